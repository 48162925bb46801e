"""The memory a computation will need, estimated before anything is allocated, and the memory available.

Every pass of a model over a batch works on rows of (sample, example) pairs: K samples for each of B examples
make K * B rows, and every layer produces one vector per row. An estimate of the peak memory of a pass is

    bytes ~= 4 * rows * c * (sum of the widths of the model's linear layers + D),

with float32 values, D the data dimension (the log-likelihood's elementwise temporaries) and c the number of
copies alive at the peak: c = 2.5 for a training step (the activations kept for the backward pass, the
gradients flowing through them, and the estimator's extra terms), c = 1.25 without gradients. On a CPU, the
peaks of the paper's models (1 and 2 stochastic layers, D = 64 and 784, each estimator) measured as the growth
of a fresh process's resident memory are about 50 % to 90 % of this estimate, and measured as the memory the
step itself allocates about 35 % to 80 % (tests/test_memory.py checks that the estimate bounds the latter). A
training step also holds the parameters, their gradients and Adam's two moments: 4 copies of the parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from iwae.settings import SettingError

COPIES_TRAINING = 2.5
COPIES_NO_GRAD = 1.25
_FLOAT_BYTES = 4


def pass_bytes(model: nn.Module, x_dim: int, rows: int, *, training: bool) -> int:
    """Estimated peak bytes of one pass of ``model`` over ``rows`` (sample, example) rows of data of dimension
    ``x_dim``: a training step (forward, backward and the optimizer's update) or, else, a pass without
    gradients. Works on a model on the meta device, so nothing is allocated."""
    widths = sum(layer.out_features for layer in model.modules() if isinstance(layer, nn.Linear)) + x_dim
    copies = COPIES_TRAINING if training else COPIES_NO_GRAD
    activations = _FLOAT_BYTES * rows * copies * widths
    return int(activations + parameter_bytes(model, training=training))


def parameter_bytes(model: nn.Module, *, training: bool) -> int:
    """Bytes of ``model``'s parameters; for training, with their gradients and Adam's two moments (4 copies)."""
    return _FLOAT_BYTES * sum(p.numel() for p in model.parameters()) * (4 if training else 1)


def available_bytes(device: torch.device) -> int | None:
    """The memory a new allocation can use on ``device``: on a GPU the free memory plus what torch's cache
    holds unused; on a CPU the kernel's MemAvailable, capped by the cgroup's limit. None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    candidates = [_meminfo_available(), _cgroup_available()]
    known = [value for value in candidates if value is not None]
    if not known:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return min(known)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """The cgroup (v2) memory limit minus the current usage, if there is a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest unit that keeps a number >= 1 (B, KB, MB, GB, TB)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:,.0f} TB"


def check_fits(needed: int, device: torch.device, what: str, names: tuple[str, ...], **values: object) -> None:
    """Raise SettingError unless ``needed`` bytes fit in the memory available on ``device``.

    ``what`` says what needs the memory, with the settings that make it large as fields {0}, {1}, ... of
    ``names`` (and their ``values``, as for ``SettingError``); the message asks for smaller values of them.
    """
    available = available_bytes(device)
    if available is None or needed <= available:
        return
    smaller = " or ".join(f"{{{i}}}" for i in range(len(names)))
    raise SettingError(
        f"{what} needs about {{needed}} of memory, but {{available}} is available on {{device}}; use a smaller "
        f"{smaller}", names, needed=format_bytes(needed), available=format_bytes(available), device=device,
        **values,
    )
