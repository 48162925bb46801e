"""Stacked seeds (``iwae.training.stacked``): each seed of a stacked run follows its lone run's trajectory (bit for bit
when compiled on a CPU), a stacked run killed at random moments (inside and between its checkpoint commits) resumes
to the parameters of an uninterrupted one bit for bit, and every seed's directory is an ordinary run."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import CUDA, same_matmul_as
from test_train import interrupt_at_call

from iwae import cli, plots
from iwae.platform import gemm
from iwae.runs import checkpoint, evaluation, lone_run, rundir, runlock, stacked_run
from iwae.training import config as train_config
from iwae.training import minibatches, signals, stacked

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def config(dataset: str, seed: int, **overrides: object) -> train_config.TrainConfig:
    settings = {"dataset": dataset, "epochs": 13, "batch_size": 8, "k": 4, "eval_k": 0, "monitor_examples": 8,
                "device": "cpu", "seed": seed, **overrides}
    return train_config.TrainConfig(**settings)


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    {"objective": "iwae", "estimator": "dreg"},
    {"objective": "piwae", "m": 2, "estimator": "standard", "layers": 2},
    {"objective": "iwae", "estimator": "standard", "compile": True},
    pytest.param({"objective": "iwae", "estimator": "standard", "compile": True, "device": "cuda"}, marks=CUDA,
                 id="cuda"),
])
def test_each_seed_follows_its_lone_run(tiny_dataset: str, tmp_path: Path, settings: dict) -> None:
    # 13 epochs of 8 steps: 104 Adam steps, the lone run multiplying on the stack's recorded path (--matmul).
    # Compiled on a CPU, a seed computes what its lone run computes, element for element: the same parameters, bit
    # for bit. Eagerly, torch's CPU kernels of the reductions over K (softmax, logsumexp) and of the matrix
    # products round differently for a stack's (K, S, B) tensors than for a lone run's (K, B), so the parameters
    # (of size ~0.25) agree to the documented float32 tolerance (docs/design.md; measured: at most 3.4e-6). On a
    # GPU the stack's batched products round differently from the lone run's too (measured on an H200 with torch
    # 2.11: one parameter of 40,000 off by 2.5e-5 after these 104 steps).
    configs = [config(tiny_dataset, seed, **settings) for seed in (0, 3)]
    stacked_run.train_stacked(configs, tmp_path / "stack", progress=False)
    recorded = [checkpoint.load(tmp_path / "stack" / f"seed-{c.seed}")["config"] for c in configs]
    assert all(r["compile"] == settings.get("compile", False) for r in recorded)
    assert len({r["matmul"] for r in recorded}) == 1
    for lone in configs:
        lone = replace(lone, matmul=recorded[0]["matmul"])
        lone_run.train(lone, tmp_path / f"lone-{lone.seed}", progress=False)
        ours = checkpoint.load(tmp_path / "stack" / f"seed-{lone.seed}")
        theirs = checkpoint.load(tmp_path / f"lone-{lone.seed}")
        assert ours["epoch"] == theirs["epoch"] == 13
        bit_for_bit = settings.get("compile", False) and settings.get("device", "cpu") == "cpu"
        for name, value in theirs["model"].items():
            if bit_for_bit:
                assert torch.equal(ours["model"][name], value), name
            else:
                atol = 2e-5 if settings.get("device", "cpu") == "cpu" else 1e-4
                torch.testing.assert_close(ours["model"][name], value, rtol=0, atol=atol)
        # the seeds' generators are where the lone run's are: the same draws follow
        for key in ("cpu", "data", *(["cuda"] if settings.get("device") == "cuda" else [])):
            assert torch.equal(ours["rng"][key], theirs["rng"][key]), key
        bounds = [m["test_bound"] for m in rundir.read_metrics(tmp_path / f"lone-{lone.seed}")]
        stacked_bounds = [m["test_bound"] for m in rundir.read_metrics(tmp_path / "stack" / f"seed-{lone.seed}")]
        assert stacked_bounds == pytest.approx(bounds, abs=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="one matmul path only")
def test_a_stack_multiplies_on_the_path_faster_for_its_own_step(tiny_dataset: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    timed = []

    def choose(workload: Callable[[], object]) -> str:  # as if oneDNN were measured the faster on the workload
        workload()
        timed.append(workload)
        return gemm.ONEDNN

    monkeypatch.setattr(gemm, "_chosen", {})
    monkeypatch.setattr(gemm, "choose", choose)
    configs = [config(tiny_dataset, seed, epochs=1) for seed in (0, 1, 2)]
    stacked_run.train_stacked(configs, tmp_path / "stack", progress=False)
    assert len(timed) == 1 and [key[-1] for key in gemm._chosen] == [3]  # timed once, on the 3-seed step
    assert {checkpoint.load(tmp_path / "stack" / f"seed-{s}")["config"]["matmul"] for s in (0, 1, 2)} == {
        gemm.ONEDNN}


@pytest.mark.slow
def test_a_seed_directory_is_an_ordinary_run(tiny_dataset: str, tmp_path: Path) -> None:
    configs = [config(tiny_dataset, seed, epochs=1) for seed in (0, 1)]
    stacked_run.train_stacked(configs, tmp_path / "stack", progress=False)
    result = evaluation.evaluate_run(tmp_path / "stack" / "seed-1", k=10, device="cpu")
    assert result["epoch"] == 1 and len(result["active_units"]) == 1
    assert rundir.read_json(tmp_path / "stack" / stacked_run.STACK) == {"seeds": [0, 1], "epoch": 1, "step": 0}


def test_stack_of_different_settings_is_refused(tiny_dataset: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="share every setting but the seed"):
        stacked_run.train_stacked([config(tiny_dataset, 0), config(tiny_dataset, 1, k=2)], tmp_path / "s")
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match=re.escape("the seeds of a stack must differ; got seeds [0, 1, 0]")):
        stacked_run.train_stacked([config(tiny_dataset, seed) for seed in (0, 1, 0)], tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_bad_seeds_is_one_line(tiny_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--dataset", tiny_dataset, "--epochs", "1", "--seeds", "0", "--out",
                     str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.startswith("iwae: error: --seeds must be a positive number of seeds; got 0")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_a_stacked_run_resumes_with_new_runtime_settings(tiny_dataset: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    append, appended = rundir.append_metrics, []

    def fail_in_epoch_2(run_dir: Path, record: dict) -> None:  # a crash after epoch 1's checkpoint
        append(run_dir, record)
        appended.append(record)
        if len(appended) == 3:
            raise RuntimeError("killed")

    monkeypatch.setattr(rundir, "append_metrics", fail_in_epoch_2)
    with pytest.raises(RuntimeError, match="killed"):
        stacked_run.train_stacked([config(tiny_dataset, seed, epochs=3) for seed in (0, 1)], tmp_path / "s",
                              progress=False)
    monkeypatch.undo()
    (tmp_path / "moved").mkdir()  # (the command line refuses --data-dir for a user's file, which reads none there)
    assert stacked_run.resume_stacked(tmp_path / "s", {"data_dir": str(tmp_path / "moved"), "checkpoint_every_s": 7},
                                      progress=False)
    for seed in (0, 1):
        state = checkpoint.load(tmp_path / "s" / f"seed-{seed}")
        assert state["epoch"] == 3
        assert (state["config"]["data_dir"], state["config"]["checkpoint_every_s"]) == (str(tmp_path / "moved"), 7)
    assert cli.main(["train", "--resume", str(tmp_path / "s"), "--k", "2"]) == 2  # not a runtime setting


def test_a_stack_too_large_for_memory_is_refused_at_once(tiny_dataset: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    assert cli.main(["train", "--dataset", tiny_dataset, "--epochs", "1", "--seeds", str(10**11), "--device", "cpu",
                     "--out", str(tmp_path / "s")]) == 2
    assert time.perf_counter() - start < 10
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"iwae: error: training --seeds {10**11} of --model burda (its parameters")
    assert line.endswith("use a smaller --model or --seeds")
    assert not (tmp_path / "s").exists()


EPOCHS = 30


def command(dataset: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "iwae.cli", "train", "--dataset", dataset, "--epochs", str(EPOCHS), "--batch-size",
            "8", "--k", "4", "--eval-k", "0", "--monitor-examples", "8", "--device", "cpu", "--seeds", "2",
            "--checkpoint-every", "0", "--out", str(out)]


@pytest.mark.slow
def test_stacked_run_killed_at_random_moments_resumes_exactly(tiny_dataset: str, tmp_path: Path) -> None:
    reference, run = tmp_path / "reference", tmp_path / "run"
    done = subprocess.run(command(tiny_dataset, reference), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rng, kills, args = random.Random(0), 0, [*command(tiny_dataset, run), *same_matmul_as(reference / "seed-0")]
    pending = run / "seed-0" / stacked_run.NEXT
    for attempt in range(8):
        process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (run / stacked_run.STACK).exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if attempt % 2:  # inside a commit
            while not pending.exists() and process.poll() is None:
                pass
        else:
            time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is not None:
            break
        process.kill()
        process.wait()
        kills += 1
        args = [sys.executable, "-m", "iwae.cli", "train", "--resume", str(run)]
    assert kills >= 2
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for seed in (0, 1):
        ours, theirs = (checkpoint.load(root / f"seed-{seed}") for root in (run, reference))
        assert ours["epoch"] == EPOCHS
        assert all(torch.equal(ours["model"][name], theirs["model"][name]) for name in theirs["model"])
        for index, moments in theirs["optimizer"]["state"].items():
            assert all(torch.equal(value, ours["optimizer"]["state"][index][key]) for key, value in moments.items())
        epochs = [m["epoch"] for m in rundir.read_metrics(run / f"seed-{seed}")]
        assert epochs == list(range(1, EPOCHS + 1))


def test_a_finished_stack_records_its_moved_file(tiny_dataset: str, tmp_path: Path) -> None:
    mine, moved = tmp_path / "mine.npz", tmp_path / "moved.npz"
    mine.write_bytes(Path(tiny_dataset).read_bytes())
    stacked_run.train_stacked([config(str(mine), seed, epochs=1) for seed in (0, 1)], tmp_path / "s", progress=False)
    mine.rename(moved)
    stacked_run.resume_stacked(tmp_path / "s", {"dataset": str(moved)}, progress=False)
    for seed in (0, 1):
        assert checkpoint.load(tmp_path / "s" / f"seed-{seed}")["config"]["dataset"] == str(moved)
        assert evaluation.evaluate_run(tmp_path / "s" / f"seed-{seed}", k=2)["dataset"] == str(moved)


def test_a_stack_holds_its_seeds_so_no_lone_resume_trains_one_meanwhile(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, refused = tmp_path / "s", []

    def refuses_lone_resumes(body: Callable[..., object]) -> Callable[..., object]:
        def checked(*args: object, **kwargs: object) -> object:
            for seed in (0, 1):
                with pytest.raises(runlock.RunInUseError):
                    lone_run.resume(out / f"seed-{seed}", progress=False)
                refused.append(seed)
            return body(*args, **kwargs)
        return checked

    monkeypatch.setattr(stacked_run, "fit", refuses_lone_resumes(stacked_run.fit))
    stacked_run.train_stacked([config(tiny_dataset, seed, epochs=1) for seed in (0, 1)], out, progress=False)
    monkeypatch.setattr(stacked_run, "_resume_stacked", refuses_lone_resumes(stacked_run._resume_stacked))
    stacked_run.resume_stacked(out, progress=False)
    assert refused == [0, 1, 0, 1]
    assert lone_run.resume(out / "seed-1", progress=False) is None  # the stack done, a seed is a run of its own


def test_a_stack_of_a_model_with_discrete_latents_is_refused_before_anything_is_written(
    tiny_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--dataset", tiny_dataset, "--model", "sbn-8", "--estimator", "vimco", "--k", "4",
            "--epochs", "1", "--batch-size", "8", "--seeds", "2", "--matmul", "default", "--out", str(tmp_path / "s")]
    assert cli.main(argv) == 2
    assert "stacked seeds need the burda model's Gaussian latents, and sbn-8 has discrete ones" in (
        capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


def test_a_stack_stopped_in_its_evaluation_names_the_stack_to_resume(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, original = tmp_path / "s", evaluation.batch_statistics

    def signalled(*args: object, **kwargs: object) -> object:
        signal.raise_signal(signal.SIGINT)
        yield from original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "batch_statistics", signalled)
        with pytest.raises(signals.Interrupted, match=re.escape(f"finish with: iwae train --resume {out}") + "$"):
            stacked_run.train_stacked([config(tiny_dataset, seed, epochs=1, eval_k=3) for seed in (0, 1)], out,
                                      progress=False)
    assert [result["k"] for result in stacked_run.resume_stacked(out, progress=False)] == [3, 3]


def test_a_stack_stopped_in_a_later_seeds_evaluation_keeps_the_earlier_seeds(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, original = tmp_path / "s", evaluation.evaluate_run
    evaluated: list[str] = []

    def stopped_at_seed_1(run_dir: Path, **kwargs: object) -> dict:
        evaluated.append(Path(run_dir).name)
        if Path(run_dir).name == "seed-1" and len(evaluated) == 2:
            signal.raise_signal(signal.SIGTERM)
        return original(run_dir, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_run", stopped_at_seed_1)
    with pytest.raises(signals.Interrupted, match=re.escape(f"finish with: iwae train --resume {out}") + "$"):
        stacked_run.train_stacked([config(tiny_dataset, seed, epochs=1, eval_k=3) for seed in (0, 1)], out,
                                  progress=False)
    first = (out / "seed-0" / rundir.EVAL).read_bytes()
    results = stacked_run.resume_stacked(out, progress=False)
    assert evaluated == ["seed-0", "seed-1", "seed-1"]  # seed 0's finished evaluation kept
    assert (out / "seed-0" / rundir.EVAL).read_bytes() == first
    assert [result["k"] for result in results] == [3, 3] and all(rundir.is_finished(out / f"seed-{s}") for s in (0, 1))


def test_a_stack_stopped_in_seed_0s_figures_names_its_resume_which_finishes_every_seed(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, original = tmp_path / "s", plots.plot_training

    def signalled(*args: object, **kwargs: object) -> object:
        signal.raise_signal(signal.SIGTERM)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(plots, "plot_training", signalled)
        with pytest.raises(signals.Interrupted, match=re.escape(f"draw them with: iwae train --resume {out}") + "$"):
            stacked_run.train_stacked([config(tiny_dataset, seed, epochs=1, eval_k=3) for seed in (0, 1)], out,
                                      progress=False)
    assert not (out / "seed-1" / rundir.EVAL).exists()
    stacked_run.resume_stacked(out, progress=False)
    for seed in (0, 1):
        assert {path.name for path in (out / f"seed-{seed}" / rundir.FIGURES).iterdir()} == {
            "samples.png", "reconstructions.png", "training.png", "bound_vs_k.png"}


def test_a_damaged_stack_record_is_named_in_one_line(tiny_dataset: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    stacked_run.train_stacked([config(tiny_dataset, seed, epochs=1, eval_k=0) for seed in (0, 1)], out,
                              progress=False)
    capsys.readouterr()
    for damaged in ('[]', '{"seeds": "0", "epoch": 1, "step": 0}', '{"seeds": [0, 0], "epoch": 1, "step": 0}',
                    '{"seeds": [0, 1]}', '{"seeds": [0, 1, 2], "epoch": 1, "step": 0}'):
        (out / stacked_run.STACK).write_text(damaged)
        assert cli.main(["train", "--resume", str(out)]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"iwae: error: {out / stacked_run.STACK}") and "iwae train --resume" in line, line


def test_a_stack_resumes_with_its_own_settings_given_again(tiny_dataset: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    stacked_run.train_stacked([config(tiny_dataset, seed, epochs=1) for seed in (0, 1)], tmp_path / "s",
                              progress=False)
    assert cli.main(["train", "--resume", str(tmp_path / "s"), "--k", "4", "--batch-size", "8"]) == 0
    assert cli.main(["train", "--resume", str(tmp_path / "s"), "--k", "2"]) == 2
    assert "different configuration: --k (run: 4, given: 2)" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", tiny_dataset, "--epochs", "1", "--seed", str(2**63 - 2), "--seeds", "3",
                     "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"--seed {2**63 - 2} with --seeds 3 takes the seeds {2**63 - 2} to {2**63}, past 2**63 - 1; choose a "
        f"--seed of at most {2**63 - 3}")


def test_a_stack_from_a_missing_run_leaves_no_directory(tiny_dataset: str, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no checkpoint in"):
        stacked_run.train_stacked([config(tiny_dataset, seed, epochs=1, init_from=str(tmp_path / "none"))
                                   for seed in (0, 1)], tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def interrupt_in_commit(monkeypatch: pytest.MonkeyPatch, out: Path, commit: int) -> None:
    """Make the ``commit``-th commit of the stack in ``out`` stop (KeyboardInterrupt, as a kill would) after seed 0's
    checkpoint is in place and before seed 1's: seed 1's new checkpoint is still pending beside its old one."""
    original, renames = os.replace, 0

    def replace_then_stop(source: object, target: object) -> None:
        nonlocal renames
        if Path(source) == out / "seed-1" / stacked_run.NEXT:
            renames += 1
            if renames == commit:
                raise KeyboardInterrupt
        original(source, target)

    monkeypatch.setattr(os, "replace", replace_then_stop)


def assert_same_seeds(run: Path, reference: Path) -> None:
    for seed in (0, 1):
        ours, theirs = (checkpoint.load(root / f"seed-{seed}") for root in (run, reference))
        assert ours["epoch"] == theirs["epoch"]
        assert all(torch.equal(ours["model"][name], theirs["model"][name]) for name in theirs["model"])
        # the epochs' training bounds too: the summed bound of an interrupted epoch is each seed's own, restored
        assert [m["train_bound"] for m in rundir.read_metrics(run / f"seed-{seed}")] == [
            m["train_bound"] for m in rundir.read_metrics(reference / f"seed-{seed}")]


def test_a_commit_stopped_between_its_seeds_renames_is_completed_on_resume(tiny_dataset: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    configs = [config(tiny_dataset, seed, epochs=3, matmul="default") for seed in (0, 1)]
    stacked_run.train_stacked(configs, tmp_path / "reference", progress=False)
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_in_commit(patch, run, commit=3)  # the commit after epoch 2 (the first is at the start)
        with pytest.raises(KeyboardInterrupt):
            stacked_run.train_stacked(configs, run, progress=False)
    assert [checkpoint.load(run / f"seed-{s}")["epoch"] for s in (0, 1)] == [2, 1]
    torn = tmp_path / "torn"  # the same stack with seed 1's pending checkpoint lost
    shutil.copytree(run, torn)
    (torn / "seed-1" / stacked_run.NEXT).unlink()
    with pytest.raises(ValueError, match=re.escape(f"the seeds of {torn} are at different positions")):
        stacked_run.resume_stacked(torn, progress=False)
    stacked_run.resume_stacked(run, progress=False)
    assert_same_seeds(run, tmp_path / "reference")


def test_a_stack_drawing_ahead_resumes_exactly_from_inside_a_chunk(tiny_dataset: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each seed's data stream is saved where its own minibatches of the chunk in use leave it, not after the chunk
    drawn ahead."""
    monkeypatch.setattr(minibatches, "CPU_CHUNK_BYTES", 3 * 2 * 8 * 16 * 4)  # chunks of 3 steps of 2 seeds
    monkeypatch.setattr(stacked, "draws_ahead", lambda device: True)
    configs = [config(tiny_dataset, seed, epochs=3, matmul="default") for seed in (0, 1)]
    stacked_run.train_stacked(configs, tmp_path / "reference", progress=False)
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, 13, signal.SIGINT)  # epoch 2, step 5: inside its second chunk, the third drawn ahead
        with pytest.raises(signals.Interrupted):
            stacked_run.train_stacked(configs, tmp_path / "run", progress=False)
    assert checkpoint.load(tmp_path / "run" / "seed-1")["step"] == 5
    stacked_run.resume_stacked(tmp_path / "run", progress=False)
    assert_same_seeds(tmp_path / "run", tmp_path / "reference")
