"""The exact log p(x) of a model with discrete latents, by summing over every joint configuration of z."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from iwae.models import DeepLatentModel, enumerate_values, value_count
from iwae.settings import check_examples

MAX_STATES = 2**20


def exact_log_likelihood(model: DeepLatentModel, x: Tensor, *, max_states: int = MAX_STATES,
                         max_rows: int = 2**16) -> Tensor:
    """The exact log p(x) = log sum_z p(x, z_1..z_L) per example of ``x`` (B, D), shape (B,), by summing
    over every joint configuration of discrete latents (Bernoulli units, one-hot categorical groups); ``x`` as
    ``DeepLatentModel.as_batch`` takes it.

    The configurations are taken in passes of at most about ``max_rows`` (configuration, example) pairs
    and combined by a running logsumexp; q plays no part. Differentiable in p's parameters.

    Raises:
      ValueError: if a latent layer is not discrete, or there are more than ``max_states`` joint
        configurations (use ``log_likelihood``, the importance-sampled estimate, for such models).
    """
    x = model.as_batch(x)
    check_examples(x)
    layers = [model.prior()]  # p(z_L), then p(z_l | z_{l+1}) at z_{l+1} = 0, top-down: only their kinds and shapes
    for layer in reversed(model.conditionals[1:]):
        layers.insert(0, layer(torch.zeros(layers[0].event_shape, dtype=x.dtype, device=x.device)))
    try:
        counts = [value_count(dist) for dist in layers]
    except ValueError as error:
        raise ValueError(f"{error}; estimate log p(x) with log_likelihood (importance sampling) instead") from None
    total = math.prod(counts)
    if total > max_states:
        raise ValueError(f"the model's latents have about 2^{math.log2(total):.0f} joint configurations, more "
                         f"than max_states={max_states} to sum over; estimate log p(x) with log_likelihood "
                         "(importance sampling) instead")
    values = [enumerate_values(dist).to(x.dtype) for dist in layers]
    per_pass = max(1, max_rows // len(x))
    result = torch.full(x.shape[:1], -math.inf, dtype=x.dtype, device=x.device)
    for start in range(0, total, per_pass):
        index = torch.arange(start, min(start + per_pass, total), device=x.device)
        z = []
        for count, value in zip(counts, values, strict=True):  # mixed radix: layer 1 varies fastest
            z.append(value[index % count].unsqueeze(1).expand(-1, len(x), -1))
            index = index // count
        result = torch.logaddexp(result, torch.logsumexp(model.log_joint(x, z), 0))
    return result
