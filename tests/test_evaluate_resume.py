"""Long evaluations: continued after a kill with the numbers of an uninterrupted one, refused when they could not
finish, and refused at once when their result could not be written."""

from __future__ import annotations

import inspect
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
import torch
from conftest import flip_a_bit_inside, messages

from iwae import data, plots
from iwae.cli import main
from iwae.core import ais
from iwae.eval import likelihood, splits
from iwae.eval.activity import posterior_mean_variances
from iwae.models import burda
from iwae.platform import duration, gemm
from iwae.runs import archives, checkpoint, evaluation, resumable, rundir
from iwae.settings import SettingError
from iwae.training import signals

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 16 test examples one per batch, 100 passes each: long enough to be killed in the middle
EVALUATE = ["--k", "50000", "--batch-size", "1", "--device", "cpu", "--no-compile", "--matmul", "default"]


@pytest.fixture(scope="module")
def run(tiny_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--dataset", tiny_dataset, "--epochs", "1", "--batch-size", "8", "--k", "4",
                 "--monitor-examples", "8", "--eval-k", "0", "--device", "cpu", "--out", str(path)]) == 0
    return path


def iwae(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "iwae", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def numbers(result: object) -> object:
    """A result without what differs between two evaluations of one setting: the run's path and the times."""
    if isinstance(result, list):
        return [numbers(item) for item in result]
    if isinstance(result, dict):
        return {key: numbers(value) for key, value in result.items()
                if key not in ("run", "time_s", "time_per_example_s")}
    return result


# per method: the options of an evaluation long enough to be killed in the middle (16 batches), and its result
KILLED = {
    "is": (EVALUATE, "eval-test-k50000.json"),
    "ais": (["--method", "ais", "--ais-steps", "150", "--chains", "2", "--leapfrog", "2", "--k", "10", "--examples",
             "16", "--batch-size", "1", "--device", "cpu"], "eval_ais-test-s150-c2-l2-k10-n16.json"),
    "bdmc": (["--method", "bdmc", "--ais-steps", "100", "--chains", "2", "--leapfrog", "2", "--k", "10",
              "--examples", "16", "--batch-size", "1", "--device", "cpu"], "eval_bdmc-s100-c2-l2-k10-n16.json"),
}


@pytest.mark.parametrize("method", list(KILLED))
def test_an_evaluation_killed_at_random_moments_continues_to_the_uninterrupted_result(method: str, run: Path,
                                                                                        tmp_path: Path) -> None:
    options, name = KILLED[method]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    shutil.copytree(run, whole)
    shutil.copytree(run, killed)
    assert iwae("evaluate", str(whole), *options).wait() == 0
    partial = resumable.partial_path(killed / name)
    draw = random.Random(0)
    continued = 0
    for attempt in range(4):
        process = iwae("evaluate", str(killed), *options, "--checkpoint-every", "0")
        if attempt < 3:  # killed at a random moment once at least one batch is written
            while not partial.exists() and process.poll() is None:
                time.sleep(0.05)
            time.sleep(draw.uniform(0.0, 1.0))
            process.send_signal(signal.SIGKILL)
        err = process.communicate()[1]
        continued += "continuing from" in err
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL and partial.is_file()
    assert process.returncode == 0 and continued >= 1  # the killed runs' work was kept
    assert not partial.exists()
    assert numbers(json.loads((killed / name).read_text())) == numbers(json.loads((whole / name).read_text()))


def test_an_evaluation_stopped_by_sigterm_says_how_it_continues(run: Path, tmp_path: Path) -> None:
    options, name = KILLED["is"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    shutil.copytree(run, whole)
    shutil.copytree(run, stopped)
    assert iwae("evaluate", str(whole), *options).wait() == 0
    partial = resumable.partial_path(stopped / name)
    process = iwae("evaluate", str(stopped), *options, "--checkpoint-every", "0")
    while not partial.exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    err = process.communicate()[1]
    assert process.returncode == 128 + signal.SIGTERM, err
    assert messages(err)[-1] == ("iwae: the evaluation (its finished batches kept) stopped by SIGTERM; continue "
                                 f"with: iwae evaluate {stopped} {' '.join(options)} --checkpoint-every 0"), err
    continued = iwae("evaluate", str(stopped), *options)
    assert continued.wait() == 0 and "continuing from" in continued.communicate()[1]
    assert numbers(json.loads((stopped / name).read_text())) == numbers(json.loads((whole / name).read_text()))


@pytest.mark.parametrize(("method", "after_the_batches"), [("bdmc", "importance_statistics"),
                                                         ("ais", "plot_ais_vs_steps")])
def test_a_stop_after_the_ais_batches_keeps_them_all(method: str, after_the_batches: str, run: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # BDMC's IS estimate, and AIS's figure, come after the last batch: a stop there keeps every batch (none was
    # due to be written yet), and the same command then finishes from them alone, to the uninterrupted numbers
    options, name = KILLED[method]
    options = [*options[:options.index("--examples") + 1], "3", *options[options.index("--examples") + 2:]]
    name = name.replace("n16", "n3")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    shutil.copytree(run, whole)
    shutil.copytree(run, stopped)
    assert main(["evaluate", str(whole), *options]) == 0
    module = likelihood if method == "bdmc" else plots

    def stop(*args: object, **kwargs: object) -> None:
        raise signals.Interrupted("the evaluation stopped by SIGTERM", signal.SIGTERM, "the same command")

    with monkeypatch.context() as patched:
        patched.setattr(module, after_the_batches, stop)
        assert main(["evaluate", str(stopped), *options, "--checkpoint-every", "3600"]) == 128 + signal.SIGTERM
    kept = archives.load(resumable.partial_path(stopped / name))["pieces"]
    assert len(kept) == {"bdmc": 3, "ais": 1 + 3}[method]  # AIS's first piece: the IS estimate

    def annealed_again(*args: object, **kwargs: object) -> Iterator[None]:
        pytest.fail("a kept batch was annealed again")
        yield

    monkeypatch.setattr(ais, f"{method}_batches", annealed_again)
    assert main(["evaluate", str(stopped), *options]) == 0
    assert numbers(json.loads((stopped / name).read_text())) == numbers(json.loads((whole / name).read_text()))


def test_a_stop_after_the_last_batch_finishes_to_the_uninterrupted_numbers(tiny_dataset: str, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # a stop between the last batch and the active units keeps every batch: the same command then finishes from
    # them alone (no batch left to evaluate), and the active units' draws (z1, for the second layer's) are those of
    # the uninterrupted evaluation, not shifted by the draws of the batches it did not evaluate again
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(["train", "--dataset", tiny_dataset, "--epochs", "1", "--batch-size", "8", "--k", "4", "--layers",
                 "2", "--monitor-examples", "8", "--eval-k", "0", "--device", "cpu", "--out", str(whole)]) == 0
    shutil.copytree(whole, stopped)
    options = ["--k", "20", "--batch-size", "5", "--device", "cpu", "--no-compile", "--matmul", "default"]
    name, found = "eval-test-k20.json", []

    def spy(*args: object) -> list[torch.Tensor]:
        variances = posterior_mean_variances(*args)
        found.append(variances)
        return variances

    def stop(*args: object) -> None:
        raise signals.Interrupted("the evaluation stopped by SIGTERM", signal.SIGTERM, "the same command")

    monkeypatch.setattr(evaluation, "posterior_mean_variances", spy)
    assert main(["evaluate", str(whole), *options]) == 0
    with monkeypatch.context() as patched:
        patched.setattr(evaluation, "posterior_mean_variances", stop)
        assert main(["evaluate", str(stopped), *options]) == 128 + signal.SIGTERM
    assert len(archives.load(resumable.partial_path(stopped / name))["pieces"]) == 4  # 16 examples, 5 a batch
    assert main(["evaluate", str(stopped), *options]) == 0
    assert numbers(json.loads((stopped / name).read_text())) == numbers(json.loads((whole / name).read_text()))
    assert len(found) == 2 and len(found[0]) == 2
    for uninterrupted, continued in zip(*found, strict=True):
        assert torch.equal(uninterrupted, continued)


def test_pieces_written_only_now_and_then_are_written_when_the_work_stops(tmp_path: Path) -> None:
    path = tmp_path / "eval.partial.pt"
    pieces = resumable.Pieces(path, {"k": 10}, every_s=3600)
    with pytest.raises(KeyboardInterrupt), pieces.kept_on_stop():
        pieces.add(torch.zeros(1))
        pieces.add(torch.ones(1))
        assert not path.exists()  # not yet due
        raise KeyboardInterrupt
    assert [piece.item() for piece in resumable.Pieces(path, {"k": 10}).done] == [0.0, 1.0]
    with pytest.raises(KeyboardInterrupt), resumable.Pieces(tmp_path / "never.pt", {"k": 10}, every_s=None
                                                             ).kept_on_stop():
        raise KeyboardInterrupt
    assert not (tmp_path / "never.pt").exists()  # pieces that are never written stay so
    continued = resumable.Pieces(path, {"k": 10}, every_s=3600)
    written = path.stat().st_mtime_ns
    with pytest.raises(KeyboardInterrupt), continued.kept_on_stop():
        raise KeyboardInterrupt
    assert path.stat().st_mtime_ns == written  # nothing new since they were read: not written again


def test_pieces_of_another_setting_are_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "eval.partial.pt"
    pieces = resumable.Pieces(path, {"k": 10, "seed": 0}, every_s=0)
    pieces.chosen["matmul"] = "default"
    pieces.add(torch.zeros(3))
    assert len(resumable.Pieces(path, {"k": 10, "seed": 0}).done) == 1
    assert resumable.Pieces(path, {"k": 10, "seed": 0}).chosen == {"matmul": "default"}
    assert resumable.Pieces(path, {"k": 10, "seed": 1}).done == []
    assert resumable.Pieces(path, {"k": 20, "seed": 0}).chosen == {}
    path.write_bytes(b"damaged")
    assert resumable.Pieces(path, {"k": 10, "seed": 0}).done == []
    pieces = resumable.Pieces(path, {"k": 10, "seed": 0}, every_s=0)
    pieces.add(torch.full((1000,), 7.0))
    flip_a_bit_inside(path)  # in the piece's numbers
    assert resumable.Pieces(path, {"k": 10, "seed": 0}).done == []  # a changed number is never counted


def test_a_checkpoints_digest_changes_with_any_one_weight() -> None:
    """The digest that ties kept batches to their model: the same for equal parameters (and position), another for
    parameters that differ in the last bit of one weight."""
    state = {"epoch": 3, "step": 0, "wall_time_s": 12.5, "model": burda(1, 16).state_dict()}
    copy = {**state, "model": {name: tensor.clone() for name, tensor in state["model"].items()}}
    digest = checkpoint.digest(state)
    assert checkpoint.digest(copy) == digest
    for name in sorted(state["model"]):
        changed = {**state, "model": {**state["model"], name: state["model"][name].clone()}}
        flat = changed["model"][name].view(-1)
        flat[-1] = torch.nextafter(flat[-1], torch.tensor(math.inf))
        assert checkpoint.digest(changed) != digest, name


def test_a_stop_right_after_the_pieces_were_written_writes_them_no_more(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The file already holds every finished piece: a stop then has nothing to add, and rewrites nothing."""
    writes: list[Path] = []
    write_atomic = resumable.write_atomic

    def counted(path: Path, write: Callable[[IO[bytes]], None]) -> None:
        writes.append(path)
        write_atomic(path, write)

    monkeypatch.setattr(resumable, "write_atomic", counted)
    path = tmp_path / "eval.partial.pt"
    pieces = resumable.Pieces(path, {"k": 10}, every_s=0)  # written after every piece
    with pytest.raises(KeyboardInterrupt), pieces.kept_on_stop():
        pieces.add(torch.zeros(1))
        pieces.add(torch.ones(1))
        assert writes == [path, path]
        raise KeyboardInterrupt
    assert writes == [path, path]
    assert [piece.item() for piece in resumable.Pieces(path, {"k": 10}).done] == [0.0, 1.0]


@pytest.mark.parametrize("option", [False, True])
def test_an_archive_saved_with_checksums_leaves_torchs_checksum_option_as_it_was(option: bool, tmp_path: Path) -> None:
    """archives.save writes every record's CRC-32 whatever torch.serialization's global option says, and puts the
    option back as it found it."""
    path = tmp_path / "archive.pt"
    try:
        torch.serialization.set_crc32_options(option)
        archives.save({"x": torch.arange(1000.0)}, io.BytesIO())
        assert torch.serialization.get_crc32_options() is option
        with path.open("wb") as file:
            archives.save({"x": torch.arange(1000.0)}, file)
        assert torch.serialization.get_crc32_options() is option
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(archives.load(path)["x"], torch.arange(1000.0))  # its checksums are there, and match


def test_a_new_checkpoint_starts_the_evaluation_afresh(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    result = copy / "eval-test-k50000.json"
    stale = resumable.Pieces(resumable.partial_path(result), {"anything": "else"}, every_s=0)
    stale.add(torch.zeros(1))
    process = iwae("evaluate", str(copy), *EVALUATE, "--checkpoint-every", "0")
    _, err = process.communicate()
    assert process.returncode == 0 and "continuing from" not in err


def one_line(process: subprocess.Popen[str]) -> str:
    _, err = process.communicate(timeout=300)
    lines = messages(err)
    assert process.returncode == 2 and len(lines) == 1 and lines[0].startswith("iwae: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--k", "100000000000000000000"], "use --k "),
        (["--method", "ais", "--ais-steps", "1000000000000", "--examples", "2"], "use --ais-steps "),
        (["--method", "bdmc", "--ais-steps", "1000000000000", "--examples", "2"], "use --ais-steps "),
    ],
)
def test_evaluations_that_could_not_finish_are_refused_at_once(options: list[str], message: str, run: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    line = one_line(iwae("evaluate", str(run), *options, "--device", "cpu"))
    assert "would take about" in line and message in line and "--no-time-limit" in line
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_gradient_draws_that_could_not_finish_are_refused_at_once(tmp_path: Path) -> None:
    line = one_line(iwae("diagnose", "snr", "--toy", "--k", "3", "--draws", "1000000000000", "--out",
                         str(tmp_path / "d")))
    assert "would take about" in line and "use --draws " in line
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("fits", "suggested"), [(100, 80), (1, 1), (0, 0)])
def test_a_refusal_suggests_a_setting_with_room_for_a_slower_timing(fits: int, suggested: int) -> None:
    # the suggested value is timed afresh when used, on a machine that may be busier: a fifth below the largest
    with pytest.raises(SettingError, match=f"use k {suggested} or less"):
        duration.check_duration(200.0, 100.0, "evaluating with {0} {k}", "k", fits, "time_limit_s", k=200)


# runs ``iwae evaluate`` as a user who may not write into the run directory, whoever runs the test (root may)
READ_ONLY = """
import os, sys
from pathlib import Path
from iwae.cli import main
run, access = Path(sys.argv[1]).resolve(), os.access
def refused(path, mode, **kw):
    return False if Path(path).resolve() == run and mode & os.W_OK else access(path, mode, **kw)
os.access = refused
sys.exit(main(["evaluate", *sys.argv[1:]]))
"""


@pytest.mark.parametrize("method", ["is", "ais", "bdmc"])
def test_a_read_only_run_directory_is_refused_before_any_work(method: str, run: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    steps = [] if method == "is" else ["--ais-steps", "100000"]  # importance sampling refuses AIS options
    process = subprocess.Popen([sys.executable, "-c", READ_ONLY, str(run), "--method", method, "--k", "100000000",
                                *steps, "--examples", "2", "--device", "cpu"], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = one_line(process)
    assert f"cannot write into {run}" in line and "evaluate the copy" in line
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert not list(run.glob("eval*"))
    assert rundir.CHECKPOINT in {p.name for p in run.iterdir()}


def test_an_evaluation_records_the_matmul_path_that_repeats_it(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    first = evaluation.evaluate_run(copy, k=20, examples=8, seed=3)  # the path timed as the faster
    assert first["matmul"] in gemm.PATHS
    for path in [path for path in gemm.PATHS if gemm.accurate(path)]:  # (an inaccurate one is refused: test_gemm)
        again = evaluation.evaluate_run(copy, k=20, examples=8, seed=3, matmul=path)
        assert again["matmul"] == path
        if path == first["matmul"]:
            assert numbers(again) == numbers(first)


def test_a_finished_evaluation_removes_the_batches_kept_by_any_number_of_ranks(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    partial = resumable.partial_path(copy / "eval-test-k10.json")
    left = [partial, *(partial.with_name(f"{partial.stem}-rank{r}{partial.suffix}") for r in (0, 1))]
    other = resumable.partial_path(copy / "eval-test-k20.json")  # another evaluation's, still to be continued
    for path in (*left, other):
        path.write_bytes(b"batches of a stopped evaluation")
    evaluation.evaluate_run(copy, k=10, device="cpu")
    assert not any(path.exists() for path in left) and other.exists()


def test_batches_kept_from_a_checkpoint_replaced_as_it_was_read_are_not_reused(
        run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a run still training writes a new checkpoint right after an evaluation read the old one: the batches that
    # evaluation keeps belong to the old model, and the next evaluation, of the new one, starts afresh
    options = ["--k", "20", "--batch-size", "5", "--device", "cpu", "--no-compile", "--matmul", "default"]
    raced, fresh = tmp_path / "raced", tmp_path / "fresh"
    shutil.copytree(run, raced)
    newer = checkpoint.load(run)
    newer["model"] = {name: tensor + 0.05 for name, tensor in newer["model"].items()}
    newer["wall_time_s"] += 1.0
    checkpoint.save(fresh.parent, newer, name="newer.pt")
    shutil.copytree(run, fresh)
    shutil.copy(tmp_path / "newer.pt", fresh / rundir.CHECKPOINT)
    load_model = checkpoint.load_model

    def read_then_replaced(run_dir: Path, device: object) -> object:
        loaded = load_model(run_dir, device)
        shutil.copy(tmp_path / "newer.pt", run_dir / rundir.CHECKPOINT)
        return loaded

    def stop(*args: object) -> None:
        raise signals.Interrupted("the evaluation stopped by SIGTERM", signal.SIGTERM, "the same command")

    with monkeypatch.context() as patched:
        patched.setattr(checkpoint, "load_model", read_then_replaced)
        patched.setattr(evaluation, "posterior_mean_variances", stop)
        assert main(["evaluate", str(raced), *options]) == 128 + signal.SIGTERM
    assert len(archives.load(resumable.partial_path(raced / "eval-test-k20.json"))["pieces"]) == 4
    assert main(["evaluate", str(raced), *options]) == 0
    assert main(["evaluate", str(fresh), *options]) == 0
    assert numbers(json.loads((raced / "eval-test-k20.json").read_text())) == numbers(
        json.loads((fresh / "eval-test-k20.json").read_text()))


def test_an_evaluations_numbers_are_the_means_and_standard_errors_of_its_examples(
        run: Path, tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """eval.json's NLL, bounds and ESS from the per-example statistics the passes give (SE: the sample standard
    deviation over sqrt(n)); active units on the run's training examples."""
    shutil.copytree(run, tmp_path / "run")
    passes, batch_statistics = [], evaluation.batch_statistics

    def recorded(*args: object, **kwargs: object) -> Iterator[likelihood.WeightStatistics]:
        for stats in batch_statistics(*args, **kwargs):
            passes.append(stats)
            yield stats

    units, variances = [], evaluation.posterior_mean_variances
    monkeypatch.setattr(evaluation, "batch_statistics", recorded)
    monkeypatch.setattr(evaluation, "posterior_mean_variances", lambda model, x: units.append(x) or variances(model, x))
    result = evaluation.evaluate_run(tmp_path / "run", k=20, batch_size=5, device="cpu", matmul="default",
                                     compile=False)
    stats = likelihood.concatenate(passes)
    nll = -stats.log_likelihood.double()
    n = len(nll)
    assert n == 16 and len(passes) == 4
    expected = {"nll": nll.mean().item(), "nll_se": nll.std(correction=1).item() / n**0.5,
                "bounds": {str(g): b.double().mean().item() for g, b in stats.bounds.items()},
                "bounds_se": {str(g): b.double().std(correction=1).item() / n**0.5 for g, b in stats.bounds.items()},
                "ess_per_k": stats.ess.double().mean().item() / 20}
    saved = json.loads(Path(result["path"]).read_text())
    for key, value in expected.items():
        assert saved[key] == pytest.approx(value, rel=1e-6), key
    assert set(saved["bounds"]) == {"1", "5", "20"} and saved["bounds"]["1"] < saved["bounds"]["20"] < 0
    loaded = data.load(tiny_dataset)
    assert len(units) == 1 and saved["active_units_examples"] == len(loaded.train) == 64
    assert torch.equal(units[0], splits.split_examples(loaded, "train", 0, 500))


def test_a_runs_own_k_is_5000_where_its_training_evaluated_nothing(run: Path) -> None:
    assert rundir.read_config(run)["eval_k"] == 0
    assert evaluation.own_k(run) == 5000 == inspect.signature(evaluation.evaluate_run).parameters["k"].default


def test_the_printed_table_gives_each_bound_its_own_standard_error() -> None:
    result = {"k": 50, "dataset": "mnist", "split": "test", "examples": 10, "run": "r", "epoch": 3, "nll": 90.0,
              "nll_se": 0.11, "bounds": {"50": -90.0, "5": -92.5}, "bounds_se": {"50": 0.11, "5": 0.22},
              "ess": 5.0, "active_units": [7], "latent_units": [50], "active_units_examples": 500,
              "active_units_threshold": 0.01}
    lines = evaluation.format_evaluation(result).splitlines()
    assert [line.split()[0] for line in lines[3:5]] == ["L_5", "L_50"]
    assert lines[3].endswith("-92.50 +- 0.22") and lines[4].endswith("-90.00 +- 0.11")
    assert lines[2].endswith("90.00 +- 0.11 nats (standard error over examples)")
