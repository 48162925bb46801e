"""Gradient diagnostics: the toy's exact answers, the streaming statistics against direct computation, the
scaling laws of the gradient SNR against K on the toy, and the command line."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import messages, overlapping, tick_label_boxes
from matplotlib.figure import Figure
from scipy import stats
from test_cli import one_line_error

from iwae import data, plots
from iwae.cli import main
from iwae.core import bounds
from iwae.core.objectives import Objective, loss
from iwae.eval import snr_diagnostics
from iwae.eval.snr_diagnostics import _Moments, _ScalarMoments, fit_slope, gradient_snr
from iwae.models import GaussianToy
from iwae.runs import snr_report


def test_toy_posterior_and_marginal_are_exact() -> None:
    x = GaussianToy.sample_data(8, seed=1)
    model = GaussianToy.near_optimum(x, perturbation=0.3, seed=2)
    z = torch.randn(5, 8, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # Bayes: log p(x, z) = log p(x) + log p(z | x) at any z
        exact = model.log_marginal(x) + model.exact_posterior(x).log_prob(z)
        torch.testing.assert_close(model.log_joint(x, [z]), exact)
        model = GaussianToy.near_optimum(x, seed=2)  # and near the optimum IWAE_5000 is within 0.05 nats of log p(x)
        torch.manual_seed(0)
        gap = model.log_marginal(x) - bounds.iwae(model.log_weights(x, 5000))
    assert bool((gap > -0.05).all() and (gap < 0.05).all()), gap


def test_the_toy_near_its_optimum_draws_only_from_its_seed() -> None:
    x = GaussianToy.sample_data(8, seed=1)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    GaussianToy.near_optimum(x, seed=2)
    assert torch.equal(torch.rand(3), expected)


def test_toy_optimum() -> None:
    """At the optimum q's mean is the posterior's and mu the data mean, where d log p(x) / d mu = 0."""
    x = GaussianToy.sample_data(64, seed=4)
    model = GaussianToy.near_optimum(x, perturbation=0.0)
    torch.testing.assert_close(model.encoder[0](x).mean, model.exact_posterior(x).mean)
    model.log_marginal(x).sum().backward()
    torch.testing.assert_close(model.mu.grad, torch.zeros(20, dtype=torch.float64), atol=1e-10, rtol=0)
    assert model.encoder[0](x).variance.unique().item() == pytest.approx(2 / 3)  # the paper's (2/3) I as variance


def test_streaming_moments_match_direct_computation() -> None:
    values = torch.distributions.Gamma(2.0, 1.0).sample((500, 3)).double()
    moments, scalar = _Moments(3, torch.device("cpu")), _ScalarMoments()
    for row in values:
        moments.add(row)
        scalar.add(row[0].item())
    torch.testing.assert_close(moments.mean, values.mean(0))
    torch.testing.assert_close(moments.std, values.std(0))
    col = values[:, 0].numpy()
    assert scalar.mean == pytest.approx(col.mean())
    assert math.sqrt(scalar.n) * scalar.m3 / scalar.m2**1.5 == pytest.approx(stats.skew(col))
    assert scalar.n * scalar.m4 / scalar.m2**2 == pytest.approx(stats.kurtosis(col, fisher=False))


def test_snr_standard_error_matches_its_spread() -> None:
    """The delta-method standard error of |mean| / std against the spread of 2000 replicate estimates from
    skewed draws (the standard deviation of 2000 draws is known to about 1.6 %; allow 10 %)."""
    generator = torch.Generator().manual_seed(0)
    draws = torch.distributions.Exponential(1.0).sample((2000, 50)) + 0.5 * torch.randn(2000, 50, generator=generator)
    estimates, ses = [], []
    for row in draws.double():
        scalar = _ScalarMoments()
        for value in row.tolist():
            scalar.add(value)
        snr, se = scalar.snr()
        estimates.append(snr)
        ses.append(se)
    assert np.mean(ses) == pytest.approx(np.std(estimates), rel=0.10)


def test_snr_is_the_absolute_mean_over_the_sample_std_whatever_the_sign() -> None:
    for values in ([-1.0, -2.0, -3.0], [1.0, 2.0, 3.0]):  # mean -2 (2), sample std 1: SNR 2
        scalar = _ScalarMoments()
        for value in values:
            scalar.add(value)
        snr, se = scalar.snr()
        # skew 0, kurtosis n m4 / m2^2 = 3 * 2 / 4: se = sqrt((1 + r^2 (1.5 - 1) / 4) / n) = sqrt(0.5)
        assert (snr, se) == (pytest.approx(2.0, rel=1e-12), pytest.approx(math.sqrt(0.5), rel=1e-12))


def test_snr_of_a_constant_is_not_a_number() -> None:
    scalar = _ScalarMoments()
    for _ in range(3):
        scalar.add(2.0)
    assert all(math.isnan(value) for value in scalar.snr())


def test_fit_slope_is_weighted_least_squares() -> None:
    ks, snr, se = [1, 10, 100, 1000], [2.0, 0.7, 0.2, 0.07], [0.1, 0.05, 0.02, 0.02]
    fit = fit_slope(ks, snr, se)
    weights = [s / e for s, e in zip(snr, se, strict=True)]  # np.polyfit weights multiply the residuals
    coef, cov = np.polyfit(np.log(ks), np.log(snr), 1, w=weights, cov="unscaled")
    assert fit.slope == pytest.approx(coef[0]) and fit.se == pytest.approx(math.sqrt(cov[0, 0]))
    assert fit_slope([1, 10], [1.0, 0.1], [0.01, 0.001]).slope == pytest.approx(-1.0)
    assert math.isnan(fit_slope([1, 10], [1.0, math.nan], [0.1, 0.1]).slope)


def test_gradient_snr_matches_stored_draws() -> None:
    """The streamed statistics equal those of the same draws (same seed) stored and computed directly."""
    x = GaussianToy.sample_data(4, dim=3, seed=0)
    model = GaussianToy.near_optimum(x)
    draws, k = 6, 5
    result = gradient_snr(model, x, "miwae", ["dreg"], [k], draws, m=5, seed=7)
    torch.manual_seed(7)
    grads = {"inference": [], "generative": []}
    for _ in range(2 * draws):
        model.zero_grad()
        loss(model, x, "miwae", k=k, m=5, estimator="dreg", reduction="sum").loss.backward()
        grads["inference"].append(torch.cat([p.grad.flatten() for p in model.encoder.parameters()]))
        grads["generative"].append(model.mu.grad.clone())
    for point in result.points:
        g = torch.stack(grads[point.network])
        direction = g[:draws].mean(0) / g[:draws].mean(0).norm()
        projected = g[draws:] @ direction
        assert point.snr == pytest.approx((projected.mean().abs() / projected.std()).item())
        assert point.std_norm == pytest.approx(g.var(0).sum().sqrt().item())
        expected = g.mean(0).square().sum() - g.var(0).sum() / len(g)
        assert point.mean_norm == pytest.approx(expected.clamp(min=0).sqrt().item())
        torch.testing.assert_close(point.parameter_snr, g.mean(0).abs() / g.std(0))
        assert (point.objective, point.k, point.m) == ("miwae", k, 5)


def test_the_mean_reduction_divides_each_gradient_by_the_batch_size() -> None:
    x = GaussianToy.sample_data(4, dim=3, seed=0)
    model = GaussianToy.near_optimum(x)
    summed, averaged = (gradient_snr(model, x, "iwae", ["dreg"], [3], 5, reduction=reduction, seed=1).points
                        for reduction in ("sum", "mean"))
    for total, mean in zip(summed, averaged, strict=True):
        assert mean.snr == pytest.approx(total.snr, rel=1e-9)
        assert mean.std_norm == pytest.approx(total.std_norm / 4, rel=1e-9)


def test_parameters_without_a_gradient_are_left_out_of_the_mean_parameter_snr() -> None:
    x = GaussianToy.sample_data(4, dim=3, seed=0)
    x[:, 0] = 0.0  # A[:, 0] multiplies x_0 = 0: its gradient is 0 in every draw, its SNR 0 / 0
    model = GaussianToy.near_optimum(x)
    point = next(p for p in gradient_snr(model, x, "iwae", ["dreg"], [3], 5, seed=1).points if p.network == "inference")
    assert int(point.parameter_snr.isnan().sum()) == 3
    assert point.mean_parameter_snr == pytest.approx(point.parameter_snr.nanmean().item())
    assert math.isfinite(point.mean_parameter_snr)


def toy_slopes(examples: int, ks: list[int], draws: int, estimators: list[str]) -> dict[str, dict[str, float]]:
    x = GaussianToy.sample_data(examples, seed=0).float()
    result = gradient_snr(GaussianToy.near_optimum(x, seed=0), x, "iwae", estimators, ks, draws, seed=0)
    for point in result.points:
        print(point.estimator, point.network, point.k, f"snr {point.snr:.4g} +- {point.snr_se:.2g}")
    for estimator, by_network in result.slopes.items():
        for network, slope in by_network.items():
            print(f"slope {estimator} {network}: {slope.slope:+.3f} +- {slope.se:.3f}")
    return result.slopes


@pytest.mark.slow
def test_snr_scaling_laws_on_the_toy() -> None:
    """Rainforth et al. (2018) and Tucker et al. (2018): the slope of log SNR against log K is -1/2 for the
    standard IWAE inference gradient, +1/2 for DReG's, and +1/2 for the generative network. Each is asserted
    within 0.15 of theory with the slope's standard error below 0.05, so that the tolerance is at least 3
    standard errors (the values measured are printed; see the README for them).

    Where the laws show: the standard inference SNR decays, so it is measured at small K (3..30) on 256
    examples; the generative SNR follows sqrt(K) once the bound's O(1/K) bias in the mean gradient is small
    (K >= 100), measured with 64 examples, where DReG's inference SNR is measured too. The generative
    gradient is the same for every estimator (asserted draw by draw), so its law holds for each.
    """
    slopes = toy_slopes(256, [3, 10, 30], 300, ["standard"])
    assert slopes["standard"]["inference"].se < 0.05
    assert abs(slopes["standard"]["inference"].slope + 0.5) < 0.15
    slopes = toy_slopes(64, [100, 1000], 150, ["dreg"])
    for network in ("inference", "generative"):
        assert slopes["dreg"][network].se < 0.05
        assert abs(slopes["dreg"][network].slope - 0.5) < 0.15


def test_a_diagnosis_of_several_objectives_gives_each_the_settings_it_reads() -> None:
    # iwae diagnose snr --objectives iwae,miwae,ciwae --m 2 --beta 0.3: one m and beta for all, each reads its own
    for name, m, beta in (("iwae", 1, 0.5), ("miwae", 2, 0.5), ("ciwae", 1, 0.3)):
        objective = snr_diagnostics.check_settings(name, ["dreg"], [2, 4], 10, m=2, beta=0.3)
        assert (objective.name, objective.m, objective.beta) == (name, m, beta)


def test_generative_gradient_is_the_same_for_every_estimator() -> None:
    x = GaussianToy.sample_data(16, seed=0)
    model = GaussianToy.near_optimum(x)
    for objective in snr_diagnostics.GRADIENT_OBJECTIVES:
        grads = []
        for estimator in ("standard", "stl", "dreg"):
            torch.manual_seed(0)
            model.zero_grad()
            groups = {"m": 2} if objective in ("miwae", "piwae") else {}
            loss(model, x, objective, k=10, estimator=estimator, **groups).loss.backward()
            grads.append(model.mu.grad.clone())
        torch.testing.assert_close(grads[1], grads[0])
        torch.testing.assert_close(grads[2], grads[0])


@pytest.mark.parametrize(("options", "message"), [
    (["--k", "0,10"], "--k (the grid of K) must be positive integers; got [0, 10]"),
    (["--objectives", "miwae", "--m", "3", "--k", "3,10"], "--m=3 must divide every K of --k for miwae; it does not "
                                                           "divide 10"),
    (["--draws", "1"], "--draws must be an integer of at least 2"),
    (["--estimators", "standard,reinforce"], "--estimators 'reinforce' is unknown; choose from standard, stl, dreg"),
    (["--estimators", "rws"], "--estimators 'rws' is a score-function estimator, and the diagnosis measures the "
                              "reparameterized ones; choose from standard, stl, dreg"),
    (["--k", "1,x"], "comma-separated integers"),
    (["--objectives", "elbo"], "--objectives 'elbo' is not diagnosed"),
    (["--objectives", "iwae,"], "--objectives '' is unknown; choose one of iwae, miwae, ciwae, piwae"),
    (["--objectives", "miwae", "--m", "0", "--k", "10,20"], "--m must be a positive integer number of groups for "
                                                            "miwae; got --m=0"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 2**63 - 1; got -1"),
    (["--seed", str(2**64)], "--seed must be an integer from 0 to 2**63 - 1"),
    (["--k", f"2,{10**11}"], f"diagnosing with --k {10**11} and --examples 256 needs about"),
    (["--k", "2", "--examples", str(10**11)], f"diagnosing with --k 2 and --examples {10**11} needs about"),
    (["--m", "2", "--k", "2,4"], "--m is read by miwae and piwae only, and --objectives has neither"),
    (["--device", "cuda"], "the Gaussian toy (--toy) is diagnosed on the CPU; drop --device cuda"),
    (["--objectives", "iwae,miwae", "--beta", "0.3"], "--beta is read by ciwae only, and --objectives has neither"),
])
def test_bad_input_is_one_line(options: list[str], message: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert message in one_line_error(capsys, ["diagnose", "snr", "--toy", *options, "--out", str(out)])
    assert not out.exists()


def test_the_library_takes_numpy_integers_and_refuses_a_bare_string() -> None:
    x = GaussianToy.sample_data(8, seed=0)
    model = GaussianToy.near_optimum(x, seed=0)
    result, expected = (gradient_snr(model, x, "iwae", ["dreg"], ks, 3) for ks in (np.array([2, 4]), [2, 4]))
    assert [(p.k, p.network, p.snr) for p in result.points] == [(p.k, p.network, p.snr) for p in expected.points]
    assert all(type(p.k) is int for p in result.points)
    with pytest.raises(ValueError, match=re.escape("estimators must be a list of names; got the string 'dreg'")):
        gradient_snr(model, x, "iwae", "dreg", [2, 4], 3)
    with pytest.raises(ValueError, match=re.escape("x is a numpy.ndarray, not a torch.Tensor")):
        gradient_snr(model, x.numpy(), "iwae", ["dreg"], [2, 4], 3)
    for unread in ({"beta": 0.3}, {"m": 2}, {"m": 1}):  # as loss refuses them, at their default values too
        with pytest.raises(ValueError, match=f"{next(iter(unread))} applies only to objective"):
            gradient_snr(model, x, "iwae", ["dreg"], [2, 4], 3, **unread)
    with pytest.raises(ValueError, match=re.escape("beta given with an Objective, which carries its own")):
        gradient_snr(model, x, Objective("ciwae", 4, beta=0.2), ["dreg"], [2, 4], 3, beta=0.9)
    with pytest.raises(ValueError, match=re.escape("ks (the grid of K) must be positive integers; got [0, 2]")):
        gradient_snr(model, x, "iwae", ["dreg"], [0, 2], 3)
    with pytest.raises(ValueError, match=re.escape("m=2 must divide every K of ks for miwae; it does not divide 3")):
        gradient_snr(model, x, "miwae", ["dreg"], [2, 3], 3, m=2)


def test_an_output_directory_that_cannot_be_written_is_refused_before_the_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    for out in (blocker, blocker / "out"):
        line = one_line_error(capsys, ["diagnose", "snr", "--toy", "--k", "1", "--out", str(out)])
        assert line == (f"iwae: error: cannot write into {out}: {blocker} is a file, not a directory; choose an "
                        "--out that is a directory or does not exist yet")
        assert capsys.readouterr().out == ""  # refused before any gradient was drawn
    assert blocker.read_text() == "a file, not a directory"


def test_vimco_is_refused_as_not_diagnosed_whatever_the_k(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "iwae.cli", "diagnose", "snr", "--toy", "--estimators", "vimco",
                           "--k", "3", "--out", str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert messages(done.stderr) == [("iwae: error: --estimators 'vimco' is a score-function estimator, and the "
                                      "diagnosis measures the reparameterized ones; choose from standard, stl, dreg")]
    assert not out.exists()


def test_needs_a_run_or_the_toy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "--toy" in one_line_error(capsys, ["diagnose", "snr", "--out", str(tmp_path / "out")])


@pytest.mark.slow
def test_diagnose_a_trained_run(tiny_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, out = tmp_path / "run", tmp_path / "snr"
    assert main(["train", "--dataset", tiny_dataset, "--epochs", "1", "--batch-size", "8", "--k", "4",
                 "--eval-k", "10", "--monitor-examples", "8", "--device", "cpu", "--out", str(run)]) == 0
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["ess_per_k"] == pytest.approx(evaluation["ess"] / 10)
    assert "ESS/k" in capsys.readouterr().out
    assert main(["diagnose", "snr", str(run), "--objectives", "iwae,piwae", "--m", "2", "--k", "2,4",
                 "--draws", "3", "--device", "cpu", "--out", str(out)]) == 0
    assert "slope of log SNR" in capsys.readouterr().out
    with (out / "snr.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == list(snr_diagnostics.CSV_COLUMNS)
    assert len(rows) == 2 * 3 * 2 * 2  # objectives x estimators x networks x K
    assert {row["m"] for row in rows if row["objective"] == "piwae"} == {"2"}
    slopes = json.loads((out / "slopes.json").read_text())
    assert set(slopes) == {"iwae", "piwae"} and set(slopes["iwae"]["stl"]) == {"inference", "generative"}
    assert (out / "snr.png").stat().st_size > 0
    examples = len(data.load(tiny_dataset).train)
    line = one_line_error(capsys, ["diagnose", "snr", str(run), "--examples", str(examples + 1), "--k", "2",
                                   "--draws", "3", "--device", "cpu", "--out", str(tmp_path / "more")])
    assert f"--examples {examples + 1} is more than the {examples} training examples" in line


def test_the_slope_files_hold_the_slopes_and_their_standard_errors(tmp_path: Path) -> None:
    model = GaussianToy.near_optimum(x := GaussianToy.sample_data(8, seed=0))
    results = [gradient_snr(model, x, "iwae", ks=[1, 10, 100], draws=3)]
    snr_report.write_results(results, tmp_path, "toy", {})
    slopes, ses = snr_diagnostics.slopes_json(results)
    assert json.loads((tmp_path / "slopes.json").read_text()) == slopes
    assert json.loads((tmp_path / "slopes_se.json").read_text()) == ses
    assert slopes != ses


def test_snr_legends_sit_outside_the_data(tmp_path: Path, saved_figures: list[Figure]) -> None:
    model = GaussianToy.near_optimum(x := GaussianToy.sample_data(8, seed=0))
    results = [gradient_snr(model, x, objective, ks=[1, 10], draws=3) for objective in ("iwae", "ciwae")]
    plots.plot_snr(tmp_path / "snr.png", results, "toy", ["iwae", "ciwae"])
    (fig,) = saved_figures
    boxes = []
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent()
        assert not legend.overlaps(ax.get_window_extent())
        boxes += [legend, ax.get_tightbbox()]
    assert all(fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1) for box in boxes)


@pytest.mark.parametrize("ks", [[3, 10, 30], [2, 3, 4], [1, 10, 100, 1000]])
def test_snr_tick_labels_name_the_k_grid_apart(ks: list[int], tmp_path: Path, saved_figures: list[Figure]) -> None:
    model = GaussianToy.near_optimum(x := GaussianToy.sample_data(8, seed=0))
    plots.plot_snr(tmp_path / "snr.png", [gradient_snr(model, x, "iwae", ["dreg"], ks, draws=3)], "toy", ["iwae"])
    (ax,) = saved_figures[0].axes
    boxes = tick_label_boxes(ax.xaxis)
    assert len(boxes) >= 2 and not overlapping([box.padded(3) for box in boxes])  # a gap between labels


def test_a_grid_of_m(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--m takes a grid: one result per M for miwae and piwae (named objective-mM), one for the others."""
    out = tmp_path / "snr"
    assert main(["diagnose", "snr", "--toy", "--examples", "8", "--objectives", "iwae,miwae", "--m", "1,2",
                 "--estimators", "dreg", "--k", "2,4", "--draws", "3", "--out", str(out)]) == 0
    assert "miwae-m2" in capsys.readouterr().out
    with (out / "snr.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 3 * 2 * 2  # (iwae, miwae m=1, miwae m=2) x networks x K
    assert {row["m"] for row in rows if row["objective"] == "miwae"} == {"1", "2"}
    assert set(json.loads((out / "slopes.json").read_text())) == {"iwae", "miwae-m1", "miwae-m2"}
    assert json.loads((out / "settings.json").read_text()) == {
        "title": "Gaussian toy", "run": None, "examples": 8, "seed": 0, "draws": 3, "objectives": ["iwae", "miwae"],
        "estimators": ["dreg"], "k": [2, 4], "m": [1, 2], "beta": None}
    assert main(["diagnose", "snr", "--toy", "--examples", "8", "--objectives", "ciwae", "--beta", "0.3",
                 "--estimators", "dreg", "--k", "2", "--draws", "3", "--seed", "5", "--out", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["beta"], settings["m"], settings["seed"], settings["k"]) == (0.3, None, 5, [2])
    with pytest.raises(ValueError, match="must divide"):
        snr_diagnostics.check_settings("piwae", ["dreg"], [4, 6], 3, m=4)


def test_one_k_is_measured_and_said_to_fit_no_slope(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "snr"
    assert main(["diagnose", "snr", "--toy", "--examples", "8", "--estimators", "dreg", "--k", "4", "--draws", "3",
                 "--out", str(out)]) == 0
    assert "iwae: one K in --k: the SNR at it is measured, and no slope against K fitted" in capsys.readouterr().err
    with (out / "snr.csv").open() as file:
        assert {row["k"] for row in csv.DictReader(file)} == {"4"}


def test_a_setting_given_twice_is_measured_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "snr"
    assert main(["diagnose", "snr", "--toy", "--examples", "8", "--objectives", "iwae,miwae,iwae", "--m", "2,2",
                 "--estimators", "dreg,dreg", "--k", "2,4,2", "--draws", "3", "--out", str(out)]) == 0
    with (out / "snr.csv").open() as file:
        rows = [(row["objective"], row["m"], row["estimator"], row["network"], row["k"])
                for row in csv.DictReader(file)]
    assert len(rows) == len(set(rows)) == 2 * 2 * 2  # (iwae, miwae m=2) x networks x K
    assert set(json.loads((out / "slopes.json").read_text())) == {"iwae", "miwae"}


@pytest.mark.slow
def test_a_diagnosis_stopped_by_sigterm_says_so(tmp_path: Path) -> None:
    log = tmp_path / "stderr"
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "iwae.cli", "diagnose", "snr", "--toy", "--k", "10,100,1000",
                                    "--draws", "500", "--no-time-limit", "--out", str(tmp_path / "out")],
                                   stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while "estimated time" not in log.read_text() and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 128 + signal.SIGTERM
    assert messages(log.read_text())[-1] == ("iwae: the diagnosis (nothing kept) stopped by SIGTERM; run it again "
                                             "with: the same command")
