"""The time a computation will take, estimated before it starts from a timed piece of it, and the limit past which
it is refused (as ``iwae.platform.memory`` refuses what would not fit in memory).

A computation of many alike units (evaluation passes, AIS steps, gradient draws) is timed on one or two units;
the estimate is that time multiplied by the number of units. One that would take longer than ``TIME_LIMIT_S``
is refused with a value of the setting at fault that would finish within it, unless the limit is lifted: a fifth
below the largest the timing allows (``SUGGESTED_SHARE``), since the same piece timed again, on a machine as busy
as before or busier, can take longer.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

from iwae.settings import SettingError

TIME_LIMIT_S = 7 * 24 * 3600.0  # a week of compute
ANNOUNCE_S = 10.0  # estimates of at least this many seconds are printed before the work starts
SUGGESTED_SHARE = 0.8  # of the largest value that fits, the one a refusal suggests


def seconds_per_call(work: Callable[[], object], rounds: int = 2) -> float:
    """The least wall time of ``rounds`` calls of ``work`` (after them, the work is warm)."""
    best = math.inf
    for _ in range(rounds):
        began = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - began)
    return best


def format_duration(seconds: float) -> str:
    """``seconds`` in the largest unit that keeps a number >= 1 (s, min, h, days, years)."""
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            value = seconds / size
            return f"{value:.3g} {unit}" if value < 1e6 else f"{value:.1e} {unit}"
    return f"{seconds:.3g} s"


def check_duration(estimate_s: float, limit_s: float | None, what: str, name: str, fits: int, lift: str,
                   **values: object) -> None:
    """Refuse (SettingError) a computation estimated to take ``estimate_s`` seconds, more than ``limit_s`` (None:
    no limit), naming the setting ``name`` and ``SUGGESTED_SHARE`` of ``fits``, its largest value that would finish
    within the limit (at least 1 where ``fits`` is); the message says how to lift the limit (the setting ``lift``).
    Print the estimate, to stderr, if it is long.

    ``what`` says what would take the time, with ``name`` as field {0} and ``values`` as for ``SettingError``.
    """
    if limit_s is not None and estimate_s > limit_s:
        raise SettingError(
            f"{what} would take about {{duration}} (estimated from a timed part of it), more than the limit of "
            "{limit}; use {0} {fits} or less, or lift the limit with {1}", (name, lift),
            duration=format_duration(estimate_s), limit=format_duration(limit_s),
            fits=max(int(fits * SUGGESTED_SHARE), min(fits, 1), 0), **values,
        )
    if estimate_s >= ANNOUNCE_S:
        print(f"iwae: estimated time: about {format_duration(estimate_s)}", file=sys.stderr)
