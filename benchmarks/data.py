"""Cost of minibatch production (gather + dynamic binarization) as a fraction of one training step.

The paper's setting: the 1-stochastic-layer model, batch 20, k=1, the ELBO, one Adam step. Minibatches come from
an MNIST-sized (60,000 x 784) grey-level training set held on the device, drawn as ``iwae train`` draws them:
``epoch_batches``' per-epoch permutation, then ``EpochMinibatches`` gathering and binarizing a chunk of steps at a
time, here in the timing thread (not ahead on a thread of its own, so that its whole cost shows). The step is the
compiled training step ``iwae train`` runs (``lone.lone_timing_step``, on a fixed minibatch). The two are timed in
interleaved rounds in one process so that the machine's load affects both alike. Target: minibatch production
under 5% of a step.

    python benchmarks/data.py [--rounds 15] [--steps 200] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from iwae.data import epoch_batches
from iwae.training import lone
from iwae.training.config import TrainConfig
from iwae.training.minibatches import EpochMinibatches

BATCH = 20


def _timed(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, averaged over ``steps`` calls, waiting for the device at the end."""
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def minibatch_drawer(train: torch.Tensor, generator: torch.Generator) -> Callable[[], None]:
    """A call that draws the next minibatch as ``iwae train``'s loop does, epoch after epoch."""
    epoch = {"minibatches": None, "step": 0, "steps": 0}

    def draw() -> None:
        if epoch["step"] == epoch["steps"]:
            batches = epoch_batches(len(train), BATCH, generator)
            epoch.update(minibatches=EpochMinibatches(train, batches[None], [generator], True, 0), step=0,
                         steps=len(batches))
        epoch["minibatches"](epoch["step"])
        epoch["step"] += 1

    return draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here; use --device cpu")
    device = torch.device(args.device)

    generator = torch.Generator(device).manual_seed(0)
    grey = torch.rand(60000, 784, generator=generator, device=device)
    config = TrainConfig(layers=1, objective="elbo", k=1, estimator="standard", epochs=1, batch_size=BATCH,
                         compile=True)
    produce, train_step = minibatch_drawer(grey, generator), lone.lone_timing_step(config, 784, device)
    for fn in (produce, train_step):  # warm-up (the step's compilation)
        _timed(fn, 20, device)
    times: dict[str, list[float]] = {"minibatch": [], "step": []}
    for _ in range(args.rounds):
        times["minibatch"].append(_timed(produce, args.steps, device))
        times["step"].append(_timed(train_step, args.steps, device))

    minibatch, step = (statistics.median(times[name]) for name in ("minibatch", "step"))
    fraction = minibatch / step
    print(f"burda(1), ELBO k=1, batch {BATCH}, {device}, {torch.get_num_threads()} threads")
    print(f"minibatch (gather + binarize)  {1e6 * minibatch:8.1f} us")
    print(f"compiled training step         {1e6 * step:8.1f} us")
    print(f"fraction {100 * fraction:.2f}% (target < 5%): {'OK' if fraction < 0.05 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
