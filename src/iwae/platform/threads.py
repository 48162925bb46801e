"""How many threads torch runs: one per CPU that this process may use and that no other process keeps busy.

The CPUs a process may use are its affinity mask, capped by its cgroup's CPU quota (a container limited to 1.5
CPUs gets 1 thread, whatever the machine's core count). Of those, the CPUs other processes keep busy are read
from ``/proc/stat`` over a short interval while this process waits (less this process's own CPU time in it).
Under torchrun the ranks on one machine share its free CPUs. On a shared machine this is what keeps a run at its
fair share: OpenMP threads spin at their barriers waiting for siblings, and a team with more threads than free
CPUs waits on a descheduled thread at every parallel region.

How long an OpenMP thread spins at a barrier before it sleeps bounds the damage when the machine's load changes
after the choice, or when two runs that start together each find the machine free. Spinning for long (OpenMP's
default) collapses such runs; sleeping at once (the passive policy, OMP_WAIT_POLICY=PASSIVE) makes every parallel
region wait for a wake-up, which slows a step of small products on two threads even on a quiet machine
(docs/performance.md measures both). Importing ``iwae`` sets a short spin (``OPENMP_WAIT``) unless the user
chose a policy or a spin; OpenMP reads it once, when torch loads it, so ``iwae`` sets it before importing torch.

The number is chosen once per process (``use_threads``), at the start of a command, and printed with its reason.
More threads than one do not always pay: a small step (a batch of 20 at k = 1, say) can spend more on each
parallel region than it gains. So a new training run whose count came from the free CPUs times its own step on
that count and on one thread (``fastest``) and keeps the faster, saying so when it drops to one. A run records
its count (a different thread count changes the rounding of some reductions, so a run that is to be
repeated bit for bit is repeated with the same count, which ``--threads`` sets).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from iwae.settings import SettingError, check_integer

# OpenMP's wait at a barrier, set on import unless the user set the policy or one of these: libgomp's threads
# (the OpenMP of torch's Linux wheels) spin 300 times, then sleep; those of LLVM's and Intel's OpenMP sleep at
# once, as under the passive policy
OPENMP_WAIT = {"GOMP_SPINCOUNT": "300", "KMP_BLOCKTIME": "0"}
CGROUP_ROOT = Path("/sys/fs/cgroup")
# how long the other processes' load is sampled at start, in seconds
SAMPLE_S = 0.25
# the ranks of a torchrun launch on this machine
LOCAL_RANKS = "LOCAL_WORLD_SIZE"


def openmp_wait(environ: Mapping[str, str]) -> dict[str, str]:
    """The OpenMP settings to add to ``environ`` before torch loads: ``OPENMP_WAIT``, unless it already sets the
    wait policy or one of them."""
    chosen = any(name in environ for name in ("OMP_WAIT_POLICY", *OPENMP_WAIT))
    return {} if chosen else dict(OPENMP_WAIT)


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count torch will run with, and why (as printed at start)."""

    threads: int
    reason: str
    from_free_cpus: bool = False  # counted from the free CPUs (not set by the user): ``fastest`` may lower it

    def line(self) -> str:
        return f"{self.threads} torch thread{'s' if self.threads != 1 else ''}: {self.reason}"


def affinity() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return set(range(os.cpu_count() or 1))


def cgroup_quota(cgroup_file: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup and its ancestors, the smallest, in CPUs (v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us``); None if there is none."""
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base, name = root, "cpu.max"
        elif "cpu" in controllers.split(","):
            base, name = root / controllers, "cpu.cfs_quota_us"
        else:
            continue
        folder = base / path.strip("/")
        for parent in (folder, *folder.parents):
            quotas.append(_read_quota(parent / name))
            if parent == base:
                break
    found = [quota for quota in quotas if quota is not None]
    return min(found) if found else None


def _read_quota(path: Path) -> float | None:
    try:
        text = path.read_text().split()
        if path.name == "cpu.max":
            quota, period = text[0], text[1]
        else:
            quota, period = text[0], (path.parent / "cpu.cfs_period_us").read_text().split()[0]
    except (OSError, IndexError):
        return None
    if quota in ("max", "-1") or float(period) <= 0:
        return None
    return float(quota) / float(period)


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by its cgroup's quota (at least 1)."""
    cpus = len(affinity())
    quota = cgroup_quota()
    return max(1, min(cpus, math.floor(quota)) if quota is not None else cpus)


def _cpu_times(cpus: set[int]) -> tuple[float, float]:
    """(busy, total) seconds summed over ``cpus`` from /proc/stat."""
    busy = total = 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        name = line.split(maxsplit=1)[0]
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [float(v) for v in line.split()[1:9]]  # user nice system idle iowait irq softirq steal
        idle = values[3] + values[4]
        total += sum(values)
        busy += sum(values) - idle
    ticks = os.sysconf("SC_CLK_TCK")
    return busy / ticks, total / ticks


def busy_cpus(cpus: set[int], seconds: float = SAMPLE_S) -> float:
    """How many of ``cpus`` other processes keep busy, averaged over ``seconds`` (this process's own CPU time in
    that interval, such as a thread of its own at work, is not counted)."""
    try:
        busy0, total0 = _cpu_times(cpus)
        own0 = time.process_time()
        time.sleep(seconds)
        busy1, total1 = _cpu_times(cpus)
        own1 = time.process_time()
    except (OSError, ValueError):
        return 0.0
    if total1 <= total0:
        return 0.0
    others = max(0.0, (busy1 - busy0) - (own1 - own0))
    return min(float(len(cpus)), len(cpus) * others / (total1 - total0))


def local_ranks() -> int:
    """The ranks of a torchrun launch on this machine (1 outside torchrun)."""
    return int(os.environ.get(LOCAL_RANKS, "1"))


def choose() -> ThreadChoice:
    """The thread count that fits the machine as it is: OMP_NUM_THREADS if set, else one per usable CPU that other
    processes leave free, shared among torchrun's ranks on this machine (at least 1)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return ThreadChoice(int(os.environ["OMP_NUM_THREADS"]), "set by OMP_NUM_THREADS")
    usable, cpus = usable_cpus(), affinity()
    free = max(1, min(usable, math.floor(len(cpus) - busy_cpus(cpus) + 0.5)))
    reason = f"{free} of {usable} CPUs free"
    ranks = local_ranks()
    if ranks > 1:
        free, reason = max(1, free // ranks), f"{reason}, shared by {ranks} ranks"
    return ThreadChoice(free, reason, from_free_cpus=ranks == 1)


_used: list[ThreadChoice] = []  # the choice in force in this process
_chosen: list[ThreadChoice] = []  # the process's own choice (use_threads'), which ``fastest`` may lower for a run


# A thread count above this many per CPU of the machine is refused: it only slows torch down, and one in the
# hundreds of thousands makes its thread pool fail.
MAX_THREADS_PER_CPU = 8


def check_count(count: int) -> int:
    """``count`` as an int, if it is a positive integer of at most ``MAX_THREADS_PER_CPU`` per CPU; else
    SettingError."""
    count = check_integer(count, "threads", 1)
    cpus = os.cpu_count() or 1
    if count > MAX_THREADS_PER_CPU * cpus:
        raise SettingError("{0} {value} is more than {per} per CPU of this machine's {cpus}; give at most {limit}, "
                           "or leave {0} out for one per free CPU", ("threads",), value=count,
                           per=MAX_THREADS_PER_CPU, cpus=cpus, limit=MAX_THREADS_PER_CPU * cpus)
    return count


def use_threads(requested: int | None = None, reason: str = "set by --threads",
                say: Callable[[str], None] | None = None) -> int:
    """Run torch on ``requested`` threads (``reason`` says why), or, for None, on the count this process chose
    before (by an earlier call; not a run's lowering by ``fastest``) or else on ``choose``'s; return the count.
    The choice is printed (by ``say``; default: to stderr as ``iwae: 2 torch threads: 2 of 2 CPUs free``) when
    the count in force changes.

    Raises:
      SettingError: for a count that is not a positive integer, or far more than the machine's CPUs.
    """
    if requested is not None:
        requested = check_count(requested)
        choice = ThreadChoice(requested, _beyond_usable(requested, reason))
    elif _chosen:
        choice = _chosen[-1]
    else:
        choice = choose()
    _chosen[:] = [choice]
    _put_in_force(choice, say)
    return choice.threads


def use_run_threads(count: int, reason: str, say: Callable[[str], None] | None = None) -> int:
    """Run torch on ``count`` threads for one run (a resumed run's recorded count, or the one given again for it;
    ``reason`` says which), printed as ``use_threads`` prints it; the process's own choice stays, so that a later
    ``use_threads()`` (the next cell of a grid) returns to it. Returns the count.

    Raises:
      SettingError: for a count that is not a positive integer, or far more than the machine's CPUs.
    """
    count = check_count(count)
    _put_in_force(ThreadChoice(count, _beyond_usable(count, reason)), say)
    return count


def _beyond_usable(count: int, reason: str) -> str:
    """``reason`` for a count given by the user or a run, and a warning where it exceeds the usable CPUs (threads
    that wait on each other's turns on a CPU, which can run many times slower than one per CPU)."""
    usable = usable_cpus()
    return f"{reason}; more than the {usable} CPUs this process may use, so slower" if count > usable else reason


def _put_in_force(choice: ThreadChoice, say: Callable[[str], None] | None) -> None:
    import torch  # here, so that importing this module leaves OpenMP's environment to be set first

    if not _used or _used[-1].threads != choice.threads:
        (say or (lambda line: print(f"iwae: {line}", file=sys.stderr)))(choice.line())
    _used[:] = [choice]
    torch.set_num_threads(choice.threads)


def fastest(workload: Callable[[], object], say: Callable[[str], None] | None = None) -> int:
    """The process's thread count, or 1 where ``workload`` (a call of a run's own step) runs faster on one thread
    than on that count; timed by turns (``timing.by_turns``), the global random generators left as they were. Only
    a count that ``choose`` counted from the free CPUs is lowered, never one the user set (or a run recorded). The
    count is put in force (and printed, by ``say``, as ``use_threads`` prints, when it changes) for the run; the
    process's own choice stays, and a later ``use_threads()`` returns to it. Returns the count."""
    import torch

    from iwae.platform import timing

    use_threads(say=say)
    chosen = _chosen[-1]
    if not chosen.from_free_cpus or chosen.threads == 1:
        return chosen.threads
    seconds = timing.by_turns(workload, {n: functools.partial(torch.set_num_threads, n) for n in (chosen.threads, 1)},
                              rounds=5)
    torch.set_num_threads(chosen.threads)
    if seconds[1] < seconds[chosen.threads]:
        _put_in_force(ThreadChoice(1, f"{chosen.reason}, but this run's step is faster on 1 ({seconds[1] * 1e3:.2f} "
                                      f"ms against {seconds[chosen.threads] * 1e3:.2f} ms on {chosen.threads})"), say)
        return 1
    return chosen.threads
