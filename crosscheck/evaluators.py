"""The two sides' k-sample log-likelihood evaluators on the same trained parameters and the same test images.

The parameters of one of the reference's checkpoints are copied into ``iwae.burda(1)``; ``iwae.log_likelihood``
and the reference's own evaluator then estimate log p(x) on a seeded random subset of the reference's binarized
test images, each with its own random draws. The paired difference of the two estimates, averaged over the
images, has mean zero if the evaluators estimate the same quantity; its standard error is that of the two
estimators' Monte Carlo noise.

Needs torch, the ``iwae`` package and jax in one environment::

    python crosscheck/evaluators.py runs/crosscheck-ref/mnist-l1-vae-k1/seed-0/checkpoint.npz \
        --data-dir ../shared/data --examples 500
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from lockstep import load_reference, to_torch

import iwae


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a reference checkpoint.npz of a 1-layer model")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--examples", type=int, default=500, help="test images, a random subset seeded with --seed")
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    ref = load_reference()
    state, _, epoch, _ = ref.load_checkpoint(args.checkpoint)
    _, test_bin = ref.load_mnist(args.data_dir)
    rows = np.sort(np.random.default_rng(args.seed).choice(len(test_bin), args.examples, replace=False))
    x = test_bin[rows]

    model = iwae.burda(1)
    with torch.no_grad():
        for p_iwae, p_ref in zip(model.parameters(), to_torch(state["params"]), strict=True):
            p_iwae.copy_(p_ref)
    ll_iwae = iwae.log_likelihood(model, torch.from_numpy(x), k=args.k, seed=args.seed).double().numpy()

    ll_fn = ref.make_log_likelihood_fn(args.k, min(500, args.k))
    chunk = 50
    ll_ref = np.concatenate([
        np.asarray(ll_fn(state["params"], jnp.asarray(x[i : i + chunk]), jax.random.PRNGKey(args.seed + i)), np.float64)
        for i in range(0, len(x), chunk)
    ])
    d = ll_iwae - ll_ref
    print(f"{args.checkpoint} (epoch {epoch}), {len(x)} random test images (seed {args.seed}), k = {args.k}")
    print(f"NLL: iwae's evaluator {-ll_iwae.mean():.4f}, the reference's {-ll_ref.mean():.4f}; "
          f"difference {-d.mean():+.4f} +- {d.std(ddof=1) / np.sqrt(d.size):.4f} (paired standard error)")


if __name__ == "__main__":
    main()
