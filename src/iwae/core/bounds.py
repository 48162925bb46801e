"""Multi-sample variational bounds on log p(x), as pure functions of the log importance weights.

Every function here takes ``log_w`` of shape ``(K, *batch)``, where

    log w_i = log p(x, z_i) - log q(z_i | x),    z_i ~ q(z | x),  i = 1..K,

and returns a tensor of shape ``batch``. Each is a stochastic lower bound on log p(x) in expectation
(except ``vr`` with alpha < 0), computed stably for log-weights anywhere in [-1e5, 1e3] in float32 and
float64: weights are only ever combined through ``logsumexp``. A zero weight (log w_i = -inf, a sample of
zero probability) counts as zero: the bounds are then what their definitions give (-inf for the ELBO), never nan.

References:
  Burda, Grosse, Salakhutdinov (2016), Importance Weighted Autoencoders, ICLR.
  Rainforth et al. (2018), Tighter Variational Bounds are Not Necessarily Better, ICML.
  Li & Turner (2016), Renyi Divergence Variational Inference, NeurIPS.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def _num_samples(log_w: Tensor) -> int:
    """K, after checking that ``log_w`` is a floating-point tensor of shape (K, *batch) with K >= 1."""
    if not isinstance(log_w, Tensor):
        raise ValueError(f"log_w must be a torch.Tensor of log weights, shape (K, *batch); got a "
                         f"{type(log_w).__name__}: give torch.as_tensor(log_w)")
    if not log_w.is_floating_point():
        raise ValueError(f"log_w must hold floating-point log weights; got {log_w.dtype}: give log_w.double()")
    if log_w.dim() == 0 or log_w.shape[0] == 0:
        raise ValueError(
            f"log_w must have a non-empty sample dimension first, shape (K, *batch); got shape {tuple(log_w.shape)}"
        )
    return log_w.shape[0]


def _real(value: object) -> object:
    """A one-element tensor's number (a setting given as a tensor), else ``value`` as it is."""
    return value.item() if isinstance(value, Tensor) and value.numel() == 1 else value


def elbo(log_w: Tensor) -> Tensor:
    """The K-sample ELBO: the plain average of the log-weights (Burda et al. 2016, eq. 7).

    Approximates: E_q[log p(x, z) - log q(z|x)] <= log p(x).
    With: (1/K) sum_i log w_i.

    Args:
      log_w: log importance weights, shape (K, *batch).

    Returns:
      The bound per batch element, shape ``batch``.
    """
    _num_samples(log_w)
    return log_w.mean(0)


def iwae(log_w: Tensor) -> Tensor:
    """The K-sample importance-weighted bound (Burda et al. 2016, eq. 8).

    Approximates: L_K = E[log (1/K) sum_i w_i], with L_1 = ELBO <= L_K <= L_{K+1} <= log p(x).
    With: logsumexp_i(log w_i) - log K.

    Args:
      log_w: log importance weights, shape (K, *batch).

    Returns:
      The bound per batch element, shape ``batch``.
    """
    k = _num_samples(log_w)
    return torch.logsumexp(log_w, 0) - math.log(k)


def group_samples(log_w: Tensor, m: int) -> Tensor:
    """Reshape (m*k, *batch) log-weights into (k, m, *batch): sample i of group j is log_w[j*k + i]."""
    total = _num_samples(log_w)
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1 or total % m:
        raise ValueError(f"m must be a positive integer dividing the number of samples K={total}; got m={m!r}")
    return log_w.reshape(int(m), total // int(m), *log_w.shape[1:]).transpose(0, 1)


def miwae(log_w: Tensor, m: int) -> Tensor:
    """The multiply importance-weighted bound MIWAE(m, k) with K = m*k (Rainforth et al. 2018).

    Approximates: (1/m) sum_j E[log (1/k) sum_i w_ji], the mean of m independent k-sample IWAE bounds.
    With: group j holds samples j*k .. j*k + k - 1 of ``log_w``.
    Requires: m divides K. m = 1 is ``iwae``; m = K is ``elbo``.

    Args:
      log_w: log importance weights, shape (K, *batch).
      m: number of groups.

    Returns:
      The bound per batch element, shape ``batch``.
    """
    return iwae(group_samples(log_w, m)).mean(0)


def ciwae(log_w: Tensor, beta: float) -> Tensor:
    """The combination bound CIWAE(beta) = beta * ELBO + (1 - beta) * IWAE_K (Rainforth et al. 2018).

    Requires: 0 <= beta <= 1 (beta = 1 is ``elbo``, beta = 0 is ``iwae``).

    Args:
      log_w: log importance weights, shape (K, *batch).
      beta: weight of the ELBO.

    Returns:
      The bound per batch element, shape ``batch``.
    """
    beta = _real(beta)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1]; got beta={beta!r}")
    if beta in (0.0, 1.0):  # the end points themselves, so that 0 * (-inf) never enters (a zero weight)
        return elbo(log_w) if beta else iwae(log_w)
    return beta * elbo(log_w) + (1.0 - beta) * iwae(log_w)


def vr(log_w: Tensor, alpha: float) -> Tensor:
    """The Renyi (variational Renyi, VR-alpha) bound of Li & Turner (2016).

    Approximates: L_alpha = 1/(1 - alpha) E[log (1/K) sum_i w_i^(1 - alpha)].
    With: alpha = 0 the IWAE bound, alpha -> 1 the ELBO (taken as the limit at alpha = 1), and
    alpha = -inf the VR-max bound max_i log w_i. For alpha < 0 it is no longer a lower bound in general.

    Args:
      log_w: log importance weights, shape (K, *batch).
      alpha: the Renyi order, any real number or -inf.

    Returns:
      The bound per batch element, shape ``batch``.
    """
    alpha = _real(alpha)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or math.isnan(alpha) or alpha == math.inf:
        raise ValueError(f"alpha must be a real number or -inf; got alpha={alpha!r}")
    if alpha == -math.inf:
        _num_samples(log_w)
        return log_w.amax(0)
    if alpha == 1.0:
        return elbo(log_w)
    k = _num_samples(log_w)
    centred, dominant = renyi_exponents(log_w, alpha)
    # log (1/K) sum_i exp(centred_i), which is divided by (1 - alpha) below: near alpha = 1 the log1p form
    # keeps its relative precision; where one weight dominates, logsumexp does.
    mean_expm1 = torch.expm1(centred).mean(0)
    log_mean = torch.where(
        mean_expm1 > -0.5, torch.log1p(mean_expm1), torch.logsumexp(centred, 0) - math.log(k)
    )
    return dominant + log_mean / (1.0 - alpha)


def renyi_exponents(log_w: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """The exponents (1 - alpha)(log w_i - c) of the VR bound's sum of w_i^(1 - alpha) / w_c^(1 - alpha), and c:
    the log-weight whose power dominates the sum (the largest for alpha < 1, the smallest for alpha > 1), so that
    every exponent is at most 0 and none overflows, whatever alpha. An infinite c (only zero weights, or a zero
    weight raised to 1 - alpha < 0) is taken as 0, as logsumexp does, so that the bound is -inf there, not nan."""
    scale = 1.0 - alpha
    dominant = log_w.amax(0) if scale > 0 else log_w.amin(0)
    dominant = torch.where(dominant.isfinite(), dominant, 0.0)
    return scale * (log_w - dominant), dominant
