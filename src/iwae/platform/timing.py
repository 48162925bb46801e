"""Which of a few settings runs a workload fastest, timed by turns.

``by_turns`` times one workload under each setting (a matrix-multiply path, a thread count) in interleaved
rounds after a warm-up, so that a machine whose speed drifts slows every setting alike, and returns each
setting's median seconds per call. The global random number generators are left as they were, so timing a
run's own step before it starts does not change what the run draws.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable

import torch

# each setting's turn repeats the workload for at least this long
MEASUREMENT_SECONDS = 0.03


def by_turns(workload: Callable[[], object], settings: dict[Hashable, Callable[[], None]], rounds: int = 9
             ) -> dict[Hashable, float]:
    """Per setting, the median seconds of one call of ``workload`` after calling the setting's function (which
    puts the setting in force), timed in ``rounds`` interleaved rounds, each turn repeated for at least
    ``MEASUREMENT_SECONDS``, after a warm-up of two calls under each setting. The caller restores what the
    settings change."""
    seconds: dict[Hashable, list[float]] = {name: [] for name in settings}
    with torch.random.fork_rng(devices=[]):
        warmup = []
        for apply in settings.values():  # the first call of each builds what it needs (kernels, thread pools)
            apply()
            workload()
            start = time.perf_counter()
            workload()
            warmup.append(time.perf_counter() - start)
        repeats = max(1, round(MEASUREMENT_SECONDS / max(min(warmup), 1e-6)))
        for _ in range(rounds):
            for name, apply in settings.items():
                apply()
                start = time.perf_counter()
                for _ in range(repeats):
                    workload()
                seconds[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(times) for name, times in seconds.items()}
