"""Where the time of one training step goes: iwae's compiled step against NumPyro's jitted program, per op.

For one (layers, K, B) cell of ``benchmarks/throughput.py`` (same model, weights, data and Adam), times both
steps side by side without a profiler (interleaved rounds, median ms per step), then profiles each (torch's
profiler with inductor's per-kernel records; jax's profiler, whose XLA:CPU trace has one record per thunk) and
sorts every kernel into one of

    GEMM          matrix products (torch: aten mm/addmm/bmm; XLA: dot and the dot fusions)
    update        Adam's update of parameters and moments (inductor kernels that update the moments;
                  XLA ops outside the model's differentiated function, which is Adam there)
    elementwise   the rest of the forward and backward passes (activations, log densities, log-sum-exp)
    random        the draws of the reparameterized noise

and prints each category's time per step; "outside kernels" is the profiled step's wall time minus its kernels'
time (dispatch, guards, argument handling, thread hand-offs). The profilers add their own cost to each record,
so the unprofiled step time (interleaved rounds, as in throughput.py) is printed beside them.

On a CPU iwae's compiled program calls its kernels from C++ (inductor's ``cpp_wrapper``), past the profiler's
records of matrix products; so the profiled iwae step is the same program with its kernels called from Python
(the same kernels), and the unprofiled time of both is printed: their difference is what the C++ wrapper saves.

    python benchmarks/step_profile.py [--layers 1] [--k 1] [--batch 20] [--steps 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from own_process import OwnProcess, Runner
from throughput import cell_data, choose_matmul, contender, installed, interleaved, numpyro_update, peer_weights

from iwae.platform import heap

CATEGORIES = ("GEMM", "update", "elementwise", "random")
# the profiled iwae step: its kernels called from Python, each inductor kernel with a profiler record of its own
# (the records cost the step as it runs, with its kernels called from C++, about 10 % at K=1, B=20)
PROFILED = {"cpp_wrapper": False, "cpp.enable_kernel_profile": True}


def torch_category(name: str) -> str | None:
    """The category of a torch profiler record, or None for records that are not kernels."""
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "GEMM"
    if name in ("aten::normal_", "aten::uniform_", "aten::bernoulli_"):
        return "random"
    if name.startswith("graph_") and "_cpp_fused_" in name:
        return "update" if "lerp" in name else "elementwise"
    return None


def profile_torch(run: Runner, steps: int) -> Counter[str]:
    """Microseconds per step of each category of the iwae step's kernels, and of the whole profiled step."""
    totals: Counter[str] = Counter()
    with torch.profiler.profile() as prof:
        start = time.perf_counter()
        run(steps)
        totals["step"] = 1e6 * (time.perf_counter() - start) / steps
    for event in prof.key_averages():
        category = torch_category(event.key)
        if category:
            totals[category] += event.self_cpu_time_total / steps
    return totals


def xla_categories(hlo: str) -> dict[str, str]:
    """The category of each instruction of an XLA program, from its text: GEMM where it computes a dot,
    random where it comes from the random-bits machinery, elementwise where it belongs to the differentiated
    function (the loss, its jvp or transpose), update otherwise."""
    categories = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
        if not match:
            continue
        name, op_name = match.groups()
        if name.startswith(("dot", "ynn_fusion")) or "dot_general" in op_name:
            categories[name] = "GEMM"
        elif any(word in op_name for word in ("random", "threefry", "rng")):
            categories[name] = "random"
        elif "jvp(" in op_name or "transpose(" in op_name:
            categories[name] = "elementwise"
        else:
            categories[name] = "update"
    return categories


def profile_jax(run: Runner, steps: int, hlo: str) -> Counter[str]:
    """Microseconds per step of each category of NumPyro's XLA program's thunks, and of the whole profiled
    step."""
    import jax

    categories = xla_categories(hlo)
    totals: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            start = time.perf_counter()
            run(steps)
            totals["step"] = 1e6 * (time.perf_counter() - start) / steps
        trace = json.loads(gzip.decompress(next(Path(folder).rglob("perfetto_trace.json.gz")).read_bytes()))
    for event in trace["traceEvents"] if isinstance(trace, dict) else trace:
        category = categories.get(event.get("name", "")) if event.get("ph") == "X" else None
        if category:
            totals[category] += event["dur"] / steps
    return totals


def numpyro_program(weights: dict[str, np.ndarray], layers: int, x: torch.Tensor, k: int) -> str:
    """The text of NumPyro's compiled XLA program (the one ``throughput.numpyro_runner`` runs)."""
    update, state, data = numpyro_update(weights, layers, x, k)
    return update.lower(state, data).compile().as_text()


def profiler(name: str, layers: int, k: int, batch: int) -> dict[str, Callable[[int], Counter[str]]]:
    """For a worker process: {name: profile}, where ``profile(n)`` warms contender ``name`` ("iwae compiled std",
    its kernels called from Python, or "numpyro") up with n steps, then profiles n more and returns the
    microseconds per step of each category of its kernels and of the whole profiled step."""
    if name == "numpyro":
        x = cell_data(batch)
        measure = partial(profile_jax, hlo=numpyro_program(peer_weights(layers, x), layers, x, k))
        run = contender(name, layers, k, batch)[name]
    else:
        measure, run = profile_torch, contender(name, layers, k, batch, inductor_options=PROFILED)[name]

    def profile(steps: int) -> Counter[str]:
        run(steps)  # compilation and warm-up
        return measure(run, steps)

    return {name: profile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not (installed("numpyro") and installed("jax")):
        raise SystemExit("step_profile.py compares against NumPyro: pip install -e '.[bench]'")
    heap.retain_freed_memory()
    path = choose_matmul(args.layers, args.batch, args.k)
    cell = (args.layers, args.k, args.batch)
    profiled = {"iwae compiled": "iwae compiled std", "numpyro": "numpyro"}
    with ExitStack() as stack:  # each step timed, then each profiled, in a process of its own
        def worker(build: Callable[..., dict[str, Callable[[int], Any]]], name: str, *extra: object) -> Runner:
            return stack.enter_context(OwnProcess(build, name, *cell, *extra, matmul_path=path)).runner(name)

        runners = {"iwae compiled": worker(contender, "iwae compiled std", PROFILED),
                   "numpyro": worker(contender, "numpyro"),
                   "iwae, C++ wrapper": worker(contender, "iwae compiled std")}
        for run in runners.values():
            run(args.steps)  # compilation and warm-up
        seconds = interleaved({name: (run, args.steps) for name, run in runners.items()}, args.rounds)
        kernels = {label: worker(profiler, name)(args.steps) for label, name in profiled.items()}
    step_us = {name: 1e6 * statistics.median(s) for name, s in seconds.items()}
    print(f"{args.layers}-layer model, K={args.k}, B={args.batch}, {torch.get_num_threads()} threads, torch {path} "
          f"matmul; microseconds per step under the profilers (iwae's kernels called from Python), and the "
          f"unprofiled step (median of {args.rounds} interleaved rounds)")
    print(f"{'':<18}" + "".join(f"{name:>15}" for name in profiled))
    for category in CATEGORIES:
        print(f"{category:<18}" + "".join(f"{kernels[name][category]:15.0f}" for name in profiled))
    outside = {n: kernels[n]["step"] - sum(kernels[n][c] for c in CATEGORIES) for n in profiled}
    print(f"{'outside kernels':<18}" + "".join(f"{outside[name]:15.0f}" for name in profiled))
    print(f"{'profiled step':<18}" + "".join(f"{kernels[name]['step']:15.0f}" for name in profiled))
    print(f"{'unprofiled step':<18}" + "".join(f"{step_us[name]:15.0f}" for name in profiled))
    print(f"{'examples/s':<18}" + "".join(f"{1e6 * args.batch / step_us[name]:15.0f}" for name in profiled))
    wrapped = step_us["iwae, C++ wrapper"]
    print(f"iwae's step as it runs (kernels called from C++): {wrapped:.0f} us unprofiled, "
          f"{1e6 * args.batch / wrapped:.0f} examples/s")


if __name__ == "__main__":
    main()
