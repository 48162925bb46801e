"""Figures show what their captions say: every point visible, titles and tick labels legible, no NaN text."""

from __future__ import annotations

import math
from pathlib import Path

from conftest import overlapping, tick_label_boxes
from matplotlib.figure import Figure

from iwae import plots
from iwae.eval.snr_diagnostics import gradient_snr
from iwae.models import GaussianToy
from iwae.runs import reproduce

RESULT = {"dataset": "/home/someone/projects/experiments/2024/my_binarized_dataset_version_3.npz", "split": "test",
          "examples": 1, "k": 50, "nll": 24.07, "bounds": {"1": -30.0, "5": -26.0, "50": -24.07},
          "bounds_se": {"1": None, "5": None, "50": None}}


def test_a_one_epoch_run_draws_its_points(tmp_path: Path, saved_figures: list[Figure]) -> None:
    plots.plot_training(tmp_path / "training.png", [{"epoch": 1, "train_bound": -34.0, "test_bound": -32.5,
                                                    "lr": 1e-3}])
    for ax in saved_figures[0].axes:
        assert ax.lines and all(line.get_marker() not in (None, "None", "") for line in ax.lines)


def test_bound_vs_k_names_a_users_file_whole_and_its_nll_and_no_bars_for_one_example(
        tmp_path: Path, saved_figures: list[Figure]) -> None:
    plots.plot_bound_vs_k(tmp_path / "bound_vs_k.png", RESULT)
    (fig,) = saved_figures
    (ax,) = fig.axes
    title = ax.title.get_window_extent()
    assert fig.bbox.x0 <= title.x0 and title.x1 <= fig.bbox.x1
    assert "my_binarized_dataset_version_3.npz" in ax.get_title() and "NLL 24.07 at k=50" in ax.get_title()
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["mean over 1 examples"]


def test_ais_vs_steps_labels_its_steps_apart(tmp_path: Path, saved_figures: list[Figure]) -> None:
    sweep = [{"steps": s, "nll": 25.0 - s / 100, "nll_se": 0.1} for s in (2, 3, 4, 5, 20)]
    result = {**RESULT, "examples": 10, "sweep": sweep, "chains": 2, "start": "prior", "leapfrog": 2, "steps": 20,
              "nll": 24.8, "is_bounds": {"2": -26.0, "3": -25.8, "4": -25.6}, "is_bounds_se": {"2": 0.1, "3": 0.1,
                                                                                              "4": 0.1}}
    plots.plot_ais_vs_steps(tmp_path / "ais.png", result)
    for ax in saved_figures[0].axes:
        boxes = tick_label_boxes(ax.xaxis)
        assert len(boxes) >= 2 and not overlapping([box.padded(3) for box in boxes])


def test_snr_with_one_k_says_no_slope_was_fitted(tmp_path: Path, saved_figures: list[Figure]) -> None:
    model = GaussianToy.near_optimum(x := GaussianToy.sample_data(8, seed=0))
    result = gradient_snr(model, x, "iwae", ["dreg"], [10], draws=3)
    assert all(math.isnan(slope.slope) for slopes in result.slopes.values() for slope in slopes.values())
    plots.plot_snr(tmp_path / "snr.png", [result], "toy", ["iwae"])
    texts = [text.get_text() for text in saved_figures[0].axes[0].get_legend().get_texts()]
    assert texts == ["dreg, inference (no slope fitted)", "dreg, generative (no slope fitted)"]


def test_report_curves_draw_a_one_epoch_cell(tmp_path: Path, saved_figures: list[Figure]) -> None:
    result = reproduce.CellResult("cell", [0], [], [], None, "", 0.0, None, {0: [(1, -30.0)]}, None)
    reproduce.plot_curves(tmp_path / "curves.png", "one epoch", [result])
    (line,) = saved_figures[0].axes[0].lines
    assert line.get_marker() not in (None, "None", "")
