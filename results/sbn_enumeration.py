"""The IWAE bound of a small sigmoid belief network against its exact log p(x), summed over all 2^10 z.

    python results/sbn_enumeration.py        # writes results/sbn-enumeration.png and prints the numbers

Model: ``sbn([10], x_dim=20)`` in float64, every parameter drawn from N(0, 1) (seed 0); q(z | x) then fitted
for 20 Adam steps (lr 0.05) on the exact ELBO of 4 binary examples, so that it is reasonable but not exact.
For each k, E[L_k] is the mean of 300 independent L_k per example, shown with 2 standard errors.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from matplotlib.figure import Figure

from iwae.core import bounds
from iwae.eval.exact import exact_log_likelihood
from iwae.models import enumerate_values, sbn

KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
REPEATS = 300


def fitted_sbn() -> tuple[torch.nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    model = sbn([10], 20).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    x = (torch.rand(4, 20, generator=torch.Generator().manual_seed(0)) < 0.5).double()
    z = enumerate_values(model.encoder[0](x)).unsqueeze(1).expand(-1, len(x), -1)
    log_p = model.log_joint(x, [z]).detach()
    optimizer = torch.optim.Adam(model.encoder.parameters(), lr=0.05)
    for _ in range(20):
        log_q = model.encoder[0](x).log_prob(z)
        optimizer.zero_grad()
        (-(log_q.exp() * (log_p - log_q)).sum()).backward()
        optimizer.step()
    return model, x


def main() -> None:
    model, x = fitted_sbn()
    log_px = exact_log_likelihood(model, x).detach()
    torch.manual_seed(0)
    means, ses = [], []
    for k in KS:
        with torch.no_grad():
            draws = torch.cat([bounds.iwae(model.log_weights(x.repeat(30, 1), k)).reshape(30, -1)
                               for _ in range(REPEATS // 30)])
        per_repeat = draws.mean(1)  # the mean over the 4 examples of one draw of L_k each
        means.append(per_repeat.mean().item())
        ses.append(per_repeat.std().item() / math.sqrt(REPEATS))
        print(f"k={k:5d}  E[L_k] = {means[-1]:.4f} +- {ses[-1]:.4f}   gap {log_px.mean().item() - means[-1]:.4f}")
    exact = log_px.mean().item()
    print(f"exact mean log p(x) = {exact:.4f} (enumerating all 1024 z)")

    figure = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.errorbar(KS, means, yerr=[2 * s for s in ses], marker="o", ms=3, capsize=2, label="E[IWAE bound L_k]")
    left.axhline(exact, color="black", ls="--", lw=1, label="exact log p(x) (sum over 2^10 z)")
    left.set(xscale="log", xlabel="k (importance samples)", ylabel="nats (mean of 4 examples)",
             title="IWAE bound against the enumerated log p(x)")
    left.legend(loc="lower right")
    gaps = [exact - m for m in means]
    right.errorbar(KS, gaps, yerr=[2 * s for s in ses], marker="o", ms=3, capsize=2)
    right.set(xscale="log", yscale="log", xlabel="k", ylabel="log p(x) - E[L_k] (nats)",
              title="the gap to the exact log p(x)")
    figure.suptitle("SBN with 10 binary latents, 20 visible units: 300 draws of L_k per k, bars 2 SE", fontsize=9)
    out = Path(__file__).with_name("sbn-enumeration.png")
    figure.savefig(out, dpi=120)
    print(os.path.relpath(out))


if __name__ == "__main__":
    main()
