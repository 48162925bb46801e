"""The device a command runs on: ``cpu``, ``cuda`` (or ``cuda:N``), or ``auto`` (a GPU when there is one)."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``.

    Raises:
        ValueError: for an unknown name, or ``cuda`` on a machine without a usable GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}; choose cpu, cuda or auto") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; choose cpu, cuda or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu")
    return device
