"""Training a run alone: ``train`` starts one in a run directory, ``resume`` continues one from its checkpoint, and
each then evaluates it and draws its figures. ``LoneSeed`` is the loop's view of one seed (``iwae.training.loop.fit``).

Under torchrun the loop is data parallel (``iwae.platform.distributed``): each rank trains on its rows of every global
batch, the step sums the ranks' gradients, and rank 0 alone writes; the trajectory is that of one process up to
float rounding.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from iwae import data
from iwae.platform import distributed
from iwae.platform.device import resolve_device
from iwae.platform.files import DiskFullError
from iwae.platform.threads import use_run_threads, use_threads
from iwae.runs import checkpoint, evaluation, rundir, runlock
from iwae.runs import figures as run_figures
from iwae.settings import SettingError
from iwae.training.config import TrainConfig, check_is_config, resolve_compile, resumed_config
from iwae.training.lone import LoneSeed
from iwae.training.loop import Outputs, fit
from iwae.training.preflight import check_training_memory, training_threads_and_path
from iwae.training.signals import StopOnSignal, raising_on_signal
from iwae.training.state import TrainingState, start


def load_training_data(config: TrainConfig, device: torch.device) -> data.Dataset:
    """The run's dataset on ``device``, checked to hold a minibatch (shared among the ranks, if several)."""
    dataset = data.load(config.dataset, config.data_dir, split=config.data_split,
                        sha256=config.dataset_sha256).to(device)
    if config.batch_size > len(dataset.train):
        raise SettingError("{0} {size} exceeds the {examples} training examples of {dataset}; choose a smaller {0}",
                           ("batch_size",), size=config.batch_size, examples=len(dataset.train),
                           dataset=config.dataset)
    distributed.rows(config.batch_size)  # the ranks (if several) can share the batch
    return dataset


def _lone_outputs(run_dir: Path, progress: bool | None) -> Outputs:
    """A lone run's outputs: its checkpoint and metrics in ``run_dir``, written by rank 0."""
    return Outputs(where=run_dir, save=lambda states: checkpoint.save(run_dir, states[0].checkpoint()),
                   record=lambda s, record: rundir.append_metrics(run_dir, record), writer=distributed.rank() == 0,
                   progress=progress, name=f"train {run_dir.name}")


def train(config: TrainConfig, run_dir: Path | str, *, progress: bool | None = None) -> dict[str, Any] | None:
    """Train a new run in ``run_dir`` (which must not exist, or be empty) and evaluate it.

    Returns:
      The final evaluation (see ``evaluation.evaluate_run``), or None if ``config.eval_k`` is 0.

    Raises:
      ValueError (DataError, RunDirError): for an unusable dataset or run directory, before anything is
        written; ``Interrupted`` after checkpointing on SIGINT/SIGTERM.
    """
    check_is_config(config)
    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    config = replace(config, device=str(device), threads=use_threads(config.threads))
    dataset = load_training_data(config, device)
    config = replace(config, dataset_sha256=data.user_file_sha256(config.dataset))  # once it has loaded
    x_dim = dataset.train.shape[1]
    check_training_memory(config, x_dim, device)
    config = resolve_compile(config, len(dataset.train))
    count, matmul = training_threads_and_path(config, x_dim, device, len(dataset.train))
    config = replace(config, threads=count, matmul=distributed.broadcast(matmul))  # the ranks multiply alike
    with ExitStack() as held:  # the run directory's lock, once it exists, until the run is evaluated
        with StopOnSignal() as stop:  # from here on a signal waits for a checkpoint
            parameters = None if config.init_from is None else checkpoint.initial_parameters(
                Path(config.init_from), config.model, config.layers, x_dim)
            state, model = start(config, dataset, parameters)  # the same on every rank

            def create() -> None:
                rundir.create(run_dir)
                held.enter_context(runlock.locked(run_dir))
                with rundir.unstarted([run_dir / rundir.CONFIG]):
                    rundir.write_json(run_dir / rundir.CONFIG, asdict(config))
                    checkpoint.save(run_dir, state.checkpoint())

            distributed.on_rank_zero(create)
            fit(LoneSeed(state, model, dataset), dataset, state, stop, _lone_outputs(run_dir, progress))
        return finish(config, run_dir, device, progress, dataset)


def resume(run_dir: Path | str, changes: dict[str, Any] | None = None, *, progress: bool | None = None
           ) -> dict[str, Any] | None:
    """Continue the run in ``run_dir`` from its checkpoint, and evaluate it when it finishes.

    Args:
      changes: settings given again; each must equal the saved one, except those in ``RUNTIME_KEYS``.

    Raises:
      CheckpointError: for a missing or unreadable checkpoint. ValueError: naming every setting in
        ``changes`` that differs from the run's. RunInUseError: while another process trains or evaluates the run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        checkpoint.load(run_dir)  # raises, naming what is there instead of a run
    with ExitStack() as held:  # rank 0 holds the lock before it reads the run; every rank learns if it could not
        distributed.on_rank_zero(lambda: held.enter_context(runlock.locked(run_dir)))
        saved = checkpoint.load(run_dir)
        config = resumed_config(saved["config"], changes, run_dir)
        distributed.on_rank_zero(lambda: record_moved_dataset(run_dir, saved, config.dataset))
        if saved["epoch"] == config.epochs and rundir.has_final_evaluation(run_dir, config.epochs):
            print(f"iwae: {run_dir} finished all {config.epochs} epochs already", file=sys.stderr)
            draw_missing_figures(config, run_dir)
            return evaluation.read_evaluation(run_dir / rundir.EVAL)
        rundir.check_metrics(run_dir, saved["epoch"])
        config = replace(config, threads=resumed_threads(config, changes))
        state = TrainingState.from_checkpoint(saved, config)
        device = resolve_device(config.device)
        dataset = load_training_data(config, device)
        check_training_memory(config, state.x_dim, device)
        with StopOnSignal() as stop:
            distributed.on_rank_zero(lambda: rundir.truncate_metrics(run_dir, state.epoch))
            # the settings as resumed (threads and the other runtime settings may change), from the checkpoint:
            # a damaged config.json is rewritten before any work rather than found after it
            distributed.on_rank_zero(lambda: rundir.write_json(run_dir / rundir.CONFIG, asdict(config)))
            fit(LoneSeed(state, state.new_model(), dataset), dataset, state, stop, _lone_outputs(run_dir, progress))
        return finish(config, run_dir, device, progress, dataset)


def record_moved_dataset(run_dir: Path, saved: dict[str, Any], dataset: str) -> None:
    """Record ``dataset`` as the data of the run in ``run_dir`` (checkpoint ``saved``), in its checkpoint and its
    config.json, where it differs from the recorded one: the run's own file at a new place (``resumed_config``
    accepts it when its SHA-256 is the recorded one), which every command then finds there, the run finished or
    not."""
    if dataset == saved["config"]["dataset"]:
        return
    recorded = {**saved["config"], "dataset": dataset}
    checkpoint.save(run_dir, {**saved, "config": recorded})
    rundir.write_json(run_dir / rundir.CONFIG, recorded)
    print(f"iwae: {run_dir} now reads its data from {dataset}", file=sys.stderr)


def resumed_threads(config: TrainConfig, changes: dict[str, Any] | None) -> int:
    """Run torch on the thread count a resumed run recorded (``config.threads``), or on the one given again in
    ``changes``, for this run only (the process's own choice stays for the next: ``use_run_threads``); a run that
    recorded none gets this machine's (``iwae.platform.threads``). Returns the count."""
    if config.threads is None:
        return use_threads()
    given = changes is not None and changes.get("threads") is not None
    return use_run_threads(config.threads, "set by --threads" if given else "the run's own count")


def finish(config: TrainConfig, run_dir: Path, device: torch.device, progress: bool | None,
           dataset: data.Dataset, resumed_as: Path | None = None) -> dict[str, Any] | None:
    """The final evaluation (unless ``eval_k`` is 0) and the figures of a trained run, on its ``dataset``; stopped
    by SIGINT or SIGTERM, it raises ``Interrupted`` naming the command that finishes them: ``iwae train --resume``
    (of ``resumed_as``: a stack's directory, whose resume evaluates every seed; default ``run_dir``) during the
    evaluation, and during the figures ``iwae sample`` (of a stack: its ``--resume``, which evaluates the seeds after
    this one and draws the figures a seed lacks)."""
    result = None
    again = f"iwae train --resume {resumed_as or run_dir}"
    if distributed.world() > 1:  # each rank keeps its own finished batches
        again += f", under torchrun with {distributed.world()} ranks again"
    with raising_on_signal("the run trained all its epochs; its evaluation", again, "finish with"):
        if config.eval_k:
            try:
                result = evaluation.evaluate_run(run_dir, k=config.eval_k, device=str(device),
                                               data_dir=config.data_dir, progress=progress is not False,
                                               loaded=dataset)
            except DiskFullError as error:
                raise DiskFullError(f"{error}, then finish with: {again}") from error
    if distributed.rank() == 0:
        _draw_figures(run_dir, device, dataset, resumed_as)
    return result


def draw_missing_figures(config: TrainConfig, run_dir: Path, resumed_as: Path | None = None) -> None:
    """Draw the figures of the finished run in ``run_dir`` if some are missing (its figures were stopped or killed);
    ``resumed_as`` as for ``finish``."""
    if distributed.rank() == 0 and run_figures.missing(run_dir):
        print(f"iwae: {run_dir} lacks some of its figures; drawing them", file=sys.stderr)
        _draw_figures(run_dir, resolve_device(config.device), None, resumed_as)


def _draw_figures(run_dir: Path, device: torch.device, dataset: data.Dataset | None, resumed_as: Path | None) -> None:
    """A run's figures; stopped, the message names ``iwae sample RUN``, and for a stack (``resumed_as``) the resume
    that finishes its other seeds."""
    how = f"iwae sample {run_dir}" if resumed_as is None else f"iwae train --resume {resumed_as}"
    with raising_on_signal("the run trained and was evaluated; its figures", how, "draw them with"):
        run_figures.make_figures(run_dir, device=device, loaded=dataset)
