"""Lock-step comparison of one training step of ``iwae`` and of the reference, on identical inputs.

Both sides start from the same parameters (the reference's initialisation, copied into ``iwae.burda(1)``) and are
fed the same minibatches (the same training images, binarized with the same uniform noise) and the same standard
normal draws eps of q's reparameterization. After every Adam step the two sets of parameters are compared. If the
two implementations compute the same objective, gradient and update, they differ by float rounding only: a
relative difference near float32's 1e-7 at the first step. A systematic difference (another loss scale, Adam
variant, parameterization or data draw) shows there already.

How fast a rounding difference grows afterwards is a property of the training dynamics, not of either
implementation: beside the comparison, the reference is run a second time from its initial parameters perturbed
by a relative 1e-7 (``--perturbation``), and the two differences are printed side by side. Where the iwae side
drifts from the reference no faster than the reference drifts from itself, the two compute the same training.

Needs torch, the ``iwae`` package and jax in one environment::

    python crosscheck/lockstep.py --data-dir ../shared/data --steps 300 --objective vae --k 1
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch.distributions import Normal

import iwae
from iwae.core.objectives import Objective
from iwae.training.step import TrainStep, make_adam

HERE = Path(__file__).resolve().parent
# the reference's parameter names, in the order of iwae.burda(1)'s parameters (its weights transposed)
NAMES = ["enc1", "enc2", "enc_mu", "enc_logstd", "dec1", "dec2", "dec_out"]


def load_reference() -> ModuleType:
    """crosscheck/reference.py as a module."""
    spec = importlib.util.spec_from_file_location("reference", HERE / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_torch(params: dict) -> list[torch.Tensor]:
    """The reference's parameters as tensors in the order (and layout) of ``iwae.burda(1).parameters()``."""
    out = []
    for name in NAMES:
        out += [torch.tensor(np.asarray(params[f"{name}_w"]).T.copy()), torch.tensor(np.asarray(params[f"{name}_b"]))]
    return out


GIVEN_EPS = torch.zeros(0)  # the draws ``given_rsample`` returns, set in place by ``give``


def given_rsample(normal: Normal, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
    """``Normal.rsample`` with the reference's standard normal draws: loc + eps * scale (eps read from a global
    tensor, so that a compiled step reads it as an input)."""
    return normal.loc + GIVEN_EPS * normal.scale


def give(eps: np.ndarray) -> None:
    """Make ``given_rsample`` return these draws, shape (k, B, latent)."""
    global GIVEN_EPS
    if GIVEN_EPS.shape != eps.shape:
        GIVEN_EPS = torch.zeros(eps.shape)
    GIVEN_EPS.copy_(torch.from_numpy(eps))


def adam_state(params: dict) -> dict:
    """The reference's optimizer state at its start."""
    import jax
    import jax.numpy as jnp

    zeros = jax.tree.map(jnp.zeros_like, params)
    return {"params": params, "m": zeros, "v": zeros, "t": jnp.asarray(0, jnp.int32)}


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x.detach() - y).double().pow(2).sum()) for x, y in zip(a, b, strict=True))
    den = sum(float(y.detach().double().pow(2).sum()) for y in b)
    return (num / den) ** 0.5


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--objective", choices=["vae", "iwae"], default="vae")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=50, help="print the comparison every this many steps")
    p.add_argument("--compile", action="store_true", help="iwae's compiled step (default: its eager step)")
    p.add_argument("--perturbation", type=float, default=1e-7,
                   help="relative perturbation of the reference's second run's initial parameters")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    ref = load_reference()
    train, _ = ref.load_mnist(args.data_dir)
    params = ref.init_params(jax.random.PRNGKey(args.seed), train.mean(axis=0, dtype=np.float64))
    noise = np.random.default_rng(args.seed + 1)
    perturbed = {name: a * (1 + args.perturbation * jnp.asarray(noise.standard_normal(a.shape), jnp.float32))
                 for name, a in params.items()}
    state, twin = adam_state(params), adam_state(perturbed)

    def ref_loss(params: dict, x: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
        per_example = ref.bound_from_log_weights(ref.log_weights(params, x, eps), args.objective)
        return -jnp.sum(per_example), jnp.sum(per_example)

    ref_grad = jax.jit(jax.grad(ref_loss, has_aux=True))
    ref_update = jax.jit(ref.adam_update)

    model = iwae.burda(1, train_mean=torch.tensor(train.mean(axis=0)))
    with torch.no_grad():
        for p_iwae, p_ref in zip(model.parameters(), to_torch(params), strict=True):
            p_iwae.copy_(p_ref)
    objective = Objective("elbo" if args.objective == "vae" else "iwae", k=args.k)
    optimizer = make_adam(model, args.lr, (ref.ADAM_B1, ref.ADAM_B2), ref.ADAM_EPS)
    step = TrainStep(model, optimizer, objective, "standard", compile=args.compile, reduction="sum")
    print(f"start: relative parameter difference {relative_difference(list(model.parameters()), to_torch(params)):.2e}")

    rng = np.random.default_rng(args.seed)
    lr = jnp.asarray(args.lr, jnp.float32)
    Normal.rsample = given_rsample
    for t in range(1, args.steps + 1):
        idx = rng.choice(train.shape[0], ref.BATCH, replace=False)
        x = (rng.random((ref.BATCH, ref.PIXELS)) < train[idx]).astype(np.float32)
        eps = rng.standard_normal((args.k, ref.BATCH, ref.LATENT)).astype(np.float32)
        grads, ref_bound = ref_grad(state["params"], jnp.asarray(x), jnp.asarray(eps))
        state = ref_update(state, grads, lr)
        twin = ref_update(twin, ref_grad(twin["params"], jnp.asarray(x), jnp.asarray(eps))[0], lr)
        give(eps)
        before = float(step.bound_sum)
        step(torch.from_numpy(x))
        iwae_bound = float(step.bound_sum) - before
        if t == 1 or t % args.every == 0 or t == args.steps:
            diff = relative_difference(list(model.parameters()), to_torch(state["params"]))
            drift = relative_difference(to_torch(twin["params"]), to_torch(state["params"]))
            print(f"step {t}: batch bound iwae {iwae_bound:.4f} reference {float(ref_bound):.4f}; relative parameter "
                  f"difference iwae-reference {diff:.2e}, perturbed reference-reference {drift:.2e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
