"""Training: the protocol of Burda, Grosse & Salakhutdinov (2016) as one loop, with exact resume.

Adam (beta1 0.9, beta2 0.999, eps 1e-4) on minibatches of 20, following the gradient of the per-batch sum
of the bound, with the schedule of 3^i epochs at learning rate 1e-3 * 10^(-i/7) for i = 0..7 (3280
epochs), or a constant rate for a given number of epochs. Dynamic data is binarized afresh for every
minibatch.

The whole training set lives on the device as one tensor; a minibatch is a gather plus a Bernoulli draw
there, the epoch's permutation comes from a seeded ``torch.Generator``, and the bound is summed on the
device and read once per epoch, so a step never waits for the host. After every epoch (and every
``checkpoint_every_s`` seconds, and on SIGINT/SIGTERM after the current step) the run's full state is
checkpointed atomically, so that ``resume`` continues it to bit-for-bit the same parameters (on a CPU).

Under torchrun the loop is data parallel (``iwae.distributed``): each rank trains on its rows of every global
batch, the step sums the ranks' gradients, and rank 0 alone writes; the trajectory is that of one process.
"""

from __future__ import annotations

import functools
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from iwae import checkpoint, data, distributed, evaluate, figures, gemm, memory, rundir
from iwae.device import resolve_device
from iwae.models import sbn_widths
from iwae.objectives import Objective
from iwae.settings import SettingError, check_integer, check_positive, check_seed
from iwae.step import TrainStep, make_adam

SCHEDULES = ("constant", "burda")
# Settings that do not change the trajectory, so a resumed run may use new values. (The device is not one:
# CPU and GPU generators have different states, so a run continues on the kind of device it started on.)
RUNTIME_KEYS = ("data_dir", "checkpoint_every_s", "compile")
# compile=None (auto) compiles runs of at least this many steps, or of at least this many samples drawn in all
# (steps x batch size x k x stacked seeds): compiling costs tens of seconds on a CPU, which only a long run wins
# back (by less launch overhead per step, and by fused kernels per sample), so a short run is never slower.
AUTO_COMPILE_STEPS = 100_000
AUTO_COMPILE_SAMPLES = 5_000_000
# The progress bar and the checkpoint clock are looked at every this many steps (a signal after every step).
REPORT_EVERY = 16


@dataclass
class TrainConfig:
    """A training run, as plain values (saved in config.json and in every checkpoint).

    ``model`` is "burda" (the paper's architecture with ``layers`` stochastic layers) or a sigmoid belief
    network "sbn-H1-...-HL" (binary latents: ``estimator`` vimco or rws). ``epochs`` and ``lr`` are resolved
    from the schedule: "burda" fixes both (``schedule_scale`` multiplies each stage's 3^i epochs, rounded, at
    least 1); "constant" needs ``epochs`` and uses ``lr`` (default 1e-3). ``eval_k`` = 0 skips the final
    evaluation; ``monitor_examples`` is the size of the fixed test subset on which each epoch's test bound
    is computed. ``compile``: True compiles the training step into one program
    (``iwae.step``), False runs it eagerly, None decides by the run's length (``resolve_compile``); the
    two modes differ by float rounding only, and a run records the mode it used. ``matmul``: the float32
    matrix-multiply path (``iwae.gemm``), None for the fastest one here; a run records the path it used.
    """

    dataset: str = "digits"
    data_split: str = "paper"
    model: str = "burda"
    layers: int = 1
    objective: str = "iwae"
    k: int = 50
    m: int = 1
    beta: float = 0.5
    alpha: float = 0.5
    estimator: str = "dreg"
    schedule: str = "constant"
    epochs: int | None = None
    lr: float | None = None
    schedule_scale: float = 1.0
    batch_size: int = 20
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-4
    seed: int = 0
    eval_k: int = 5000
    monitor_examples: int = 1000
    checkpoint_every_s: float = 600.0
    device: str = "auto"
    data_dir: str | None = None
    compile: bool | None = None
    matmul: str | None = None
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.model != "burda":
            sbn_widths(self.model)  # validates the name
        # validates the objective's name, k, m, beta and alpha, and the estimator for it and the model's q
        self.objective_spec().check_estimator(self.estimator, reparameterized=self.model == "burda")
        if self.layers not in (1, 2):
            raise SettingError("{0} must be 1 or 2 (the paper's architectures); got {value}", ("layers",),
                               value=self.layers)
        if self.schedule not in SCHEDULES:
            raise SettingError("unknown {0} {value!r}; choose one of {known}", ("schedule",), value=self.schedule,
                               known=", ".join(SCHEDULES))
        if self.schedule == "burda":
            check_positive(self.schedule_scale, "schedule_scale")
            total = sum(epochs for epochs, _ in burda_schedule(self.schedule_scale))
            if self.epochs not in (None, total) or self.lr is not None:
                raise SettingError("{0} and {1} do not apply to {2} burda, which fixes both; shorten it with {3} "
                                   "instead", ("epochs", "lr", "schedule", "schedule_scale"))
            self.epochs = total
        else:
            if self.epochs is None:
                raise SettingError("give the number of epochs with {0}, or use {1} burda", ("epochs", "schedule"))
            self.lr = 1e-3 if self.lr is None else self.lr
            check_positive(self.lr, "lr")
        for name, low in (("epochs", 1), ("batch_size", 1), ("eval_k", 0), ("monitor_examples", 1)):
            check_integer(getattr(self, name), name, low)
        check_seed(self.seed)
        check_positive(self.adam_eps, "adam_eps")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise SettingError("{0} must lie in [0, 1); got {value}", (name,), value=getattr(self, name))
        if not self.checkpoint_every_s >= 0:
            raise SettingError("{0} must be >= 0 seconds; got {value}", ("checkpoint_every_s",),
                               value=self.checkpoint_every_s)
        if self.data_split not in ("paper", "code"):
            raise SettingError("unknown {0} {value!r}; choose paper or code", ("data_split",), value=self.data_split)
        if self.matmul not in (None, *gemm.PATHS):
            raise SettingError("unknown {0} {value!r}; choose {known}", ("matmul",), value=self.matmul,
                               known=" or ".join(gemm.PATHS))

    def steps(self, train_examples: int) -> int:
        """The number of training steps of the whole run on ``train_examples`` examples."""
        return self.epochs * (train_examples // self.batch_size)

    def objective_spec(self) -> Objective:
        """The training objective these settings describe."""
        return Objective(self.objective, self.k, self.m, self.beta, self.alpha)


def burda_schedule(scale: float = 1.0) -> list[tuple[int, float]]:
    """The paper's (epochs, learning rate) stages: 3^i epochs at 1e-3 * 10^(-i/7), i = 0..7, with each
    stage's epochs multiplied by ``scale`` (rounded, at least 1) for shorter runs."""
    return [(max(1, round(3**i * scale)), 1e-3 * 10 ** (-i / 7)) for i in range(8)]


def schedule(config: TrainConfig) -> list[tuple[int, float]]:
    """The run's (epochs, learning rate) stages."""
    return burda_schedule(config.schedule_scale) if config.schedule == "burda" else [(config.epochs, config.lr)]


def learning_rate(stages: list[tuple[int, float]], epoch: int) -> tuple[int, float]:
    """(stage index, learning rate) of the 0-based ``epoch``."""
    for stage, (epochs, lr) in enumerate(stages):
        if epoch < epochs:
            return stage, lr
        epoch -= epochs
    raise ValueError(f"epoch {epoch} lies beyond the schedule")


class Interrupted(Exception):
    """Training stopped on ``signal`` after writing a checkpoint; the message says how to continue."""

    def __init__(self, message: str, sig: signal.Signals) -> None:
        super().__init__(message)
        self.signal = sig


class _StopOnSignal:
    """Within the block, the first SIGINT or SIGTERM only records itself, so the loop can finish its step
    and write a checkpoint; a second one acts as it would have (KeyboardInterrupt, or termination)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> _StopOnSignal:
        self.received: signal.Signals | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def here(self) -> bool:
        """Whether to act on a signal after this step: if one came, and this process trains alone (ranks
        training together act on one at the next report, where they agree on it)."""
        return self.received is not None and distributed.world() == 1

    def agreed(self) -> signal.Signals | None:
        """The signal received by this process or, training with several ranks, by any of them."""
        number = distributed.maximum(0 if self.received is None else int(self.received))
        return signal.Signals(number) if number else None


def resolve_compile(config: TrainConfig, train_examples: int, seeds: int = 1) -> TrainConfig:
    """``config`` with ``compile`` decided: as given, or (None) True for runs of at least ``AUTO_COMPILE_STEPS``
    steps or ``AUTO_COMPILE_SAMPLES`` samples (of ``seeds`` stacked seeds together)."""
    if config.compile is not None:
        return config
    steps = config.steps(train_examples)
    samples = steps * config.batch_size * config.k * seeds
    return replace(config, compile=steps >= AUTO_COMPILE_STEPS or samples >= AUTO_COMPILE_SAMPLES)


def _seeds(seed: int) -> tuple[int, int]:
    """Independent seeds for torch's global generator (initialisation, ``rsample``) and the data generator."""
    model_seq, data_seq = np.random.SeedSequence(seed).spawn(2)
    return int(model_seq.generate_state(1)[0]), int(data_seq.generate_state(1)[0])


def initial_state(config: TrainConfig, dataset: data.Dataset) -> dict[str, Any]:
    """The checkpoint state of a new run (see ``iwae.checkpoint``): the model initialised from the run's seed
    (or ``init_from``), and the states of the generators it continues with."""
    model_seed, data_seed = _seeds(config.seed)
    torch.manual_seed(model_seed)
    model = checkpoint.build_model(asdict(config), dataset.train.shape[1], train_mean=dataset.train.mean(0))
    if config.init_from is not None:
        model.load_state_dict(_initial_parameters(config, Path(config.init_from), dataset.train.shape[1]))
    generator = torch.Generator(dataset.train.device).manual_seed(data_seed)
    return {
        "config": asdict(config), "x_dim": dataset.train.shape[1], "model": model.state_dict(),
        "optimizer": None, "epoch": 0, "step": 0, "batches": None, "bound_sum": 0.0, "epoch_time_s": 0.0,
        "wall_time_s": 0.0, "rng": checkpoint.rng_state(generator),
    }


def _initial_parameters(config: TrainConfig, source: Path, x_dim: int) -> dict[str, torch.Tensor]:
    """The parameters of the run in ``source``, checked to fit ``config``'s model."""
    state = checkpoint.load(source)
    if state["config"]["layers"] != config.layers or state["x_dim"] != x_dim:
        raise ValueError(f"cannot start from {source}: its model has {state['config']['layers']} stochastic layers "
                         f"for data of dimension {state['x_dim']}, this run {config.layers} for {x_dim}; give "
                         "--init-from a run of the same architecture and data")
    return state["model"]


def _load_data(config: TrainConfig, device: torch.device) -> data.Dataset:
    dataset = data.load(config.dataset, config.data_dir, split=config.data_split).to(device)
    if config.batch_size > len(dataset.train):
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(dataset.train)} training examples of "
                         f"{config.dataset}; choose a smaller --batch-size")
    distributed.rows(config.batch_size)  # the ranks (if several) can share the batch
    return dataset


def check_memory(config: TrainConfig, x_dim: int, device: torch.device, seeds: int = 1) -> None:
    """Refuse (SettingError) a run whose training steps, per-epoch monitoring or final evaluation would not fit
    in ``device``'s memory, estimated from the model's layer widths, k and the batch size without allocating;
    ``seeds`` stacked seeds (``iwae.stacked``) each need a lone run's memory for their steps."""
    with torch.device("meta"):
        model = checkpoint.build_model(asdict(config), x_dim)
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


def throwaway_step(config: TrainConfig, x_dim: int, device: torch.device) -> Callable[[], None]:
    """A training step of ``config`` (objective, estimator, compiled or not) on a fresh model and a random
    minibatch: the workload that ``matmul_path`` times."""
    model = checkpoint.build_model(asdict(config), x_dim).to(device)
    x = (torch.rand(config.batch_size, x_dim, device=device) < 0.5).float()
    optimizer = make_adam(model, schedule(config)[0][1], (config.beta1, config.beta2), config.adam_eps)
    step = TrainStep(model, optimizer, config.objective_spec(), config.estimator, compile=bool(config.compile),
                     what="the training step (to time the matmul paths)")
    return lambda: step(x)


def matmul_path(config: TrainConfig, x_dim: int, device: torch.device, seeds: int = 1,
                workload: Callable[[TrainConfig, int, torch.device], Callable[[], None]] = throwaway_step) -> str:
    """A new run's float32 matrix-multiply path: ``config.matmul`` if set, else the faster one on the run's own
    kind of step, ``workload(config, x_dim, device)`` (a lone run's ``throwaway_step``; a stack of ``seeds``
    seeds, its own), measured once per process for runs alike. (A compiled step is compiled here first, and the
    run's own step then finds its graph in inductor's cache.) The throwaway step is built only when there is
    something to time, on generators that ``gemm.measure`` forks, so the global ones are left as they were."""
    step = functools.cache(lambda: workload(config, x_dim, device))
    key = ("training step", config.model, config.layers, x_dim, config.batch_size, config.objective, config.k,
           config.m, config.estimator, bool(config.compile), seeds)
    return gemm.fastest_fp32_matmul(device, config.matmul, lambda: step()(), key)


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
    dataset = _load_data(config, device)
    check_memory(config, dataset.train.shape[1], device)
    config = resolve_compile(config, len(dataset.train))
    matmul = distributed.broadcast(matmul_path(config, dataset.train.shape[1], device))  # the ranks multiply alike
    config = replace(config, matmul=matmul)
    with _StopOnSignal() as stop:  # from here on a signal waits for a checkpoint
        state = initial_state(config, dataset)  # the same on every rank

        def create() -> None:
            rundir.create(run_dir)
            rundir.write_json(run_dir / rundir.CONFIG, asdict(config))
            checkpoint.save(run_dir, state)

        distributed.on_rank_zero(create)
        _fit(config, run_dir, dataset, state, stop, progress)
    del dataset  # the evaluation loads what it needs: never hold two copies of the data
    return _finish(config, run_dir, device, progress)


def resume(run_dir: Path, changes: dict[str, Any] | None = None, *, progress: bool | None = None
           ) -> dict[str, Any] | None:
    """Continue the run in ``run_dir`` from its checkpoint, and evaluate it when it finishes.

    Args:
      changes: settings given again; each must equal the saved one, except those in ``RUNTIME_KEYS``.

    Raises:
      CheckpointError: for a missing or unreadable checkpoint. ValueError: naming every setting in
        ``changes`` that differs from the run's.
    """
    state = checkpoint.load(run_dir)
    config = resumed_config(state["config"], changes, run_dir)
    if state["epoch"] == config.epochs and (run_dir / rundir.EVAL).is_file():
        print(f"iwae: {run_dir} finished all {config.epochs} epochs already", file=sys.stderr)
        return rundir.read_json(run_dir / rundir.EVAL)
    device = resolve_device(config.device)
    dataset = _load_data(config, device)
    check_memory(config, state["x_dim"], device)
    with _StopOnSignal() as stop:
        distributed.on_rank_zero(lambda: rundir.truncate_metrics(run_dir, state["epoch"]))
        _fit(config, run_dir, dataset, state, stop, progress)
    del dataset  # the evaluation loads what it needs: never hold two copies of the data
    return _finish(config, run_dir, device, progress)


def resumed_config(saved: dict[str, Any], changes: dict[str, Any] | None, run_dir: Path) -> TrainConfig:
    """The configuration that the run in ``run_dir``, saved as ``saved``, continues with: ``changes`` are settings
    given again, each of which must equal the saved one, except those in ``RUNTIME_KEYS``, which replace it.

    Raises:
      ValueError: naming every setting in ``changes`` that differs from the run's.
    """
    changes = dict(changes or {})
    if "device" in changes:
        changes["device"] = str(resolve_device(changes["device"]))  # compared as resolved, like the saved one
    differing = [key for key, value in changes.items() if key not in RUNTIME_KEYS and saved.get(key) != value]
    if differing:
        listed = ", ".join(f"{key} (run: {saved.get(key)!r}, given: {changes[key]!r})" for key in differing)
        raise ValueError(f"cannot resume {run_dir} with a different configuration: {listed}; drop those options "
                         "to continue the run as it was, or start a new run with a new --out")
    return TrainConfig(**{**saved, **{key: value for key, value in changes.items() if key in RUNTIME_KEYS}})


def _fit(config: TrainConfig, run_dir: Path, dataset: data.Dataset, state: dict[str, Any], stop: _StopOnSignal,
         progress: bool | None) -> None:
    """The training loop, from the position in ``state`` to the end of the schedule.

    With several ranks (``iwae.distributed``), each trains on its rows of every global batch, drawing the random
    numbers of the whole batch, and the step all-reduces the gradients; rank 0 alone writes.
    """
    device = dataset.train.device
    objective, stages = config.objective_spec(), schedule(config)
    model = checkpoint.build_model(asdict(config), state["x_dim"]).to(device)
    model.load_state_dict(state["model"])
    optimizer = make_adam(model, stages[0][1], (config.beta1, config.beta2), config.adam_eps)
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    # the run's own path, so that it resumes bit for bit (runs that predate the setting used the default)
    gemm.fastest_fp32_matmul(device, config.matmul or gemm.DEFAULT)
    rows, writer = distributed.rows(config.batch_size), distributed.rank() == 0
    train_step = TrainStep(distributed.sharded_draws(model, rows, config.batch_size), optimizer, objective,
                           config.estimator, compile=bool(config.compile),
                           all_reduce=distributed.all_reduce_sum if distributed.world() > 1 else None)
    generator = torch.Generator(device)
    checkpoint.set_rng_state(state["rng"], generator)

    epoch, step, batches = state["epoch"], state["step"], state["batches"]
    batches = None if batches is None else batches.to(device)
    bound_sum = train_step.bound_sum  # the step adds each minibatch's summed bound to it
    bound_sum.fill_(float(state["bound_sum"]))
    steps_per_epoch, monitor = len(dataset.train) // config.batch_size, dataset.test[: config.monitor_examples]
    session_start, wall_time_base = time.perf_counter(), state["wall_time_s"]
    epoch_start = time.perf_counter() - state["epoch_time_s"]

    def save() -> None:
        if writer:
            checkpoint.save(run_dir, {
                "config": asdict(config), "x_dim": state["x_dim"], "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
                "batches": batches if step else None, "bound_sum": bound_sum,
                "epoch_time_s": time.perf_counter() - epoch_start if step else 0.0,
                "wall_time_s": wall_time_base + time.perf_counter() - session_start,
                "rng": checkpoint.rng_state(generator),
            })

    bar = tqdm(total=config.epochs * steps_per_epoch, initial=epoch * steps_per_epoch + step, unit="step",
               disable=(None if progress is None else not progress) if writer else True, dynamic_ncols=True,
               desc=f"train {run_dir.name}")
    next_checkpoint = time.monotonic() + config.checkpoint_every_s
    last_bound = math.nan
    with bar:
        while epoch < config.epochs:
            stage, lr = learning_rate(stages, epoch)
            train_step.set_lr(lr)
            bound = "-" if math.isnan(last_bound) else f"{last_bound:.2f}"  # known once per epoch
            bar.set_postfix_str(f"epoch {epoch + 1}/{config.epochs} stage {stage + 1}/{len(stages)} lr {lr:.1e} "
                                f"train bound {bound}", refresh=False)
            if batches is None:
                batches = data.epoch_batches(len(dataset.train), config.batch_size, generator)
                bound_sum.zero_()
                epoch_start = time.perf_counter()
            while step < steps_per_epoch:
                train_step(dataset.minibatch(batches[step], generator)[rows])
                step += 1
                if step % REPORT_EVERY and step < steps_per_epoch and not stop.here():
                    continue
                bar.update(epoch * steps_per_epoch + step - bar.n)
                stopped = stop.agreed()
                if stopped or time.monotonic() >= next_checkpoint:
                    save()
                    next_checkpoint = time.monotonic() + config.checkpoint_every_s
                    if stopped:
                        raise Interrupted(
                            f"training stopped by {stopped.name} in epoch {epoch + 1}/{config.epochs} after "
                            f"step {step}/{steps_per_epoch}; checkpoint saved; continue with: "
                            f"iwae train --resume {run_dir}", stopped,
                        )

            epoch_time = time.perf_counter() - epoch_start
            last_bound = bound_sum.item() / (steps_per_epoch * config.batch_size)
            if not math.isfinite(last_bound):
                raise FloatingPointError(
                    f"the training bound became {last_bound} in epoch {epoch + 1}; the last good checkpoint is "
                    f"in {run_dir}; start a new run with a smaller learning rate"
                )
            epoch, step, batches = epoch + 1, 0, None
            next_checkpoint = time.monotonic() + config.checkpoint_every_s
            if not writer:
                continue
            with evaluate.seeded(config.seed, device):
                test_bound = evaluate.objective_bound(model, monitor, objective).mean().item()
            record = {
                "epoch": epoch, "stage": stage + 1, "lr": lr, "train_bound": last_bound, "test_bound": test_bound,
                "examples_per_s": steps_per_epoch * config.batch_size / epoch_time, "epoch_time_s": epoch_time,
                "wall_time_s": wall_time_base + time.perf_counter() - session_start,
            }
            rundir.append_metrics(run_dir, record)
            save()
            if bar.disable:
                print(f"epoch {epoch}/{config.epochs} stage {stage + 1} lr {lr:.2e} train bound {last_bound:.2f} "
                      f"test bound {test_bound:.2f} {record['examples_per_s']:.0f} examples/s", file=sys.stderr)

    stopped = stop.agreed()
    distributed.barrier()  # rank 0 has written the last checkpoint, which every rank evaluates
    if stopped:
        raise Interrupted(f"training stopped by {stopped.name} after the last epoch, before the evaluation; "
                          f"checkpoint saved; finish with: iwae train --resume {run_dir}", stopped)


def _finish(config: TrainConfig, run_dir: Path, device: torch.device, progress: bool | None
            ) -> dict[str, Any] | None:
    """The final evaluation (unless ``eval_k`` is 0) and the figures of a trained run."""
    result = None
    if config.eval_k:
        result = evaluate.evaluate_run(run_dir, k=config.eval_k, device=str(device), data_dir=config.data_dir,
                                       progress=progress is not False)
    if distributed.rank() == 0:
        figures.make_figures(run_dir, device=device)
    return result
