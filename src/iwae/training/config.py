"""The settings of a training run (``TrainConfig``) and what follows from them: the learning-rate schedule,
whether the step is compiled, and which settings a resumed run may change.

Adam (beta1 0.9, beta2 0.999, eps 1e-4) on minibatches of 20, following the gradient of the per-batch sum
of the bound, with the schedule of 3^i epochs at learning rate 1e-3 * 10^(-i/7) for i = 0..7 (3280
epochs), or a constant rate for a given number of epochs.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from iwae.core.objectives import Objective
from iwae.data import recorded_name, user_file_sha256
from iwae.models import sbn_widths
from iwae.platform import gemm
from iwae.platform.device import check_device_name, resolve_device
from iwae.settings import SettingError, check_integer, check_positive, check_seed, plain_number

SCHEDULES = ("constant", "burda")
# Settings that change the trajectory by float rounding at most, so a resumed run may use new values. (The device
# is not one: CPU and GPU generators have different states, so a run continues on the kind of device it started on.)
RUNTIME_KEYS = ("data_dir", "checkpoint_every_s", "compile", "threads")
# compile=None (auto) compiles runs of at least this many steps, or of at least this many samples drawn in all
# (steps x batch size x k x stacked seeds): compiling costs tens of seconds on a CPU, which only a long run wins
# back (by less launch overhead per step, and by fused kernels per sample), so a short run is never slower.
AUTO_COMPILE_STEPS = 100_000
AUTO_COMPILE_SAMPLES = 5_000_000


@dataclass
class TrainConfig:
    """A training run, as plain values (saved in config.json and in every checkpoint).

    ``model`` is "burda" (the paper's architecture with ``layers`` stochastic layers) or a sigmoid belief
    network "sbn-H1-...-HL" (binary latents: ``estimator`` vimco or rws). ``epochs`` and ``lr`` are resolved
    from the schedule: "burda" fixes both (``schedule_scale`` multiplies each stage's 3^i epochs, rounded, at
    least 1); "constant" needs ``epochs`` and uses ``lr`` (default 1e-3). ``eval_k`` = 0 skips the final
    evaluation; ``monitor_examples`` is the size of the fixed random test subset on which each epoch's test
    bound is computed (``iwae.eval.splits.subset``: the examples ``iwae evaluate --examples`` takes).
    ``compile``: True compiles the training step into one program (``iwae.training.step``), False runs it
    eagerly, None decides by the run's length (``resolve_compile``); the two modes differ by float rounding only,
    and a run records the mode it used. ``matmul``: the float32
    matrix-multiply path (``iwae.platform.gemm``), None for the fastest one here; a run records the path it used.
    ``threads``: torch's threads (``iwae.platform.threads``), None for one per CPU that other processes leave
    free; a run records the count it used, and resumes on it unless given another. ``dataset``: a catalogue
    name, or a user's .npy/.npz file, which a run records by its absolute path and its SHA-256
    (``dataset_sha256``, set when the run starts): a changed file is refused, and a moved one is named again with
    ``dataset`` when the run is resumed.
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
    threads: int | None = None
    dataset_sha256: str | None = None

    def __post_init__(self) -> None:
        _check_kinds(self)
        self.dataset = recorded_name(self.dataset)
        if self.data_dir is not None:  # recorded absolute: the run's data is found from any directory
            self.data_dir = str(Path(self.data_dir).expanduser().absolute())
        if self.model != "burda":
            sbn_widths(self.model)  # validates the name
        # validates the objective's name, k, m, beta and alpha, and the estimator for it and the model's q
        self.objective_spec().check_estimator(self.estimator, reparameterized=self.model == "burda")
        if self.model != "burda" and self.layers != 1:
            raise SettingError("{0} applies to the paper's architecture ({1} burda); the layers of {value} are the "
                               "widths in its name", ("layers", "model"), value=self.model)
        if self.layers not in (1, 2):
            raise SettingError("{0} must be 1 or 2 (the paper's architectures); got {value!r}", ("layers",),
                               value=self.layers)
        if self.schedule not in SCHEDULES:
            raise SettingError("unknown {0} {value!r}; choose one of {known}", ("schedule",), value=self.schedule,
                               known=", ".join(SCHEDULES))
        if self.schedule == "burda":
            check_positive(self.schedule_scale, "schedule_scale")
            if not math.isfinite(self.schedule_scale * 3**7):
                raise SettingError("{0} {value} makes more epochs than can be counted; give a smaller {0}",
                                   ("schedule_scale",), value=self.schedule_scale)
            total = sum(epochs for epochs, _ in burda_schedule(self.schedule_scale))
            if self.epochs not in (None, total) or self.lr is not None:
                check_schedule_reads("burda", ("epochs", "lr"))
            self.epochs = total
        else:
            if self.epochs is None:
                raise SettingError("give the number of epochs with {0}, or use {1} burda", ("epochs", "schedule"))
            if self.schedule_scale != 1.0:
                check_schedule_reads("constant", ("schedule_scale",))
            self.lr = 1e-3 if self.lr is None else self.lr
            check_positive(self.lr, "lr")
        for name, low in (("epochs", 1), ("batch_size", 1), ("eval_k", 0), ("monitor_examples", 1)):
            check_integer(getattr(self, name), name, low)
        check_seed(self.seed)
        check_positive(self.adam_eps, "adam_eps")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise SettingError("{0} must lie in [0, 1); got {value!r}", (name,), value=getattr(self, name))
        if not self.checkpoint_every_s >= 0:
            raise SettingError("{0} must be >= 0 seconds; got {value!r}", ("checkpoint_every_s",),
                               value=self.checkpoint_every_s)
        if self.data_split not in ("paper", "code"):
            raise SettingError("unknown {0} {value!r}; choose paper or code", ("data_split",), value=self.data_split)
        if self.threads is not None:
            check_integer(self.threads, "threads", 1)
        if self.matmul not in (None, *gemm.PATHS):
            raise SettingError("unknown {0} {value!r}; choose {known}", ("matmul",), value=self.matmul,
                               known=" or ".join(gemm.PATHS))
        gemm.check_path(self.matmul, self.device)

    def steps(self, train_examples: int) -> int:
        """The number of training steps of the whole run on ``train_examples`` examples."""
        return self.epochs * (train_examples // self.batch_size)

    def objective_spec(self) -> Objective:
        """The training objective these settings describe."""
        return Objective(self.objective, self.k, self.m, self.beta, self.alpha)


def _check_kinds(config: TrainConfig) -> None:
    """Write ``config``'s paths as strings and its integers (NumPy's too) as ints, and raise SettingError for a
    setting of a kind that the checks of its value would not name (a number for a path or a name, a string for a
    number, a word for a flag)."""
    for name in ("layers", "k", "m", "epochs", "batch_size", "seed", "eval_k", "monitor_examples", "threads"):
        setattr(config, name, plain_number(getattr(config, name)))
    for name in ("dataset", "data_dir", "init_from"):
        value = getattr(config, name)
        if value is None and name != "dataset":
            continue
        if not isinstance(value, str | os.PathLike):
            raise SettingError("{0} must be a path or a name (a string); got {value!r}", (name,), value=value)
        setattr(config, name, os.fspath(value))
    if not isinstance(config.model, str):
        raise SettingError("{0} must be a model's name, burda or sbn-H1-...-HL; got {value!r}", ("model",),
                           value=config.model)
    if config.compile is not None and not isinstance(config.compile, bool):
        raise SettingError("{0} must be True, False or None (decided by the run's length); got {value!r}",
                           ("compile",), value=config.compile)
    for name in ("beta1", "beta2", "checkpoint_every_s"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise SettingError("{0} must be a real number; got {value!r}", (name,), value=value)
    check_device_name(config.device)


def check_schedule_reads(schedule: str, given: Collection[str]) -> None:
    """Raise SettingError if the settings ``given`` (by name) include one that ``schedule`` does not read: epochs and
    lr, which burda fixes, or schedule_scale, which scales burda's stages only."""
    if schedule == "burda" and {"epochs", "lr"} & set(given):
        raise SettingError("{0} and {1} do not apply to {2} burda, which fixes both; shorten it with {3} instead",
                           ("epochs", "lr", "schedule", "schedule_scale"))
    if schedule == "constant" and "schedule_scale" in given:
        raise SettingError("{0} scales {1} burda's stages only; with {1} constant give the length with {2}",
                           ("schedule_scale", "schedule", "epochs"))


def check_is_config(config: object) -> None:
    """Raise TypeError unless ``config`` is a ``TrainConfig`` (not, say, a dict of its settings)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"a run's settings must be a TrainConfig, not a {type(config).__name__}; give "
                        "TrainConfig(**settings)")


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


def resolve_compile(config: TrainConfig, train_examples: int, seeds: int = 1) -> TrainConfig:
    """``config`` with ``compile`` decided: as given, or (None) True for runs of at least ``AUTO_COMPILE_STEPS``
    steps or ``AUTO_COMPILE_SAMPLES`` samples (of ``seeds`` stacked seeds together)."""
    if config.compile is not None:
        return config
    steps = config.steps(train_examples)
    samples = steps * config.batch_size * config.k * seeds
    return replace(config, compile=steps >= AUTO_COMPILE_STEPS or samples >= AUTO_COMPILE_SAMPLES)


def resumed_config(saved: dict[str, Any], changes: dict[str, Any] | None, run_dir: Path) -> TrainConfig:
    """The configuration that the run in ``run_dir``, saved as ``saved``, continues with: ``changes`` are settings
    given again, each of which must equal the saved one, except those in ``RUNTIME_KEYS``, which replace it.

    Raises:
      ValueError: naming every setting in ``changes`` that differs from the run's.
    """
    if changes is not None and not isinstance(changes, Mapping):
        raise TypeError(f"changes must map settings to their values, e.g. {{'threads': 1}}; got a "
                        f"{type(changes).__name__}")
    changes = dict(changes or {})
    unknown = sorted(set(changes) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise SettingError("unknown setting {unknown} in {0}; the settings are TrainConfig's fields", ("changes",),
                           unknown=", ".join(map(repr, unknown)))
    if "device" in changes:
        changes["device"] = str(resolve_device(changes["device"]))  # compared as resolved, like the saved one
    if "dataset" in changes:  # both compared as runs record them (older runs saved a user's file as given)
        changes["dataset"] = recorded_name(changes["dataset"])
        saved = {**saved, "dataset": recorded_name(saved["dataset"])}
        digest = saved.get("dataset_sha256")
        if digest is not None and user_file_sha256(changes["dataset"]) == digest:  # the run's file, moved
            saved["dataset"] = changes["dataset"]
    differing = [key for key, value in changes.items() if key not in RUNTIME_KEYS and saved.get(key) != value]
    if differing:  # named as settings, which the command line names as its options
        listed = ", ".join(f"{{{i}}} (run: {{run{i}}}, given: {{given{i}}})" for i in range(len(differing)))
        raise SettingError(f"cannot resume {{where}} with a different configuration: {listed}; drop those options "
                           "to continue the run as it was, or start a new run with a new --out", tuple(differing),
                           where=run_dir, **{f"run{i}": repr(saved.get(key)) for i, key in enumerate(differing)},
                           **{f"given{i}": repr(changes[key]) for i, key in enumerate(differing)})
    unknown = sorted(set(saved) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"the checkpoint in {run_dir} holds settings this version of iwae does not know "
                         f"({', '.join(unknown)}): it was written by another version; continue it with that version")
    return TrainConfig(**{**saved, **{key: value for key, value in changes.items() if key in RUNTIME_KEYS}})
