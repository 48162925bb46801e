"""The command line: a working train / evaluate / sample round, and one-line errors for bad input that
leave existing runs untouched."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import flip_a_bit_inside, messages
from matplotlib.figure import Figure
from PIL import Image

from iwae import cli, plots
from iwae.cli import main
from iwae.runs import checkpoint, evaluation, rundir, runlock
from iwae.runs import figures as run_figures

TINY = ["--epochs", "1", "--batch-size", "8", "--k", "4", "--monitor-examples", "8", "--device", "cpu"]


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the command, check it failed with exit status 2 and exactly one line on stderr; return the line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = messages(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("iwae: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tiny_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--dataset", tiny_dataset, *TINY, "--eval-k", "10", "--out", str(run)]) == 0
    return run


def test_train_evaluate_and_sample(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert json.loads((finished_run / rundir.EVAL).read_text())["k"] == 10
    assert main(["evaluate", str(finished_run), "--k", "20", "--split", "train", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "NLL (k=20)" in out
    assert re.search(r"^active units +\d+ of 50 units \(variance of the posterior mean", out, re.M)
    result = json.loads((finished_run / "eval-train-k20.json").read_text())
    assert result["k"] == 20 and result["split"] == "train" and set(result["bounds"]) == {"1", "5", "20"}
    assert main(["sample", str(finished_run), "--n", "16", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.split()) == 4


def test_an_evaluation_file_edited_by_hand_is_named_not_a_key_error(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    result = json.loads((run / rundir.EVAL).read_text())
    del result["bounds_se"], result["ess"]
    (run / rundir.EVAL).write_text(json.dumps(result))
    for argv in (["sample", str(run), "--n", "4", "--device", "cpu"], ["train", "--resume", str(run)]):
        assert main(argv) == 2
        line = messages(capsys.readouterr().err)[-1]
        assert f"{run / rundir.EVAL} is not an evaluation written by iwae (it lacks bounds_se, ess)" in line
        assert line.endswith(f"evaluate the run again with iwae evaluate {run}")


@pytest.mark.parametrize(("other", "this"), [
    (["--model", "sbn-4-2", "--estimator", "vimco"], "the sigmoid belief net sbn-4-2"),
    (["--layers", "2"], "the paper's with 2 stochastic layers"),
])
def test_init_from_a_run_of_another_architecture_names_both(other: list[str], this: str, finished_run: Path,
                                                           tiny_dataset: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(capsys, ["train", "--dataset", tiny_dataset, *TINY, *other, "--init-from",
                                   str(finished_run), "--out", str(tmp_path / "run")])
    assert f"cannot start from {finished_run}: its model is the paper's with 1 stochastic layer for data of " \
           f"dimension 16, this run's {this} for 16" in line
    assert not (tmp_path / "run").exists()


def test_init_from_a_run_on_data_of_another_width_names_both_dimensions(
        finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same architecture is not enough: a run trained on 16 values per example cannot start one on 9."""
    narrow = tmp_path / "narrow.npz"
    rng = np.random.default_rng(4)
    np.savez(narrow, train=rng.random((40, 9), dtype=np.float32), test=rng.random((8, 9), dtype=np.float32))
    line = one_line_error(capsys, ["train", "--dataset", str(narrow), *TINY, "--init-from", str(finished_run),
                                   "--out", str(tmp_path / "run")])
    assert line == (f"iwae: error: cannot start from {finished_run}: its model is the paper's with 1 stochastic layer "
                    "for data of dimension 16, this run's the paper's with 1 stochastic layer for 9; give --init-from "
                    "a run of the same architecture and data")
    assert not (tmp_path / "run").exists()


def test_fewer_images_than_columns_leave_no_empty_tiles() -> None:
    grid = plots.image_grid(torch.ones(7, 16), (4, 4), columns=10)
    assert grid.shape == (1 + 4 + 1, 1 + 7 * (4 + 1))
    assert plots.image_grid(torch.ones(17, 16), (4, 4), columns=10).shape == (1 + 2 * 5, 1 + 10 * 5)


def test_samples_keep_their_aspect_and_a_small_grid_stays_legible(
    finished_run: Path, saved_figures: list[Figure], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sample", str(finished_run), "--n", "20", "--device", "cpu"]) == 0  # 4x4 images, 10 a row
    samples = finished_run / rundir.FIGURES / "samples.png"
    assert capsys.readouterr().out.split()[0] == str(samples)
    for fig in saved_figures[:2]:  # samples, reconstructions
        for ax in fig.axes:
            (image,) = ax.get_images()
            rows, cols = image.get_array().shape
            box = ax.get_window_extent()
            assert ax.get_aspect() == 1.0
            assert box.height / box.width == pytest.approx(rows / cols, rel=0.02)  # square pixels
            assert box.width / cols * 120 / fig.dpi >= 2.4  # PNG pixels per image pixel, at the 120 dpi saved
    with Image.open(samples) as png:
        assert png.size[0] / png.size[1] == pytest.approx(
            saved_figures[0].get_figwidth() / saved_figures[0].get_figheight(), rel=0.01)


@pytest.mark.parametrize("width", [1, 10, 64])
def test_image_titles_fit_inside_their_figure(width: int, tmp_path: Path, saved_figures: list[Figure]) -> None:
    grid = np.zeros((300, width))  # a strip of data that is not square images, down to one value wide
    plots.plot_images(tmp_path / "grids.png", {"samples (Bernoulli means)": grid, "reconstruction": grid})
    (fig,) = saved_figures
    bounds = fig.bbox
    for ax in fig.axes:
        title = ax.title.get_window_extent()
        assert bounds.x0 <= title.x0 and title.x1 <= bounds.x1 and bounds.y0 <= title.y0 and title.y1 <= bounds.y1
        assert title.y0 >= ax.get_window_extent().y1  # above its grid


def test_bound_vs_k_labels_its_error_bars(finished_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig) or path)
    plots.plot_bound_vs_k(finished_run / "unused.png", json.loads((finished_run / rundir.EVAL).read_text()))
    (legend,) = [ax.get_legend() for ax in saved[0].axes]
    assert [text.get_text() for text in legend.get_texts()] == ["mean over 16 examples\nerror bars: ±1 standard error"]


@pytest.mark.slow
def test_figures_of_data_that_are_not_square_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vectors = tmp_path / "vectors.npy"
    np.save(vectors, np.random.default_rng(3).random((40, 10)))  # D = 10: drawn as rows of 10 values
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(vectors), *TINY, "--eval-k", "0", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--device", "cpu"]) == 0
    assert [Path(line).name for line in capsys.readouterr().out.split()] == [
        "samples.png", "reconstructions.png", "training.png"
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--dataset", "nope"], "Dataset 'nope' is unknown; choose one of"),
        (["--objective", "nope"], "unknown --objective 'nope'; choose one of elbo, iwae"),
        (["--estimator", "nope"], "unknown --estimator 'nope'; choose one of standard, stl, dreg"),
        (["--k", "0"], "--k must be a positive integer number of samples; got --k=0"),
        (["--objective", "miwae", "--k", "10", "--m", "3"], "--m must be a positive integer dividing --k"),
        (["--m", "8"], "--m applies to --objective miwae or piwae only, not iwae; drop --m, or choose --objective "
                       "miwae"),
        (["--objective", "vr", "--beta", "0.3"], "--beta applies to --objective ciwae only, not vr"),
        (["--objective", "ciwae", "--alpha", "0"], "--alpha applies to --objective vr only, not ciwae"),
        (["--model", "sbn-4-2", "--estimator", "vimco", "--layers", "1"],
         "--layers applies to --model burda only, not sbn-4-2, whose layers are the widths in its name; drop --layers"),
        (["--schedule", "burda"], "--epochs and --lr do not apply to --schedule burda"),
        (["--k", "many"], "argument --k: invalid int value: 'many'; see iwae train --help"),
        (["--bogus", "1"], "unrecognized arguments: --bogus 1; see iwae train --help"),
        (["--batch-size", "65"], "--batch-size 65 exceeds the 64 training examples of "),
        (["--objective", "miwae", "--k", "4", "--groups", "3"], "--groups must be a positive integer dividing --k"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--data-dir", "."], "reads none there; drop --data-dir"),  # a user's file
        (["--schedule-scale", "0.01"], "--schedule-scale scales --schedule burda's stages only; with --schedule "
                                       "constant give the length with --epochs"),
        (["--data-dir", "/nonexistent/typo"], "--data-dir /nonexistent/typo is not a directory; give the folder"),
        (["--objective", "elbo", "--estimator", "vimco"], "--estimator vimco is defined for --objective iwae only; "
                                                          "give --objective iwae (got elbo)"),
        (["--model", "sbn-4", "--estimator", "dreg"], "--estimator dreg needs a reparameterizable q (rsample), and "
                                                      "this model's q has discrete latents; use --estimator vimco"),
        (["--model", "sbn-4", "--estimator", "vimco", "--k", "1"], "vimco needs --k >= 2 samples for its "
                                                                   "leave-one-out baseline; got --k=1"),
        (["--schedule-scale", "1"], "--schedule-scale scales --schedule burda's stages only"),  # its default too
    ],
)
def test_bad_training_options(
    options: list[str], message: str, tiny_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    line = one_line_error(capsys, ["train", "--dataset", tiny_dataset, *TINY, *options, "--out", str(run)])
    assert message in line
    assert not run.exists()


def test_out_or_resume_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert one_line_error(capsys, ["train", *TINY]) == (
        "iwae: error: give --out DIR to start a new run, or --resume DIR to continue one"
    )
    line = one_line_error(capsys, ["train", *TINY, "--out", "a", "--resume", "b"])
    assert "give --out DIR or --resume DIR, not both" in line
    for command in (["train", "--resume", ""], ["evaluate", ""], ["sample", ""]):  # not this directory, unsaid
        assert "an empty path; give a directory (. for this one)" in one_line_error(capsys, command)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--seed", "-1"], "--seed must be an integer from 0 to 2**63 - 1; got -1"),
        (["--seed", "99999999999999999999999"], "--seed must be an integer from 0 to 2**63 - 1"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0 seconds"),
        (["--schedule", "burda", "--epochs", "5", "--schedule-scale", "0.01"],
         "--epochs and --lr do not apply to --schedule burda, which fixes both; shorten it with --schedule-scale"),
        (["--eval-k", "-1"], "--eval-k must be an integer >= 0"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["--monitor-examples", "0"], "--monitor-examples must be an integer >= 1"),
        (["--lr", "inf"], "--lr must be a finite number > 0"),
        (["--adam-eps", "0"], "--adam-eps must be a finite number > 0"),
        (["--beta2", "1"], "--beta2 must lie in [0, 1)"),
        (["--objective", "ciwae", "--beta", "2"], "--beta must lie in [0, 1] for ciwae"),
        (["--data-split", "nope"], "unknown --data-split 'nope'"),
        (["--matmul", "fast"], "unknown --matmul 'fast'; choose default or onednn"),
        (["--layers", "3"], "--layers must be 1 or 2"),
    ],
)
def test_every_training_option_is_checked_before_anything_is_written_and_named_as_typed(
    options: list[str], message: str, tiny_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert message in one_line_error(capsys, ["train", "--dataset", tiny_dataset, *TINY, *options, "--out", str(run)])
    assert not run.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--seed", "-1"], "--seed must be an integer from 0 to 2**63 - 1; got -1"),
        (["--seed", "99999999999999999999999"], "--seed must be an integer from 0 to 2**63 - 1"),
        (["--k", "0"], "--k must be an integer >= 1; got 0"),
        (["--examples", "0"], "--examples must be an integer >= 1; got 0"),
        (["--chunk-size", "0"], "--chunk-size must be an integer >= 1"),
        (["--batch-size", "-2"], "--batch-size must be an integer >= 1"),
        (["--split", "nope"], "unknown --split 'nope'; choose one of test, train, valid"),
        (["--split", "valid"], "--split 'valid' is not available"),
    ],
)
def test_evaluation_options_are_named_as_typed_and_nothing_is_written(
    options: list[str], message: str, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(path.name for path in finished_run.iterdir())
    assert message in one_line_error(capsys, ["evaluate", str(finished_run), *options, "--device", "cpu"])
    assert sorted(path.name for path in finished_run.iterdir()) == before


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--n", "1"], "--n must be an integer >= 2; got 1"), (["--seed", "-5"], "--seed must be an integer from 0")],
)
def test_sample_options_are_named_as_typed(options: list[str], message: str, finished_run: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert message in one_line_error(capsys, ["sample", str(finished_run), *options, "--device", "cpu"])


def test_unwritable_output_directory(tiny_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    for out in (blocker, blocker / "run"):
        line = one_line_error(capsys, ["train", "--dataset", tiny_dataset, *TINY, "--out", str(out)])
        assert f"cannot write into {out}: {blocker} is a file, not a directory" in line
        assert "choose an --out that is a directory or does not exist yet" in line


def test_evaluate_refuses_the_ais_options_for_importance_sampling(finished_run: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(capsys, ["evaluate", str(finished_run), "--k", "4", "--ais-steps", "5", "--start", "encoder"])
    assert line.endswith("--ais-steps, --start apply to --method ais or bdmc, not to importance sampling; drop them, "
                         "or choose --method ais or bdmc")
    line = one_line_error(capsys, ["evaluate", str(finished_run), "--k", "4", "--chains", "2"])
    assert line.endswith("--chains applies to --method ais or bdmc, not to importance sampling; drop it, or choose "
                         "--method ais or bdmc")


def test_an_existing_run_is_never_overwritten(finished_run: Path, tiny_dataset: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    before = {path.name: path.read_bytes() for path in finished_run.iterdir() if path.is_file()}
    line = one_line_error(capsys, ["train", "--dataset", tiny_dataset, *TINY, "--out", str(finished_run)])
    assert f"continue that run with: iwae train --resume {finished_run}" in line
    line = one_line_error(capsys, ["train", "--resume", str(finished_run), "--k", "8", "--objective", "elbo"])
    assert "different configuration: --k (run: 4, given: 8), --objective (run: 'iwae', given: 'elbo')" in line
    assert {path.name: path.read_bytes() for path in finished_run.iterdir() if path.is_file()} == before


@pytest.mark.parametrize("command", [["train", "--resume"], ["evaluate"], ["sample"]])
def test_missing_checkpoint(command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(capsys, [*command, str(tmp_path / "nowhere")])
    assert f"no checkpoint in {tmp_path / 'nowhere'} (the directory does not exist)" in line


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("command", [["train", "--resume"], ["evaluate"]])
def test_corrupt_checkpoint(damage: str, command: list[str], finished_run: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    saved = (finished_run / rundir.CHECKPOINT).read_bytes()
    (run / rundir.CHECKPOINT).write_bytes(b"not a checkpoint" if damage == "garbage" else saved[: len(saved) // 2])
    line = one_line_error(capsys, [*command, str(run)])
    assert f"{run / rundir.CHECKPOINT} is corrupt or not a checkpoint: its " in line
    assert "are not a complete PyTorch archive (the file was cut short, or is some other file)" in line
    assert line.endswith("restore it from a copy, or start a new run with a new --out")
    assert "weights_only" not in line.lower() and "weights only" not in line.lower()


@pytest.mark.parametrize("command", [["train", "--resume"], ["evaluate"], ["sample"]])
def test_a_checkpoint_with_a_flipped_bit_is_refused(command: list[str], finished_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / rundir.CHECKPOINT
    record = flip_a_bit_inside(path)
    line = one_line_error(capsys, [*command, str(run)])
    assert line == (f"iwae: error: {path} is a damaged checkpoint: its record {record} no longer matches the "
                    "checksum written with it (bits changed on the disk or in a copy); restore it from a copy, or "
                    "start a new run with a new --out")


@pytest.mark.parametrize("text", ["[1, 2]", '"x"', '{"k": 5}'])
@pytest.mark.parametrize("command", [["train", "--resume"], ["evaluate"], ["sample"]])
def test_a_configuration_that_is_json_but_not_a_runs_settings_is_named(text: str, command: list[str],
                                                                       finished_run: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / rundir.CONFIG).write_text(text)
    assert main([*command, str(run)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err  # a resume first says the checkpoint's run finished
    assert messages(err)[-1] == (f"iwae: error: {run / rundir.CONFIG} is not a run's settings (a JSON object with "
                                 "its epochs and the rest); restore it or re-create it")


@pytest.mark.parametrize("command", [["evaluate"], ["sample"], ["diagnose", "snr"], ["train", "--init-from"]])
def test_a_stacked_run_points_to_its_seeds(command: list[str], tiny_dataset: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    stack = tmp_path / "stack"
    (stack / "seed-3").mkdir(parents=True)  # what iwae train --seeds 2 --seed 3 writes, but for the seeds' files
    (stack / "seed-4").mkdir()
    rundir.write_json(stack / rundir.STACK, {"seeds": [3, 4], "epoch": 1, "step": 0})
    rest = ["--dataset", tiny_dataset, *TINY, "--out", str(tmp_path / "new")] if command[0] == "train" else [
        "--out", str(tmp_path / "new")] if command[0] == "diagnose" else []
    line = one_line_error(capsys, [*command, str(stack), *rest])
    assert line == (f"iwae: error: {stack} holds a stacked run, whose seeds are run directories of their own; give "
                    f"one of them, e.g. {stack / 'seed-3'}")
    assert not (tmp_path / "new").exists()


def test_a_file_given_as_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "file"
    file.write_text("not a run")
    assert f"no checkpoint in {file} (it is a file, not a directory)" in one_line_error(capsys, ["sample", str(file)])


def test_seeds_do_not_apply_to_resuming_a_lone_run(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {path.name: path.read_bytes() for path in finished_run.iterdir() if path.is_file()}
    line = one_line_error(capsys, ["train", "--resume", str(finished_run), "--seeds", "2"])
    assert line == (f"iwae: error: --seeds starts a new stacked run; to continue the run in {finished_run}, drop "
                    f"--seeds: iwae train --resume {finished_run}")
    assert {path.name: path.read_bytes() for path in finished_run.iterdir() if path.is_file()} == before


def test_damaged_lines_of_the_metrics_are_skipped(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    whole = rundir.read_metrics(run)
    with (run / rundir.METRICS).open("a") as file:
        file.write('null\n{"epoch": 2}\n[1, 2]\n{"epoch": 2, "lr": 0.1, "train')  # damage, then a cut last line
    assert rundir.read_metrics(run) == whole
    assert main(["sample", str(run), "--n", "4", "--device", "cpu"]) == 0
    rundir.truncate_metrics(run, 1)
    assert rundir.read_metrics(run) == whole


def test_an_npz_of_test_data_only_is_not_trained_on(tmp_path: Path) -> None:
    path = tmp_path / "test-only.npz"
    np.savez(path, test=np.zeros((20, 16), dtype=np.float32))
    done = subprocess.run([sys.executable, "-m", "iwae.cli", "train", "--dataset", str(path), *TINY, "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert messages(done.stderr) == [(f"iwae: error: {path} holds only 'test', no 'train' array to train on; save the "
                                     "training data beside it, e.g. numpy.savez(path, train=x_train, test=x_test).")]
    assert not (tmp_path / "run").exists()


def test_reproduce_refuses_an_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    line = one_line_error(capsys, ["reproduce", "burda-table1", "--budget", "0.001", "--out", str(blocker)])
    assert line.endswith(f"{blocker} is a file, not a directory; choose an --out that is a directory or does not "
                         "exist yet")
    assert blocker.read_text() == "a file, not a directory"


def test_a_pytorch_file_that_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    torch.save(torch.nn.Linear(2, 2), run / rundir.CHECKPOINT)  # a pickled module, not plain values
    line = one_line_error(capsys, ["evaluate", str(run)])
    assert "a PyTorch archive, but a damaged one or one holding objects other than tensors and plain values" in line
    assert "weights_only" not in line.lower() and "weights only" not in line.lower()


@pytest.mark.slow
def test_an_evaluation_never_replaces_one_made_with_other_settings(
    finished_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    own = finished_run / rundir.EVAL  # written by training's final evaluation, k=10
    before = own.read_bytes()
    assert main(["evaluate", str(finished_run), "--k", "3", "--examples", "5", "--device", "cpu"]) == 0
    assert own.read_bytes() == before
    quick = finished_run / "eval-test-k3-n5.json"
    assert f"written to {quick}" in capsys.readouterr().out
    assert json.loads(quick.read_text())["k"] == 3 and json.loads(quick.read_text())["examples"] == 5

    drawn: list[int] = []
    plot = plots.plot_bound_vs_k
    monkeypatch.setattr(plots, "plot_bound_vs_k", lambda path, res: drawn.append(res["k"]) or plot(path, res))
    assert main(["sample", str(finished_run), "--n", "4", "--device", "cpu"]) == 0
    assert drawn == [10]  # bound_vs_k.png shows the run's own evaluation, not the quick one

    assert main(["evaluate", str(finished_run), "--k", "10", "--device", "cpu", "--batch-size", "7"]) == 0
    assert json.loads(own.read_text())["k"] == 10 and f"written to {own}" in capsys.readouterr().out  # its own setting
    assert drawn == [10, 10]  # and its figure drawn again with it


@pytest.mark.slow
@pytest.mark.parametrize("examples", ["1000", "16"])
def test_an_evaluation_of_as_many_examples_as_the_split_holds_or_more_is_named_for_all(
    examples: str, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", str(finished_run), "--k", "3", "--examples", examples, "--device", "cpu"]) == 0
    every = finished_run / "eval-test-k3.json"  # the tiny dataset's 16 test examples, not "n1000" or "n16"
    assert f"written to {every}" in capsys.readouterr().out
    assert json.loads(every.read_text())["examples"] == 16
    assert not list(finished_run.glob(f"eval-*n{examples}*"))


def test_each_evaluation_setting_has_its_own_file(finished_run: Path) -> None:
    name = lambda *args, **kwargs: evaluation.eval_path(finished_run, *args, **kwargs).name  # noqa: E731
    assert name() == name("test", None, k=10) == "eval.json"  # the run's own k: its training's --eval-k 10
    assert name(k=5000) == "eval-test-k5000.json"
    assert name("train") == "eval-train-k10.json"
    mine = name("test", "some/where/my.npz", k=7)
    assert re.fullmatch(r"eval-my-[0-9a-f]{8}-test-k7\.json", mine)
    # one stem in two folders, and a file named like a catalogue dataset: files of their own
    assert mine != name("test", "else/where/my.npz", k=7)
    assert name("test", "mnist", k=7) == "eval-mnist-test-k7.json" != name("test", "x/mnist.npz", k=7)
    assert name(k=10, examples=50) == "eval-test-k10-n50.json"
    assert name(k=10, seed=3) == "eval-test-k10-seed3.json"
    settings = [dict(k=k, examples=n, seed=seed) for k in (10, 11) for n in (None, 5) for seed in (0, 1)]
    names = {name(split, data, **kw) for split in ("test", "train") for data in (None, "x.npy") for kw in settings}
    assert len(names) == 2 * 2 * len(settings)


@pytest.mark.slow
@pytest.mark.parametrize(("seeds", "what", "smaller"), [
    ([], "training with", "--k or --batch-size"),
    (["--seeds", "2"], "training --seeds 2 with", "--k or --batch-size or --seeds"),  # each seed: a lone run's
])
def test_a_run_too_large_for_memory_is_refused_at_once_with_nothing_written(
    seeds: list[str], what: str, smaller: str, tiny_dataset: str, tmp_path: Path,
) -> None:
    """--k 2000000: a training step would need hundreds of GB. Run as a real process capped at 4 GB of address
    space, so that a command that tried to allocate fails quickly instead of exhausting the machine."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "iwae.cli", "train", "--dataset", tiny_dataset, "--k", "2000000", "--epochs", "1",
               *seeds, "--device", "cpu", "--out", str(run)]
    cap = 4 * 2**30
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
    assert time.perf_counter() - start < 60
    assert done.returncode == 2, done.stderr
    (line,) = messages(done.stderr)
    expected = (rf"iwae: error: {what} --k 2000000 and --batch-size 20 needs about [\d.]+ [GT]B of memory, "
                rf"but [\d.]+ [KMGT]?B is available on cpu; use a smaller {smaller}")
    assert re.fullmatch(expected, line), line
    assert not run.exists()


@pytest.mark.parametrize("seeds", [[], ["--seeds", "3"]])
def test_a_model_too_large_for_memory_is_refused_for_its_size(seeds: list[str], tiny_dataset: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(capsys, ["train", "--dataset", tiny_dataset, "--model", "sbn-99999999999", "--estimator",
                                   "vimco", "--k", "2", "--batch-size", "1", "--epochs", "1", *seeds, "--device", "cpu",
                                   "--out", str(tmp_path / "run")])
    stack = "--seeds 3 of " if seeds else ""
    assert line.startswith(f"iwae: error: training {stack}--model sbn-99999999999 (its parameters, their gradients "
                           "and Adam's moments alone) needs about")
    assert line.endswith("use a smaller --model" + (" or --seeds" if seeds else ""))
    assert not (tmp_path / "run").exists()


def test_evaluation_and_sampling_too_large_for_memory_are_refused(finished_run: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(path.name for path in finished_run.rglob("*"))
    line = one_line_error(capsys, ["evaluate", str(finished_run), "--k", "10000000", "--chunk-size", "10000000",
                                   "--batch-size", "100000", "--device", "cpu"])
    assert "evaluating with --chunk-size 10000000 and --batch-size 100000 needs about" in line
    assert line.endswith("use a smaller --chunk-size or --batch-size")
    line = one_line_error(capsys, ["sample", str(finished_run), "--n", "10000000000", "--device", "cpu"])
    assert "drawing --n 10000000000 samples needs about" in line and line.endswith("use a smaller --n")
    assert sorted(path.name for path in finished_run.rglob("*")) == before


def test_evaluate_on_the_users_own_data(finished_run: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    own = tmp_path / "own.npy"
    np.save(own, np.random.default_rng(2).random((10, 16)) < 0.5)
    assert main(["evaluate", str(finished_run), "--dataset", str(own), "--k", "5", "--device", "cpu"]) == 0
    result = json.loads(evaluation.eval_path(finished_run, "test", str(own), k=5).read_text())
    assert result["dataset"] == str(own) and result["examples"] == 1  # .npy without a test split: 10% held out
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((10, 9)))
    line = one_line_error(capsys, ["evaluate", str(finished_run), "--dataset", str(wrong), "--device", "cpu"])
    assert "has 9 values per example but the model" in line and "was trained on 16" in line


def test_unavailable_split(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(capsys, ["evaluate", str(finished_run), "--split", "valid", "--k", "2"])
    assert "split 'valid' is not available" in line


@pytest.mark.slow
def test_errors_reach_a_real_terminal_as_one_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "iwae.cli", "train", "--objective", "nope", "--epochs", "1", "--out", "run"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "iwae: error: unknown --objective 'nope'; choose one of elbo, iwae, miwae, ciwae, piwae, vr"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["missing model", "missing rng", "misshapen weight", "misshapen moment",
                                    "NaN weight", "epoch -3", "epoch 99", "step 2.5"])
@pytest.mark.parametrize("command", [["train", "--resume"], ["evaluate"], ["sample"]])
def test_a_checkpoint_damaged_inside_is_named_as_such(damage: str, command: list[str], finished_run: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = torch.load(run / rundir.CHECKPOINT, weights_only=True)
    if damage.startswith("missing"):
        del state[damage.split()[1]]
    elif damage == "misshapen weight":
        name = next(iter(state["model"]))
        state["model"][name] = state["model"][name][:, :3]
    elif damage == "NaN weight":
        state["model"][next(iter(state["model"]))][0, 1] = math.nan
    elif damage.startswith(("epoch", "step")):
        name, value = damage.split()
        state[name] = float(value) if "." in value else int(value)
    else:
        state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    torch.save(state, run / rundir.CHECKPOINT)
    line = one_line_error(capsys, [*command, str(run)])
    assert f"{run / rundir.CHECKPOINT} is a damaged checkpoint: " in line
    assert line.endswith("restore it from a copy, or start a new run with a new --out")
    named = {"NaN weight": "its parameters hold NaN or infinite values (", "epoch -3": "its epoch -3 is not a position",
             "epoch 99": "its epoch 99 is not a position", "step 2.5": "its step 2.5 is not a position"}
    assert named.get(damage, "") in line


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_a_checkpoint_with_infinite_parameters_is_refused_for_evaluation(value: float, finished_run: Path,
                                                                       tmp_path: Path) -> None:
    """Not NaN only: an infinite weight, as a diverged run's, is refused before any example is evaluated."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = torch.load(run / rundir.CHECKPOINT, weights_only=True)
    name = sorted(state["model"])[-1]
    state["model"][name].view(-1)[-1] = value
    torch.save(state, run / rundir.CHECKPOINT)
    with pytest.raises(checkpoint.CheckpointError) as error:
        evaluation.evaluate_run(run, k=2)
    assert str(error.value) == (f"{run / rundir.CHECKPOINT} is a damaged checkpoint: its parameters hold NaN or "
                                f"infinite values ({name}), as a diverged run's do; restore it from a copy, or start "
                                "a new run with a new --out")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("number", [2, 0, None])
def test_a_checkpoint_of_another_format_is_refused(number: int | None, finished_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Everything else in it may be in order: a format number other than 1 (or none) is not read."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = torch.load(run / rundir.CHECKPOINT, weights_only=True)
    state["format"] = number
    if number is None:
        del state["format"]
    torch.save(state, run / rundir.CHECKPOINT)
    line = one_line_error(capsys, ["evaluate", str(run), "--k", "2", "--device", "cpu"])
    assert line == (f"iwae: error: {run / rundir.CHECKPOINT} is not an iwae checkpoint of format 1; start a new run "
                    "with a new --out")


def test_a_checkpoint_of_settings_this_version_does_not_know_is_named(finished_run: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = torch.load(run / rundir.CHECKPOINT, weights_only=True)
    state["config"]["warmup_epochs"] = 3  # as a later version might write
    torch.save(state, run / rundir.CHECKPOINT)
    assert main(["train", "--resume", str(run)]) == 2
    assert messages(capsys.readouterr().err)[-1] == (
        f"iwae: error: the checkpoint in {run} holds settings this version of iwae does not know (warmup_epochs): it "
        "was written by another version; continue it with that version")


def test_a_resumed_run_writes_its_config_again_before_training(tiny_dataset: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--dataset", tiny_dataset, *TINY[2:], "--epochs", "3", "--eval-k", "0", "--threads", "1",
                 "--out", str(run)]) == 0
    state = torch.load(run / rundir.CHECKPOINT, weights_only=True)
    state["epoch"] = 1  # as if stopped after its first epoch
    torch.save(state, run / rundir.CHECKPOINT)
    rundir.truncate_metrics(run, 1)
    (run / rundir.CONFIG).write_text('{"dataset": ')  # damaged
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--resume", str(run), "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    config = json.loads((run / rundir.CONFIG).read_text())
    assert config["threads"] == 2 and config["epochs"] == 3 and config["dataset"] == tiny_dataset


def test_diagnosing_a_model_with_discrete_latents_says_what_to_diagnose(
        tiny_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "sbn"
    assert main(["train", "--dataset", tiny_dataset, *TINY, "--model", "sbn-8-4", "--estimator", "vimco",
                 "--eval-k", "0", "--out", str(run)]) == 0
    capsys.readouterr()
    line = one_line_error(capsys, ["diagnose", "snr", str(run), "--k", "2,4", "--draws", "2", "--out",
                                   str(tmp_path / "snr")])
    assert line.endswith("has discrete latents, which the reparameterized estimators measured here cannot train; "
                         "diagnose a run of the burda model, or --toy")
    assert not (tmp_path / "snr").exists()


def test_evaluating_a_file_asks_for_a_runs_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "file"
    file.write_text("not a run")
    line = one_line_error(capsys, ["evaluate", str(file)])
    assert "choose an --out" not in line and line.endswith("give the directory of a run started with iwae train --out")


@pytest.mark.parametrize("argv", [["train", "--dataset", "digits", "--out", ""],
                                  ["reproduce", "burda-table1", "--out", ""],
                                  ["evaluate", "RUN", "--checkpoint-every", "-1"]])
def test_an_empty_out_and_a_negative_evaluation_checkpoint_interval_are_refused(
        argv: list[str], finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, [str(finished_run) if arg == "RUN" else arg for arg in argv])
    assert "an empty path; give a directory" in line or "--checkpoint-every must be a number of seconds >= 0" in line
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_grid_is_continued_by_its_own_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from iwae.runs import reproduce
    from iwae.training.signals import Interrupted

    def stopped(*args: object, **kwargs: object) -> None:
        raise Interrupted("training stopped by SIGINT in epoch 1/9 after step 5/10; checkpoint saved",
                          signal.SIGINT, "iwae train --resume out/cell/seed-0")

    monkeypatch.setattr(reproduce, "run_table", stopped)
    argv = ["reproduce", "burda-table1", "--budget", "0.001", "--out", str(tmp_path / "grid")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip() == ("iwae: training stopped by SIGINT in epoch 1/9 after step 5/10; checkpoint saved; "
                           f"continue with: iwae reproduce burda-table1 --budget 0.001 --out {tmp_path / 'grid'}")


def test_an_undefined_standard_error_is_written_as_null(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main(["evaluate", str(run), "--k", "5", "--examples", "1", "--device", "cpu"]) == 0
    text = (run / "eval-test-k5-n1.json").read_text()
    assert "NaN" not in text and json.loads(text)["nll_se"] is None  # strict JSON: one example has no spread


def test_data_dir_on_resume_is_refused_where_the_runs_dataset_reads_none(
        finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(capsys, ["train", "--resume", str(finished_run), "--data-dir", str(tmp_path)])
    assert line.startswith("iwae: error: --data-dir is where the files of mnist") and "the run trains on" in line
    assert line.endswith("which reads none there; drop --data-dir")
    assert "data_dir" not in json.loads((finished_run / rundir.CONFIG).read_text()) or json.loads(
        (finished_run / rundir.CONFIG).read_text())["data_dir"] is None


def test_a_run_directory_that_cannot_be_locked_says_to_use_a_copy(
        finished_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from iwae.runs import runlock

    open_file = os.open

    def immutable(path: object, *args: object) -> int:  # as on a directory made immutable (chattr +i)
        if str(path).endswith(runlock.LOCK):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return open_file(path, *args)

    monkeypatch.setattr(runlock.os, "open", immutable)
    line = one_line_error(capsys, ["train", "--resume", str(finished_run)])
    assert line == (f"iwae: error: cannot lock {finished_run} (writing {finished_run / runlock.LOCK}: Operation not "
                    "permitted); copy the run directory somewhere writable (cp -r RUN COPY) and use the copy")

    def read_only(path: object, *args: object) -> int:  # on a file system mounted read-only (EROFS, no PermissionError)
        if str(path).endswith(runlock.LOCK):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return open_file(path, *args)

    monkeypatch.setattr(runlock.os, "open", read_only)
    line = one_line_error(capsys, ["train", "--resume", str(finished_run)])
    assert line.startswith(f"iwae: error: cannot lock {finished_run} (writing {finished_run / runlock.LOCK}: Read-only")


def test_a_directory_turned_read_only_names_the_write_that_failed_not_the_lock(tmp_path: Path) -> None:
    # the lock file cannot be removed from a directory made read-only while the lock was held: the error that stopped
    # the work is the one raised
    import errno
    import os

    from iwae.runs import runlock

    unlink = Path.unlink

    def read_only(path: Path, missing_ok: bool = False) -> None:
        if path.name == runlock.LOCK:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        unlink(path, missing_ok=missing_ok)

    with pytest.raises(OSError, match=r"metrics\.jsonl"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "unlink", read_only)
        with runlock.locked(tmp_path):
            raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "metrics.jsonl"))
    assert os.path.exists(tmp_path / runlock.LOCK)


def test_a_run_with_one_test_example_finishes_resumes_and_draws(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # one example has no standard error: NaN in the result, null in eval.json, and NaN again where it is read back
    rng = np.random.default_rng(0)
    path = tmp_path / "one-test.npz"
    np.savez(path, train=(rng.random((40, 16)) < 0.4).astype(np.float32),
             test=(rng.random((1, 16)) < 0.4).astype(np.float32))
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(path), *TINY, "--eval-k", "10", "--out", str(run)]) == 0
    assert json.loads((run / rundir.EVAL).read_text())["nll_se"] is None
    assert (run / "figures" / "bound_vs_k.png").is_file()
    assert main(["train", "--resume", str(run)]) == 0
    assert re.search(r"^NLL \(k=10\) +-?\d+\.\d\d \+- nan nats", capsys.readouterr().out, re.M)
    assert main(["sample", str(run), "--n", "4", "--device", "cpu"]) == 0
    assert np.isnan(evaluation.read_evaluation(run / rundir.EVAL)["bounds_se"]["10"])


def test_sample_draws_a_run_that_is_still_training(finished_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with runlock.locked(run):  # as a training run holds it for as long as it trains
        assert main(["sample", str(run), "--n", "4", "--device", "cpu"]) == 0
    assert "samples.png" in capsys.readouterr().out



def test_schedule_options_the_schedule_does_not_read_are_refused_at_its_own_values(
        tiny_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    burda = ["--schedule", "burda", "--schedule-scale", "0.001"]  # 9 epochs at 1e-3 first
    for extra in (["--epochs", "9"], ["--lr", "0.001"]):
        line = one_line_error(capsys, ["train", "--dataset", tiny_dataset, *burda, *extra, "--out",
                                       str(tmp_path / "r")])
        assert line.endswith("--epochs and --lr do not apply to --schedule burda, which fixes both; shorten it with "
                             "--schedule-scale instead")
    line = one_line_error(capsys, ["train", "--dataset", tiny_dataset, "--schedule", "burda", "--schedule-scale", "inf",
                                   "--out", str(tmp_path / "r")])
    assert "--schedule-scale must be a finite number > 0" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("command", "backend"), [
    (["train", "--resume", "RUN"], "gloo"),  # the run trains on the CPU, as recorded
    (["train", "--resume", "RUN", "--device", "cuda"], None),
    (["evaluate", "RUN", "--device", "cpu"], "gloo"),
    (["evaluate", "RUN"], None),  # auto: a GPU's backend where there is one
])
def test_ranks_meet_on_the_backend_of_the_device_they_compute_on(
        command: list[str], backend: str | None, finished_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    met = []
    monkeypatch.setattr(cli.distributed, "session", lambda backend, again: met.append(backend))
    argv = [str(finished_run) if word == "RUN" else word for word in command]
    cli._session(cli.build_parser().parse_args(argv), argv)
    assert met == [backend]


def test_evaluating_and_drawing_a_run_leave_torchs_global_generator_as_it_was(finished_run: Path,
                                                                              tmp_path: Path) -> None:
    # design.md: evaluation draws from a generator of its own, so that a user's program around it draws as before
    run = shutil.copytree(finished_run, tmp_path / "run")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluation.evaluate_run(run, k=5, examples=4, device="cpu", threads=1)
    run_figures.make_figures(run, n=4)
    assert torch.equal(torch.rand(3), expected)


def test_the_runs_own_data_named_with_dataset_is_its_own_evaluation(finished_run: Path, tiny_dataset: str,
                                                                     tmp_path: Path) -> None:
    run = shutil.copytree(finished_run, tmp_path / "run")
    assert main(["evaluate", str(run), "--k", "10", "--device", "cpu"]) == 0
    own = json.loads((run / rundir.EVAL).read_text())
    (run / rundir.EVAL).unlink()
    before = {path.name for path in run.glob("eval*.json")}
    for named in (tiny_dataset, os.path.relpath(tiny_dataset)):  # the file the run records, however it is written
        assert main(["evaluate", str(run), "--dataset", named, "--k", "10", "--device", "cpu"]) == 0
        assert {path.name for path in run.glob("eval*.json")} == before | {rundir.EVAL}
        assert json.loads((run / rundir.EVAL).read_text())["nll"] == own["nll"]
    other = tmp_path / "tiny.npz"
    shutil.copy(tiny_dataset, other)  # the same values in another file: other data
    assert main(["evaluate", str(run), "--dataset", str(other), "--k", "10", "--device", "cpu"]) == 0
    assert {path.name for path in run.glob("eval*.json")} - before - {rundir.EVAL} == {
        evaluation.eval_path(run, dataset=str(other), k=10).name}
