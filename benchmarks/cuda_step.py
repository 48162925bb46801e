"""Steps/s of the paper's training step on a GPU: eager, compiled, and compiled as a CUDA graph.

For the 1- and 2-stochastic-layer models, K in {1, 5, 50} and the paper's batch of 20, times one IWAE-bound
training step (forward, backward, Adam with lr 1e-3, betas (0.9, 0.999), eps 1e-4:
``iwae.training.step.TrainStep``) on a
fixed random binary minibatch on the GPU, as

    eager std       the step uncompiled: every operation a kernel launched from Python
    compiled std    torch.compile (inductor's Triton kernels), launched from Python, no CUDA graph
    graph std       the compiled step captured as a CUDA graph and replayed: what ``iwae train`` runs on a GPU
    graph dreg      the same with the DReG estimator
    numpyro         NumPyro's RenyiELBO(alpha=0) ``SVI.update`` under jax.jit on the same GPU (if installed)

and S stacked seeds (``iwae.training.stacked``, ``iwae train --seeds S``) as a CUDA graph at the ``--stacked-k`` values,
against one seed. Every contender is built and warmed up first (its first call, the compilation and the graph's
capture where there are some, is timed and reported), then the contenders take turns, one round of about
``--round-seconds`` of steps each, each round ending when the GPU has finished its work; the median over
``--rounds`` rounds is reported, so that the ratios are fair.

    python benchmarks/cuda_step.py [--layers 1 2] [--k 1 5 50] [--batch 20] [--seeds 1 4 16] [--stacked-k 1 50]
                                   [--rounds 5] [--round-seconds 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX shares the GPU with torch

import torch
from stacked import make_step
from throughput import (
    Runner,
    calibrate,
    initial_model,
    installed,
    interleaved,
    iwae_runner,
    numpyro_runner,
    peer_weights,
    write_json,
)

NO_GRAPH = {"triton.cudagraphs": False}


def contenders(layers: int, x: torch.Tensor, k: int, device: torch.device) -> dict[str, Runner]:
    """The runners of one cell on ``device``, all starting from the same initial weights."""
    def iwae(estimator: str, compile: bool, options: dict[str, object] | None = None) -> Runner:
        return iwae_runner(initial_model(layers, x).to(device), x.to(device), k, estimator, compile, options)

    runners = {
        "eager std": iwae("standard", False),
        "compiled std": iwae("standard", True, NO_GRAPH),
        "graph std": iwae("standard", True),
        "graph dreg": iwae("dreg", True),
    }
    if installed("numpyro") and installed("jax"):
        runners["numpyro"] = numpyro_runner(peer_weights(layers, x), layers, x, k)
    return runners


def stacked_runner(seeds: int, k: int, batch: int, device: torch.device) -> Runner:
    step = make_step(seeds, k, batch, compile=True, device=str(device))

    def run(n: int) -> None:
        for _ in range(n):
            step()
        torch.cuda.synchronize(device)

    return run


def time_runners(runners: dict[str, Runner], args: argparse.Namespace) -> dict[str, Any]:
    """Warm every runner up (timing its first call), then time them in interleaved rounds: seconds per step."""
    first_call, steps = {}, {}
    for name, run in runners.items():
        start = time.perf_counter()
        run(1)
        first_call[name] = time.perf_counter() - start
        steps[name] = calibrate(run, args.round_seconds)
    seconds = interleaved({name: (run, steps[name]) for name, run in runners.items()}, args.rounds)
    return {"first_call_s": first_call, "steps": steps,
            "steps_per_s": {name: 1 / statistics.median(s) for name, s in seconds.items()},
            "rounds_steps_per_s": {name: [1 / t for t in s] for name, s in seconds.items()}}


def step_benchmark(args: argparse.Namespace, device: torch.device, result: dict[str, Any]) -> None:
    names: list[str] = []
    for layers in args.layers:
        for k in args.k:
            for batch in args.batch:
                torch._dynamo.reset()
                x = (torch.rand(batch, 784, generator=torch.Generator().manual_seed(1)) < 0.13).float()
                cell = {"layers": layers, "k": k, "batch": batch,
                        **time_runners(contenders(layers, x, k, device), args)}
                result["cells"].append(cell)
                write_json(args.json, result)
                names = list(cell["steps_per_s"])
                rate = cell["steps_per_s"]
                row = "  ".join(f"{rate[n]:>12,.0f}" for n in names)
                graph = rate["graph std"]
                ratios = f"{graph / rate['eager std']:>11.2f}  {graph / rate['compiled std']:>14.2f}"
                numpyro = f"  {graph / rate['numpyro']:>13.2f}" if "numpyro" in rate else ""
                if len(result["cells"]) == 1:
                    print(f"{'layers':>6} {'K':>3} {'B':>4}  " + "  ".join(f"{n:>12}" for n in names)
                          + f"  {'graph/eager':>11}  {'graph/compiled':>14}" + ("  graph/numpyro" if numpyro else ""))
                print(f"{layers:>6} {k:>3} {batch:>4}  {row}  {ratios}{numpyro}", flush=True)
    print("first call (compilation, capture) s: " + "; ".join(
        f"{c['layers']}L K={c['k']} B={c['batch']}: " + ", ".join(f"{n} {c['first_call_s'][n]:.1f}" for n in names)
        for c in result["cells"]))


def stacked_benchmark(args: argparse.Namespace, device: torch.device, result: dict[str, Any]) -> None:
    print(f"\nstacked seeds as one CUDA graph, 1-layer model, IWAE bound, standard estimator, B={args.batch[0]} per "
          "seed: steps/s and examples/s of all seeds together")
    seeds = sorted({1, *args.seeds})
    for k in args.stacked_k:
        torch._dynamo.reset()
        timed = time_runners({f"S={s}": stacked_runner(s, k, args.batch[0], device) for s in seeds}, args)
        result["stacked"].append({"k": k, "batch": args.batch[0], **timed})
        write_json(args.json, result)
        one = timed["steps_per_s"]["S=1"]
        for s in seeds:
            rate = timed["steps_per_s"][f"S={s}"]
            print(f"K={k:<3} S={s:<3} {rate:9,.0f} steps/s  {rate * s * args.batch[0]:11,.0f} examples/s  "
                  f"{rate * s / one:6.2f}x one seed's examples/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", choices=[1, 2], default=[1, 2])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 50])
    parser.add_argument("--batch", type=int, nargs="+", default=[20])
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 4, 16], help="stacked seeds (none: skip)")
    parser.add_argument("--stacked-k", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=1.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA device here: this benchmark times the GPU's step (benchmarks/throughput.py times a CPU)")
    device = torch.device("cuda")
    properties = torch.cuda.get_device_properties(device)
    jax_devices = ""
    if installed("jax"):
        import jax

        jax_devices = ", ".join(str(d) for d in jax.devices())
    result: dict[str, Any] = {"device": properties.name, "torch": torch.__version__, "jax_devices": jax_devices,
                              "cells": [], "stacked": []}
    print(f"{properties.name}, torch {torch.__version__}" + (f"; jax on {jax_devices}" if jax_devices else "")
          + f"; steps/s, median of {args.rounds} interleaved rounds")
    step_benchmark(args, device, result)
    if args.seeds:
        stacked_benchmark(args, device, result)


if __name__ == "__main__":
    main()
