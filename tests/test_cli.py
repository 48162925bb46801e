"""The command line: a working train / evaluate / sample round, and one-line errors for bad input that
leave existing runs untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from iwae import rundir
from iwae.cli import main

TINY = ["--epochs", "1", "--batch-size", "8", "--k", "4", "--monitor-examples", "8", "--device", "cpu"]


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the command, check it failed with exit status 2 and exactly one line on stderr; return the line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
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
    assert "NLL (k=20)" in out and "active units" in out
    result = json.loads((finished_run / "eval-train-k20.json").read_text())
    assert result["k"] == 20 and result["split"] == "train" and set(result["bounds"]) == {"1", "5", "20"}
    assert main(["sample", str(finished_run), "--n", "16", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.split()) == 4


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
        (["--objective", "nope"], "unknown objective 'nope'; choose one of elbo, iwae"),
        (["--estimator", "nope"], "unknown estimator 'nope'; choose one of standard, stl, dreg"),
        (["--k", "0"], "--k must be a positive integer number of samples; got --k=0"),
        (["--objective", "miwae", "--k", "10", "--m", "3"], "--m must be a positive integer dividing --k"),
        (["--schedule", "burda"], "--epochs and --lr do not apply to --schedule burda"),
        (["--k", "many"], "argument --k: invalid int value: 'many'; see iwae train --help"),
        (["--device", "tpu"], "unknown device 'tpu'"),
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
    assert "give --out DIR to start a new run, or --resume DIR" in one_line_error(capsys, ["train", *TINY])


def test_unwritable_output_directory(tiny_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    line = one_line_error(capsys, ["train", "--dataset", tiny_dataset, *TINY, "--out", str(blocker / "run")])
    assert f"cannot create or write the run directory {blocker / 'run'}" in line
    assert "choose an --out in a writable directory" in line


def test_an_existing_run_is_never_overwritten(finished_run: Path, tiny_dataset: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    before = {path.name: path.read_bytes() for path in finished_run.iterdir() if path.is_file()}
    line = one_line_error(capsys, ["train", "--dataset", tiny_dataset, *TINY, "--out", str(finished_run)])
    assert f"continue that run with: iwae train --resume {finished_run}" in line
    line = one_line_error(capsys, ["train", "--resume", str(finished_run), "--k", "8", "--objective", "elbo"])
    assert "different configuration: k (run: 4, given: 8), objective (run: 'iwae', given: 'elbo')" in line
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
    assert f"{run / rundir.CHECKPOINT} is corrupt or not a checkpoint" in line


def test_evaluate_on_the_users_own_data(finished_run: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    own = tmp_path / "own.npy"
    np.save(own, np.random.default_rng(2).random((10, 16)) < 0.5)
    assert main(["evaluate", str(finished_run), "--dataset", str(own), "--k", "5", "--device", "cpu"]) == 0
    result = json.loads((finished_run / "eval-own-test-k5.json").read_text())
    assert result["dataset"] == str(own) and result["examples"] == 1  # .npy without a test split: 10% held out
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((10, 9)))
    line = one_line_error(capsys, ["evaluate", str(finished_run), "--dataset", str(wrong), "--device", "cpu"])
    assert "has 9 values per example but the model" in line and "was trained on 16" in line


def test_unavailable_split(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(capsys, ["evaluate", str(finished_run), "--split", "valid", "--k", "2"])
    assert "split 'valid' is not available" in line


def test_errors_reach_a_real_terminal_as_one_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "iwae.cli", "train", "--objective", "nope", "--epochs", "1", "--out", "run"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "iwae: error: unknown objective 'nope'; choose one of elbo, iwae, miwae, ciwae, piwae, vr"
    ]
    assert not (tmp_path / "run").exists()
