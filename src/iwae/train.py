"""Training a run alone: ``train`` starts one in a run directory, ``resume`` continues one from its checkpoint, and
each then evaluates it and draws its figures. ``LoneSeed`` is the loop's view of one seed (``iwae.loop.fit``).

Under torchrun the loop is data parallel (``iwae.distributed``): each rank trains on its rows of every global
batch, the step sums the ranks' gradients, and rank 0 alone writes; the trajectory is that of one process.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iwae import checkpoint, data, distributed, evaluate, figures, gemm, memory, rundir
from iwae.config import (
    AUTO_COMPILE_SAMPLES,
    AUTO_COMPILE_STEPS,
    RUNTIME_KEYS,
    TrainConfig,
    burda_schedule,
    learning_rate,
    resolve_compile,
    resumed_config,
    schedule,
)
from iwae.device import resolve_device
from iwae.loop import Outputs, fit
from iwae.models import DeepLatentModel, build_model
from iwae.signals import Interrupted, StopOnSignal
from iwae.state import SeedStreams, TrainingState, start
from iwae.step import TrainStep, make_adam

__all__ = [
    "AUTO_COMPILE_SAMPLES", "AUTO_COMPILE_STEPS", "RUNTIME_KEYS", "Interrupted", "LoneSeed", "TrainConfig",
    "burda_schedule", "check_training_memory", "learning_rate", "load_training_data", "resolve_compile", "resume",
    "resumed_config", "schedule", "train", "training_matmul_path",
]


class LoneSeed:
    """One seed trained alone (``iwae.loop.Seeds``): its model as it is, its noise from torch's global generator.

    With several ranks (``iwae.distributed``), each trains on its rows of every global batch, drawing the random
    numbers of the whole batch, and the step all-reduces the gradients.
    """

    def __init__(self, state: TrainingState, model: DeepLatentModel, dataset: data.Dataset) -> None:
        config, device = state.config, dataset.train.device
        self.configs, self.dataset = [config], dataset
        self.model = model.to(device)
        self.optimizer = make_adam(self.model, schedule(config)[0][1], (config.beta1, config.beta2), config.adam_eps)
        if state.optimizer is not None:
            self.optimizer.load_state_dict(state.optimizer)
        # the run's own path, so that it resumes bit for bit (runs that predate the setting used the default)
        gemm.fastest_fp32_matmul(device, config.matmul or gemm.DEFAULT)
        self.rows = distributed.rows(config.batch_size)
        self.step = TrainStep(distributed.sharded_draws(self.model, self.rows, config.batch_size), self.optimizer,
                              config.objective_spec(), config.estimator, compile=bool(config.compile),
                              all_reduce=distributed.all_reduce_sum if distributed.world() > 1 else None)
        self.streams = SeedStreams.restore(state.rng, device, own_noise=False)
        self.batches = None if state.batches is None else state.batches.to(device)
        self.step.bound_sum.fill_(state.bound_sum)
        self.x_dim = state.x_dim

    def epoch_batches(self) -> Tensor:
        return data.epoch_batches(len(self.dataset.train), self.configs[0].batch_size, self.streams.data)

    def train_on(self, batches: Tensor, step: int) -> None:
        self.step(self.dataset.minibatch(batches[step], self.streams.data)[self.rows])

    def monitor(self, x: Tensor) -> list[float]:
        config = self.configs[0]
        with evaluate.seeded(config.seed, x.device):
            return [evaluate.objective_bound(self.model, x, config.objective_spec()).mean().item()]

    def states(self, epoch: int, step: int, batches: Tensor | None, epoch_time_s: float, wall_time_s: float
               ) -> list[TrainingState]:
        return [TrainingState(config=self.configs[0], x_dim=self.x_dim, model=self.model.state_dict(),
                              optimizer=self.optimizer.state_dict(), epoch=epoch, step=step, batches=batches,
                              bound_sum=self.step.bound_sum.item(), epoch_time_s=epoch_time_s,
                              wall_time_s=wall_time_s, rng=self.streams.state())]

    def summary(self, bounds: list[float], test_bounds: list[float], examples_per_s: float) -> str:
        return f"train bound {bounds[0]:.2f} test bound {test_bounds[0]:.2f} {examples_per_s:.0f} examples/s"


def load_training_data(config: TrainConfig, device: torch.device) -> data.Dataset:
    """The run's dataset on ``device``, checked to hold a minibatch (shared among the ranks, if several)."""
    dataset = data.load(config.dataset, config.data_dir, split=config.data_split).to(device)
    if config.batch_size > len(dataset.train):
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(dataset.train)} training examples of "
                         f"{config.dataset}; choose a smaller --batch-size")
    distributed.rows(config.batch_size)  # the ranks (if several) can share the batch
    return dataset


def check_training_memory(config: TrainConfig, x_dim: int, device: torch.device, seeds: int = 1) -> None:
    """Refuse (SettingError) a run whose training steps, per-epoch monitoring or final evaluation would not fit
    in ``device``'s memory, estimated from the model's layer widths, k and the batch size without allocating;
    ``seeds`` stacked seeds (``iwae.stacked``) each need a lone run's memory for their steps."""
    with torch.device("meta"):
        model = build_model(config.model, config.layers, x_dim)
    # a model too large on its own is refused for its size, whatever k and the batch size
    memory.check_fits(seeds * memory.parameter_bytes(model, training=True), device,
                      "training " + ("{1} {seeds} of " if seeds > 1 else "") + "{0} {model} (its parameters, their "
                      "gradients and Adam's moments alone)", ("model", "seeds")[:1 + (seeds > 1)], model=config.model,
                      seeds=seeds)
    # each rank (iwae.distributed) trains on its rows of the global batch; the monitor and the final evaluation
    # pass over at most max(k, PASS_ROWS) rows, without gradients
    rows = distributed.rows(config.batch_size)
    needed = max(seeds * memory.pass_bytes(model, x_dim, config.k * (rows.stop - rows.start), training=True),
                 memory.pass_bytes(model, x_dim, max(config.k, evaluate.PASS_ROWS), training=False))
    what, names = "training with {0} {k} and {1} {batch_size}", ("k", "batch_size")
    if seeds > 1:  # a stack's message names its seeds among the settings to make smaller
        what, names = "training {2} {seeds} with {0} {k} and {1} {batch_size}", (*names, "seeds")
    memory.check_fits(needed, device, what, names, k=config.k, batch_size=config.batch_size, seeds=seeds)


def lone_timing_step(config: TrainConfig, x_dim: int, device: torch.device) -> Callable[[], None]:
    """A training step of ``config`` (objective, estimator, compiled or not) on a fresh model and a random
    minibatch: the workload that ``training_matmul_path`` times."""
    model = build_model(config.model, config.layers, x_dim).to(device)
    x = (torch.rand(config.batch_size, x_dim, device=device) < 0.5).float()
    optimizer = make_adam(model, schedule(config)[0][1], (config.beta1, config.beta2), config.adam_eps)
    step = TrainStep(model, optimizer, config.objective_spec(), config.estimator, compile=bool(config.compile),
                     what="the training step (to time the matmul paths)")
    return lambda: step(x)


def training_matmul_path(config: TrainConfig, x_dim: int, device: torch.device, seeds: int = 1,
                         workload: Callable[[TrainConfig, int, torch.device], Callable[[], None]] = lone_timing_step
                         ) -> str:
    """A new run's float32 matrix-multiply path: ``config.matmul`` if set, else the faster one on the run's own
    kind of step, ``workload(config, x_dim, device)`` (a lone run's ``lone_timing_step``; a stack of ``seeds``
    seeds, its own), measured once per process for runs alike. (A compiled step is compiled here first, and the
    run's own step then finds its graph in inductor's cache.) The throwaway step is built only when there is
    something to time, on generators that ``gemm.measure`` forks, so the global ones are left as they were."""
    step = functools.cache(lambda: workload(config, x_dim, device))
    key = ("training step", config.model, config.layers, x_dim, config.batch_size, config.objective, config.k,
           config.m, config.estimator, bool(config.compile), seeds)
    return gemm.fastest_fp32_matmul(device, config.matmul, lambda: step()(), key)


def _lone_outputs(run_dir: Path, progress: bool | None) -> Outputs:
    """A lone run's outputs: its checkpoint and metrics in ``run_dir``, written by rank 0."""
    return Outputs(where=run_dir, save=lambda states: checkpoint.save(run_dir, states[0].checkpoint()),
                   record=lambda s, record: rundir.append_metrics(run_dir, record), writer=distributed.rank() == 0,
                   progress=progress, name=f"train {run_dir.name}")


def train(config: TrainConfig, run_dir: Path, *, progress: bool | None = None) -> dict[str, Any] | None:
    """Train a new run in ``run_dir`` (which must not exist, or be empty) and evaluate it.

    Returns:
      The final evaluation (see ``evaluate.evaluate_run``), or None if ``config.eval_k`` is 0.

    Raises:
      ValueError (DataError, RunDirError): for an unusable dataset or run directory, before anything is
        written; ``Interrupted`` after checkpointing on SIGINT/SIGTERM.
    """
    device = resolve_device(config.device)
    config = replace(config, device=str(device))
    dataset = load_training_data(config, device)
    x_dim = dataset.train.shape[1]
    check_training_memory(config, x_dim, device)
    config = resolve_compile(config, len(dataset.train))
    matmul = distributed.broadcast(training_matmul_path(config, x_dim, device))  # the ranks multiply alike
    config = replace(config, matmul=matmul)
    with StopOnSignal() as stop:  # from here on a signal waits for a checkpoint
        parameters = (None if config.init_from is None
                      else checkpoint.initial_parameters(Path(config.init_from), config.layers, x_dim))
        state, model = start(config, dataset, parameters)  # the same on every rank

        def create() -> None:
            rundir.create(run_dir)
            rundir.write_json(run_dir / rundir.CONFIG, asdict(config))
            checkpoint.save(run_dir, state.checkpoint())

        distributed.on_rank_zero(create)
        fit(LoneSeed(state, model, dataset), dataset, state, stop, _lone_outputs(run_dir, progress))
    return finish(config, run_dir, device, progress, dataset)


def resume(run_dir: Path, changes: dict[str, Any] | None = None, *, progress: bool | None = None
           ) -> dict[str, Any] | None:
    """Continue the run in ``run_dir`` from its checkpoint, and evaluate it when it finishes.

    Args:
      changes: settings given again; each must equal the saved one, except those in ``RUNTIME_KEYS``.

    Raises:
      CheckpointError: for a missing or unreadable checkpoint. ValueError: naming every setting in
        ``changes`` that differs from the run's.
    """
    saved = checkpoint.load(run_dir)
    state = TrainingState.from_checkpoint(saved, resumed_config(saved["config"], changes, run_dir))
    config = state.config
    if state.epoch == config.epochs and (run_dir / rundir.EVAL).is_file():
        print(f"iwae: {run_dir} finished all {config.epochs} epochs already", file=sys.stderr)
        return rundir.read_json(run_dir / rundir.EVAL)
    device = resolve_device(config.device)
    dataset = load_training_data(config, device)
    check_training_memory(config, state.x_dim, device)
    with StopOnSignal() as stop:
        distributed.on_rank_zero(lambda: rundir.truncate_metrics(run_dir, state.epoch))
        fit(LoneSeed(state, state.new_model(), dataset), dataset, state, stop, _lone_outputs(run_dir, progress))
    return finish(config, run_dir, device, progress, dataset)


def finish(config: TrainConfig, run_dir: Path, device: torch.device, progress: bool | None,
           dataset: data.Dataset) -> dict[str, Any] | None:
    """The final evaluation (unless ``eval_k`` is 0) and the figures of a trained run, on its ``dataset``."""
    result = None
    if config.eval_k:
        result = evaluate.evaluate_run(run_dir, k=config.eval_k, device=str(device), data_dir=config.data_dir,
                                       progress=progress is not False, loaded=dataset)
    if distributed.rank() == 0:
        figures.make_figures(run_dir, device=device, loaded=dataset)
    return result
