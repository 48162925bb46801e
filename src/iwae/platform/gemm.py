"""The fastest float32 matrix multiply of this machine for a given workload, chosen at run time.

On x86 CPUs torch multiplies float32 matrices with MKL's sgemm by default. oneDNN, which torch also ships,
has a float32 path (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``) that on CPUs with AVX-512 BF16
splits each operand into bfloat16 parts and accumulates in float32: its results stay within float32 rounding
of the exact product (checked here against float64 before it is used), and on such CPUs it runs up to about
twice as fast on large products. On small ones (a batch of 20 rows, layers 50 wide) its per-product overhead
can make it the slower path, so ``fastest_fp32_matmul`` times both paths on the caller's own workload (a
training step's forward and backward pass, an evaluation pass), side by side, and keeps the faster one that is
accurate; elsewhere (GPUs, other CPUs) torch's default stays.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch

from iwae.platform import timing
from iwae.platform.device import resolve_device
from iwae.settings import SettingError

DEFAULT, ONEDNN = "default", "onednn"
PATHS = (DEFAULT, ONEDNN)
# accepted error of a path, as a multiple of the default path's error against the float64 product
ACCURACY_FACTOR = 4.0
_errors: dict[str, float] = {}  # per path, its relative error (``relative_errors``, measured once per process)
_chosen: dict[Hashable, str] = {}  # the path chosen per workload key (measured once per process)


def _set_path(path: str) -> None:
    torch.backends.mkldnn.matmul.fp32_precision = "bf16" if path == ONEDNN else "ieee"


def _current_path() -> str:
    return ONEDNN if torch.backends.mkldnn.matmul.fp32_precision == "bf16" else DEFAULT


def check_path(path: str | None, device: str) -> None:
    """Raise SettingError for a ``path`` given for products on ``device`` (a name, as ``resolve_device`` takes;
    resolved only for oneDNN's path) that are not a CPU's (a GPU multiplies on its own path), rather than ignore
    it."""
    if path == ONEDNN and (kind := resolve_device(device).type) != "cpu":
        raise SettingError("{0} {value} applies to a CPU's float32 products, not to {device}'s; drop {0}",
                           ("matmul",), value=path, device=kind)


def has_choice(device: torch.device | str) -> bool:
    """Whether float32 products on ``device`` have a second path to choose (oneDNN's, on a CPU build with it)."""
    return torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()


def relative_errors(rows: int = 1000, inner: int = 200, cols: int = 784) -> dict[str, float]:
    """Per path, the largest error of a (rows, inner) @ (inner, cols) product of standard normal matrices against
    the float64 product, relative to the largest entry of the product."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=generator)
    b = torch.randn(inner, cols, generator=generator)
    exact = a.double() @ b.double()
    errors = {}
    with using_matmul_path(DEFAULT):
        for path in PATHS:
            _set_path(path)
            errors[path] = ((a @ b).double() - exact).abs().max().item() / exact.abs().max().item()
    return errors


def measure(workload: Callable[[], object], rounds: int = 9) -> dict[str, float]:
    """Per path, the median seconds of one call of ``workload``, timed by turns (``timing.by_turns``). The global
    random number generators are left as they were."""
    with using_matmul_path(DEFAULT):  # oneDNN builds its kernels on first use: the warm-up
        return timing.by_turns(workload, {path: functools.partial(_set_path, path) for path in PATHS}, rounds)


def accurate(path: str) -> bool:
    """Whether ``path`` multiplies to float32 rounding on this CPU: within ``ACCURACY_FACTOR`` times the default
    path's error against the float64 product. (oneDNN's path is, on CPUs that split each operand into several
    bfloat16 parts; on others it multiplies in one bfloat16 part, with an error some 1000 times larger.)"""
    if not _errors:
        _errors.update(relative_errors())
    return _errors[path] <= ACCURACY_FACTOR * max(_errors[DEFAULT], 1e-7)


def inaccuracy(path: str) -> str:
    """Why ``path`` is not used on this CPU, for a message."""
    return (f"oneDNN's float32 path is not accurate to float32 on this CPU (a relative error of "
            f"{_errors[path]:.1e}, the default path's {_errors[DEFAULT]:.1e})")


def run_path(recorded: str | None, device: torch.device | str) -> str:
    """The path a resumed run multiplies on: the one it ``recorded`` (None: the default, that of runs before the
    setting), or the default path where the recorded one is not accurate on this CPU (said once on stderr): the
    two differ by float rounding, as a run resumed on another CPU does anyway."""
    path = recorded or DEFAULT
    if has_choice(device) and not accurate(path):
        print(f"iwae: {inaccuracy(path)}; the run continues on the default path", file=sys.stderr)
        path = DEFAULT
    return fastest_fp32_matmul(device, path)


def choose(workload: Callable[[], object]) -> str:
    """The faster of the accurate paths on ``workload`` (the default path when oneDNN's is not accurate here)."""
    if not accurate(ONEDNN):
        return DEFAULT
    seconds = measure(workload)
    return ONEDNN if seconds[ONEDNN] < seconds[DEFAULT] else DEFAULT


def fastest_fp32_matmul(device: torch.device | str, path: str | None = None,
                        workload: Callable[[], object] | None = None, key: Hashable | None = None) -> str:
    """Switch float32 matrix multiplies on ``device`` to ``path`` ("onednn" or "default") or, if None, to the
    faster accurate path on ``workload`` (a call that runs the products to be made fast: ``choose``); return
    the path used. With a ``key`` (what the workload's speed depends on: its shapes, say), the choice is made
    once per process and key, so that runs alike multiply alike. The switch is torch's global setting, so it
    holds for the whole process. (A run records the path, so that it resumes on the same one.)
    """
    if path not in (None, *PATHS):
        raise ValueError(f"unknown matrix-multiply path {path!r}; choose {DEFAULT} or {ONEDNN}")
    device = torch.device(device)
    if not has_choice(device):
        return DEFAULT
    if path is not None and not accurate(path):
        raise ValueError(f"{inaccuracy(path)}; give --matmul {DEFAULT}")
    if path is None:
        if workload is None:
            raise ValueError("fastest_fp32_matmul needs a workload to time, or a path")
        path = _chosen[key] if key in _chosen else choose(workload)
        if key is not None:
            _chosen[key] = path
    _set_path(path)
    return path


@contextmanager
def using_matmul_path(path: str) -> Iterator[None]:
    """Within the block, float32 matrix multiplies use ``path`` ("default" or "onednn")."""
    previous = _current_path()
    _set_path(path)
    try:
        yield
    finally:
        _set_path(previous)
