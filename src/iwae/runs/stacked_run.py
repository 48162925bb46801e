"""The run directory of S seeds trained together (``iwae train --seeds``): DIR/seed-<s> run directories and
DIR/stack.json, the commit record of their checkpoints (see ``iwae.training.stacked``).

A checkpoint is written as every seed's RUN/checkpoint.next, then stack.json names the position, then each file is
renamed to RUN/checkpoint.pt; a resume first completes or discards an interrupted commit, so every seed continues
from the same position and a stacked run resumes to bit-for-bit the parameters of an uninterrupted one.
"""

from __future__ import annotations

import functools
import os
import sys
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from iwae import data
from iwae.platform.device import resolve_device
from iwae.platform.threads import use_threads
from iwae.runs import checkpoint, evaluation, lone_run, rundir, runlock
from iwae.training import preflight
from iwae.training.config import TrainConfig, check_is_config, resolve_compile, resumed_config
from iwae.training.loop import Outputs, fit
from iwae.training.signals import StopOnSignal
from iwae.training.stacked import StackedSeeds, stacked_timing_step
from iwae.training.state import TrainingState, start

STACK = rundir.STACK

NEXT = "checkpoint.next"


# Settings in which the seeds of a stack may differ.
PER_SEED = ("seed", "init_from")


def check_configs(configs: list[TrainConfig]) -> None:
    """Raise ValueError unless ``configs`` differ in their seeds (distinct) and initialisations only."""
    if not configs:
        raise ValueError("a stack needs at least one seed; give --seeds S with S >= 1")
    for config in configs:
        check_is_config(config)
    common = [{k: v for k, v in asdict(c).items() if k not in PER_SEED} for c in configs]
    if any(c != common[0] for c in common):
        raise ValueError("the seeds of a stack must share every setting but the seed and --init-from")
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the seeds of a stack must differ; got seeds {seeds}")
    if configs[0].model != "burda":  # a stack draws its seeds' Gaussian noise itself (``stacked.SeedNoise``)
        raise ValueError(f"stacked seeds need the burda model's Gaussian latents, and {configs[0].model} has "
                         "discrete ones; train each seed alone (iwae train --seed S), or use --model burda")


def train_stacked(configs: list[TrainConfig], out: Path | str, *, progress: bool | None = None,
                  beside_finished: bool = False) -> list[dict | None]:
    """Train one run per configuration (same settings, distinct seeds) together into OUT/seed-<seed>, and
    evaluate each; returns the evaluations (None where ``eval_k`` is 0). OUT must be new or empty, or, with
    ``beside_finished``, may hold the finished runs of other seeds (whose stack record the new one replaces)."""
    out = Path(out)
    check_configs(configs)
    device = resolve_device(configs[0].device)
    dataset = lone_run.load_training_data(configs[0], device)
    x_dim = dataset.train.shape[1]
    preflight.check_training_memory(configs[0], x_dim, device, seeds=len(configs))
    count = use_threads(configs[0].threads)
    digest = data.user_file_sha256(configs[0].dataset)
    configs = [resolve_compile(replace(c, device=str(device), threads=count, dataset_sha256=digest),
                               len(dataset.train), len(configs)) for c in configs]
    # the faster count and path on the stack's own step: its batched products may favour others than a lone run's
    count, matmul = preflight.training_threads_and_path(configs[0], x_dim, device, len(dataset.train), len(configs),
                                                        functools.partial(stacked_timing_step, seeds=len(configs)))
    configs = [replace(c, threads=count, matmul=matmul) for c in configs]
    initial = [None if c.init_from is None
               else checkpoint.initial_parameters(Path(c.init_from), c.model, c.layers, x_dim) for c in configs]
    with ExitStack() as held:  # the locks of the stack and its seeds, once they exist, until the seeds are evaluated
        with StopOnSignal() as stop:
            if beside_finished:
                out.mkdir(parents=True, exist_ok=True)
            else:
                rundir.create(out)
            held.enter_context(runlock.locked(out))
            dirs = [rundir.create(out / f"seed-{c.seed}") for c in configs]
            held.enter_context(runlock.all_locked(dirs))
            with rundir.unstarted(dirs):
                for config, path in zip(configs, dirs, strict=True):
                    rundir.write_json(path / rundir.CONFIG, asdict(config))
                started = [start(c, dataset, parameters) for c, parameters in zip(configs, initial, strict=True)]
                states = [state for state, _ in started]
                _commit(out, dirs, states)
            fit(StackedSeeds(states, [model for _, model in started], dataset), dataset, states[0], stop,
                _stack_outputs(out, dirs))
        return [lone_run.finish(c, d, device, progress, dataset, out) for c, d in zip(configs, dirs, strict=True)]


def is_stacked(path: Path) -> bool:
    """Whether ``path`` holds a stacked run."""
    return (path / STACK).is_file()


def resume_stacked(out: Path, changes: dict[str, Any] | None = None, *, progress: bool | None = None
                   ) -> list[dict | None]:
    """Continue the stacked run in ``out`` from its last committed checkpoint, and evaluate each seed.
    ``changes`` as for ``lone_run.resume``, applied to every seed (e.g. a new ``data_dir``). RunInUseError while
    another process trains or evaluates the stack or one of its seeds."""
    with runlock.locked(out) if out.is_dir() else nullcontext():
        record = _read_stack(out)
        dirs = [out / f"seed-{s}" for s in record["seeds"]]
        with runlock.all_locked([path for path in dirs if path.is_dir()]):  # no lone --resume of a seed meanwhile
            return _resume_stacked(out, record, dirs, changes, progress)


def _read_stack(out: Path) -> dict[str, Any]:
    """The stack record of ``out``: its seeds (distinct integers, each with its directory) and its position.

    Raises:
      RunDirError: naming the file, for a record of any other form.
    """
    record = rundir.read_json(out / STACK)

    def count(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    seeds = record.get("seeds") if isinstance(record, dict) else None
    if not (isinstance(seeds, list) and seeds and all(count(s) for s in seeds) and len(set(seeds)) == len(seeds)
            and count(record.get("epoch")) and count(record.get("step"))):
        raise rundir.RunDirError(f"{out / STACK} is damaged (not a list of distinct seeds with the epoch and step "
                                 "they stand at); each seed-*/ directory in it is a run that resumes alone: iwae "
                                 f"train --resume {out}/seed-S")
    missing = [s for s in seeds if not (out / f"seed-{s}").is_dir()]
    if missing:
        raise rundir.RunDirError(f"{out / STACK} names seeds {missing} that have no seed-S directory in {out}; each "
                                 f"seed-*/ directory there is a run that resumes alone: iwae train --resume "
                                 f"{out}/seed-S")
    return record


def _resume_stacked(out: Path, record: dict[str, Any], dirs: list[Path], changes: dict[str, Any] | None,
                    progress: bool | None) -> list[dict | None]:
    for path in dirs:  # complete (or discard) an interrupted commit
        pending = path / NEXT
        if pending.is_file():
            state = checkpoint.read(pending)
            if (state["epoch"], state["step"]) == (record["epoch"], record["step"]):
                os.replace(pending, path / rundir.CHECKPOINT)
            else:
                pending.unlink()
    saved = [checkpoint.load(path) for path in dirs]
    states = [TrainingState.from_checkpoint(s, resumed_config(s["config"], changes, path))
              for s, path in zip(saved, dirs, strict=True)]
    for path, s, state in zip(dirs, saved, states, strict=True):
        lone_run.record_moved_dataset(path, s, state.config.dataset)
    configs = [state.config for state in states]
    device = resolve_device(configs[0].device)
    evaluated = [bool(c.eval_k) and rundir.has_final_evaluation(d, c.epochs)
                 for d, c in zip(dirs, configs, strict=True)]
    if all(s.epoch == c.epochs for s, c in zip(states, configs, strict=True)) and all(
            done or not c.eval_k for done, c in zip(evaluated, configs, strict=True)):
        print(f"iwae: {out} finished all {configs[0].epochs} epochs already", file=sys.stderr)
        for d, c in zip(dirs, configs, strict=True):
            lone_run.draw_missing_figures(c, d, out)
        return [evaluation.read_evaluation(d / rundir.EVAL) if c.eval_k else None
                for d, c in zip(dirs, configs, strict=True)]
    if len({(state.epoch, state.step) for state in states}) != 1:
        raise ValueError(f"the seeds of {out} are at different positions; resume each with iwae train --resume")
    for path, state in zip(dirs, states, strict=True):
        rundir.check_metrics(path, state.epoch)
    count = lone_run.resumed_threads(configs[0], changes)
    for state in states:
        state.config = replace(state.config, threads=count)
    configs = [state.config for state in states]
    dataset = lone_run.load_training_data(configs[0], device)
    preflight.check_training_memory(configs[0], states[0].x_dim, device, seeds=len(configs))
    with StopOnSignal() as stop:
        for path, state in zip(dirs, states, strict=True):
            rundir.truncate_metrics(path, state.epoch)
            rundir.write_json(path / rundir.CONFIG, asdict(state.config))  # as resumed (repaired if damaged)
        models = [state.new_model() for state in states]
        fit(StackedSeeds(states, models, dataset), dataset, states[0], stop, _stack_outputs(out, dirs))
    # a seed evaluated before a stop in another's final evaluation keeps its evaluation (and gets the figures it lacks)
    return [_evaluated(c, d, out) if done else lone_run.finish(c, d, device, progress, dataset, out)
            for c, d, done in zip(configs, dirs, evaluated, strict=True)]


def _evaluated(config: TrainConfig, run_dir: Path, out: Path) -> dict[str, Any]:
    """The evaluation of a seed evaluated already, its missing figures drawn."""
    lone_run.draw_missing_figures(config, run_dir, out)
    return evaluation.read_evaluation(run_dir / rundir.EVAL)


def _stack_outputs(out: Path, dirs: list[Path]) -> Outputs:
    """A stack's outputs: its seeds' checkpoints as one commit, each seed's metrics in its own run directory."""
    def record(s: int, values: dict[str, Any]) -> None:
        rundir.append_metrics(dirs[s], {**values, "stacked_seeds": len(dirs)})

    return Outputs(where=out, save=lambda states: _commit(out, dirs, states), record=record, progress=False)


def _commit(out: Path, dirs: list[Path], states: list[TrainingState]) -> None:
    """Write every seed's checkpoint as one commit (see the module docstring)."""
    for path, state in zip(dirs, states, strict=True):
        checkpoint.save(path, state.checkpoint(), name=NEXT)
    seeds = [state.config.seed for state in states]
    rundir.write_json(out / STACK, {"seeds": seeds, "epoch": states[0].epoch, "step": states[0].step})
    for path in dirs:
        os.replace(path / NEXT, path / rundir.CHECKPOINT)
