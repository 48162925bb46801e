"""Active units (Burda et al. 2016): a unit u of layer l is active when Var_x(E_q[u | x]) > 0.01, the mean of
layer l taken given a z_{l-1} sampled from q (for a binary unit, the variance of its probability of being on)."""

from __future__ import annotations

import torch
from torch import Tensor

from iwae.models import DeepLatentModel
from iwae.settings import check_examples

ACTIVE_UNIT_EXAMPLES = 500

ACTIVE_UNIT_THRESHOLD = 0.01


@torch.no_grad()
def posterior_mean_variances(model: DeepLatentModel, x: Tensor) -> list[Tensor]:
    """For each stochastic layer, the population variance over the examples ``x`` of each unit's posterior
    mean, shape (d_l,); for layer l >= 2 the mean is that of q(z_l | z_{l-1}) at one z_{l-1} sampled from q. ``x``
    as ``DeepLatentModel.as_batch`` takes it."""
    variances, h = [], model.as_batch(x)
    check_examples(h)
    for layer in model.encoder:
        q = layer(h)
        variances.append(q.mean.var(0, unbiased=False))
        h = q.sample()
    return variances


def active_units(model: DeepLatentModel, x: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> list[int]:
    """The number of active units of each stochastic layer on the examples ``x`` (Burda et al. 2016): units
    whose posterior mean has a variance over ``x`` above ``threshold`` (see ``posterior_mean_variances``)."""
    return [int((v > threshold).sum()) for v in posterior_mean_variances(model, x)]
