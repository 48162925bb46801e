"""Per-step time of the STL and DReG estimators relative to the standard one.

The paper's 1-stochastic-layer model on random binary data, IWAE bound at k=50, batch 100: one training
step (forward, backward, Adam update) per estimator, timed in interleaved rounds in one process so that
the machine's load affects every estimator alike. Target: STL and DReG at most 1.10x the standard step.

    python benchmarks/estimators.py [--rounds 15] [--steps 10] [--layers 1] [--k 50] [--batch 100]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from iwae.core.objectives import REPARAMETERIZED_ESTIMATORS as ESTIMATORS
from iwae.core.objectives import loss
from iwae.models import burda


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = (torch.rand(args.batch, 784) < 0.13).float()
    models = {name: burda(args.layers, train_mean=x.mean(0)) for name in ESTIMATORS}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-4) for name, m in models.items()}

    def step(name: str) -> None:
        optimizers[name].zero_grad(set_to_none=True)
        loss(models[name], x, "iwae", k=args.k, estimator=name, reduction="sum").loss.backward()
        optimizers[name].step()

    for name in ESTIMATORS:  # warm-up
        for _ in range(3):
            step(name)
    times: dict[str, list[float]] = {name: [] for name in ESTIMATORS}
    for _ in range(args.rounds):
        for name in ESTIMATORS:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - start) / args.steps)

    base = statistics.median(times["standard"])
    print(f"burda({args.layers}), IWAE k={args.k}, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"{'estimator':<10} {'ms/step':>8} {'ratio':>6}")
    for name in ESTIMATORS:
        median = statistics.median(times[name])
        print(f"{name:<10} {1e3 * median:8.2f} {median / base:6.3f}")
    worst = max(statistics.median(times[n]) for n in ESTIMATORS if n != "standard") / base
    print(f"worst ratio {worst:.3f} (target <= 1.10): {'OK' if worst <= 1.10 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
