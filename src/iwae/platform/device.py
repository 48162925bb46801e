"""The device a command runs on: ``cpu``, ``cuda`` (or ``cuda:N``), or ``auto`` (a GPU when there is one), and
seeding its random generators for one computation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``.

    Raises:
        ValueError: for an unknown name, or ``cuda`` on a machine without a usable GPU.
    """
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu")
    return device


def check_device_name(name: object) -> None:
    """Raise ValueError unless ``name`` names a device this library runs on (cpu, cuda, cuda:N or auto), whether
    or not this machine has it."""
    if name == "auto":
        return
    try:
        device = torch.device(name) if isinstance(name, str | torch.device) else None
    except RuntimeError:
        device = None
    if device is None:
        raise ValueError(f"unknown device {name!r}; choose cpu, cuda or auto")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; choose cpu, cuda or auto")


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with torch's global generator (and the GPU's, on ``device``) seeded with ``seed``,
    restoring the generators' states afterwards, so that evaluating never perturbs a training run."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def batch_seed(seed: int, index: int) -> int:
    """The seed of the draws of batch ``index`` of a computation seeded with ``seed``: independent streams, so that a
    batch's draws depend on the seed and its index alone."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
