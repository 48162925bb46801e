"""The fastest float32 matrix multiply of this machine, chosen at run time.

On x86 CPUs torch multiplies float32 matrices with MKL's sgemm by default. oneDNN, which torch also ships,
has a float32 path (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``) that on CPUs with AVX-512 BF16
splits each operand into bfloat16 parts and accumulates in float32: its results stay within float32 rounding
of the exact product (checked here against float64 before it is used), and on such CPUs it runs up to about
twice as fast. ``fastest_fp32_matmul`` measures both paths on a matrix product of a training step's shape,
side by side, and keeps the faster one that is accurate; elsewhere (GPUs, other CPUs) torch's default stays.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

DEFAULT, ONEDNN = "default", "onednn"
# accepted error of a path, as a multiple of the default path's error against the float64 product
ACCURACY_FACTOR = 4.0
_chosen: dict[str, str] = {}


def _set_path(path: str) -> None:
    torch.backends.mkldnn.matmul.fp32_precision = "bf16" if path == ONEDNN else "ieee"


def _current_path() -> str:
    return ONEDNN if torch.backends.mkldnn.matmul.fp32_precision == "bf16" else DEFAULT


def _onednn_available(device: torch.device) -> bool:
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


def _relative_error(path: str, a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor) -> float:
    _set_path(path)
    return ((a @ b).double() - exact).abs().max().item() / exact.abs().max().item()


def _seconds(path: str, a: torch.Tensor, layer: torch.nn.Linear, repeats: int) -> float:
    _set_path(path)
    start = time.perf_counter()
    for _ in range(repeats):
        layer(a).sum().backward()
    return (time.perf_counter() - start) / repeats


def measure(rows: int = 1000, inner: int = 200, cols: int = 784, rounds: int = 5) -> dict[str, dict[str, float]]:
    """Per path: the relative error of a product against float64, and the median seconds of a linear layer's
    forward and backward pass on (rows, inner) inputs with ``cols`` outputs, timed in interleaved rounds."""
    previous = _current_path()
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=generator, requires_grad=True)
    b = torch.randn(inner, cols, generator=generator)
    layer = torch.nn.Linear(inner, cols)
    exact = a.detach().double() @ b.double()
    paths = (DEFAULT, ONEDNN)
    try:
        result = {path: {"error": _relative_error(path, a.detach(), b, exact)} for path in paths}
        times: dict[str, list[float]] = {path: [] for path in paths}
        for path in paths:  # warm-up: oneDNN builds its kernels on first use
            _seconds(path, a, layer, 2)
        for _ in range(rounds):
            for path in paths:
                times[path].append(_seconds(path, a, layer, 5))
    finally:
        _set_path(previous)
    for path in paths:
        result[path]["seconds"] = statistics.median(times[path])
    return result


def fastest_fp32_matmul(device: torch.device | str = "cpu") -> str:
    """Switch float32 matrix multiplies on ``device`` to the fastest accurate path, once per process; return its
    name ("onednn" or "default"). The switch is torch's global setting, so it holds for the whole process."""
    device = torch.device(device)
    if not _onednn_available(device):
        return DEFAULT
    if "cpu" not in _chosen:
        result = measure()
        accurate = result[ONEDNN]["error"] <= ACCURACY_FACTOR * max(result[DEFAULT]["error"], 1e-7)
        faster = result[ONEDNN]["seconds"] < 0.95 * result[DEFAULT]["seconds"]
        _chosen["cpu"] = ONEDNN if accurate and faster else DEFAULT
    _set_path(_chosen["cpu"])
    return _chosen["cpu"]


@contextmanager
def matmul_path(path: str) -> Iterator[None]:
    """Within the block, float32 matrix multiplies use ``path`` ("default" or "onednn")."""
    previous = _current_path()
    _set_path(path)
    try:
        yield
    finally:
        _set_path(previous)
