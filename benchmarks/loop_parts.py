"""Where the training loop's time goes beyond its bare step: the compiled step on three kinds of minibatch.

The paper's 1-stochastic-layer model, IWAE bound, the standard estimator, B = 20, in one process, one torch
thread (``--threads``), the step compiled as ``iwae train`` compiles it, on the MNIST training images
(``$IWAE_DATA_DIR``), in interleaved rounds of ``--steps`` steps each:

    fixed      one random binary minibatch, the same every step (what ``benchmarks/loop.py`` times as the bare step)
    real       ``--steps`` MNIST minibatches binarized before the round (a new real minibatch every step)
    loop       the minibatches as the loop draws them (``iwae.training.minibatches.EpochMinibatches``: a chunk's
               rows gathered and binarized at once, the step on a view of the chunk), the draws timed with the step
    ahead      the same, the next chunk drawn ahead on a thread of its own (as the loop draws them where torch's
               threads leave a CPU free)

Prints the median microseconds per step of each, and real - fixed (what real data cost the step itself),
loop - real (what drawing them costs) and ahead - real (what is left of it when they are drawn ahead).

    python benchmarks/loop_parts.py [--k 1] [--steps 1200] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from iwae import data
from iwae.core.objectives import Objective
from iwae.models import burda
from iwae.training.minibatches import EpochMinibatches
from iwae.training.step import TrainStep, make_adam

BATCH = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = data.load("mnist", os.environ.get("IWAE_DATA_DIR"), download=False)
    model = burda(1, 784, train_mean=dataset.train.mean(0))
    step = TrainStep(model, make_adam(model, 1e-3, (0.9, 0.999), 1e-4), Objective("iwae", args.k), "standard",
                     compile=True)
    generator = torch.Generator().manual_seed(0)
    fixed = (torch.rand(BATCH, 784, generator=generator) < 0.2).float()
    for _ in range(5):
        step(fixed)

    def epoch() -> torch.Tensor:
        return data.epoch_batches(len(dataset.train), BATCH, generator)[: args.steps]

    def on_fixed() -> Callable[[], None]:
        def run() -> None:
            for _ in range(args.steps):
                step(fixed)
        return run

    def on_real() -> Callable[[], None]:
        minibatches = [dataset.minibatch(idx, generator) for idx in epoch()]

        def run() -> None:
            for x in minibatches:
                step(x)
        return run

    def drawn(ahead: bool) -> Callable[[], Callable[[], None]]:
        def prepare() -> Callable[[], None]:
            chunks = EpochMinibatches(dataset.train, epoch().unsqueeze(0), [generator], True, 0, ahead)

            def run() -> None:
                for i in range(args.steps):
                    step(chunks(i)[0])
            return run
        return prepare

    times: dict[str, list[float]] = {"fixed": [], "real": [], "loop": [], "ahead": []}
    for _ in range(args.rounds):
        for name, prepare in (("fixed", on_fixed), ("real", on_real), ("loop", drawn(False)), ("ahead", drawn(True))):
            run = prepare()
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / args.steps * 1e6)
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:6} {median[name]:7.0f} us/step  (rounds {min(values):.0f}-{max(values):.0f})")
    print(f"real - fixed {median['real'] - median['fixed']:+.0f} us/step; loop - real "
          f"{median['loop'] - median['real']:+.0f} us/step; ahead - real {median['ahead'] - median['real']:+.0f} "
          f"us/step; loop / fixed {median['fixed'] / median['loop']:.3f}, ahead / fixed "
          f"{median['fixed'] / median['ahead']:.3f} (the loop's speed over the bare step's)")


if __name__ == "__main__":
    main()
