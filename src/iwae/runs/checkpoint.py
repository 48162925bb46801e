"""Checkpoints: everything a training run needs to continue exactly where it stopped, in one file.

A checkpoint is a dict saved with ``torch.save`` and written atomically (``rundir.write_atomic``):

    format      CHECKPOINT_FORMAT
    config      the resolved training configuration, plain values
    x_dim       the data dimension the model was built for
    model       model.state_dict()
    optimizer   optimizer.state_dict()
    epoch       epochs finished
    step        minibatches finished within the current epoch (0 at an epoch boundary)
    batches     the current epoch's minibatch indices (None at an epoch boundary)
    bound_sum   the sum of the training bound over the current epoch's finished minibatches
    epoch_time_s, wall_time_s   seconds spent in the current epoch's minibatches, and in the whole run
    rng         the states of torch's global generator (CPU, and CUDA on a GPU) used by ``rsample``, and
                of the data generator that draws permutations and binarizations

Every record of the archive carries its CRC-32, checked when the file is read, so that bits changed on the disk
or in a copy are found before a run trains or is evaluated on them.

Restoring all of it replays the same random streams from the same position, so on a CPU a resumed run
ends with bit-for-bit the parameters of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iwae.models import DeepLatentModel, build_model
from iwae.platform.files import write_atomic
from iwae.runs import archives
from iwae.runs.rundir import CHECKPOINT, EVAL, STACK, is_finished

CHECKPOINT_FORMAT = 1
KEYS = ("config", "x_dim", "model", "optimizer", "epoch", "step", "batches", "bound_sum", "epoch_time_s",
        "wall_time_s", "rng")  # every checkpoint's entries (see the module docstring)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not one of ours; the message names the file and the fix."""


def save(run_dir: Path, state: dict[str, Any], name: str = CHECKPOINT) -> None:
    """Write ``state`` (see the module docstring) to RUN/``name`` (RUN/checkpoint.pt) atomically, each record with
    its checksum (``iwae.runs.archives``)."""
    write_atomic(run_dir / name, lambda file: archives.save({"format": CHECKPOINT_FORMAT, **state}, file))


def load(run_dir: Path) -> dict[str, Any]:
    """The checkpoint in ``run_dir``, with every tensor on the CPU.

    Raises:
        CheckpointError: if there is no checkpoint, or it cannot be read (truncated, corrupt, or not
            written by ``save``).
    """
    path = run_dir / CHECKPOINT
    if not path.is_file() and (run_dir / STACK).is_file():
        seeds = sorted(seed.name for seed in run_dir.glob("seed-*"))
        raise CheckpointError(
            f"{run_dir} holds a stacked run, whose seeds are run directories of their own; give one of them, "
            f"e.g. {run_dir / (seeds[0] if seeds else 'seed-0')}"
        )
    if not path.is_file() and is_finished(run_dir):
        raise CheckpointError(
            f"{run_dir} is a finished run kept without its {CHECKPOINT} (as results are kept): its evaluation is "
            f"{run_dir / EVAL}; restore its {CHECKPOINT} to evaluate, draw from or continue it"
        )
    if not path.is_file():
        reason = ("it is a file, not a directory" if run_dir.is_file() else "the directory does not exist"
                  if not run_dir.is_dir() else f"it holds no {CHECKPOINT}")
        raise CheckpointError(
            f"no checkpoint in {run_dir} ({reason}); give the directory of a run started with iwae train --out"
        )
    return read(path)


def read(path: Path) -> dict[str, Any]:
    """The checkpoint in the file ``path`` (written by ``save``, or a stack's ``checkpoint.next``), with every tensor
    on the CPU.

    Raises:
        CheckpointError: if the file cannot be read (truncated, corrupt, or not written by ``save``).
    """
    fix = "restore it from a copy, or start a new run with a new --out"
    try:
        state = archives.load(path)
    except archives.NotAnArchive as error:
        raise CheckpointError(
            f"{path} is corrupt or not a checkpoint: its {error.size} bytes are not a complete PyTorch archive (the "
            f"file was cut short, or is some other file); {fix}"
        ) from None
    except archives.ChangedRecord as error:
        raise CheckpointError(
            f"{path} is a damaged checkpoint: its record {error.record} no longer matches the checksum written with "
            f"it (bits changed on the disk or in a copy); {fix}"
        ) from None
    except Exception as error:  # torch.load reports damage as any of a dozen exception types
        raise CheckpointError(
            f"{path} is corrupt or not a checkpoint: it is a PyTorch archive, but a damaged one or one holding "
            f"objects other than tensors and plain values ({type(error).__name__}); {fix}"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an iwae checkpoint of format {CHECKPOINT_FORMAT}; start a new run with a new --out"
        )
    damage = _damage(state)
    if damage:
        raise CheckpointError(f"{path} is a damaged checkpoint: {damage}; {fix}")
    return state


def _damage(state: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's contents, if anything: a missing entry, or parameters (or Adam's moments)
    that do not fit the model its configuration describes."""
    missing = [key for key in KEYS if key not in state]
    if missing:
        return f"it lacks {', '.join(missing)}"
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no memory, no draws
            model = _model(state)
        expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        saved = {name: tuple(tensor.shape) for name, tensor in state["model"].items()}
        optimizer = state["optimizer"]  # None in the checkpoint a run writes at its start, before its first step
        moments = {} if optimizer is None else {int(index): moment for index, moment in optimizer["state"].items()}
        parameters = [tuple(parameter.shape) for parameter in model.parameters()]
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        return f"its configuration, model or optimizer entry is not what iwae writes ({type(error).__name__}: {error})"
    if saved != expected:
        wrong = sorted(name for name in expected.keys() | saved.keys() if expected.get(name) != saved.get(name))
        return f"its parameters do not fit the model its configuration describes ({', '.join(wrong[:3])})"
    diverged = [name for name, tensor in state["model"].items() if not torch.isfinite(tensor).all()]
    if diverged:
        return f"its parameters hold NaN or infinite values ({', '.join(diverged[:3])}), as a diverged run's do"
    epochs = state["config"].get("epochs")
    for name, value, high in (("epoch", state["epoch"], epochs), ("step", state["step"], None)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (high is not None and value > high):
            return f"its {name} {value!r} is not a position in its run of {epochs} epochs"
    for index, moment in moments.items():
        if not 0 <= index < len(parameters):
            return f"its optimizer holds moments of parameter {index}, of {len(parameters)}"
        for name, value in moment.items():
            if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) != parameters[index]:
                return f"Adam's {name} of parameter {index} has shape {tuple(value.shape)}, not its parameter's"
    return None


def _model(state: dict[str, Any]) -> DeepLatentModel:
    """A new model of the architecture a checkpoint's configuration describes."""
    return build_model(state["config"].get("model", "burda"), state["config"]["layers"], state["x_dim"])


def load_model(run_dir: Path, device: torch.device | str = "cpu") -> tuple[dict[str, Any], DeepLatentModel]:
    """A run's latest checkpoint (see ``load``) and its model with the checkpoint's parameters, on ``device``; torch's
    global generator is left as it was (the model's initialisation, which the parameters replace, draws nothing
    from it)."""
    state = load(run_dir)
    with torch.random.fork_rng(devices=[]):
        model = _model(state)
    model.load_state_dict(state["model"])
    return state, model.to(device)


def digest(state: dict[str, Any]) -> str:
    """The SHA-256 of a checkpoint's position and parameters, as loaded: what ties an evaluation's finished batches
    to the model they were made with. Taken from the state read, not from the file, which a run still training
    may have replaced since."""
    sha256 = hashlib.sha256(repr((state["epoch"], state["step"], state["wall_time_s"])).encode())
    for name, tensor in sorted(state["model"].items()):
        sha256.update(name.encode())
        sha256.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return sha256.hexdigest()


def initial_parameters(source: Path, model: str, layers: int, x_dim: int) -> dict[str, Tensor]:
    """The parameters of the run in ``source`` (a run's ``init_from``), checked to fit a ``model`` ("burda" with
    ``layers`` stochastic layers, or a sigmoid belief net "sbn-...") for data of dimension ``x_dim``."""
    state = load(source)
    theirs = (state["config"].get("model", "burda"), state["config"]["layers"], state["x_dim"])
    if _architecture(*theirs[:2]) != _architecture(model, layers) or theirs[2] != x_dim:
        raise ValueError(f"cannot start from {source}: its model is {_architecture(*theirs[:2])} for data of "
                         f"dimension {theirs[2]}, this run's {_architecture(model, layers)} for {x_dim}; give "
                         "--init-from a run of the same architecture and data")
    return state["model"]


def _architecture(model: str, layers: int) -> str:
    """A model's architecture in words: the paper's with its stochastic layers, or a sigmoid belief net's name."""
    if model == "burda":
        return f"the paper's with {layers} stochastic layer{'s' if layers > 1 else ''}"
    return f"the sigmoid belief net {model}"
