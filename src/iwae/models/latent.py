"""A deep latent-variable model with L stochastic layers, and its log importance weights.

    p(x, z_1..z_L) = p(z_L) prod_{l=1..L} p(z_{l-1} | z_l),     z_0 = x,
    q(z_1..z_L | x) = prod_{l=1..L} q(z_l | z_{l-1}),

    log w = log p(x, z_1..z_L) - log q(z_1..z_L | x).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal
from torch.func import functional_call

from iwae.settings import check_samples


@dataclass
class LatentSample:
    """K draws from q for a batch: ``z[l]`` has shape (K, B, d_l), and ``q[l]`` is the distribution
    q(z_l | z_{l-1}) each was drawn from (with the encoder's parameters attached). ``reparameterized``: every
    z_l was drawn with ``rsample`` (so it carries a gradient path to q's parameters); otherwise the draws of
    the non-reparameterizable layers (e.g. Bernoulli) are constants."""

    z: list[Tensor]
    q: list[Distribution]
    reparameterized: bool = True


class DeepLatentModel(nn.Module):
    """A latent-variable model from conditional layers that return ``torch.distributions`` objects.

    Args:
      encoder: q's layers, bottom-up: ``encoder[l](z_l)`` is q(z_{l+1} | z_l), with z_0 = x. Each returns a
        distribution with event shape (d_{l+1},): reparameterizable (``has_rsample``) for the standard, STL
        and DReG estimators, or any (e.g. Bernoulli) for the score-function estimators VIMCO and RWS.
      decoder: p's conditional layers, bottom-up: ``decoder[l](z_{l+1})`` is p(z_l | z_{l+1}), with z_0 = x.
      prior: a module called with no input that returns p(z_L).
      x_dim: the data's dimension D, if known: ``as_input`` then refuses data of another dimension, naming both.

    ``self.encoder`` holds all of q's parameters and ``self.decoder`` all of p's: the conditionals
    (``self.conditionals``), then the prior (``self.prior``), under the parameter names decoder.<l>.* that
    checkpoints use.
    """

    def __init__(self, encoder: Sequence[nn.Module], decoder: Sequence[nn.Module], prior: nn.Module, *,
                 x_dim: int | None = None) -> None:
        super().__init__()
        if len(encoder) != len(decoder) or not encoder:
            raise ValueError(
                f"need one decoder layer per encoder layer, at least one of each; got {len(encoder)} encoder "
                f"and {len(decoder)} decoder layers"
            )
        self.encoder = nn.ModuleList(encoder)
        self.decoder = nn.ModuleList([*decoder, prior])
        self._support_checked = False
        self.x_dim = x_dim

    def as_input(self, x: Tensor) -> Tensor:
        """``x`` checked to fit the model: vectors of the model's dimension ``x_dim`` (if known) along its last
        dimension, with at least one batch dimension before it (B, D; a stack of seeds adds one, which ``as_batch``
        refuses), and of its parameters' dtype, cast to it where every value stays the same (integers or bools, and
        0/1 or 8-bit data in float64).

        Raises:
            ValueError: naming the type, shape, x_dim, dtype or device and the fix, rather than a failure
                deep inside torch.
        """
        if not isinstance(x, Tensor):
            raise ValueError(f"x is a {type(x).__module__}.{type(x).__qualname__}, not a torch.Tensor; give "
                             "torch.as_tensor(x, dtype=torch.float32)")
        device = next((p.device for p in self.parameters()), x.device)
        if x.device != device:
            raise ValueError(f"x is on {x.device}, the model's parameters on {device}; give x.to({str(device)!r})")
        if x.dim() < 2:
            raise _not_a_batch(x)
        if self.x_dim is not None and x.shape[-1] != self.x_dim:
            fix = (": x.flatten(1) flattens each example" if math.prod(x.shape[1:]) == self.x_dim
                   else f", or build the model for x_dim={x.shape[-1]}")
            raise ValueError(f"x has shape {tuple(x.shape)}, but the model is built for data of dimension "
                             f"x_dim={self.x_dim}; give x of shape (B, {self.x_dim}){fix}")
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), None)
        if dtype is None or x.dtype == dtype:
            return x
        cast = x.to(dtype) if not x.is_complex() else None
        if cast is None or not torch.equal(cast.to(x.dtype), x):
            move = (f", or move the model to {_name(x.dtype)} with model.to({x.dtype})" if x.is_floating_point()
                    else "")
            raise ValueError(f"x is {_name(x.dtype)}, the model's parameters {_name(dtype)}, and not every value of x "
                             f"is exact in {_name(dtype)}; give x.to({dtype}){move}")
        return cast

    def as_batch(self, x: Tensor) -> Tensor:
        """``x`` as ``as_input`` takes it, and one batch of examples (B, D), not a stack of them: the input of an
        estimate per example, or of a statistic over the examples.

        Raises:
            ValueError: for ``as_input``'s reasons, or for a stack of batches, naming its shape and the fix.
        """
        x = self.as_input(x)
        if x.dim() > 2:
            raise _not_a_batch(x)
        return x

    @property
    def prior(self) -> nn.Module:
        """The prior's module: ``prior()`` is p(z_L)."""
        return self.decoder[-1]

    @property
    def conditionals(self) -> list[nn.Module]:
        """p's conditional layers, bottom-up: ``conditionals[l](z_{l+1})`` is p(z_l | z_{l+1}), with z_0 = x."""
        return list(self.decoder)[:-1]

    def sample_posterior(self, x: Tensor, k: int, detach: bool = False) -> LatentSample:
        """Draw k samples of z_1..z_L from q(z | x) for a batch x of shape (B, D): with ``rsample`` where q's
        layer has it, else with ``sample`` (no gradient path; see ``LatentSample.reparameterized``). With
        ``detach`` every z_l is a constant (as score-function estimators need), and so is the input of
        q(z_{l+1} | z_l)."""
        k = check_samples(k)
        h, zs, qs = x, [], []
        for index, layer in enumerate(self.encoder):
            q = _over_vectors(layer(h), f"encoder[{index}]")
            draw = q.rsample if q.has_rsample and not detach else q.sample
            h = draw((k,)) if h is x else draw()
            zs.append(h)
            qs.append(q)
        return LatentSample(zs, qs, all(q.has_rsample for q in qs) and not detach)

    def log_joint(self, x: Tensor, z: Sequence[Tensor]) -> Tensor:
        """log p(x, z_1..z_L), shape (K, B), for latents of shape (K, B, d_l)."""
        log_p = _over_vectors(self.prior(), "the prior").log_prob(z[-1])
        for index, (layer, target, given) in enumerate(zip(self.conditionals, [x, *z[:-1]], z, strict=True)):
            p = _over_vectors(layer(given), f"decoder[{index}]")
            if target is x:
                self._check_support(p, x)
            log_p = log_p + p.log_prob(target)
        return log_p

    def _check_support(self, p_x: Distribution, x: Tensor) -> None:
        """Warn if the data lie outside the support of p(x | z), e.g. grey levels for a Bernoulli decoder:
        checked on the first batch this model sees (one check, so training steps never wait for it). Compiled,
        nothing is checked and the flag is not read, so that a compiled program does not depend on it (a guard on
        it would compile the program again once the first eager call has set it)."""
        if torch.compiler.is_compiling() or self._support_checked:
            return
        self._support_checked = True
        try:
            inside = bool(p_x.support.check(x).all())
        except (NotImplementedError, ValueError):  # a support that depends on the parameters
            return
        if not inside:
            base = getattr(p_x, "base_dist", p_x)
            warnings.warn(
                f"the data x lie outside the support of p(x | z), a {type(base).__name__} (for a Bernoulli: values "
                "other than 0 and 1), so log p(x, z) and the bounds are not log-likelihoods; binarize x first, "
                "e.g. iwae.data.binarize(x), which draws x_bin ~ Bernoulli(x)",
                UserWarning, stacklevel=4,  # the caller of loss() or log_weights()
            )

    def log_posterior(self, x: Tensor, sample: LatentSample, stop_gradient: bool = False) -> Tensor:
        """log q(z_1..z_L | x), shape (K, B), at the sample's latents.

        With ``stop_gradient`` the encoder's parameters are held constant (their gradient is not taken),
        while the gradient with respect to every z_l is kept: the "sticking the landing" form of log q
        (Roeder et al. 2017), which for l >= 2 re-evaluates q(z_l | z_{l-1}) with frozen parameters.
        """
        z = sample.z
        log_q = torch.zeros((), dtype=x.dtype, device=x.device)
        for layer, q, given, value in zip(self.encoder, sample.q, [x, *z[:-1]], z, strict=True):
            if stop_gradient:
                q = _frozen(layer, given, q)
            log_q = log_q + q.log_prob(value)
        return log_q

    def log_weights(self, x: Tensor, k: int) -> Tensor:
        """log w_i = log p(x, z_i) - log q(z_i | x) for k draws z_i ~ q(z | x); shape (k, B). ``x`` as
        ``as_input`` takes it."""
        x = self.as_input(x)
        sample = self.sample_posterior(x, k)
        return self.log_joint(x, sample.z) - self.log_posterior(x, sample)


def _over_vectors(dist: Distribution, layer: str) -> Distribution:
    """``dist``, the distribution ``layer`` returned, checked to be one over vectors (event shape (d,)), whose
    ``log_prob`` sums over a latent's or an example's units."""
    if not isinstance(dist, Distribution) or len(dist.event_shape) != 1:
        what = (f"a distribution of event shape {tuple(dist.event_shape)}" if isinstance(dist, Distribution)
                else f"a {type(dist).__name__}")
        raise ValueError(f"{layer} returned {what}, not a distribution over vectors (event shape (d,)), whose "
                         "log_prob sums over the units; wrap an elementwise one in Independent(..., 1), e.g. "
                         "Independent(Normal(loc, scale), 1)")
    return dist


def _not_a_batch(x: Tensor) -> ValueError:
    """The error for data ``x`` that is not one batch of vectors (B, D), with the fix for its shape."""
    fix = "x[None] for a single example" if x.dim() < 2 else "x.flatten(0, -2) joins a stack of batches into one"
    return ValueError(f"x has shape {tuple(x.shape)}; give a batch of examples of shape (B, D): {fix}")


def _name(dtype: torch.dtype) -> str:
    """``dtype`` as torch names it, without the module: float32, int64."""
    return str(dtype).removeprefix("torch.")


def _frozen(layer: nn.Module, given: Tensor, q: Distribution) -> Distribution:
    """``q = layer(given)`` with the layer's parameters detached; differentiable in ``given`` only. Where ``given``
    is a constant (x), that is ``q`` with its parameters detached (for Gaussians; other kinds are re-evaluated
    without autograd), so the layer is not evaluated a second time."""
    if not given.requires_grad:
        detached = _detached(q)
        if detached is not None:
            return detached
        with torch.no_grad():
            return layer(given)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    return functional_call(layer, params, (given,))


def _detached(q: Distribution) -> Distribution | None:
    """A Gaussian ``q`` (``Normal``, or ``Independent`` over one) with its parameters detached; None otherwise."""
    if isinstance(q, Independent):
        base = _detached(q.base_dist)
        return None if base is None else Independent(base, q.reinterpreted_batch_ndims, validate_args=False)
    if isinstance(q, Normal):
        return Normal(q.loc.detach(), q.scale.detach(), validate_args=False)
    return None
