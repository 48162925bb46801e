"""Training throughput of S stacked seeds (``iwae.training.stacked``) against one seed, with the paper's 1-layer model.

Times the training step (``iwae.training.step.TrainStep``, compiled and eager) on random 784-dimensional binary
minibatches of B examples per seed: one seed alone, and S seeds stacked into one model, each seed drawing its
noise from its own generator ahead of the step as ``iwae train --seeds`` does. Rounds are interleaved (every
configuration once per round) so that the ratios are fair on a noisy machine; prints the median examples per
second (all seeds together) and the speed-up over the lone seed in the same mode and over the lone seed's
fastest mode. Every configuration multiplies on the matmul path ``iwae train --seeds S`` chooses for it (the
faster on its own step: a stack's batched products may favour another path than a lone seed's); the lone
compiled seed is also timed on the other path where that is accurate here (``gemm.accurate``), in the same
rounds, and its fastest mode is the best of all its timings, so that a path choice that the machine's noise
tipped the wrong way cannot inflate a speed-up.

    python benchmarks/stacked.py [--seeds 1 4 16] [--k 1 50] [--batch-size 20] [--steps 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from iwae.platform import gemm, heap
from iwae.training import config as train_config
from iwae.training import lone, preflight, stacked


def step_config(k: int, batch_size: int, compile: bool) -> train_config.TrainConfig:
    """The benchmark's training settings: the 1-layer model, IWAE bound, standard estimator."""
    return train_config.TrainConfig(layers=1, objective="iwae", k=k, estimator="standard", epochs=1,
                                    batch_size=batch_size,
                             compile=compile)


def workload(seeds: int) -> Callable[[train_config.TrainConfig, int, torch.device], Callable[[], None]]:
    """The builder of a throwaway step of ``seeds`` seeds, the one ``iwae train --seeds`` times its paths on."""
    return lone.lone_timing_step if seeds == 1 else functools.partial(stacked.stacked_timing_step, seeds=seeds)


def make_step(seeds: int, k: int, batch_size: int, compile: bool, device: str = "cpu") -> Callable[[], None]:
    """One training step of ``seeds`` stacked seeds (a lone model for 1) on ``device``, each seed drawing its
    noise ahead of the step; warmed up (compiled if asked; on a GPU, as a CUDA graph)."""
    run = workload(seeds)(step_config(k, batch_size, compile), 784, torch.device(device))
    for _ in range(3):  # compilation and warm-up
        run()
    return run


def chosen_path(seeds: int, k: int, batch_size: int, compile: bool) -> str:
    """The matmul path ``iwae train --seeds`` chooses for this configuration (``train.training_matmul_path``)."""
    config = step_config(k, batch_size, compile)
    return preflight.training_matmul_path(config, 784, torch.device("cpu"), seeds, workload(seeds))


def examples_per_s(run: Callable[[], None], seeds: int, batch_size: int, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        run()
    return steps * seeds * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    heap.retain_freed_memory()  # as the iwae command does
    print(f"stacked seeds, 1-layer model, IWAE bound, standard estimator, B={args.batch_size} per seed, "
          f"{torch.get_num_threads()} threads; examples/s of all seeds together, median of {args.rounds} rounds")
    for k in args.k:
        seeds_list = sorted({1, *args.seeds})
        keys = [(s, c) for s in seeds_list for c in (True, False)]
        paths = {(s, c): chosen_path(s, k, args.batch_size, c) for s, c in keys}
        steps = {(s, c): make_step(s, k, args.batch_size, c) for s, c in keys}
        other = gemm.ONEDNN if paths[(1, True)] == gemm.DEFAULT else gemm.DEFAULT
        if not (gemm.has_choice("cpu") and gemm.accurate(other)):
            other = None  # a path iwae train never takes here is no baseline
        lone = steps[(1, True)]  # timed on both paths: the switch is read at each product, so one compile serves
        rates: dict[tuple[int, bool], list[float]] = {key: [] for key in steps}
        other_rates: list[float] = []
        for _ in range(args.rounds):
            for key, run in steps.items():
                with gemm.using_matmul_path(paths[key]):
                    rates[key].append(examples_per_s(run, key[0], args.batch_size, args.steps))
            if other is not None:
                with gemm.using_matmul_path(other):
                    other_rates.append(examples_per_s(lone, 1, args.batch_size, args.steps))
        median = {key: statistics.median(values) for key, values in rates.items()}
        lone_rates = [median[(1, True)], median[(1, False)]]
        if other_rates:
            lone_rates.append(statistics.median(other_rates))
            print(f"K={k:<3} S=1   compiled {lone_rates[-1]:9.0f} examples/s  on the {other} path (lone seed only)")
        best_lone = max(lone_rates)
        for s, c in keys:
            rate = median[(s, c)]
            print(f"K={k:<3} S={s:<3} {'compiled' if c else 'eager   '} {rate:9.0f} examples/s  "
                  f"{rate / median[(1, c)]:5.2f}x one seed ({'compiled' if c else 'eager'})  "
                  f"{rate / best_lone:5.2f}x one seed (fastest mode)  on the {paths[(s, c)]} path", flush=True)


if __name__ == "__main__":
    main()
