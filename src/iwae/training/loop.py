"""The training loop: one seed alone or S seeds stacked, from a position in the schedule to its end.

``fit`` runs the epochs of the schedule: each draws its minibatches' order, takes one step per minibatch, checks the
training bound, computes the test bound on a fixed subset, records the epoch and checkpoints. What differs between a
seed alone and a stack of seeds (how a step is taken, how the seeds' states are cut from the model) is the
``Seeds`` it is given; where it writes (a run directory, a stack's commit) are the ``Outputs`` it is given.

The whole training set lives on the device as one tensor; the epoch's permutation comes from a seeded
``torch.Generator``, its minibatches are gathered and binarized there a chunk of steps at a time
(``iwae.training.minibatches``), and the bound is summed on the device and read once per epoch, so a step is the
compiled step on a view of the chunk and never waits for the host. An epoch's record gives the speed of its
training steps (``examples_per_s``, ``epoch_time_s``: the steps alone, the step's compilation left out) and its
wall time (``epoch_wall_s``: since the previous record, the test bound and the previous checkpoint included), and
how the process that finished it ran (``compiled``, ``threads``: a run resumed with other ones records them anew).

After every epoch (and every ``checkpoint_every_s`` seconds, and on SIGINT/SIGTERM after the current step) the state
is checkpointed, so that a resumed run continues to bit-for-bit the same parameters (on a CPU).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from iwae.data import Dataset
from iwae.eval import splits
from iwae.platform import distributed
from iwae.platform.files import DiskFullError
from iwae.training.config import TrainConfig, learning_rate, schedule
from iwae.training.signals import Interrupted, StopOnSignal
from iwae.training.state import TrainingState
from iwae.training.step import TrainStep

# The progress bar and the checkpoint clock are looked at every this many steps (a signal after every step).
REPORT_EVERY = 16
# Ranks training together act on a signal at a report, where they agree on it; torchrun kills a rank 30 s after its
# SIGTERM, so where REPORT_EVERY steps take longer than this, their reports come every this many seconds of steps.
AGREE_S = 5.0


class Seeds(Protocol):
    """What ``fit`` trains: one seed (``iwae.training.lone.LoneSeed``) or S stacked seeds
    (``iwae.training.stacked.StackedSeeds``)."""

    configs: list[TrainConfig]
    step: TrainStep
    batches: Tensor | None

    def epoch_batches(self) -> Tensor:
        """The minibatches' indices of a new epoch, drawn from the seeds' data streams."""

    def draw_from(self, batches: Tensor, step: int) -> None:
        """Train on the minibatches of ``batches`` (``epoch_batches``'s) from minibatch ``step`` on."""

    def train_on(self, step: int) -> None:
        """Take the training step on minibatch ``step`` of the epoch's ``batches``."""

    def monitor(self, x: Tensor) -> list[float]:
        """Each seed's mean bound on the examples ``x``."""

    def states(self, epoch: int, step: int, batches: Tensor | None, epoch_time_s: float, wall_time_s: float
               ) -> list[TrainingState]:
        """Each seed's state at this position."""

    def summary(self, bounds: list[float], test_bounds: list[float], examples_per_s: float) -> str:
        """An epoch's line for the log: the seeds' training (and test) bounds and the speed."""


@dataclass
class Outputs:
    """Where ``fit`` writes: ``save`` the seeds' states (a checkpoint), ``record`` seed s's metrics of an epoch;
    ``where`` is named in messages; ``writer`` is whether this process writes (rank 0); ``progress`` shows a
    progress bar (None: on a terminal), described as ``name``."""

    where: Path
    save: Callable[[list[TrainingState]], None]
    record: Callable[[int, dict[str, Any]], None]
    writer: bool = True
    progress: bool | None = None
    name: str = ""


def fit(seeds: Seeds, dataset: Dataset, start: TrainingState, stop: StopOnSignal, outputs: Outputs) -> None:
    """Train ``seeds`` from ``start``'s position to the end of the schedule.

    Raises:
      Interrupted: after checkpointing, when ``stop`` received a signal.
      FloatingPointError: when an epoch's training bound is not finite (the last checkpoint is the epoch before).
      DiskFullError: when a checkpoint or a record cannot be written for want of space (the last checkpoint kept).
    """
    _Loop(seeds, dataset, start, stop, outputs).run()


class _Loop:
    """``fit``'s position (epoch, step, the epoch's minibatches) and clocks."""

    def __init__(self, seeds: Seeds, dataset: Dataset, start: TrainingState, stop: StopOnSignal,
                 outputs: Outputs) -> None:
        self.seeds, self.stop, self.outputs = seeds, stop, outputs
        self.config, self.stages = seeds.configs[0], schedule(seeds.configs[0])
        self.steps_per_epoch = len(dataset.train) // self.config.batch_size
        self.monitor_x = splits.subset(dataset.test, self.config.monitor_examples)
        self.epoch, self.step, self.batches = start.epoch, start.step, seeds.batches
        self.session_start, self.wall_time_base = time.perf_counter(), start.wall_time_s
        self.epoch_start = time.perf_counter() - start.epoch_time_s
        self.last_record = self.session_start  # when the previous epoch was recorded (or the session started)
        self.compilation_counted = False
        # steps from one report to the next, the same on every rank; ranks training together time their first step
        self.report_every = REPORT_EVERY if distributed.world() == 1 else 1
        self._report_from_here()
        self.next_checkpoint = time.monotonic() + self.config.checkpoint_every_s
        self.bounds: list[float] = []

    def run(self) -> None:
        config = self.config
        bar = tqdm(total=config.epochs * self.steps_per_epoch, initial=self.epoch * self.steps_per_epoch + self.step,
                   unit="step", dynamic_ncols=True, desc=self.outputs.name,
                   disable=(None if self.outputs.progress is None else not self.outputs.progress)
                   if self.outputs.writer else True)
        with bar:
            while self.epoch < config.epochs:
                stage, lr = learning_rate(self.stages, self.epoch)
                self.seeds.step.set_lr(lr)
                bounds = " ".join(f"{b:.2f}" for b in self.bounds) or "-"  # known once per epoch
                bar.set_postfix_str(f"epoch {self.epoch + 1}/{config.epochs} stage {stage + 1}/{len(self.stages)} "
                                    f"lr {lr:.1e} train bound {bounds}", refresh=False)
                try:
                    self._train_epoch(bar)
                    self._end_epoch(stage, lr, bar)
                except DiskFullError as error:
                    raise DiskFullError(f"{error}, then continue with: iwae train --resume {self.outputs.where}"
                                        ) from error
        stopped = self.stop.agreed()
        distributed.barrier()  # rank 0 has written the last checkpoint, which every rank evaluates
        if stopped:
            raise Interrupted(f"training stopped by {stopped.name} after the last epoch, before the evaluation; "
                              "checkpoint saved", stopped, f"iwae train --resume {self.outputs.where}", "finish with")

    def _train_epoch(self, bar: tqdm) -> None:
        if self.batches is None:
            self.batches = self.seeds.epoch_batches()
            self.seeds.step.bound_sum.zero_()
            self.epoch_start = time.perf_counter()
        self.seeds.draw_from(self.batches, self.step)
        self._report_from_here()
        while self.step < self.steps_per_epoch:
            self.seeds.train_on(self.step)
            self.step += 1
            if self.step < self.report_at and self.step < self.steps_per_epoch and not self.stop.here():
                continue
            self._discount_compilation()
            bar.update(self.epoch * self.steps_per_epoch + self.step - bar.n)
            stopped = self.stop.agreed()
            self._time_reports()
            if stopped or time.monotonic() >= self.next_checkpoint:
                self._save()
                if stopped:
                    raise Interrupted(
                        f"training stopped by {stopped.name} in epoch {self.epoch + 1}/{self.config.epochs} after "
                        f"step {self.step}/{self.steps_per_epoch}; checkpoint saved", stopped,
                        f"iwae train --resume {self.outputs.where}",
                    )

    def _end_epoch(self, stage: int, lr: float, bar: tqdm) -> None:
        config, examples = self.config, self.steps_per_epoch * self.config.batch_size
        epoch_time = time.perf_counter() - self.epoch_start
        self.bounds = [bound_sum / examples for bound_sum in self.seeds.step.bound_sum.reshape(-1).tolist()]
        if not all(math.isfinite(bound) for bound in self.bounds):
            shown = self.bounds[0] if len(self.bounds) == 1 else self.bounds
            raise FloatingPointError(f"the training bound became {shown} in epoch {self.epoch + 1}; the last good "
                                     f"checkpoint is in {self.outputs.where}; start a new run with a smaller "
                                     "learning rate")
        self.epoch, self.step, self.batches = self.epoch + 1, 0, None
        self.next_checkpoint = time.monotonic() + config.checkpoint_every_s
        if not self.outputs.writer:
            return
        test_bounds = self.seeds.monitor(self.monitor_x)
        recorded = time.perf_counter()
        epoch_wall, self.last_record = recorded - self.last_record, recorded
        for s, (bound, test_bound) in enumerate(zip(self.bounds, test_bounds, strict=True)):
            self.outputs.record(s, {
                "epoch": self.epoch, "stage": stage + 1, "lr": lr, "train_bound": bound, "test_bound": test_bound,
                "examples_per_s": examples / epoch_time, "epoch_time_s": epoch_time, "epoch_wall_s": epoch_wall,
                "wall_time_s": self._wall_time(), "compiled": self.seeds.step.compiled,
                "threads": torch.get_num_threads(),
            })
        self._save()
        if bar.disable:
            print(f"epoch {self.epoch}/{config.epochs} stage {stage + 1} lr {lr:.2e} "
                  + self.seeds.summary(self.bounds, test_bounds, examples / epoch_time), file=sys.stderr)

    def _time_reports(self) -> None:
        """Set the step of the next report: ``REPORT_EVERY`` steps on, or, for ranks training together, fewer where
        those would take longer than ``AGREE_S`` at the slowest rank's pace since the last report (agreed on by
        every rank, so that all of them report, and agree on a signal, after the same steps)."""
        if distributed.world() > 1:
            first, started = self.steps_timed_from
            step_us = distributed.maximum(math.ceil(1e6 * (time.perf_counter() - started) / (self.step - first)))
            self.report_every = max(1, min(REPORT_EVERY, int(AGREE_S * 1e6 / max(step_us, 1))))
        self._report_from_here()

    def _report_from_here(self) -> None:
        """Report ``report_every`` steps after the current one, and time the steps until then."""
        self.report_at, self.steps_timed_from = self.step + self.report_every, (self.step, time.perf_counter())

    def _discount_compilation(self) -> None:
        """Leave the step's compilation (its first call in this process) out of the epoch's training time."""
        seconds = self.seeds.step.compile_seconds
        if seconds is not None and not self.compilation_counted:
            self.epoch_start += seconds
            self.compilation_counted = True

    def _wall_time(self) -> float:
        return self.wall_time_base + time.perf_counter() - self.session_start

    def _save(self) -> None:
        """Checkpoint the seeds at the current position (this process, if it writes), and restart the clock."""
        epoch_time = time.perf_counter() - self.epoch_start if self.step else 0.0
        states = self.seeds.states(self.epoch, self.step, self.batches if self.step else None, epoch_time,
                                   self._wall_time())
        if not all(torch.isfinite(tensor).all() for state in states for tensor in state.model.values()):
            raise FloatingPointError(f"the parameters became NaN or infinite in epoch {self.epoch + 1}; the last "
                                     f"good checkpoint is in {self.outputs.where}; start a new run with a smaller "
                                     "learning rate")  # on every rank: each holds the same parameters
        if self.outputs.writer:
            self.outputs.save(states)
        self.next_checkpoint = time.monotonic() + self.config.checkpoint_every_s
