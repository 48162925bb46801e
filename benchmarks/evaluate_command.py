"""The wall time of the ``iwae evaluate RUN --k K`` command against the evaluator's own time on the same data and k
(target: the command within 1.15 times the evaluator).

The script trains a small run of the paper's model (one epoch, on MNIST where IWAE_DATA_DIR or the cache holds it;
random binary stand-ins of MNIST's shape when the files are not found), then times, each in a fresh process and on
the same number of torch threads (``--threads``; this process's by default):

  the command    ``iwae evaluate RUN --k K --examples N``, start to exit (loading, checks, compiling as it
                 chooses, the evaluation, the active units, writing the result);
  the evaluator  ``iwae.eval.likelihood.importance_statistics`` on the same model, examples, k, seed, pass sizes,
                 matrix-multiply path and compilation, after a first pass (the compilation, when compiled: the
                 timed call then compiles its own evaluator from inductor's cache, as the command does), as
                 ``benchmarks/evaluate_memory.py`` times it;

by turns over ``--rounds`` rounds, and prints each round's times and their ratio, and the median ratio (on a
machine whose speed drifts, a ratio within a round is steadier than one of separate runs). ``--examples N``
evaluates a seeded random subset of N test images (the command's ``--examples``; the full 10,000 at k = 5000 take
minutes on a small CPU).

    python benchmarks/evaluate_command.py [--examples 10000] [--k 5000] [--layers 1] [--device cpu] [--rounds 3]
                                          [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from children import run_child

from iwae import data
from iwae.eval import likelihood
from iwae.platform import heap
from iwae.runs import evaluation


def make_run(out: Path, layers: int, threads: int) -> tuple[Path, str]:
    """A run trained for one epoch in ``out``/run, and what it was trained on."""
    try:
        data.load("mnist", download=False)
        dataset, source = "mnist", "MNIST"
    except data.DataError:
        rng = np.random.default_rng(0)
        dataset = str(out / "standin.npz")
        np.savez(dataset, train=(rng.random((2000, 784)) < 0.13).astype(np.float32),
                 test=(rng.random((10_000, 784)) < 0.13).astype(np.float32))
        source = "random binary stand-ins of MNIST's shape"
    run = out / "run"
    run_child([sys.executable, "-m", "iwae", "train", "--dataset", dataset, "--layers", str(layers), "--epochs", "1",
               "--batch-size", "500", "--k", "1", "--eval-k", "0", "--device", "cpu", "--threads", str(threads),
               "--out", str(run)], threads)
    return run, source


def time_command(run: Path, k: int, examples: int, device: str, threads: int) -> float:
    """Seconds from the start of ``iwae evaluate`` to its exit."""
    began = time.perf_counter()
    run_child([sys.executable, "-m", "iwae", "evaluate", str(run), "--k", str(k), "--examples", str(examples),
               "--device", device, "--threads", str(threads)], threads)
    return time.perf_counter() - began


def evaluator_seconds(run: Path, k: int, examples: int, device: str) -> dict[str, float]:
    """In this process: the evaluator's own time on what ``iwae evaluate`` evaluates, after a first pass."""
    heap.retain_freed_memory()  # as the iwae command does
    _, model, _, x = evaluation.load_examples(run, split="test", dataset=None, data_dir=None, examples=examples,
                                              device=device, seed=0)
    batch_size = min(likelihood.EXAMPLES_PER_PASS, len(x))
    compile = len(x) * k >= evaluation.AUTO_COMPILE_SAMPLES
    likelihood.evaluation_matmul_path(model, x, k, 500, batch_size)
    likelihood.importance_statistics(model, x[:batch_size], min(k, 500), seed=0, compile=compile)
    began = time.perf_counter()
    stats = likelihood.importance_statistics(model, x, k, batch_size=batch_size, seed=0, compile=compile)
    return {"seconds": time.perf_counter() - began, "nll": -stats.log_likelihood.mean().item(),
            "compiled": compile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the command and the evaluator (default: %(default)s, this process's)")
    parser.add_argument("--child", metavar="RUN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(evaluator_seconds(Path(args.child), args.k, args.examples, args.device)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        run, source = make_run(Path(tmp), args.layers, args.threads)
        print(f"iwae evaluate RUN --k {args.k} --examples {args.examples} --device {args.device} --threads "
              f"{args.threads}: a {args.layers}-layer run trained for one epoch on {source}")
        child = [sys.executable, __file__, "--child", str(run), "--k", str(args.k), "--examples", str(args.examples),
                 "--device", args.device]
        ratios = []
        for round_ in range(args.rounds):
            for result in run.glob("eval-*.json"):  # the command evaluates afresh each round
                result.unlink()
            command = time_command(run, args.k, args.examples, args.device, args.threads)
            own = json.loads(run_child(child, args.threads))
            ratios.append(command / own["seconds"])
            print(f"round {round_ + 1}: command {command:.1f} s, evaluator {own['seconds']:.1f} s "
                  f"({'compiled' if own['compiled'] else 'eager'}), ratio {ratios[-1]:.3f}", flush=True)
    ratio = statistics.median(ratios)
    print(f"median ratio {ratio:.3f} (target: at most 1.15: {'met' if ratio <= 1.15 else 'NOT met'})")


if __name__ == "__main__":
    main()
