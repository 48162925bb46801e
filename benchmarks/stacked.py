"""Training throughput of S stacked seeds (``iwae.stacked``) against one seed, with the paper's 1-layer model.

Times the eager training step (``iwae.step.TrainStep``) on random 784-dimensional binary minibatches of B
examples per seed: one seed alone, and S seeds stacked into one model, each seed drawing its noise from its own
generator. Prints examples per second (all seeds together) and the speed-up over the lone seed, per K.

    python benchmarks/stacked.py [--seeds 1 4 16] [--k 1 50] [--batch-size 20] [--steps 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from iwae.models import burda
from iwae.objectives import Objective
from iwae.stacked import SeedNoise, stack_models
from iwae.step import TrainStep, make_adam


def examples_per_s(seeds: int, k: int, batch_size: int, steps: int) -> float:
    models = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        models.append(burda(1, 784))
    if seeds == 1:
        model, shape = models[0], (batch_size, 784)
    else:
        model = stack_models(models, SeedNoise([torch.Generator().manual_seed(s) for s in range(seeds)]))
        shape = (seeds, batch_size, 784)
    optimizer = make_adam(model, 1e-3, (0.9, 0.999), 1e-4)
    step = TrainStep(model, optimizer, Objective("iwae", k), "standard", bound_shape=shape[:-2])
    x = (torch.rand(shape) < 0.5).float()
    for _ in range(3):  # warm-up
        step(x)
    start = time.perf_counter()
    for _ in range(steps):
        step(x)
    return steps * seeds * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for k in args.k:
        lone = examples_per_s(1, k, args.batch_size, args.steps)
        for seeds in args.seeds:
            rate = lone if seeds == 1 else examples_per_s(seeds, k, args.batch_size, args.steps)
            print(f"K={k:<3} B={args.batch_size} S={seeds:<3} {rate:9.0f} examples/s  {rate / lone:5.2f}x one seed",
                  flush=True)


if __name__ == "__main__":
    main()
