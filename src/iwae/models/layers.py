"""Building blocks: tanh MLPs and conditional distributions as ``nn.Module`` s.

A conditional layer maps its input ``h`` (shape ``(*batch, in_dim)``) to a ``torch.distributions``
distribution with event shape ``(out_dim,)``, so that ``layer(h).log_prob(v)`` has shape ``batch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, Normal


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


class BernoulliLayer(nn.Module):
    """Factorised Bernoulli on logits: a tanh MLP, then a linear head giving the logits."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.body = mlp(in_dim, hidden)
        self.logits = nn.Linear(_out_dim(in_dim, hidden), out_dim)

    def forward(self, h: Tensor) -> Distribution:
        return Independent(Bernoulli(logits=self.logits(self.body(h)), validate_args=False), 1)

    @torch.no_grad()
    def set_output_bias(self, mean: Tensor, clip: float = 1e-3) -> None:
        """Set the output bias to logit(mean), the mean clipped to [clip, 1 - clip], so that an untrained
        model already predicts the data's pixel marginals (Burda et al. 2016)."""
        p = torch.as_tensor(mean, dtype=self.logits.bias.dtype).clamp(clip, 1.0 - clip)
        if p.shape != self.logits.bias.shape:
            raise ValueError(f"mean must have shape {tuple(self.logits.bias.shape)}; got {tuple(p.shape)}")
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
