"""Cost of minibatch production (gather + dynamic binarization) as a fraction of one training step.

The paper's setting: the 1-stochastic-layer model, batch 20, k=1, negative ELBO summed over the batch, one
Adam step. Minibatches come from an MNIST-sized (60,000 x 784) grey-level training set held on the device,
through ``epoch_batches`` and ``Dataset.minibatch`` exactly as a trainer draws them (the per-epoch
permutation included). The two are timed in interleaved rounds in one process so that the machine's load
affects both alike. Target: minibatch production under 5% of a step.

    python benchmarks/data.py [--rounds 15] [--steps 200] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from iwae.core.objectives import loss
from iwae.data import Dataset, epoch_batches
from iwae.models import burda

BATCH = 20


def _timed(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, averaged over ``steps`` calls, waiting for the device at the end."""
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    generator = torch.Generator(device).manual_seed(0)
    grey = torch.rand(60000, 784, generator=generator, device=device)
    data = Dataset("mnist-sized", grey, grey[:10000], "dynamic")
    model = burda(1, train_mean=grey.mean(0)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-4)
    x = data.minibatch(epoch_batches(len(data.train), BATCH, generator)[0], generator)

    batches = iter(())

    def produce() -> None:
        nonlocal batches
        idx = next(batches, None)
        if idx is None:
            batches = iter(epoch_batches(len(data.train), BATCH, generator))
            idx = next(batches)
        data.minibatch(idx, generator)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(model, x, "elbo", k=1, estimator="standard", reduction="sum").loss.backward()
        optimizer.step()

    for fn in (produce, train_step):  # warm-up
        _timed(fn, 20, device)
    times: dict[str, list[float]] = {"minibatch": [], "step": []}
    for _ in range(args.rounds):
        times["minibatch"].append(_timed(produce, args.steps, device))
        times["step"].append(_timed(train_step, args.steps, device))

    minibatch, step = (statistics.median(times[name]) for name in ("minibatch", "step"))
    fraction = minibatch / step
    print(f"burda(1), ELBO k=1, batch {BATCH}, {device}, {torch.get_num_threads()} threads")
    print(f"minibatch (gather + binarize) {1e6 * minibatch:8.1f} us")
    print(f"training step                 {1e6 * step:8.1f} us")
    print(f"fraction {100 * fraction:.2f}% (target < 5%): {'OK' if fraction < 0.05 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
