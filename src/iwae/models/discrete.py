"""Discrete latent layers and the sigmoid belief networks of Mnih & Rezende (2016), section 6.

A sigmoid belief network (SBN) ``sbn-H1-...-HL`` has L stochastic layers of H_l binary units with linear
(logistic) conditionals, a factorised Bernoulli prior with learned logits on the top layer, and an inference
network of the same shape (bottom-up):

    p(z_L) = prod_j Bernoulli(z_Lj; sigmoid(b_j)),     p(z_{l-1} | z_l) = Bernoulli(sigmoid(W_l z_l + c_l)),
    q(z_l | z_{l-1}) = Bernoulli(sigmoid(V_l z_{l-1} + d_l)),    z_0 = x.

``sbn-200-200-200`` is the MNIST model of the VIMCO and NVIL papers. Its q cannot be reparameterized: train it
with ``estimator="vimco"`` or ``"rws"``. ``CategoricalLayer`` gives groups of one-hot categorical units for
the same interface.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, OneHotCategorical, constraints

from iwae.models.latent import DeepLatentModel
from iwae.models.layers import BernoulliLayer, FactorisedBernoulli, glorot_init_, mlp
from iwae.settings import SettingError, check_integer

_SBN_NAME = re.compile(r"sbn(-[1-9][0-9]*)+")


class BernoulliPrior(nn.Module):
    """A factorised Bernoulli prior over ``dim`` binary units with learned logits (zero at start)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(dim))

    def forward(self) -> Distribution:
        return FactorisedBernoulli(self.logits)


class OneHotGroups(Distribution):
    """``groups`` independent categorical variables of ``categories`` values each, one-hot encoded and
    concatenated into one event of size groups * categories. ``logits``: shape (*batch, groups * categories)."""

    arg_constraints: ClassVar = {"logits": constraints.real_vector}
    support = constraints.independent(constraints.boolean, 1)
    has_enumerate_support = True

    def __init__(self, logits: Tensor, categories: int) -> None:
        if logits.shape[-1] % categories:
            raise ValueError(f"logits' last dimension {logits.shape[-1]} is not a multiple of {categories} categories")
        self.logits, self.categories = logits, categories
        grouped = logits.unflatten(-1, (-1, categories))
        self._base = Independent(OneHotCategorical(logits=grouped, validate_args=False), 1)
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=False)

    @property
    def mean(self) -> Tensor:
        return self._base.mean.flatten(-2)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        return self._base.sample(sample_shape).flatten(-2)

    def log_prob(self, value: Tensor) -> Tensor:
        return self._base.log_prob(value.unflatten(-1, (-1, self.categories)))

    def enumerate_support(self, expand: bool = True) -> Tensor:
        """Every joint value of the groups, shape (categories**groups, event) (batch dimensions not added)."""
        groups = self.event_shape[0] // self.categories
        eye = torch.eye(self.categories, dtype=self.logits.dtype, device=self.logits.device)
        values = itertools.product(range(self.categories), repeat=groups)
        return torch.stack([torch.cat([eye[i] for i in value]) for value in values])


class CategoricalLayer(nn.Module):
    """``groups`` one-hot categorical variables of ``categories`` values each, with logits linear in the input
    (a tanh MLP of widths ``hidden`` first, if given); event size groups * categories."""

    def __init__(self, in_dim: int, hidden: Sequence[int], groups: int, categories: int) -> None:
        super().__init__()
        self.body = mlp(in_dim, hidden)
        self.logits = nn.Linear(hidden[-1] if hidden else in_dim, groups * categories)
        self.categories = categories

    def forward(self, h: Tensor) -> Distribution:
        return OneHotGroups(self.logits(self.body(h)), self.categories)


def value_count(dist: Distribution) -> int:
    """The number of values of a discrete latent layer's distribution: 2^d for d Bernoulli units
    (``Independent(Bernoulli, 1)``), categories^groups for ``OneHotGroups``.

    Raises:
      ValueError: for any other distribution (continuous latents have no finite set of values).
    """
    if isinstance(dist, OneHotGroups):
        return dist.categories ** (dist.event_shape[0] // dist.categories)
    if isinstance(dist, Independent) and isinstance(dist.base_dist, Bernoulli) and len(dist.event_shape) == 1:
        return 2 ** dist.event_shape[0]
    kind = type(dist).__name__ + (f"({type(dist.base_dist).__name__})" if isinstance(dist, Independent) else "")
    raise ValueError(f"a latent layer's distribution is {kind}, which has no finite set of values; enumerating "
                     "the latents needs Bernoulli or one-hot categorical layers")


def enumerate_values(dist: Distribution) -> Tensor:
    """Every value of a discrete latent layer's distribution (see ``value_count``): shape (count, d), in the
    distribution's dtype; binary vectors in the order of the integers they write (first unit lowest)."""
    if isinstance(dist, OneHotGroups):
        return dist.enumerate_support()
    value_count(dist)  # raises for anything but Bernoulli units
    d, probs = dist.event_shape[0], dist.base_dist.probs
    bits = torch.arange(2**d, device=probs.device).unsqueeze(-1) >> torch.arange(d, device=probs.device)
    return (bits & 1).to(probs.dtype)


def sbn_widths(name: str) -> list[int]:
    """The stochastic layers' widths, bottom-up, of a model name such as ``sbn-200-200-200``."""
    if not _SBN_NAME.fullmatch(name):
        raise ValueError(f"unknown model {name!r}; write burda (with --layers) or sbn-H1-...-HL with widths of at "
                         "least 1, e.g. sbn-200-200-200")
    return [int(width) for width in name.split("-")[1:]]


def sbn(widths: Sequence[int], x_dim: int = 784, train_mean: Tensor | None = None) -> DeepLatentModel:
    """A sigmoid belief network with binary stochastic layers of the given widths (bottom-up), linear
    conditionals in p and q, Glorot-uniform weights and zero biases.

    Args:
      widths: units per stochastic layer, bottom-up, e.g. (200, 200, 200).
      x_dim: data dimension.
      train_mean: optional training-set means, shape (x_dim,); if given, p(x | z_1)'s bias is set to their
        logit (clipped to [0.001, 0.999]).
    """
    x_dim = check_integer(x_dim, "x_dim", 1)
    if isinstance(widths, str) or not isinstance(widths, Iterable) or not len(widths := list(widths)):
        raise SettingError("{0} must be a sequence of at least one layer width, e.g. (200, 200); got {value!r}",
                           ("widths",), value=widths)
    widths = [check_integer(width, "each of widths", 1) for width in widths]
    dims = [x_dim, *widths]
    encoder = [BernoulliLayer(below, (), above) for below, above in itertools.pairwise(dims)]
    decoder = [BernoulliLayer(above, (), below) for below, above in itertools.pairwise(dims)]
    model = DeepLatentModel(encoder, decoder, BernoulliPrior(widths[-1]), x_dim=x_dim)
    glorot_init_(model)
    if train_mean is not None:
        model.decoder[0].set_output_bias(train_mean)
    return model
