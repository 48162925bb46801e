"""Score-function estimators for a q that cannot be reparameterized (discrete latents), as surrogates.

For the IWAE bound L = log (1/K) sum_i w_i, w_i = p_theta(x, z_i) / q_phi(z_i | x), z_1..z_K ~ q_phi(z | x)
independently and held constant (no gradient path), the gradient of the expected bound is

    grad E[L] = E[ sum_i L grad log q_phi(z_i | x)  +  sum_i w~_i grad log w_i ],   w~_i = w_i / sum_j w_j,

its first term the score-function (REINFORCE) term. Each function here returns, per example, a surrogate
whose gradient is one estimator's, built from the K log p(x, z_i) and log q(z_i | x) (shape (K, *batch),
attached to the networks' parameters):

    vimco:  theta:  sum_i w~_i grad log p(x, z_i)          (the IWAE gradient)
            phi:    sum_i (L - L_{-i} - w~_i) grad log q(z_i | x)

with the per-sample leave-one-out baseline of Mnih & Rezende (2016), "Variational inference for Monte Carlo
objectives", eq. (10): L_{-i} = log (1/K) (sum_{j != i} w_j + w^_{-i}), where the left-out weight is replaced
by the geometric mean of the others, log w^_{-i} = (1/(K-1)) sum_{j != i} log w_j. L_{-i} does not depend on
z_i, so the estimator is unbiased for grad_phi E[L]. Requires K >= 2.

    rws:    theta:  sum_i w~_i grad log p(x, z_i)          (the IWAE gradient)
            phi:    sum_i w~_i grad log q(z_i | x)         (wake-phase q update)

the reweighted wake-sleep of Bornschein & Bengio (2015), "Reweighted wake-sleep", without the sleep phase:
q ascends a self-normalized importance-sampling estimate of E_{p(z|x)}[grad log q(z | x)] = -grad_phi
KL(p(z | x) || q(z | x)), consistent as K grows (biased for finite K), not a gradient of the bound.

Both work for any q, reparameterizable or not; their variance grows with the dimension of z.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from iwae.core import bounds
from iwae.settings import SettingError


def weighted_sum(weights: Tensor, values: Tensor) -> Tensor:
    """sum_i weights_i values_i over the samples (dim 0), a term of zero weight counting as zero even where its
    value is -inf (a sample of zero probability, log p(x, z_i) = -inf): a surrogate's value then stays finite
    wherever its bound is."""
    return torch.where(weights != 0, weights * values, 0.0).sum(0)


def check_vimco_samples(k: int) -> None:
    """Raise SettingError unless ``k`` >= 2: VIMCO's leave-one-out baseline needs another sample."""
    if k < 2:
        raise SettingError("vimco needs {0} >= 2 samples for its leave-one-out baseline; got {0}={k}", ("k",), k=k)


def _check_same_shape(log_p: Tensor, log_q: Tensor) -> None:
    """Raise ValueError unless log p(x, z_i) and log q(z_i | x) come in the same shape (K, *batch): broadcast, they
    would pair samples that were not drawn together."""
    if log_p.shape != log_q.shape:
        raise ValueError(f"log_p and log_q must have the same shape (K, *batch), one entry per sample z_i; got "
                         f"{tuple(log_p.shape)} and {tuple(log_q.shape)}")


def vimco(log_p: Tensor, log_q: Tensor) -> Tensor:
    """The VIMCO surrogate per example (see the module docstring), shape ``batch``.

    Args:
      log_p: log p(x, z_i), shape (K, *batch), K >= 2, differentiable in the generative network.
      log_q: log q(z_i | x) at the same z_i, differentiable in the inference network.
    """
    _check_same_shape(log_p, log_q)
    k = log_p.shape[0]
    check_vimco_samples(k)
    log_w = (log_p - log_q).detach()
    bound = bounds.iwae(log_w)
    weights = torch.softmax(log_w, 0)
    replaced = log_w.expand(k, *log_w.shape).clone()  # row i: the K log-weights with log w_i replaced
    diagonal = torch.arange(k, device=log_w.device)
    # log w^_{-i}: the mean of the other K-1 log-weights (summed without log w_i, not as the total minus it,
    # which is nan where log w_i = -inf), put in the place of log w_i
    replaced[diagonal, diagonal] = 0.0
    replaced[diagonal, diagonal] = replaced.sum(1) / (k - 1)
    leave_one_out = torch.logsumexp(replaced, 1) - math.log(k)
    signal = bound - leave_one_out
    return weighted_sum(weights, log_p) + ((signal - weights) * log_q).sum(0)


def rws(log_p: Tensor, log_q: Tensor) -> Tensor:
    """The reweighted wake-sleep surrogate per example (wake-phase q update; see the module docstring), shape
    ``batch``; arguments as for ``vimco``."""
    _check_same_shape(log_p, log_q)
    weights = torch.softmax((log_p - log_q).detach(), 0)
    return weighted_sum(weights, log_p + log_q)


# the surrogate of each estimator, by the name ``objectives.loss`` takes
SURROGATES = {"vimco": vimco, "rws": rws}
ESTIMATORS = tuple(SURROGATES)
