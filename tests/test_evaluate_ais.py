"""``iwae evaluate RUN --method ais|bdmc``: the files and keys written, the figure, and one-line errors."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import messages

from iwae.cli import main
from iwae.core import ais
from iwae.runs import evaluate_ais, rundir
from iwae.training import signals

FAST = ["--chains", "2", "--leapfrog", "2", "--k", "10", "--examples", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tiny_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--dataset", tiny_dataset, "--epochs", "1", "--batch-size", "8", "--k", "4",
                 "--monitor-examples", "8", "--eval-k", "0", "--device", "cpu", "--out", str(path)]) == 0
    return path


def test_ais_writes_its_estimate_beside_importance_sampling(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(run), "--method", "ais", "--ais-steps", "6", "3", *FAST]) == 0  # the larger reported
    out = capsys.readouterr().out
    assert "NLL, AIS" in out and "NLL, IS k=10" in out and "IS - AIS" in out
    path = evaluate_ais.result_path(run, "ais", steps=[3, 6], chains=2, leapfrog=2, k=10, examples=3)
    assert path.name == "eval_ais-test-s3_6-c2-l2-k10-n3.json" and f"written to {path}" in out
    result = json.loads(path.read_text())
    assert result["steps"] == 6 and result["chains"] == 2 and result["examples"] == 3 and result["k"] == 10
    assert result["batch_size"] == evaluate_ais.BATCH_SIZE
    assert [entry["steps"] for entry in result["sweep"]] == [3, 6]
    assert result["nll"] == result["sweep"][-1]["nll"]
    assert result["is_minus_ais"] == pytest.approx(result["is_nll"] - result["nll"])
    for key in ("nll_se", "is_nll", "is_nll_se", "time_s", "acceptance", "ess"):
        assert result[key] == result[key]  # present and not NaN
    assert result["time_per_example_s"] == pytest.approx(result["time_s"] / 3, abs=0.006 / 3)
    assert (run / rundir.FIGURES / "ais_vs_steps-test-s3_6-c2-l2-k10-n3.png").stat().st_size > 0


def test_bdmc_writes_both_bounds_and_their_gap(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(run), "--method", "bdmc", "--ais-steps", "4", *FAST]) == 0
    assert "BDMC gap" in capsys.readouterr().out
    result = json.loads(evaluate_ais.result_path(run, "bdmc", steps=4, chains=2, leapfrog=2, k=10, examples=3)
                        .read_text())
    assert result["gap"] == pytest.approx(result["log_p_upper"] - result["log_p_lower"])
    assert result["nll"] == -result["log_p_lower"] and result["steps"] == 4 and result["examples"] == 3
    assert result["nll_se"] == result["log_p_lower_se"] != result["log_p_upper_se"]
    assert result["batch_size"] == evaluate_ais.BATCH_SIZE
    assert result["time_per_example_s"] == pytest.approx(result["time_s"] / 3, abs=0.006 / 3)


def ticking_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every batch of an evaluation take one second by evaluate_ais's clock."""
    ticks = itertools.count()
    monkeypatch.setattr(evaluate_ais, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))


def fixed_run(log_w: list[float], acceptance: float, step_size: float) -> ais.Run:
    """A batch's AIS run of one chain per example: its log weights, and each transition's acceptance and step size."""
    shape = (1, len(log_w))
    return (torch.tensor([log_w], dtype=torch.float64), torch.full(shape, acceptance, dtype=torch.float64),
            ais.StepSizes(torch.tensor([0.5, 1.0], dtype=torch.float64),
                          torch.full((2, *shape), math.log(step_size), dtype=torch.float64)))


def test_an_ais_results_time_is_that_of_all_its_batches(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ticking_clock(monkeypatch)
    monkeypatch.setattr(evaluate_ais.plots, "plot_ais_vs_steps", lambda *args: None)  # a second's drawing
    result = evaluate_ais.evaluate_ais(run, steps=2, chains=1, leapfrog=1, k=10, examples=3, batch_size=1,
                                       device="cpu", time_limit_s=None, save_every_s=None)
    assert result["time_s"] == result["sweep"][0]["time_s"] == 3.0 and result["time_per_example_s"] == 1.0


def test_bdmc_reports_the_paired_gap_and_each_directions_own_diagnostics(run: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # lower bounds 0..3, upper bounds 0.5, 0.5, 0.5 and 0.7 above them: the gaps vary far less than either bound
    lower, gap = [0.0, 1.0, 2.0, 3.0], [0.5, 0.5, 0.5, 0.7]
    x = (torch.arange(32).view(2, 16) % 3 == 0).float()
    upper = [lo + g for lo, g in zip(lower, gap, strict=True)]
    batches = [(x, fixed_run(lower[i:i + 2], 0.25, 0.1), fixed_run([-u for u in upper[i:i + 2]], 0.75, 0.3))
               for i in (0, 2)]  # a backward run's log weights estimate -log p(x)

    def fixed_batches(model: object, n: int, *, first_batch: int, **settings: object) -> Iterator[object]:
        yield from batches[first_batch:]

    monkeypatch.setattr(ais, "bdmc_batches", fixed_batches)
    ticking_clock(monkeypatch)
    result = evaluate_ais.evaluate_bdmc(run, steps=2, chains=1, leapfrog=1, k=10, examples=4, batch_size=2,
                                        device="cpu", time_limit_s=None, save_every_s=None)
    assert result["gap"] == pytest.approx(0.55) and result["log_p_lower"] == pytest.approx(1.5)
    assert result["gap_se"] == pytest.approx(torch.tensor(gap, dtype=torch.float64).std().item() / 2)
    assert result["forward"] == pytest.approx({"acceptance": 0.25, "ess": 1.0, "step_size": 0.1})
    assert result["backward"] == pytest.approx({"acceptance": 0.75, "ess": 1.0, "step_size": 0.3})
    assert result["time_s"] == 2.0


def test_a_results_standard_errors_are_the_sample_sd_over_the_root_of_the_examples() -> None:
    mean, se = evaluate_ais._mean_se(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-12)
    assert math.isnan(evaluate_ais._mean_se(torch.tensor([1.0]))[1])


def test_a_result_is_named_after_the_examples_evaluated() -> None:
    assert evaluate_ais.examples_named(10**6, 16) == evaluate_ais.examples_named(None, 16) == 16
    assert evaluate_ais.examples_named(5, 16) == 5
    assert evaluate_ais.step_values([1000, 10, 1000]) == [10, 1000] and evaluate_ais.step_values(7) == [7]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--method", "ais", "--ais-steps", "0"], "--ais-steps must be a positive integer; got 0"),
        (["--method", "bdmc", "--chains", "0"], "--chains must be a positive integer; got 0"),
        (["--method", "ais", "--leapfrog", "0"], "--leapfrog must be a positive integer; got 0"),
        (["--method", "ais", "--batch-size", "0"], "--batch-size must be a positive integer; got 0"),
        (["--method", "ais", "--k", "0"], "--k must be an integer >= 1; got 0"),
        (["--method", "bdmc", "--k", "0"], "--k must be an integer >= 1; got 0"),
        (["--method", "ais", "--chunk-size", "0"], "--chunk-size does not apply to --method ais; drop it"),
        (["--method", "bdmc", "--split", "nope", "--matmul", "bogus", "--compile"],
         "--compile, --matmul, --split do not apply to --method bdmc (which simulates its examples from the model); "
         "drop them"),
        (["--method", "ais", "--leapfrog", str(10**9), "--examples", "2"],
         f"AIS of 1000 steps with --leapfrog {10**9} on 2 examples would take about"),
        (["--method", "bdmc", "--ais-steps", "2", "4"], "bdmc runs one number of --ais-steps"),
        (["--method", "ais", "--examples", "0"], "--examples must be an integer >= 1; got 0"),
        (["--method", "bdmc", "--examples", "0"],
         "the number of simulated examples, --examples, must be a positive integer; got 0"),
        (["--method", "ais", "--seed", "-1"], "--seed must be an integer from 0"),
        (["--method", "ais", "--split", "nope"], "unknown --split 'nope'"),
        (["--method", "ais", "--chains", str(10**12)],  # the tiny test split has 16 examples
         f"AIS of --ais-steps 1000 with --chains {10**12} and --batch-size 100 on --examples 16 needs about"),
        (["--method", "bdmc", "--seed", "-1"], "--seed must be an integer from 0"),
        (["--method", "bdmc", "--seed", str(2**63)], "--seed must be an integer from 0"),
        (["--method", "ais", "--data-dir", "."], "the run was trained on "),
        (["--data-dir", "."], "the run was trained on "),
        (["--method", "bdmc", "--examples", str(10**13)], f"on --examples {10**13} needs about"),
    ],
)
def test_bad_settings_get_one_line_and_write_nothing(options: list[str], message: str, run: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    assert main(["evaluate", str(run), *options, "--device", "cpu"]) == 2
    err = messages(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("iwae: error: ") and message in err[0]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_the_library_takes_numpy_integers_for_every_count(run: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    counts = {"chains": 2, "leapfrog": 2, "k": 10, "examples": 3, "batch_size": 2}
    given = {name: np.int64(value) for name, value in counts.items()}
    ais_ints = evaluate_ais.evaluate_ais(copy, steps=[3, 2], device="cpu", **counts)
    ais_numpy = evaluate_ais.evaluate_ais(copy, steps=[np.int64(3), np.int32(2)], device="cpu", **given)
    bdmc_ints = evaluate_ais.evaluate_bdmc(copy, steps=3, device="cpu", **counts)
    bdmc_numpy = evaluate_ais.evaluate_bdmc(copy, steps=np.int64(3), device="cpu", **given)
    def untimed(result: dict) -> dict:
        return {key: [untimed(entry) for entry in value] if key == "sweep" else value
                for key, value in result.items() if "time" not in key}

    assert untimed(ais_numpy) == untimed(ais_ints) and untimed(bdmc_numpy) == untimed(bdmc_ints)
    assert evaluate_ais.evaluate_ais(copy, steps=np.int64(2), device="cpu", **given)["steps"] == 2
    with pytest.raises(ValueError, match=r"^steps must be a number of AIS steps or a sweep of them; got none$"):
        evaluate_ais.evaluate_ais(copy, steps=[], device="cpu", **counts)


def test_each_ais_setting_has_its_own_file(run: Path) -> None:
    assert main(["evaluate", str(run), "--method", "ais", "--ais-steps", "3", *FAST]) == 0
    assert main(["evaluate", str(run), "--method", "ais", "--ais-steps", "3", *FAST, "--split", "train"]) == 0
    test = json.loads((run / "eval_ais-test-s3-c2-l2-k10-n3.json").read_text())
    train = json.loads((run / "eval_ais-train-s3-c2-l2-k10-n3.json").read_text())
    assert (test["split"], train["split"]) == ("test", "train")
    assert evaluate_ais.result_path(run, "ais") == run / evaluate_ais.AIS_FILE  # the default setting's, as before
    assert evaluate_ais.result_path(run, "bdmc") == run / evaluate_ais.BDMC_FILE
    assert evaluate_ais.result_path(run, "ais", seed=1, start="encoder").name == (
        "eval_ais-test-s1000-c16-l10-encoder-k5000-n100-seed1.json")


def test_a_sweep_and_a_single_number_of_steps_have_files_of_their_own(run: Path) -> None:
    assert main(["evaluate", str(run), "--method", "ais", "--ais-steps", "2", "4", *FAST]) == 0
    assert main(["evaluate", str(run), "--method", "ais", "--ais-steps", "4", *FAST]) == 0
    sweep = json.loads((run / "eval_ais-test-s2_4-c2-l2-k10-n3.json").read_text())
    single = json.loads((run / "eval_ais-test-s4-c2-l2-k10-n3.json").read_text())
    assert [entry["steps"] for entry in sweep["sweep"]] == [2, 4] and len(single["sweep"]) == 1
    assert evaluate_ais.result_path(run, "ais", steps=[1000]) == run / evaluate_ais.AIS_FILE


def test_files_of_one_name_in_two_folders_have_results_of_their_own(run: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    for folder, scale in (("a", 0.1), ("b", 1.0)):  # the same stem, different data
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / "my.npy", (scale * rng.random((50, 16))).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    results = {}
    for folder in ("a", "b"):
        assert main(["evaluate", str(run), "--method", "ais", "--ais-steps", "3", *FAST,
                     "--dataset", f"{folder}/my.npy"]) == 0
        path = evaluate_ais.result_path(run, "ais", dataset=f"{folder}/my.npy", steps=3, chains=2, leapfrog=2, k=10,
                                        examples=3)
        results[folder] = json.loads(path.read_text())
    assert evaluate_ais.result_path(run, "ais", dataset="a/my.npy") != evaluate_ais.result_path(
        run, "ais", dataset="b/my.npy")
    assert results["a"]["nll"] != results["b"]["nll"]


def test_the_finished_batches_of_a_file_since_changed_are_not_reused(run: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "my.npy"
    rng = np.random.default_rng(2)
    np.save(data, (0.1 * rng.random((50, 16))).astype(np.float32))
    options = ["evaluate", str(run), "--method", "ais", "--ais-steps", "3", *FAST, "--batch-size", "1",
               "--dataset", str(data), "--checkpoint-every", "0"]
    with monkeypatch.context() as patched:  # stopped after its first AIS batch: the IS estimate and it are kept
        batches = ais.ais_batches

        def stop_after_one(*args: object, **kwargs: object) -> Iterator[object]:
            yield next(batches(*args, **kwargs))
            raise signals.Interrupted("the evaluation stopped by SIGTERM", signal.SIGTERM, "the same command")

        patched.setattr(ais, "ais_batches", stop_after_one)
        assert main(options) == 128 + signal.SIGTERM
    np.save(data, rng.random((50, 16)).astype(np.float32))  # the same path, other data
    assert main(options) == 0
    fresh = tmp_path / "fresh"
    shutil.copytree(run, fresh, ignore=shutil.ignore_patterns("eval_ais*"))
    assert main(["evaluate", str(fresh), *options[2:]]) == 0
    continued, again = (json.loads(evaluate_ais.result_path(path, "ais", dataset=str(data), steps=3, chains=2,
                                                            leapfrog=2, k=10, examples=3).read_text())
                        for path in (run, fresh))
    assert (continued["nll"], continued["is_nll"]) == (again["nll"], again["is_nll"])
