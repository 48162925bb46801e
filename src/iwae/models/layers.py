"""Building blocks: tanh MLPs and conditional distributions as ``nn.Module`` s.

A conditional layer maps its input ``h`` (shape ``(*batch, in_dim)``) to a ``torch.distributions``
distribution with event shape ``(out_dim,)``, so that ``layer(h).log_prob(v)`` has shape ``batch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, Normal

# the log(1 + exp(-|l|)) terms of a Bernoulli log-density are summed as logs of products over blocks of this
# many (each factor lies in (1, 2], so a block's product is at most 2^16): one log per block, not one per unit
_LOG_BLOCK = 16


def mlp(in_dim: int, hidden: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given widths, each followed by tanh (Burda et al. 2016 use tanh throughout)."""
    blocks: list[nn.Module] = []
    for width in hidden:
        blocks += [nn.Linear(in_dim, width), nn.Tanh()]
        in_dim = width
    return nn.Sequential(*blocks)


def _out_dim(in_dim: int, hidden: Sequence[int]) -> int:
    return hidden[-1] if hidden else in_dim


class GaussianLayer(nn.Module):
    """Diagonal Gaussian N(mean(h), diag(std(h)^2)): a tanh MLP, then a linear mean head and a linear head
    followed by exp giving the standard deviation (Burda et al. 2016, appendix)."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.body = mlp(in_dim, hidden)
        self.mean = nn.Linear(_out_dim(in_dim, hidden), out_dim)
        self.log_std = nn.Linear(_out_dim(in_dim, hidden), out_dim)

    def forward(self, h: Tensor) -> Distribution:
        h = self.body(h)
        return Independent(Normal(self.mean(h), self.log_std(h).exp(), validate_args=False), 1)


class _BernoulliLogDensity(torch.autograd.Function):
    """``bernoulli_log_density``'s blocked form, with the backward x - sigmoid(l) (autograd would differentiate
    the blocked products instead)."""

    @staticmethod
    def forward(logits: Tensor, x: Tensor) -> Tensor:
        factors = nn.functional.pad(1 + torch.exp(-logits.abs()), (0, -logits.shape[-1] % _LOG_BLOCK), value=1.0)
        log_normalizer = factors.unflatten(-1, (-1, _LOG_BLOCK)).prod(-1).log().sum(-1)
        return (x * logits - logits.clamp_min(0)).sum(-1) - log_normalizer

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        logits, x = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        grad_logits = ((x - torch.sigmoid(logits)) * grad).sum_to_size(logits.shape)
        grad_x = (logits * grad).sum_to_size(x.shape) if ctx.needs_input_grad[1] else None
        return grad_logits, grad_x


def bernoulli_log_density(logits: Tensor, x: Tensor, blocked: bool | None = None) -> Tensor:
    """log p(x | logits) = sum_d [x_d l_d - softplus(l_d)] of a factorised Bernoulli, summed over the last
    dimension (``logits`` and ``x`` broadcast); its gradient in l is x - sigmoid(l).

    ``blocked`` (default: while ``torch.compile`` traces) writes softplus(l) = max(l, 0) + log(1 + e^{-|l|})
    and sums the log(1 + e^{-|l|}) terms as the logs of their factors' products over blocks of 16 units: one
    log per block instead of a log1p per unit, which is most of the density's cost in a compiled CPU step,
    and as accurate in float32 as summing per-unit terms (the rounding of the sum dominates either way).
    Otherwise torch's ``binary_cross_entropy_with_logits`` computes it, one kernel and one temporary when
    run eagerly.
    """
    if blocked is None:
        blocked = torch.compiler.is_compiling()
    if blocked:
        return _BernoulliLogDensity.apply(logits, x)
    logits, x = torch.broadcast_tensors(logits, x)  # what Bernoulli.log_prob computes, without building one
    return -nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


class FactorisedBernoulli(Independent):
    """Independent Bernoulli units on ``logits`` (event shape ``logits.shape[-1:]``) whose ``log_prob`` is
    ``bernoulli_log_density``."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__(Bernoulli(logits=logits, validate_args=False), 1, validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        return bernoulli_log_density(self.base_dist.logits, value)


class BernoulliLayer(nn.Module):
    """Factorised Bernoulli on logits: a tanh MLP, then a linear head giving the logits."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.body = mlp(in_dim, hidden)
        self.logits = nn.Linear(_out_dim(in_dim, hidden), out_dim)

    def forward(self, h: Tensor) -> Distribution:
        return FactorisedBernoulli(self.logits(self.body(h)))

    @torch.no_grad()
    def set_output_bias(self, mean: Tensor, clip: float = 1e-3) -> None:
        """Set the output bias to logit(mean), the mean clipped to [clip, 1 - clip], so that an untrained
        model already predicts the data's pixel marginals (Burda et al. 2016)."""
        p = torch.as_tensor(mean, dtype=self.logits.bias.dtype)
        if p.shape != self.logits.bias.shape:
            raise ValueError(f"mean must have shape {tuple(self.logits.bias.shape)}; got {tuple(p.shape)}")
        outside = ~((p >= 0) & (p <= 1))  # NaN too
        if outside.any():
            raise ValueError(f"mean must hold probabilities in [0, 1] (the training set's means); entry "
                             f"{int(outside.nonzero()[0])} is {p[outside][0].item():g}")
        p = p.clamp(clip, 1.0 - clip)
        self.logits.bias.copy_(torch.log(p) - torch.log1p(-p))


class StandardNormal(nn.Module):
    """The prior N(0, I) over a ``dim``-dimensional latent; called with no input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("loc", torch.zeros(dim))

    def forward(self) -> Distribution:
        return Independent(Normal(self.loc, torch.ones_like(self.loc), validate_args=False), 1)


def glorot_init_(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases for every ``nn.Linear`` inside ``module``."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
