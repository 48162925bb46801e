"""What a run settles before its first step: that it fits in memory, its thread count, and the float32
matrix-multiply path it multiplies on."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from iwae.eval import likelihood
from iwae.models import build_model
from iwae.platform import distributed, gemm, memory, threads
from iwae.training.config import TrainConfig
from iwae.training.lone import lone_timing_step


def check_training_memory(config: TrainConfig, x_dim: int, device: torch.device, seeds: int = 1) -> None:
    """Refuse (SettingError) a run whose training steps, per-epoch monitoring or final evaluation would not fit
    in ``device``'s memory, estimated from the model's layer widths, k and the batch size without allocating;
    ``seeds`` stacked seeds (``iwae.training.stacked``) each need a lone run's memory for their steps."""
    with torch.device("meta"):
        model = build_model(config.model, config.layers, x_dim)
    # a model too large on its own is refused for its size, whatever k and the batch size
    memory.check_fits(seeds * memory.parameter_bytes(model, training=True), device,
                      "training " + ("{1} {seeds} of " if seeds > 1 else "") + "{0} {model} (its parameters, their "
                      "gradients and Adam's moments alone)", ("model", "seeds")[:1 + (seeds > 1)], model=config.model,
                      seeds=seeds)
    # each rank (iwae.platform.distributed) trains on its rows of the global batch; the monitor and the final evaluation
    # pass over at most max(k, PASS_ROWS) rows, without gradients
    rows = distributed.rows(config.batch_size)
    needed = max(seeds * memory.pass_bytes(model, x_dim, config.k * (rows.stop - rows.start), training=True),
                 memory.pass_bytes(model, x_dim, max(config.k, likelihood.PASS_ROWS), training=False))
    what, names = "training with {0} {k} and {1} {batch_size}", ("k", "batch_size")
    if seeds > 1:  # a stack's message names its seeds among the settings to make smaller
        what, names = "training {2} {seeds} with {0} {k} and {1} {batch_size}", (*names, "seeds")
    memory.check_fits(needed, device, what, names, k=config.k, batch_size=config.batch_size, seeds=seeds)


Workload = Callable[[TrainConfig, int, torch.device], Callable[[], None]]
# runs of fewer steps than this keep the thread count as chosen: timing it (about half a second) costs about what
# it could save them
THREAD_TIMING_MIN_STEPS = 500


def training_threads_and_path(config: TrainConfig, x_dim: int, device: torch.device, train_examples: int,
                              seeds: int = 1, workload: Workload = lone_timing_step) -> tuple[int, str]:
    """A new run's torch thread count and float32 matrix-multiply path, each the faster on the run's own kind of
    step (``workload``, as for ``training_matmul_path``): first the count (on a CPU, outside torchrun, one thread
    where the step runs faster on it than on the count taken from the free CPUs: ``threads.fastest``), then the
    path on that count. The count is timed for runs of at least ``THREAD_TIMING_MIN_STEPS`` steps (on
    ``train_examples`` examples), where building the step costs little (it runs eagerly) or where the path is to be
    chosen too (which times the same step), not for a compiled step whose path is given or has no choice."""
    step = functools.cache(lambda: workload(config, x_dim, device))
    count = torch.get_num_threads()
    path_timed = config.matmul is None and gemm.has_choice(device)
    timed = config.steps(train_examples) >= THREAD_TIMING_MIN_STEPS and (not config.compile or path_timed)
    if device.type == "cpu" and not distributed.launched() and timed:
        count = threads.fastest(lambda: step()())
    return count, training_matmul_path(config, x_dim, device, seeds, workload, step)


def training_matmul_path(config: TrainConfig, x_dim: int, device: torch.device, seeds: int = 1,
                         workload: Workload = lone_timing_step,
                         step: Callable[[], Callable[[], None]] | None = None) -> str:
    """A new run's float32 matrix-multiply path: ``config.matmul`` if set, else the faster one on the run's own
    kind of step, ``workload(config, x_dim, device)`` (a lone run's ``lone_timing_step``; a stack of ``seeds``
    seeds, its own; ``step``: a function that returns it, built once), measured once per process for runs alike.
    (A compiled step is compiled here first, and the run's own step then finds its graph in inductor's cache.) The
    throwaway step is built only when there is something to time, on generators that ``gemm.measure`` forks, so
    the global ones are left as they were."""
    step = step or functools.cache(lambda: workload(config, x_dim, device))
    key = ("training step", config.model, config.layers, x_dim, config.batch_size, config.objective, config.k,
           config.m, config.estimator, bool(config.compile), seeds)
    return gemm.fastest_fp32_matmul(device, config.matmul, lambda: step()(), key)
