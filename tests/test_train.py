"""The trainer: schedule, configuration checks, the run directory, and exact resume, in-process and of the
real command (a run stopped by SIGINT, and runs killed by SIGKILL at random moments, between and during
checkpoint writes, continue to the parameters of an uninterrupted run, bit for bit)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import messages, same_matmul_as

import iwae
from iwae import cli, data, plots
from iwae.eval import splits
from iwae.platform import distributed, files
from iwae.runs import checkpoint, evaluation, lone_run, rundir, runlock
from iwae.runs import figures as run_figures
from iwae.training import config as train_config
from iwae.training import lone, signals, state
from iwae.training import step as train_step
from iwae.training.config import TrainConfig


def tiny_config(dataset: str, **overrides: object) -> TrainConfig:
    """A run of 3 epochs of 8 minibatches of 8 examples, k=4, no final evaluation."""
    settings = {"dataset": dataset, "epochs": 3, "batch_size": 8, "k": 4, "eval_k": 0, "monitor_examples": 8,
                "device": "cpu", **overrides}
    return TrainConfig(**settings)


def assert_same_parameters(a: Path, b: Path) -> None:
    first, second = checkpoint.load(a), checkpoint.load(b)
    assert first["epoch"] == second["epoch"]
    assert first["model"].keys() == second["model"].keys()
    for name, tensor in first["model"].items():
        assert torch.equal(tensor, second["model"][name]), name
    for index, moments in first["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, second["optimizer"]["state"][index][key]), (index, key)


def test_burda_schedule_is_the_papers() -> None:
    stages = train_config.burda_schedule()
    assert [epochs for epochs, _ in stages] == [3**i for i in range(8)]
    assert sum(epochs for epochs, _ in stages) == 3280
    assert stages[0][1] == pytest.approx(1e-3) and stages[-1][1] == pytest.approx(1e-4)
    assert [epochs for epochs, _ in train_config.burda_schedule(0.01)] == [1, 1, 1, 1, 1, 2, 7, 22]


def test_burda_schedule_lowers_the_rate_by_ten_to_the_one_seventh_each_stage() -> None:
    assert [lr for _, lr in train_config.burda_schedule(0.5)] == pytest.approx([1e-3 * 10 ** (-i / 7)
                                                                              for i in range(8)], rel=1e-12)


def test_config_defaults_are_the_papers_optimizer_settings() -> None:
    """Adam with beta1 0.9, beta2 0.999, epsilon 1e-4 on minibatches of 20 (Burda et al. 2016, section 5)."""
    config = TrainConfig(epochs=1)
    assert (config.beta1, config.beta2, config.adam_eps, config.batch_size) == (0.9, 0.999, 1e-4, 20)
    assert (config.data_split, config.eval_k, config.seed) == ("paper", 5000, 0)


def test_model_and_data_seeds_are_fixed_and_distinct() -> None:
    """A run's initialisation and data stream follow from its seed alone, the same in every version."""
    assert state.model_and_data_seeds(0) == (3757552657, 673228719)
    for seed in (0, 1, 2**63 - 1):
        model_seed, data_seed = state.model_and_data_seeds(seed)
        assert model_seed != data_seed and state.model_and_data_seeds(seed) == (model_seed, data_seed)
    assert state.model_and_data_seeds(1) != state.model_and_data_seeds(0)


def test_the_loop_trains_each_stage_at_its_rate_with_the_configs_adam(tiny_dataset: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    rates: list[float] = []
    set_lr = train_step.TrainStep.set_lr
    monkeypatch.setattr(train_step.TrainStep, "set_lr", lambda step, lr: rates.append(lr) or set_lr(step, lr))
    config = tiny_config(tiny_dataset, epochs=None, schedule="burda", schedule_scale=0.001, beta1=0.8, beta2=0.99,
                         adam_eps=1e-3)
    lone_run.train(config, tmp_path / "run", progress=False)
    stages = train_config.burda_schedule(0.001)
    expected = [lr for epochs, lr in stages for _ in range(epochs)]
    assert rates == expected and [record["lr"] for record in rundir.read_metrics(tmp_path / "run")] == expected
    group = checkpoint.load(tmp_path / "run")["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-4) and group["betas"] == (0.8, 0.99) and group["eps"] == 1e-3


def test_the_training_bound_is_the_epochs_mean_bound_per_example(tiny_dataset: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every example's bound set to -1 - (its first pixel): each epoch's train_bound is minus one minus the mean
    first pixel of the examples it trained on."""
    original = train_step.loss
    first_pixels: list[torch.Tensor] = []

    def loss(model: object, x: torch.Tensor, *args: object, **kwargs: object) -> object:
        out = original(model, x, *args, **kwargs)
        first_pixels.append(x[..., 0].detach().clone())
        return out._replace(bound=-1.0 - x[..., 0])

    monkeypatch.setattr(train_step, "loss", loss)
    lone_run.train(tiny_config(tiny_dataset, epochs=2, compile=False), tmp_path / "run", progress=False)
    steps = len(first_pixels) // 2
    expected = [-1.0 - float(torch.cat(first_pixels[e * steps:(e + 1) * steps]).double().mean()) for e in range(2)]
    bounds = [record["train_bound"] for record in rundir.read_metrics(tmp_path / "run")]
    assert bounds == pytest.approx(expected, rel=1e-12) and bounds[0] != bounds[1]


def test_learning_rate_follows_the_stages() -> None:
    stages = train_config.burda_schedule()
    assert train_config.learning_rate(stages, 0) == (0, pytest.approx(1e-3))
    assert train_config.learning_rate(stages, 1)[0] == 1
    assert train_config.learning_rate(stages, 3)[0] == 1
    assert train_config.learning_rate(stages, 4)[0] == 2
    assert train_config.learning_rate(stages, 3279) == (7, pytest.approx(1e-4))
    with pytest.raises(ValueError, match="beyond"):
        train_config.learning_rate(stages, 3280)


def test_config_resolves_the_schedule_and_survives_a_round_trip() -> None:
    burda = TrainConfig(schedule="burda", schedule_scale=0.01)
    assert burda.epochs == 36 and burda.lr is None
    constant = TrainConfig(epochs=5)
    assert constant.lr == 1e-3
    for config in (burda, constant):
        assert TrainConfig(**json.loads(json.dumps(asdict(config)))) == config


def test_config_records_the_data_folder_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run started with a relative --data-dir finds its data from any directory it is resumed or evaluated in."""
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(epochs=1, data_dir="data").data_dir == str(tmp_path / "data")
    assert TrainConfig(epochs=1).data_dir is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"objective": "nope"}, "unknown objective 'nope'"),
        ({"estimator": "nope"}, "unknown estimator 'nope'"),
        ({"k": 0}, "k must be a positive integer"),
        ({"objective": "miwae", "k": 10, "m": 3}, "m must be a positive integer dividing k"),
        ({"objective": "vr", "alpha": float("-inf")}, "no DReG estimator"),
        ({"layers": 3}, "layers must be 1 or 2"),
        ({"model": "sbn-4-2", "estimator": "vimco", "layers": 2}, "layers applies to the paper's architecture"),
        ({"schedule": "cosine"}, "unknown schedule"),
        ({"schedule": "burda", "epochs": 5}, "epochs and lr do not apply to schedule burda"),
        ({"epochs": None}, "give the number of epochs"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"lr": -1.0}, "lr must be a finite number > 0"),
        ({"lr": float("inf")}, "lr must be a finite number > 0"),
        ({"schedule": "burda", "schedule_scale": float("inf")}, "schedule_scale must be a finite number > 0"),
        ({"schedule": "burda", "schedule_scale": 1e308}, r"schedule_scale 1e\+308 makes more epochs than"),
        ({"beta2": 1.0}, r"beta2 must lie in \[0, 1\)"),
        ({"seed": -1}, "seed must be an integer from 0 to 2\\*\\*63 - 1; got -1"),
        ({"seed": 2**63}, "seed must be an integer from 0"),
        ({"device": "bogus"}, "unknown device 'bogus'; choose cpu, cuda or auto"),
        ({"device": "meta"}, "unsupported device 'meta'"),
        ({"compile": "yes"}, r"compile must be True, False or None \(decided by the run's length\); got 'yes'"),
        ({"init_from": 5}, "init_from must be a path or a name \\(a string\\); got 5"),
        ({"dataset": 5}, "dataset must be a path or a name"),
        ({"model": 5}, "model must be a model's name, burda or sbn-H1-...-HL; got 5"),
        ({"beta1": None}, "beta1 must be a real number; got None"),
        ({"checkpoint_every_s": "60"}, "checkpoint_every_s must be a real number; got '60'"),
    ],
)
def test_config_rejects_bad_settings(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"epochs": 1, **settings})


def test_config_takes_numpy_integers_as_ints() -> None:
    config = TrainConfig(epochs=np.int64(2), k=np.int64(5), m=np.int64(1), seed=np.int64(3), threads=np.int32(1),
                         batch_size=np.int16(10), eval_k=np.int64(0), monitor_examples=np.int64(7))
    assert config == TrainConfig(epochs=2, k=5, seed=3, threads=1, batch_size=10, eval_k=0, monitor_examples=7)
    assert all(type(value) is int for value in asdict(config).values() if isinstance(value, np.integer | int))


def test_config_takes_a_torch_device() -> None:
    assert TrainConfig(epochs=1, device=torch.device("cpu")).device == torch.device("cpu")


def test_config_takes_paths_and_a_device_this_machine_may_lack(tmp_path: Path) -> None:
    config = TrainConfig(epochs=1, dataset=tmp_path / "mine.npy", init_from=tmp_path / "run", data_dir=tmp_path,
                         device="cuda:1")
    assert (config.dataset, config.init_from, config.data_dir) == (str(tmp_path / "mine.npy"), str(tmp_path / "run"),
                                                                   str(tmp_path))
    assert json.loads(json.dumps(asdict(config))) == asdict(config)


def test_training_refuses_settings_that_are_not_a_config(tmp_path: Path) -> None:
    for train, settings in ((iwae.train, {"epochs": 1}), (iwae.train_stacked, [{"epochs": 1, "seed": 0}])):
        with pytest.raises(TypeError, match=re.escape("a run's settings must be a TrainConfig, not a dict; give "
                                                      "TrainConfig(**settings)")):
            train(settings, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_writes_config_metrics_checkpoint_evaluation_and_figures(tiny_dataset: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = lone_run.train(tiny_config(tiny_dataset, epochs=2, eval_k=20), run, progress=False)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # Ctrl-C works after it
    assert json.loads((run / rundir.CONFIG).read_text())["device"] == "cpu"
    metrics = rundir.read_metrics(run)
    assert [record["epoch"] for record in metrics] == [1, 2]
    for record in metrics:
        assert record["examples_per_s"] > 0 and record["lr"] == 1e-3
        assert record["train_bound"] < 0 and record["test_bound"] < 0 and record["wall_time_s"] > 0
    assert checkpoint.load(run)["epoch"] == 2
    saved = json.loads((run / rundir.EVAL).read_text())
    assert result == {**saved, "path": str(run / rundir.EVAL)}
    assert saved["k"] == 20 and saved["examples"] == 16 and len(saved["active_units"]) == 1
    assert saved["nll"] > 0 and saved["nll_se"] > 0 and set(saved["bounds"]) == {"1", "5", "20"}
    figures = {path.name for path in (run / rundir.FIGURES).iterdir()}
    assert figures == {"samples.png", "reconstructions.png", "training.png", "bound_vs_k.png"}


def test_the_monitor_bound_is_on_a_random_test_subset(tiny_dataset: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monitored: list[torch.Tensor] = []
    monitor = lone.LoneSeed.monitor
    monkeypatch.setattr(lone.LoneSeed, "monitor", lambda seeds, x: monitored.append(x) or monitor(seeds, x))
    lone_run.train(tiny_config(tiny_dataset, epochs=1, monitor_examples=5), tmp_path / "run", progress=False)
    test = data.load(tiny_dataset).test
    assert len(monitored) == 1 and torch.equal(monitored[0], splits.subset(test, 5))  # as evaluate --examples 5
    assert not torch.equal(monitored[0], test[:5])


def interrupt_at_call(monkeypatch: pytest.MonkeyPatch, call: int, sig: signal.Signals) -> None:
    """Make the trainer receive ``sig`` during its ``call``-th loss evaluation (1-based)."""
    calls = 0
    original = train_step.loss

    def loss(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == call:
            signal.raise_signal(sig)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_step, "loss", loss)


@pytest.mark.parametrize(("call", "sig"), [(13, signal.SIGINT), (8, signal.SIGTERM), (1, signal.SIGINT)])
def test_interrupt_then_resume_matches_an_uninterrupted_run(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: int, sig: signal.Signals
) -> None:
    lone_run.train(tiny_config(tiny_dataset), tmp_path / "reference", progress=False)
    run = tmp_path / "interrupted"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, call, sig)
        with pytest.raises(signals.Interrupted, match=f"iwae train --resume {run}") as stopped:
            lone_run.train(tiny_config(tiny_dataset), run, progress=False)
    assert stopped.value.signal == sig
    position = checkpoint.load(run)
    assert position["epoch"] * 8 + position["step"] == call  # stopped right after the step it was signalled in
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # handlers restored
    assert position["wall_time_s"] > 0
    position["wall_time_s"] += 1e6  # (a run stopped after days: its clocks go on from there)
    position["epoch_time_s"] += 1e6 if position["step"] else 0  # (the interrupted epoch's)
    checkpoint.save(run, {key: value for key, value in position.items() if key != "format"})
    resumed_at = time.monotonic()
    lone_run.resume(run, progress=False)
    resumed_for = time.monotonic() - resumed_at
    assert_same_parameters(tmp_path / "reference", run)
    metrics = rundir.read_metrics(run)
    assert [record["epoch"] for record in metrics] == [1, 2, 3]
    # the interrupted epoch's bound summed on from where it stood
    assert [record["train_bound"] for record in metrics] == [
        record["train_bound"] for record in rundir.read_metrics(tmp_path / "reference")]
    assert all(position["wall_time_s"] < record["wall_time_s"] < position["wall_time_s"] + resumed_for
               for record in metrics if record["epoch"] * 8 > call)
    assert [record["epoch_time_s"] > 1e6 for record in metrics] == [
        record["epoch"] == position["epoch"] + 1 and position["step"] > 0 for record in metrics]


def test_a_second_signal_acts_as_it_would_have() -> None:
    """The handler in place before the block (here Python's own; a process started in the background may have
    SIGINT ignored) takes the second signal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with signals.StopOnSignal() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.received == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_resumed_run_trains_on_its_recorded_thread_count(tiny_dataset: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    run, before = tmp_path / "run", torch.get_num_threads()
    try:
        with monkeypatch.context() as patch:
            interrupt_at_call(patch, 3, signal.SIGINT)
            with pytest.raises(signals.Interrupted):
                lone_run.train(tiny_config(tiny_dataset, threads=1), run, progress=False)
        torch.set_num_threads(2)
        trained_on: list[int] = []
        fit = lone_run.fit
        monkeypatch.setattr(lone_run, "fit", lambda *args: trained_on.append(torch.get_num_threads()) or fit(*args))
        lone_run.resume(run, progress=False)
        assert trained_on == [1] and rundir.read_json(run / rundir.CONFIG)["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_a_new_run_seeds_its_initialisation_and_its_data_stream_from_its_seed(tiny_dataset: str) -> None:
    model_seed, data_seed = state.model_and_data_seeds(7)
    dataset = data.load(tiny_dataset)
    started, _ = state.start(tiny_config(tiny_dataset, seed=7), dataset)
    assert torch.initial_seed() == model_seed  # the initialisation, then the noise, from the model's seed
    assert torch.equal(started.rng["data"], torch.Generator().manual_seed(data_seed).get_state())
    again, other = (state.start(tiny_config(tiny_dataset, seed=seed), dataset)[0].model for seed in (7, 8))
    assert all(torch.equal(again[name], value) for name, value in started.model.items())
    assert not any(torch.equal(other[name], value) for name, value in started.model.items() if "weight" in name)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_in_the_final_evaluation_names_the_command_that_finishes_the_run(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals
) -> None:
    reference = lone_run.train(tiny_config(tiny_dataset, eval_k=10), tmp_path / "reference", progress=False)
    run = tmp_path / "stopped"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    original = evaluation.batch_statistics

    def signalled(*args: object, **kwargs: object) -> object:
        signal.raise_signal(sig)
        yield from original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "batch_statistics", signalled)
        with pytest.raises(signals.Interrupted, match=re.escape(
                f"its evaluation stopped by {sig.name}; finish with: iwae train --resume {run}")) as stopped:
            lone_run.train(tiny_config(tiny_dataset, eval_k=10), run, progress=False)
    assert stopped.value.signal == sig
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # handlers restored
    assert checkpoint.load(run)["epoch"] == 3 and not (run / rundir.EVAL).exists()
    assert lone_run.resume(run, progress=False)["nll"] == reference["nll"]
    assert json.loads((run / rundir.EVAL).read_text())["nll"] == reference["nll"]


def test_an_earlier_checkpoints_evaluation_is_not_taken_for_the_final_one(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = lone_run.train(tiny_config(tiny_dataset, eval_k=10), tmp_path / "reference", progress=False)
    run, append = tmp_path / "run", rundir.append_metrics

    def killed_after_epoch_2(run_dir: Path, record: dict) -> None:
        append(run_dir, record)
        if record["epoch"] == 2:
            raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(rundir, "append_metrics", killed_after_epoch_2)
        with pytest.raises(RuntimeError, match="killed"):
            lone_run.train(tiny_config(tiny_dataset, eval_k=10), run, progress=False)
    # a look at the run while it trains: the run's own evaluation file, of the checkpoint after epoch 1
    assert evaluation.evaluate_run(run, k=10)["epoch"] == 1 and (run / rundir.EVAL).is_file()
    original = evaluation.batch_statistics

    def signalled(*args: object, **kwargs: object) -> object:
        signal.raise_signal(signal.SIGTERM)
        yield from original(*args, **kwargs)

    with monkeypatch.context() as patch:  # the run trains to its end and is stopped in its final evaluation
        patch.setattr(evaluation, "batch_statistics", signalled)
        with pytest.raises(signals.Interrupted, match="its evaluation stopped"):
            lone_run.resume(run, progress=False)
    assert checkpoint.load(run)["epoch"] == 3 and not rundir.is_finished(run)
    assert lone_run.resume(run, progress=False)["nll"] == reference["nll"]
    assert json.loads((run / rundir.EVAL).read_text())["epoch"] == 3 and rundir.is_finished(run)


def test_a_finished_run_kept_without_its_checkpoint_is_named_so(tiny_dataset: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    lone_run.train(tiny_config(tiny_dataset, epochs=1, eval_k=3), run, progress=False)
    (run / rundir.CHECKPOINT).unlink()  # as results are kept
    assert rundir.is_finished(run)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(
            f"{run} is a finished run kept without its checkpoint.pt (as results are kept): its evaluation is "
            f"{run / rundir.EVAL}; restore its checkpoint.pt")):
        lone_run.resume(run, progress=False)
    with pytest.raises(rundir.RunDirError, match="holds a finished run kept without its checkpoint \\(as results "
                                                 "are kept\\); choose a new --out"):
        lone_run.train(tiny_config(tiny_dataset, epochs=1, eval_k=3), run, progress=False)


def test_a_final_evaluation_stopped_under_torchrun_says_to_finish_it_with_as_many_ranks(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(tiny_dataset, epochs=1, eval_k=10)
    lone_run.train(replace(config, eval_k=0), tmp_path / "run", progress=False)
    monkeypatch.setattr(distributed, "world", lambda: 2)  # each rank keeps its own batches

    def stopped(*args: object, **kwargs: object) -> None:
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(evaluation, "evaluate_run", stopped)
    with pytest.raises(signals.Interrupted, match=re.escape(
            f"finish with: iwae train --resume {tmp_path / 'run'}, under torchrun with 2 ranks again")):
        lone_run.finish(config, tmp_path / "run", torch.device("cpu"), False, data.load(tiny_dataset))


def test_a_signal_while_the_figures_are_drawn_names_the_command_that_draws_them(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    original = plots.plot_training

    def signalled(*args: object, **kwargs: object) -> object:
        signal.raise_signal(signal.SIGTERM)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(plots, "plot_training", signalled)
        with pytest.raises(signals.Interrupted, match=re.escape(
                f"its figures stopped by SIGTERM; draw them with: iwae sample {run}")):
            lone_run.train(tiny_config(tiny_dataset, eval_k=10), run, progress=False)
    assert (run / rundir.EVAL).is_file() and not (run / rundir.FIGURES / "training.png").exists()
    assert cli.main(["sample", str(run), "--device", "cpu"]) == 0
    assert {path.name for path in (run / rundir.FIGURES).iterdir()} == {
        "samples.png", "reconstructions.png", "training.png", "bound_vs_k.png"}


def test_a_finished_run_that_lacks_figures_gets_them_on_resume(tiny_dataset: str, tmp_path: Path) -> None:
    # a run killed (SIGKILL: no message) while it drew its figures is finished for --resume, which draws them
    run = tmp_path / "run"
    lone_run.train(tiny_config(tiny_dataset, eval_k=10), run, progress=False)
    drawn = {path.name: path.read_bytes() for path in (run / rundir.FIGURES).iterdir()}
    for name in ("training.png", "bound_vs_k.png"):
        (run / rundir.FIGURES / name).unlink()
    lone_run.resume(run, progress=False)
    assert {path.name: path.read_bytes() for path in (run / rundir.FIGURES).iterdir()} == drawn


def test_a_full_disk_in_the_final_evaluation_names_the_command_that_finishes_it(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    write_atomic = rundir.write_atomic

    def full(path: Path, *args: object, **kwargs: object) -> None:
        if path.name == rundir.EVAL:
            raise files.disk_full(path, 10_000, kept=True)
        write_atomic(path, *args, **kwargs)

    monkeypatch.setattr(rundir, "write_atomic", full)
    with pytest.raises(files.DiskFullError) as error:
        lone_run.train(tiny_config(tiny_dataset, eval_k=10), run, progress=False)
    assert str(error.value).startswith(f"no space to write {run / rundir.EVAL}")
    assert str(error.value).endswith(f", then finish with: iwae train --resume {run}")


@pytest.mark.parametrize("call", [13, 14])
def test_minibatches_drawn_ahead_train_and_resume_as_those_drawn_in_turn(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: int
) -> None:
    from iwae.training import lone, minibatches

    monkeypatch.setattr(minibatches, "CPU_CHUNK_BYTES", 3 * 8 * 16 * 4)  # chunks of 3 minibatches of 8 x 16
    monkeypatch.setattr(lone, "draws_ahead", lambda device: False)
    lone_run.train(tiny_config(tiny_dataset), tmp_path / "reference", progress=False)
    monkeypatch.setattr(lone, "draws_ahead", lambda device: True)
    lone_run.train(tiny_config(tiny_dataset), tmp_path / "ahead", progress=False)
    assert_same_parameters(tmp_path / "reference", tmp_path / "ahead")
    run = tmp_path / "interrupted"
    with monkeypatch.context() as patch:  # stopped inside a chunk (after step 5 of epoch 2), or at its end (6)
        interrupt_at_call(patch, call, signal.SIGINT)
        with pytest.raises(signals.Interrupted):
            lone_run.train(tiny_config(tiny_dataset), run, progress=False)
    lone_run.resume(run, progress=False)
    assert_same_parameters(tmp_path / "reference", run)


@pytest.mark.slow
def test_resume_refuses_a_different_configuration(tiny_dataset: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    lone_run.train(tiny_config(tiny_dataset, epochs=1), run, progress=False)
    with pytest.raises(ValueError, match=r"different configuration: k \(run: 4, given: 5\), objective"):
        lone_run.resume(run, {"k": 5, "objective": "elbo", "batch_size": 8}, progress=False)
    with pytest.raises(TypeError, match=re.escape("changes must map settings to their values, e.g. {'threads': 1}; "
                                                  "got a list")):
        lone_run.resume(run, ["threads"], progress=False)
    with pytest.raises(ValueError, match=re.escape("unknown setting 'epochz' in changes; the settings are "
                                                   "TrainConfig's fields")):
        lone_run.resume(run, {"epochz": 2}, progress=False)
    lone_run.resume(run, {"k": 4, "device": "cpu", "checkpoint_every_s": 1.0}, progress=False)  # same, or runtime


@pytest.mark.slow
def test_resume_after_the_last_epoch_only_evaluates(tiny_dataset: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    lone_run.train(tiny_config(tiny_dataset, epochs=1, eval_k=10), run, progress=False)
    (run / rundir.EVAL).unlink()
    before = checkpoint.load(run)
    result = lone_run.resume(run, progress=False)
    assert result is not None and result["k"] == 10 and (run / rundir.EVAL).is_file()
    assert torch.equal(before["model"]["encoder.0.mean.weight"], checkpoint.load(run)["model"]["encoder.0.mean.weight"])


def test_a_fresh_run_never_overwrites_an_existing_one(tiny_dataset: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    lone_run.train(tiny_config(tiny_dataset, epochs=1), run, progress=False)
    saved = (run / rundir.CHECKPOINT).read_bytes()
    with pytest.raises(rundir.RunDirError, match="already exists"):
        lone_run.train(tiny_config(tiny_dataset, epochs=1), run, progress=False)
    assert (run / rundir.CHECKPOINT).read_bytes() == saved


def test_the_run_functions_take_their_directory_as_a_string(tiny_dataset: str, tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    assert iwae.train(tiny_config(tiny_dataset, epochs=1, matmul="default"), run, progress=False) is None
    assert iwae.resume(run, progress=False) is None  # finished: nothing to train, and no evaluation asked for
    assert iwae.evaluate_run(run, k=2, examples=4)["k"] == 2
    stacked = str(tmp_path / "stacked")
    configs = [tiny_config(tiny_dataset, epochs=1, seed=seed) for seed in (0, 1)]
    assert iwae.train_stacked(configs, stacked, progress=False) == [None, None]


def test_a_run_on_a_file_named_relative_to_its_directory_is_found_from_anywhere(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    for folder in (work, elsewhere):
        folder.mkdir()
    shutil.copy(tiny_dataset, work / "mine.npz")
    monkeypatch.chdir(work)
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, 12, signal.SIGINT)  # in epoch 2 of 3
        with pytest.raises(signals.Interrupted):
            lone_run.train(tiny_config("mine.npz", matmul="default"), work / "run", progress=False)
    assert rundir.read_json(work / "run" / rundir.CONFIG)["dataset"] == str(work / "mine.npz")
    with pytest.raises(ValueError, match="different configuration: dataset"):
        lone_run.resume(work / "run", {"dataset": "../elsewhere/mine.npz"}, progress=False)
    lone_run.resume(work / "run", {"dataset": "mine.npz"}, progress=False)  # the same file, named as at the start
    monkeypatch.chdir(elsewhere)
    assert evaluation.evaluate_run(work / "run", k=2)["dataset"] == str(work / "mine.npz")


def test_a_run_knows_its_file_again_changed_or_moved(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, moved = tmp_path / "mine.npz", tmp_path / "moved" / "mine.npz"
    shutil.copy(tiny_dataset, mine)
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, 12, signal.SIGINT)  # in epoch 2 of 3
        with pytest.raises(signals.Interrupted):
            lone_run.train(tiny_config(str(mine), matmul="default"), run, progress=False)
    assert rundir.read_json(run / rundir.CONFIG)["dataset_sha256"] == data.user_file_sha256(mine)
    original = mine.read_bytes()
    arrays = dict(np.load(mine))
    np.savez(mine, train=arrays["train"][::-1], test=arrays["test"])  # the same shape, other data
    for use in (lambda: lone_run.resume(run, progress=False), lambda: evaluation.evaluate_run(run, k=2)):
        with pytest.raises(data.DataError, match=f"{mine} has changed since the run started on it"):
            use()
    moved.parent.mkdir()
    moved.write_bytes(original)
    shutil.copy(mine, tmp_path / "other.npz")
    with pytest.raises(ValueError, match="different configuration: dataset"):  # not the run's file
        lone_run.resume(run, {"dataset": str(tmp_path / "other.npz")}, progress=False)
    lone_run.resume(run, {"dataset": str(moved)}, progress=False)
    assert rundir.read_json(run / rundir.CONFIG)["dataset"] == str(moved)
    assert evaluation.evaluate_run(run, k=2)["dataset"] == str(moved)


@pytest.mark.parametrize("eval_k", [0, 3])
def test_a_finished_run_records_its_moved_file_for_every_command(tiny_dataset: str, tmp_path: Path,
                                                                   eval_k: int) -> None:
    mine, moved = tmp_path / "mine.npz", tmp_path / "moved" / "mine.npz"
    shutil.copy(tiny_dataset, mine)
    run = tmp_path / "run"
    lone_run.train(tiny_config(str(mine), epochs=1, eval_k=eval_k), run, progress=False)
    moved.parent.mkdir()
    mine.rename(moved)
    for use in (lambda: evaluation.evaluate_run(run, k=2), lambda: run_figures.make_figures(run, n=2)):
        with pytest.raises(data.DataError, match=re.escape(f"{mine}, the file the run trained on, does not exist; "
                                                           "if it has moved, give the run its new place once with: "
                                                           "iwae train --resume RUN --dataset NEW_PATH")):
            use()
    lone_run.resume(run, {"dataset": str(moved)}, progress=False)
    assert checkpoint.load(run)["config"]["dataset"] == str(moved)
    assert rundir.read_json(run / rundir.CONFIG)["dataset"] == str(moved)
    assert evaluation.evaluate_run(run, k=2)["dataset"] == str(moved)
    assert len(run_figures.make_figures(run, n=2)) >= 3


def test_an_evaluation_inside_an_epoch_says_where_in_it(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, 12, signal.SIGINT)  # in epoch 2 of 3
        with pytest.raises(signals.Interrupted):
            lone_run.train(tiny_config(tiny_dataset, matmul="default"), run, progress=False)
    saved = checkpoint.load(run)
    assert saved["epoch"] == 1 and 0 < saved["step"] < 8
    result = evaluation.evaluate_run(run, k=2)
    assert (result["epoch"], result["step"]) == (1, saved["step"])
    assert f"{run} after epoch 1 and {saved['step']} minibatches of epoch 2" in evaluation.format_evaluation(result)


def test_a_directory_in_the_way_of_a_new_run_is_named_for_what_it_holds(tiny_dataset: str, tmp_path: Path) -> None:
    config = tiny_config(tiny_dataset, epochs=1)
    stopped = tmp_path / "stopped"  # killed between writing its configuration and its first checkpoint
    stopped.mkdir()
    (stopped / rundir.CONFIG).write_text(json.dumps(asdict(config)))
    with pytest.raises(rundir.RunDirError, match="stopped before its first checkpoint, with nothing to resume; "
                                                 "delete the directory and run the same command again"):
        lone_run.train(config, stopped, progress=False)
    stack = tmp_path / "stack"  # seeds trained together, killed before their first checkpoint
    (stack / "seed-0").mkdir(parents=True)
    (stack / "seed-0" / rundir.CONFIG).write_text(json.dumps(asdict(config)))
    with pytest.raises(rundir.RunDirError, match="stopped before its first checkpoint"):
        rundir.create(stack)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(rundir.RunDirError, match="holds files that are not a run's; choose a new --out"):
        lone_run.train(config, other, progress=False)
    assert [path.name for path in other.iterdir()] == ["notes.txt"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("IWAE_DATA_DIR"), reason="needs the MNIST files: set IWAE_DATA_DIR")
def test_a_short_mnist_run_learns(tmp_path: Path) -> None:
    # One epoch of 60 minibatches of 1000 takes the NLL from about 203 nats (the pixel marginals the output
    # bias starts at) to about 154 on the first 200 test images.
    run = tmp_path / "mnist"
    config = TrainConfig(dataset="mnist", objective="elbo", k=1, epochs=1, batch_size=1000, eval_k=0,
                         monitor_examples=100, device="cpu")
    lone_run.train(config, run, progress=False)
    result = evaluation.evaluate_run(run, k=50, examples=200, device="cpu")
    assert 100 < result["nll"] < 180
    assert result["examples"] == 200 and result["active_units"][0] > 0
    assert (run / rundir.FIGURES / "samples.png").is_file()


# The real command in subprocesses.

# Tiny models train fastest on one thread, and a busy machine slows multi-threaded small kernels badly.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
EPOCHS = 40  # of 8 steps each


def train_command(dataset: str, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "iwae.cli", "train", "--dataset", dataset, "--epochs", str(EPOCHS), "--batch-size", "8",
        "--k", "4", "--eval-k", "0", "--monitor-examples", "8", "--device", "cpu", *args,
    ]


def resume_command(run: Path) -> list[str]:
    return [sys.executable, "-m", "iwae.cli", "train", "--resume", str(run)]


def run_to_completion(command: list[str]) -> None:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def wait_for_checkpoint(run: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until ``process`` has written a checkpoint (a new one, if the run had one already)."""
    path = run / rundir.CHECKPOINT
    before = path.stat().st_mtime_ns if path.exists() else None
    deadline = time.monotonic() + timeout
    while not path.exists() or path.stat().st_mtime_ns == before:
        assert process.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() < deadline, f"no new {path} after {timeout} s"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(tiny_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    run_to_completion(train_command(tiny_dataset, "--out", str(run)))
    return run


@pytest.mark.slow
def test_sigint_checkpoints_and_resume_is_exact(tiny_dataset: str, reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    process = subprocess.Popen(train_command(tiny_dataset, "--out", str(run), *same_matmul_as(reference)), env=ENV,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    wait_for_checkpoint(run, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr
    assert f"checkpoint saved; continue with: iwae train --resume {run}" in stderr
    state = checkpoint.load(run)
    assert 0 < state["epoch"] * 8 + state["step"] < EPOCHS * 8
    run_to_completion(resume_command(run))
    assert_same_parameters(reference, run)
    assert [record["epoch"] for record in rundir.read_metrics(run)] == list(range(1, EPOCHS + 1))


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_a_checkpoint_to_resume_exactly(
    tiny_dataset: str, reference: Path, tmp_path: Path
) -> None:
    # A checkpoint after every step makes writes a large share of the run. Kills alternate between a random
    # moment and the moment a checkpoint's temporary file is seen, so that they land both inside writes (the
    # temporary file is left behind) and between them.
    run, rng = tmp_path / "run", random.Random(0)
    tmp = run / (rundir.CHECKPOINT + ".tmp")
    command = train_command(tiny_dataset, "--out", str(run), "--checkpoint-every", "0", *same_matmul_as(reference))
    kills = {"during a write": 0, "between writes": 0}
    for attempt in range(12):
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_checkpoint(run, process)
        if attempt % 2:
            while not tmp.exists() and process.poll() is None:
                pass
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        if process.poll() is not None:
            break  # it finished before the kill
        process.kill()
        process.wait()
        kills["during a write" if tmp.exists() else "between writes"] += 1
        checkpoint.load(run)  # always a complete checkpoint
        command = resume_command(run)
        if min(kills.values()) >= 1 and sum(kills.values()) >= 3:
            break
    assert min(kills.values()) >= 1, kills
    run_to_completion(resume_command(run))
    assert_same_parameters(reference, run)
    assert [record["epoch"] for record in rundir.read_metrics(run)] == list(range(1, EPOCHS + 1))


def test_a_run_stopped_before_its_first_step_resumes_exactly(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # killed before its first step, a run holds only the checkpoint written at its start (no Adam state yet)
    config = tiny_config(tiny_dataset, matmul="default")
    lone_run.train(config, tmp_path / "whole", progress=False)

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(lone_run, "fit", killed)
        with pytest.raises(KeyboardInterrupt):
            lone_run.train(config, tmp_path / "run", progress=False)
    assert checkpoint.load(tmp_path / "run")["optimizer"] is None
    lone_run.resume(tmp_path / "run", progress=False)
    assert_same_parameters(tmp_path / "whole", tmp_path / "run")


def test_resume_refuses_to_lose_a_checkpointed_epochs_record(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, 20, signal.SIGINT)  # after epoch 2 of 3, in epoch 3
        with pytest.raises(signals.Interrupted):
            lone_run.train(tiny_config(tiny_dataset, matmul="default"), run, progress=False)  # no timing steps
    assert checkpoint.load(run)["epoch"] == 2
    lines = (run / rundir.METRICS).read_text().splitlines(keepends=True)
    (run / rundir.METRICS).write_text(lines[0] + lines[1][:30])  # epoch 2's record cut short
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    done = subprocess.run(resume_command(run), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"iwae: error: {run / rundir.METRICS} has no whole record of epoch 2, though the checkpoint is after epoch 2 "
        f"(a line was cut short or damaged); resuming would lose that record for good: restore metrics.jsonl from "
        "a copy, or start a new run with a new --out")
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    (run / rundir.METRICS).write_text(lines[0] + lines[1] + lines[1][:30])  # a cut line of an epoch to repeat
    run_to_completion(resume_command(run))
    assert [record["epoch"] for record in rundir.read_metrics(run)] == [1, 2, 3]


def interrupted_after_epoch_one(dataset: str, run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of ``tiny_config`` (3 epochs of 8 steps) stopped in its second epoch, its checkpoint after epoch 1."""
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, 12, signal.SIGINT)
        with pytest.raises(signals.Interrupted):
            lone_run.train(tiny_config(dataset, matmul="default"), run, progress=False)  # no timing steps
    assert (checkpoint.load(run)["epoch"], checkpoint.load(run)["step"]) == (1, 4)


def test_a_full_disk_keeps_the_last_checkpoint_and_says_what_is_needed(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    interrupted_after_epoch_one(tiny_dataset, run, monkeypatch)
    before = (run / rundir.CHECKPOINT).read_bytes()
    fsync = os.fsync

    def full(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == rundir.CHECKPOINT + ".tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(files.DiskFullError) as error:
        lone_run.resume(run, progress=False)
    assert re.fullmatch(
        rf"no space to write {run / rundir.CHECKPOINT}: it needs [\d.]+ [KM]B on the disk mounted at /\S*, which has "
        rf"[\d.]+ [KMG]?B free; checkpoint.pt is left as it was; free space there, then continue with: "
        rf"iwae train --resume {run}", str(error.value)), str(error.value)
    assert (run / rundir.CHECKPOINT).read_bytes() == before
    assert sorted(path.name for path in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: shutil_usage(free=1000))
    with pytest.raises(files.DiskFullError, match=r"needs [\d.]+ [KM]B on the disk mounted at .*, which has 1.0 KB "
                       r"free; checkpoint.pt is left as it was"):
        lone_run.resume(run, progress=False)
    assert (run / rundir.CHECKPOINT).read_bytes() == before


def shutil_usage(free: int) -> object:
    """A ``shutil.disk_usage`` result with ``free`` bytes free."""
    return type("Usage", (), {"total": 10**12, "used": 10**12 - free, "free": free})()


def logged_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """From now on, every os.fsync (of the path its descriptor names) and os.replace (of its target), in order."""
    calls: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def logged_replace(source: str | Path, target: str | Path) -> None:
        calls.append(("replace", str(target)))
        replace(source, target)

    monkeypatch.setattr(files.os, "fsync", logged_fsync)
    monkeypatch.setattr(files.os, "replace", logged_replace)
    return calls


def test_an_atomic_write_syncs_the_file_then_renames_it_then_syncs_the_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Durable at each step: the new content on the disk before the rename, and the rename before the return."""
    directory = tmp_path.resolve()
    path = directory / "result.json"
    calls = logged_syncs(monkeypatch)
    files.write_atomic(path, lambda file: file.write(b"{}"))
    assert calls == [("fsync", f"{path}.tmp"), ("replace", str(path)), ("fsync", str(directory))]
    assert path.read_bytes() == b"{}" and not path.with_name("result.json.tmp").exists()


def test_each_durable_append_is_synced_to_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path.resolve() / "metrics.jsonl"
    calls = logged_syncs(monkeypatch)
    files.append_durably(path, "one\n")
    assert calls == [("fsync", str(path))]
    files.append_durably(path, "two\n")
    assert calls == [("fsync", str(path))] * 2
    assert path.read_text() == "one\ntwo\n"


def test_a_file_size_limit_stops_training_with_one_line_and_no_temporary_file(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    interrupted_after_epoch_one(tiny_dataset, run, monkeypatch)
    before = (run / rundir.CHECKPOINT).read_bytes()
    limit = len(before) // 2  # a checkpoint does not fit; a line of metrics does
    done = subprocess.run(resume_command(run), env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert done.returncode == 2, done.stderr
    (line,) = messages(done.stderr)
    assert re.fullmatch(rf"iwae: error: cannot write {run / rundir.CHECKPOINT}: it needs [\d.]+ [KM]B, more than this "
                        rf"process's file size limit allows; checkpoint.pt is left as it was; raise the limit "
                        rf"\(ulimit -f\), then continue with: iwae train --resume {run}", line), line
    assert (run / rundir.CHECKPOINT).read_bytes() == before
    assert not (run / (rundir.CHECKPOINT + ".tmp")).exists()
    run_to_completion(resume_command(run))
    assert [record["epoch"] for record in rundir.read_metrics(run)] == [1, 2, 3]


@pytest.mark.parametrize("seeds", [[], pytest.param(["--seeds", "2"], marks=pytest.mark.slow)])
def test_a_first_checkpoint_that_cannot_be_written_leaves_nothing_in_the_way(
    tiny_dataset: str, tmp_path: Path, seeds: list[str]
) -> None:
    run = tmp_path / "run"
    command = train_command(tiny_dataset, "--out", str(run), "--epochs", "2", "--matmul", "default", "--no-compile",
                            *seeds)
    limit = 8192  # the configuration fits, a checkpoint does not
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert done.returncode == 2, done.stderr
    (line,) = messages(done.stderr)
    assert line.startswith(f"iwae: error: cannot write {run}/"), line
    assert line.endswith("raise the limit (ulimit -f), then run the same command again"), line
    assert run.is_dir() and not any(run.iterdir())
    run_to_completion(command)
    assert [r["epoch"] for r in rundir.read_metrics(run / "seed-1" if seeds else run)] == [1, 2]


@pytest.mark.parametrize("seeds", [[], pytest.param(["--seeds", "2"], marks=pytest.mark.slow)])
def test_a_run_in_use_is_refused_naming_its_process_and_a_killed_ones_lock_blocks_nothing(
    tiny_dataset: str, tmp_path: Path, seeds: list[str]
) -> None:
    run = tmp_path / "run"
    first = subprocess.Popen(train_command(tiny_dataset, "--out", str(run), "--epochs", "100000", "--matmul",
                                           "default", *seeds), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(run / "seed-0" if seeds else run, first)
        done = subprocess.run(resume_command(run), env=ENV, capture_output=True, text=True, timeout=120)
    finally:
        first.kill()
        first.wait()
    assert done.returncode == 2, done.stderr
    assert messages(done.stderr) == [
        f"iwae: error: {run} is in use by process {first.pid} (cli.py {' '.join(first.args[3:])}); wait for it to "
        f"end, or stop it (kill {first.pid}), then run this command again"]
    assert (run / runlock.LOCK).is_file()  # left by the killed process, its lock gone with it
    with runlock.locked(run):
        assert (run / runlock.LOCK).read_text().startswith(f"{os.getpid()} ")
    assert not (run / runlock.LOCK).exists()


def open_descriptors() -> int:
    """The number of this process's open file descriptors."""
    return len(os.listdir("/proc/self/fd"))


def holder_line() -> str:
    """What a lock file holds while this process holds its lock: its pid and command line."""
    return f"{os.getpid()} {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n"


def test_a_released_lock_leaves_no_descriptor_open_even_when_its_file_cannot_be_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = open_descriptors()
    with runlock.locked(tmp_path):
        assert open_descriptors() == before + 1
    assert open_descriptors() == before and not (tmp_path / runlock.LOCK).exists()
    unlink = Path.unlink

    def read_only(path: Path, missing_ok: bool = False) -> None:  # a directory turned read-only meanwhile
        if path.name == runlock.LOCK:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        unlink(path, missing_ok=missing_ok)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "unlink", read_only)
        with runlock.locked(tmp_path):
            pass
    assert (tmp_path / runlock.LOCK).exists() and open_descriptors() == before
    with runlock.locked(tmp_path):  # its lock went with the descriptor
        pass


def test_a_lock_file_left_longer_is_replaced_by_the_holders_line(tmp_path: Path) -> None:
    (tmp_path / runlock.LOCK).write_text(f"{2**22} {'python a-much-longer-command-line ' * 20}\n")
    with runlock.locked(tmp_path):
        assert (tmp_path / runlock.LOCK).read_text() == holder_line()


def test_the_lock_taken_is_on_the_file_at_the_path_when_the_file_was_replaced_before_it_was_locked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A holder that ended removed the file this process had opened, and another process made a new one, before
    this process's flock: it locks the new file, the one that the path names, not the one it first opened."""
    path, calls = tmp_path / runlock.LOCK, []

    def replaced_first(fd: int, operation: int) -> None:
        calls.append(os.fstat(fd).st_ino)
        if len(calls) == 1:
            path.unlink()
            path.write_text("a newer holder's\n")
        fcntl.flock(fd, operation)

    monkeypatch.setattr(runlock, "fcntl", SimpleNamespace(LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB,
                                                          flock=replaced_first))
    with runlock.locked(tmp_path):
        other = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # the file at the path is the one locked
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
        assert path.read_text() == holder_line()
        assert len(calls) == 2 and calls[0] != calls[1] == path.stat().st_ino  # the first file let go


CAPPED_SESSION = '''
import os
from pathlib import Path

from iwae.runs import lone_run
from iwae.training.config import TrainConfig


def test_a_long_run(tiny_dataset):
    config = TrainConfig(dataset=tiny_dataset, epochs=100000, batch_size=8, k=4, eval_k=0, monitor_examples=8,
                         device="cpu", matmul="default")
    lone_run.train(config, Path(os.environ["RUN"]), progress=False)


def test_after_it():
    Path(os.environ["RUN"] + ".after").touch()
'''


def test_a_suite_stops_on_the_sigterm_of_timeout_during_an_in_process_run(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path)
    (tmp_path / "test_capped.py").write_text(CAPPED_SESSION)
    run = tmp_path / "run"
    session = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                               cwd=tmp_path, env={**ENV, "RUN": str(run)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(run, session)
    session.send_signal(signal.SIGTERM)  # as timeout does
    out, _ = session.communicate(timeout=120)
    assert session.returncode != 0, out
    assert "SIGTERM received during test_capped.py::test_a_long_run" in out
    assert not Path(f"{run}.after").exists(), out  # the session stopped there


def test_a_diverging_run_never_checkpoints_its_non_finite_parameters(tiny_dataset: str, tmp_path: Path) -> None:
    config = TrainConfig(dataset=tiny_dataset, epochs=2, lr=1e38, checkpoint_every_s=0, compile=False, k=2, eval_k=0)
    with pytest.raises(FloatingPointError, match="the parameters became NaN or infinite in epoch 1; the last good "
                                                 f"checkpoint is in {re.escape(str(tmp_path / 'run'))}"):
        iwae.train(config, tmp_path / "run", progress=False)
    state = checkpoint.load(tmp_path / "run")  # readable: its parameters are finite
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())


def test_every_rank_stops_at_non_finite_parameters_where_rank_0_does(
        tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank that writes nothing stops at the same checkpoint as rank 0 (which raises there), rather than go on
    to a collective that rank 0 never joins."""
    outputs = lone_run._lone_outputs
    monkeypatch.setattr(lone_run, "_lone_outputs", lambda *args: replace(outputs(*args), writer=False))
    config = TrainConfig(dataset=tiny_dataset, epochs=2, lr=1e38, checkpoint_every_s=0, compile=False, k=2, eval_k=0)
    with pytest.raises(FloatingPointError, match="the parameters became NaN or infinite in epoch 1"):
        iwae.train(config, tmp_path / "run", progress=False)


def test_each_epochs_record_says_how_the_process_that_finished_it_ran(
        tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # config.json holds the latest session's threads and compile, which a resume may replace: each epoch's line
    # keeps how it ran
    run, before = tmp_path / "run", torch.get_num_threads()
    try:
        with monkeypatch.context() as patch:
            interrupt_at_call(patch, 9, signal.SIGINT)  # in epoch 2 of 3
            with pytest.raises(signals.Interrupted):
                lone_run.train(tiny_config(tiny_dataset, threads=1), run, progress=False)
        lone_run.resume(run, {"threads": 2}, progress=False)
    finally:
        torch.set_num_threads(before)
    assert [(line["threads"], line["compiled"]) for line in rundir.read_metrics(run)] == [(1, False), (2, False),
                                                                                          (2, False)]
    assert rundir.read_config(run)["threads"] == 2


def test_figures_reconstruct_the_test_data_and_draw_samples_of_their_seed(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = tmp_path / "run"
    lone_run.train(tiny_config(tiny_dataset, epochs=1), run, progress=False)
    grids: list[torch.Tensor] = []
    reconstructed: list[torch.Tensor] = []
    image_grid, reconstructions = plots.image_grid, plots.reconstructions

    def recorded_grid(images: torch.Tensor, *args: object) -> np.ndarray:
        grids.append(images.clone())
        return image_grid(images, *args)

    def recorded_reconstructions(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        reconstructed.append(x.clone())
        return reconstructions(model, x)

    monkeypatch.setattr(plots, "image_grid", recorded_grid)
    monkeypatch.setattr(plots, "reconstructions", recorded_reconstructions)
    drawn = {}
    for seed in (0, 1, 0):
        grids.clear()
        run_figures.make_figures(run, seed=seed, n=6)
        samples, originals, _ = grids
        drawn.setdefault(seed, []).append(samples)
    test = data.load(tiny_dataset).test[:3]
    assert torch.equal(originals, test) and torch.equal(reconstructed[-1], test)  # the grid captioned test data
    assert torch.equal(drawn[0][0], drawn[0][1])  # a seed's samples are drawn again alike
    assert not torch.equal(drawn[0][0], drawn[1][0])  # another seed's differ
