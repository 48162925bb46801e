"""Scaling of 2 ranks against 1 process (``iwae.platform.distributed``) on this machine, with gloo on 127.0.0.1.

Data-parallel training: the training step of the paper's 1-layer model on a global batch of B random 784-dimensional
binary examples, each rank taking B/2 rows (drawing the noise of all B, ``distributed.sharded_draws``) and
all-reducing the gradients; global examples per second after a warm-up, against one process on the whole batch
(one thread per process, and one process with two threads: the same cores).

Spread grid: ``reproduce.run_table`` on a grid of 4 cells on the built-in digits data (ELBO and IWAE, k 5 and 20,
whole runs: training, evaluation, figures), one process against 2 ranks with 2 cells each; wall time of the grid.

Scaling efficiency = (rate with 2 ranks / rate with 1 process) / 2. Process start-up (importing torch) is not timed.
The settings run in interleaved rounds; the medians are printed.

    python benchmarks/distributed.py [--k 50] [--batch-size 20] [--steps 200] [--budget 0.003] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from iwae.core.objectives import Objective
from iwae.models import burda
from iwae.platform import distributed, gemm
from iwae.runs import reproduce
from iwae.runs.reproduce import Cell, Options
from iwae.training.step import TrainStep, make_adam


def step_rate(k: int, batch_size: int, steps: int) -> float:
    """Global examples per second of this rank's data-parallel training step (one process: all rows)."""
    torch.manual_seed(0)
    model = burda(1, 784)
    rows = distributed.rows(batch_size)
    step = TrainStep(distributed.sharded_draws(model, rows, batch_size), make_adam(model, 1e-3, (0.9, 0.999), 1e-4),
                     Objective("iwae", k), "standard",
                     all_reduce=distributed.all_reduce_sum if distributed.world() > 1 else None)
    x = (torch.rand(batch_size, 784) < 0.5).float()[rows]
    for _ in range(5):
        step(x)
    distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step(x)
    distributed.barrier()
    return steps * batch_size / (time.perf_counter() - start)


def grid_seconds(out: Path, budget: float) -> float:
    """Wall seconds of a 4-cell grid on digits, spread over the ranks."""
    base = {**reproduce.BASE, "dataset": "digits", "layers": 1}
    cells = [Cell(f"{name}-k{k}", {**base, "objective": name, "k": k}) for name in ("elbo", "iwae") for k in (5, 20)]
    distributed.barrier()
    start = time.perf_counter()
    reproduce.run_table("burda-table1", out, Options(budget=budget, seeds=1, eval_k=100, device="cpu"),
                        cells=cells, progress=False, log=lambda line: None)
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> None:
    with distributed.session("gloo"):
        gemm.fastest_fp32_matmul("cpu", gemm.DEFAULT)
        if args.worker == "step":
            value = step_rate(args.k, args.batch_size, args.steps)
        else:
            value = grid_seconds(Path(args.out), args.budget)
        if distributed.rank() == 0:
            print(json.dumps(value))


def launch(args: argparse.Namespace, what: str, processes: int, threads: int, out: Path | None = None) -> float:
    """Run this script as ``what`` worker in ``processes`` ranks of ``threads`` threads; rank 0's number."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, __file__, "--worker", what, "--k", str(args.k), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--budget", str(args.budget), "--out", str(out)]
    ranks = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads), "RANK": str(r),
                                   "LOCAL_RANK": str(r), "WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)})
             for r in range(processes)]
    with ThreadPoolExecutor(processes) as pool:  # read every rank's pipes at once, so that none fills up
        outputs = list(pool.map(subprocess.Popen.communicate, ranks))
    if any(p.returncode for p in ranks):
        raise SystemExit(f"a {what} worker failed:\n" + outputs[0][1][-3000:] + outputs[-1][1][-3000:])
    return float(outputs[0][0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--budget", type=float, default=0.003, help="the grid's fraction of the paper's schedule")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=("step", "grid"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, gloo on 127.0.0.1", flush=True)
    settings = ((1, 1), (1, 2), (2, 1))
    rates = [[launch(args, "step", p, t) for p, t in settings] for _ in range(args.rounds)]
    one, both, two = (statistics.median(column) for column in zip(*rates, strict=True))
    print(f"data parallel, K={args.k} B={args.batch_size}: 1 process x 1 thread {one:.0f} examples/s, 1 process x 2 "
          f"threads {both:.0f}, 2 ranks x 1 thread {two:.0f}: speed-up {two / one:.2f}x, scaling efficiency "
          f"{two / one / 2:.2f} ({two / both:.2f}x the 2-thread process)", flush=True)
    seconds = []
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory() as root:
            seconds.append([launch(args, "grid", p, 1, Path(root) / f"{p}-{round_}") for p in (1, 2)])
    alone, spread = (statistics.median(column) for column in zip(*seconds, strict=True))
    print(f"spread grid, 4 cells on digits, budget {args.budget:g}: 1 process {alone:.1f} s, 2 ranks {spread:.1f} s: "
          f"speed-up {alone / spread:.2f}x, scaling efficiency {alone / spread / 2:.2f}", flush=True)


if __name__ == "__main__":
    main()
