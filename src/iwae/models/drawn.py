"""Latent layers whose random draws come from a source the caller gives, instead of torch's global generator.

A stack of seeds gives each seed's draws from that seed's own stream (``iwae.training.stacked``), and a rank of a
data-parallel run draws the noise of the whole global batch and keeps its own rows (``iwae.platform.distributed``):
both wrap the encoder's layers with ``with_draws``, which keeps the layers' parameters (and their names).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, Normal

from iwae.models.layers import BernoulliLayer, GaussianLayer

# (shape, like) -> standard normal draws of that shape, of ``like``'s dtype and device
Normals = Callable[[torch.Size, Tensor], Tensor]
# probabilities -> draws of 0 or 1 with those probabilities
Bernoullis = Callable[[Tensor], Tensor]


class _DrawnNormal(Normal):
    def __init__(self, loc: Tensor, scale: Tensor, normals: Normals) -> None:
        super().__init__(loc, scale, validate_args=False)
        self.normals = normals

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        return self.loc + self.normals(self._extended_shape(torch.Size(sample_shape)), self.loc) * self.scale

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)


class _DrawnBernoulli(Bernoulli):
    def __init__(self, logits: Tensor, bernoullis: Bernoullis) -> None:
        super().__init__(logits=logits, validate_args=False)
        self.bernoullis = bernoullis

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return self.bernoullis(self.probs.expand(self._extended_shape(torch.Size(sample_shape))))


class _DrawnGaussianLayer(GaussianLayer):
    def __init__(self, layer: GaussianLayer, normals: Normals) -> None:
        nn.Module.__init__(self)
        self.body, self.mean, self.log_std = layer.body, layer.mean, layer.log_std
        self.normals = normals

    def forward(self, h: Tensor) -> Distribution:
        normal = super().forward(h).base_dist
        return Independent(_DrawnNormal(normal.loc, normal.scale, self.normals), 1)


class _DrawnBernoulliLayer(BernoulliLayer):
    def __init__(self, layer: BernoulliLayer, bernoullis: Bernoullis) -> None:
        nn.Module.__init__(self)
        self.body, self.logits = layer.body, layer.logits
        self.bernoullis = bernoullis

    def forward(self, h: Tensor) -> Distribution:
        return Independent(_DrawnBernoulli(self.logits(self.body(h)), self.bernoullis), 1)


def with_draws(layer: nn.Module, normals: Normals | None = None, bernoullis: Bernoullis | None = None
               ) -> nn.Module | None:
    """``layer`` (the same parameters, under the same names) drawing its Gaussian latents' noise from ``normals``
    or its binary latents from ``bernoullis``; None when ``layer`` is not a ``GaussianLayer`` (with ``normals``)
    or a ``BernoulliLayer`` (with ``bernoullis``)."""
    if type(layer) is GaussianLayer and normals is not None:
        return _DrawnGaussianLayer(layer, normals)
    if type(layer) is BernoulliLayer and bernoullis is not None:
        return _DrawnBernoulliLayer(layer, bernoullis)
    return None
