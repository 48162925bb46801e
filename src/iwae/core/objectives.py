"""Training objectives and their gradient estimators, as surrogate losses for one backward pass.

For a bound L(log w) of the K log-weights log w_i = log p_theta(x, z_i) - log q_phi(z_i | x), with
z_i = z(eps_i; phi) reparameterized, write a_i = dL/d(log w_i). Then

    generative network:  grad_theta L = sum_i a_i grad_theta log w_i                     (every estimator)
    inference network:
      standard:  sum_i a_i (d log w_i/dz_i  dz_i/dphi  -  d log q_phi(z_i|x)/dphi)     (path + score)
      stl:       sum_i a_i  d log w_i/dz_i  dz_i/dphi                                   (Roeder et al. 2017)
      dreg:      sum_i (a_i - da_i/d(log w_i))  d log w_i/dz_i  dz_i/dphi             (Tucker et al. 2018)

where d log w_i/dz_i is taken with q's parameters held constant. DReG rewrites the score term by
reparameterizing it a second time, so it has the same expectation as the standard gradient; for the IWAE
bound its weights are a_i = w~_i and a_i - da_i/dlog w_i = w~_i^2, w~ the normalized weights. STL drops
the score term and is unbiased for the ELBO only.

The surrogate puts weight a_i on log p(x, z_i) (which carries theta's gradient) and the inference weight on
log q(z_i | x); where the inference weights differ from a_i (DReG, PIWAE), a gradient hook rescales the
path gradient d log p/dz_i by their ratio. So each estimator costs one forward and one backward pass, for
any number of stochastic layers; STL and DReG re-evaluate q(z_l | z_{l-1}) for l >= 2 with frozen
parameters in the forward pass, and nothing else.

Requires: a reparameterizable q (``rsample``) for these three estimators. For a q that cannot be
reparameterized (discrete latents) the score-function estimators ``vimco`` and ``rws`` of
``iwae.core.score_function`` train the IWAE bound; ``loss`` dispatches to them.
Limitation: the rescaling divides by a_i, so for PIWAE a sample whose share of the total weight is below the
dtype's smallest normal number (about 1e-38 in float32), where the ratio could overflow, passes no path gradient
to the inference network.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from iwae.core import bounds, score_function
from iwae.models.latent import DeepLatentModel
from iwae.settings import SettingError, check_examples, check_samples, plain_number

OBJECTIVES = ("elbo", "iwae", "miwae", "ciwae", "piwae", "vr")
# the objectives that read each of ``Objective``'s settings beyond k (the others ignore it)
SETTING_READERS = {"m": ("miwae", "piwae"), "beta": ("ciwae",), "alpha": ("vr",)}
REPARAMETERIZED_ESTIMATORS = ("standard", "stl", "dreg")
ESTIMATORS = REPARAMETERIZED_ESTIMATORS + score_function.ESTIMATORS


@dataclass(frozen=True)
class Objective:
    """A training objective and its parameters.

    Attributes:
      name: "elbo" (K-sample ELBO), "iwae", "miwae" (m groups of K/m), "ciwae" (beta), "piwae" (inference
        network on MIWAE(m, K/m), generative network on IWAE(K); Rainforth et al. 2018) or "vr" (alpha).
      k: total number of samples K per example.
      m: number of groups, for miwae and piwae.
      beta: the ELBO's weight, for ciwae.
      alpha: the Renyi order, for vr (-inf is VR-max).
    """

    name: str = "iwae"
    k: int = 50
    m: int = 1
    beta: float = 0.5
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise SettingError("unknown {0} {name!r}; choose one of {known}", ("objective",), name=self.name,
                               known=", ".join(OBJECTIVES))
        object.__setattr__(self, "m", plain_number(self.m))  # numpy's integers too, as plain ints
        object.__setattr__(self, "k", check_samples(self.k))
        for name in ("beta", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise SettingError("{0} must be a real number; got {0}={value!r}", (name,), value=value)
        _refuse_unread(self.name, [name for name in SETTING_READERS if getattr(self, name) != _DEFAULTS[name]])
        if self.name in SETTING_READERS["m"] and (isinstance(self.m, bool) or not isinstance(self.m, int)
                                                  or self.m < 1 or self.k % self.m):
            raise SettingError("{0} must be a positive integer dividing {1} for {name}; got {0}={m}, {1}={k}",
                               ("m", "k"), name=self.name, m=self.m, k=self.k)
        if self.name == "ciwae" and not 0.0 <= self.beta <= 1.0:
            raise SettingError("{0} must lie in [0, 1] for ciwae; got {0}={beta}", ("beta",), beta=self.beta)
        if self.name == "vr" and (math.isnan(self.alpha) or self.alpha == math.inf):
            raise SettingError("{0} must be a real number or -inf for vr; got {0}={alpha}", ("alpha",),
                               alpha=self.alpha)

    def bound(self, log_w: Tensor) -> Tensor:
        """The bound the generative network is trained on, per example (PIWAE: IWAE_K)."""
        if self.name in ("iwae", "piwae"):
            return bounds.iwae(log_w)
        if self.name == "elbo":
            return bounds.elbo(log_w)
        if self.name == "miwae":
            return bounds.miwae(log_w, self.m)
        if self.name == "ciwae":
            return bounds.ciwae(log_w, self.beta)
        return bounds.vr(log_w, self.alpha)

    def check_estimator(self, estimator: str, reparameterized: bool = True) -> None:
        """Raise SettingError unless ``estimator`` names an estimator defined for this objective and for a q
        that is (``reparameterized``) or is not (discrete latents) reparameterizable."""
        if estimator not in ESTIMATORS:
            raise SettingError("unknown {0} {name!r}; choose one of {known}", ("estimator",), name=estimator,
                               known=", ".join(ESTIMATORS))
        if estimator in score_function.ESTIMATORS:
            if self.name != "iwae":
                raise SettingError("{0} {estimator} is defined for {1} iwae only; give {1} iwae (got {name})",
                                   ("estimator", "objective"), estimator=estimator, name=self.name)
            if estimator == "vimco":
                score_function.check_vimco_samples(self.k)
        elif not reparameterized:
            raise SettingError("{0} {estimator} needs a reparameterizable q (rsample), and this model's q has "
                               "discrete latents; use {0} vimco or rws", ("estimator",), estimator=estimator)
        if estimator == "dreg" and self.name == "vr" and self.alpha == -math.inf:
            raise SettingError("dreg has no form for the VR-max bound (vr with {1}=-inf), so it has no DReG "
                               "estimator; use {0} standard or stl", ("estimator", "alpha"))

    def weights(self, log_w: Tensor, inference: bool = False) -> tuple[Tensor, Tensor | None]:
        """(a, d): a_i = dL/d(log w_i) and the DReG weight d_i = a_i - d a_i / d(log w_i), shape (K, *batch).

        L is the generative network's bound, or with ``inference`` the inference network's (they differ
        for PIWAE only). d is None where the bound has no doubly reparameterized form (VR-max).
        """
        name, k = self.name, log_w.shape[0]
        if name == "piwae":
            name = "miwae" if inference else "iwae"
        if name == "elbo" or (name == "vr" and self.alpha == 1.0):
            a = torch.full_like(log_w, 1.0 / k)
            return a, a
        if name == "iwae":
            w = _normalized(log_w)
            return w, w * w
        if name == "miwae":
            w = _normalized(bounds.group_samples(log_w, self.m)).transpose(0, 1).reshape(log_w.shape)
            return w / self.m, w * w / self.m
        if name == "ciwae":
            w = _normalized(log_w)
            return self.beta / k + (1 - self.beta) * w, self.beta / k + (1 - self.beta) * w * w
        if self.alpha == -math.inf:
            return torch.nn.functional.one_hot(log_w.argmax(0), k).movedim(-1, 0).to(log_w.dtype), None
        v = _normalized(bounds.renyi_exponents(log_w, self.alpha)[0])
        return v, self.alpha * v + (1.0 - self.alpha) * v * v


def _normalized(log_w: Tensor) -> Tensor:
    """The normalized weights softmax(log w) along dim 0: 0, not nan, where every log-weight is -inf (a bound
    that is -inf there; for MIWAE a group of zero weights, beside others that keep its bound finite)."""
    return torch.where(log_w.amax(0) == -math.inf, 0.0, torch.softmax(log_w, 0))


# the settings' defaults, which an objective that does not read a setting must leave it at
_DEFAULTS = {name: Objective.__dataclass_fields__[name].default for name in SETTING_READERS}


class Loss(NamedTuple):
    """``loss``: a scalar whose gradient is the estimator's and whose value is minus the (mean or summed)
    bound; ``bound``: the bound per example, shape (B,), detached; ``log_w``: shape (K, B), detached."""

    loss: Tensor
    bound: Tensor
    log_w: Tensor


def _scale_path_gradient(z: Tensor, ratio: Tensor) -> None:
    """Multiply the gradient arriving at ``z`` (shape (K, B, ...)) by ``ratio`` (shape (K, B)) per sample."""
    z.register_hook(lambda grad: grad * ratio.reshape(ratio.shape + (1,) * (grad.dim() - ratio.dim())))


def loss(
    model: DeepLatentModel,
    x: Tensor,
    objective: str | Objective = "iwae",
    k: int | None = None,
    estimator: str = "dreg",
    *,
    m: int | None = None,
    beta: float | None = None,
    alpha: float | None = None,
    reduction: str = "mean",
) -> Loss:
    """The surrogate loss for ``objective`` on a batch ``x`` (B, D), with ``estimator``'s gradient.

    Args:
      model: a ``DeepLatentModel`` (or any module with its ``sample_posterior``, ``log_joint`` and
        ``log_posterior``).
      x: a batch of data, shape (B, D): checked and cast by ``DeepLatentModel.as_input``.
      objective: an ``Objective``, or its name: then ``k`` (default 50), ``m``, ``beta`` and ``alpha`` (those
        the objective reads; ``Objective``'s defaults) configure it. An ``Objective`` carries its own, and is
        refused with any of them.
      estimator: "standard", "stl" or "dreg" (the inference network's gradient), or for a q that cannot be
        reparameterized, "vimco" or "rws" (see ``iwae.core.score_function``; objective iwae only).
      reduction: "mean" or "sum" of the per-example bounds (Burda et al. use the sum over a batch).

    Returns ``Loss(loss, bound, log_w)``.
    """
    obj = _objective(objective, k=k, m=m, beta=beta, alpha=alpha)
    obj.check_estimator(estimator)
    if isinstance(model, DeepLatentModel):
        x = model.as_input(x)
    check_examples(x)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    if estimator in score_function.ESTIMATORS:
        sample = model.sample_posterior(x, obj.k, detach=True)
        log_p, log_q = model.log_joint(x, sample.z), model.log_posterior(x, sample)
        surrogate = score_function.SURROGATES[estimator](log_p, log_q)
        log_w = (log_p - log_q).detach()
        return _loss(surrogate, obj.bound(log_w), log_w, reduction)

    sample = model.sample_posterior(x, obj.k)
    obj.check_estimator(estimator, sample.reparameterized)
    rescaled = (estimator == "dreg" and obj.name != "elbo") or obj.name == "piwae"
    z = [z.view_as(z) for z in sample.z] if rescaled else sample.z
    log_p = model.log_joint(x, z)
    log_q = model.log_posterior(x, sample, stop_gradient=estimator != "standard")
    log_w = (log_p - log_q).detach()

    inference, dreg = obj.weights(log_w, inference=True)
    a = obj.weights(log_w)[0] if obj.name == "piwae" else inference  # the two bounds differ for PIWAE only
    path = dreg if estimator == "dreg" else inference
    if rescaled:
        ratio = torch.where(a >= torch.finfo(a.dtype).tiny, path / a, torch.zeros_like(a))  # else it may overflow
        for latent in z:
            _scale_path_gradient(latent, ratio)
    surrogate = score_function.weighted_sum(a, log_p) - (path * log_q).sum(0)
    return _loss(surrogate, obj.bound(log_w), log_w, reduction)


def _refuse_unread(objective: str, names: list[str]) -> None:
    """Raise SettingError for the first of the settings ``names`` that ``objective`` does not read."""
    for name in names:
        readers = SETTING_READERS.get(name, (objective,))
        if objective not in readers:
            raise SettingError("{0} applies only to objective {readers}, not {objective}; leave {0} out, or choose "
                               "the objective that reads it", (name,), readers=" or ".join(readers),
                               objective=objective)


def check_given(objective: str | Objective, **given: float | None) -> None:
    """Refuse (SettingError) the settings ``given`` (those not None, at their default values too) that the objective
    of that name does not read, and any beside an ``Objective``, which carries its own."""
    settings = [name for name, value in given.items() if value is not None]
    if not isinstance(objective, Objective):
        if objective in OBJECTIVES:  # an unknown name is Objective's to refuse
            _refuse_unread(objective, settings)
    elif settings:
        named = " and ".join(f"{{{i}}}" for i in range(len(settings)))
        raise SettingError(named + " given with an Objective, which carries its own; set them in the Objective, or "
                           "give the objective's name", tuple(settings))


def _objective(objective: str | Objective, **given: float | None) -> Objective:
    """``objective``, or the objective of that name with the settings ``given`` (those not None; k 50 unless given),
    after ``check_given``."""
    check_given(objective, **given)
    if isinstance(objective, Objective):
        return objective
    return Objective(objective, **{"k": 50, **{name: value for name, value in given.items() if value is not None}})


def _loss(surrogate: Tensor, bound: Tensor, log_w: Tensor, reduction: str) -> Loss:
    """The ``Loss`` of per-example ``surrogate``s and ``bound``s: its value minus the reduced bound (+inf where a
    bound is -inf, not the nan of -inf - -inf), its gradient the surrogates'."""
    per_example = torch.where(surrogate.isfinite(), surrogate - surrogate.detach(), 0.0) + bound
    return Loss(-(per_example.mean() if reduction == "mean" else per_example.sum()), bound, log_w)
