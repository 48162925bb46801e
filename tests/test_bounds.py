"""Bounds against float64 references, at random and extreme log-weights, and their limits."""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from iwae.core import bounds
from iwae.core.objectives import Objective


def reference(name: str, log_w: np.ndarray, param: float | int | None = None) -> np.ndarray:
    """The bounds written directly from their definitions, in float64 numpy with scipy's logsumexp."""
    k = log_w.shape[0]
    if name == "elbo":
        return log_w.mean(0)
    if name == "iwae":
        return logsumexp(log_w, 0) - np.log(k)
    if name == "miwae":
        groups = log_w.reshape(param, k // param, *log_w.shape[1:])
        return (logsumexp(groups, 1) - np.log(k // param)).mean(0)
    if name == "ciwae":
        return param * reference("elbo", log_w) + (1 - param) * reference("iwae", log_w)
    return (logsumexp((1 - param) * log_w, 0) - np.log(k)) / (1 - param)


CASES = [("elbo", None), ("iwae", None), ("miwae", 4), ("ciwae", 0.3), ("vr", 0.5), ("vr", -2.0), ("vr", 3.0)]


def call(name: str, log_w: torch.Tensor, param: float | int | None) -> torch.Tensor:
    fn = getattr(bounds, name)
    return fn(log_w) if param is None else fn(log_w, param)


def log_weight_sets(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (20, 7)
    return [
        torch.randn(shape, generator=g, dtype=torch.float64) * 3 - 100,  # typical: a spread of a few nats
        torch.empty(shape, dtype=torch.float64).uniform_(-1e5, 1e3, generator=g),  # spread over the whole range
        torch.full(shape, -1e5, dtype=torch.float64) + torch.rand(shape, generator=g, dtype=torch.float64),
        torch.full(shape, 1e3, dtype=torch.float64) - torch.rand(shape, generator=g, dtype=torch.float64),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "param"), CASES)
def test_bounds_match_float64_reference(name: str, param: float | int | None, dtype: torch.dtype) -> None:
    eps = torch.finfo(dtype).eps
    for log_w64 in log_weight_sets(dtype):
        log_w = log_w64.to(dtype)
        # The reference sees the same (rounded) inputs; the tolerance is a few ulps of the largest magnitude,
        # amplified by 1/|1 - alpha| for the Renyi bound, which divides by it.
        expected = reference(name, log_w.double().numpy(), param)
        scale = 1 / abs(1 - param) if name == "vr" else 1.0
        got = call(name, log_w, param)
        assert got.dtype == dtype and got.shape == log_w.shape[1:]
        tol = 8 * eps * max(1.0, float(log_w64.abs().max())) * scale
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "param"), CASES)
def test_gradients_finite_at_extremes(name: str, param: float | int | None, dtype: torch.dtype) -> None:
    for log_w in log_weight_sets(dtype):
        log_w = log_w.to(dtype).requires_grad_()
        call(name, log_w, param).sum().backward()
        assert torch.isfinite(log_w.grad).all()


def test_special_cases_agree() -> None:
    log_w = torch.randn(12, 5, dtype=torch.float64) * 4
    torch.testing.assert_close(bounds.miwae(log_w, 1), bounds.iwae(log_w))
    torch.testing.assert_close(bounds.miwae(log_w, 12), bounds.elbo(log_w))
    torch.testing.assert_close(bounds.ciwae(log_w, 0.0), bounds.iwae(log_w))
    torch.testing.assert_close(bounds.ciwae(log_w, 1.0), bounds.elbo(log_w))
    torch.testing.assert_close(bounds.vr(log_w, 0.0), bounds.iwae(log_w))
    torch.testing.assert_close(bounds.vr(log_w, 1.0), bounds.elbo(log_w))
    assert torch.equal(bounds.vr(log_w, -math.inf), log_w.amax(0))
    assert torch.equal(bounds.iwae(log_w[:1]), log_w[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vr_limits(dtype: torch.dtype) -> None:
    """alpha -> 1 approaches the ELBO at rate (1 - alpha) Var(log w) / 2; alpha -> -inf approaches the max."""
    log_w = (torch.randn(50, 6, dtype=torch.float64) * 2 - 300).to(dtype)
    centred = log_w.double() - log_w.double().mean(0)
    elbo, var = bounds.elbo(log_w).double(), centred.pow(2).mean(0)
    for delta in (1e-1, 1e-2, 1e-3, -1e-2):
        got = bounds.vr(log_w, 1 - delta).double()
        # the next terms of the cumulant expansion, plus a few ulps of the log-weights' magnitude
        slack = delta**2 * centred.abs().pow(3).mean(0) + 20 * torch.finfo(dtype).eps * log_w.abs().max()
        assert ((got - elbo - delta * var / 2).abs() <= slack).all()
    for alpha in (-1e3, -1e5):
        gap = log_w.amax(0).double() - bounds.vr(log_w, alpha).double()
        assert (gap >= -1e-3).all() and (gap <= math.log(50) / abs(1 - alpha) + 1e-3).all()
    # orders so large that (1 - alpha) log w overflows the dtype: the max and the min, and their one-hot weights
    for alpha, extreme in ((-1e37, log_w.amax(0)), (1e37, log_w.amin(0))):
        torch.testing.assert_close(bounds.vr(log_w, alpha), extreme)
        weights = Objective("vr", 50, alpha=alpha).weights(log_w)[0]
        assert torch.equal(weights, (log_w == extreme).to(dtype))


def test_vr_is_non_increasing_in_alpha() -> None:
    log_w = torch.randn(30, 8, dtype=torch.float64) * 3
    alphas = [-math.inf, -10.0, -1.0, 0.0, 0.5, 0.99, 1.0, 2.0, 10.0]
    values = torch.stack([bounds.vr(log_w, a) for a in alphas])
    assert (values[1:] <= values[:-1] + 1e-12).all()


def test_invalid_arguments_name_the_problem() -> None:
    log_w = torch.zeros(6, 2)
    with pytest.raises(ValueError, match="non-empty sample dimension"):
        bounds.iwae(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="non-empty sample dimension"):
        bounds.elbo(torch.tensor(1.0))
    with pytest.raises(ValueError, match="m must be a positive integer dividing"):
        bounds.miwae(log_w, 4)
    with pytest.raises(ValueError, match="m must be a positive integer dividing"):
        bounds.miwae(log_w, 0)
    with pytest.raises(ValueError, match="m must be a positive integer dividing"):
        bounds.miwae(log_w, True)
    torch.testing.assert_close(bounds.miwae(log_w, np.int64(2)), bounds.miwae(log_w, 2))  # numpy's integers too
    for beta in (1.5, None, "0.5"):
        with pytest.raises(ValueError, match=re.escape(f"beta must be a number in [0, 1]; got beta={beta!r}")):
            bounds.ciwae(log_w, beta)
    for alpha in (math.nan, math.inf, None, "0.5"):
        with pytest.raises(ValueError, match=re.escape(f"alpha must be a real number or -inf; got alpha={alpha!r}")):
            bounds.vr(log_w, alpha)
    assert torch.equal(bounds.ciwae(log_w, torch.tensor(0.3)), bounds.ciwae(log_w, 0.3))  # a tensor's number
    assert torch.equal(bounds.vr(log_w, torch.tensor(0.3)), bounds.vr(log_w, 0.3))
    for bound in (bounds.elbo, bounds.iwae, functools.partial(bounds.vr, alpha=0.5)):
        with pytest.raises(ValueError, match=re.escape("log_w must be a torch.Tensor of log weights, shape (K, "
                                                       "*batch); got a list: give torch.as_tensor(log_w)")):
            bound([1.0, 2.0])
        with pytest.raises(ValueError, match=re.escape("log_w must hold floating-point log weights; got torch.int64: "
                                                       "give log_w.double()")):
            bound(torch.zeros(5, 3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_weights_give_the_limits_not_nan(dtype: torch.dtype) -> None:
    """A zero-probability sample (log w = -inf): every bound stays what its definition gives, never nan.

    Column 0 holds one zero weight among finite ones, column 1 only zero weights. With a zero weight the
    ELBO is -inf, IWAE and VR with alpha < 1 only lose that sample, VR with alpha > 1 (which averages w^(1 - alpha))
    is -inf, and with only zero weights every bound is -inf.
    """
    log_w = torch.tensor([[-math.inf, -math.inf], [0.3, -math.inf], [-2.0, -math.inf]], dtype=dtype)
    finite = log_w[1:, :1]
    expected = {
        ("iwae", None): bounds.iwae(finite)[0] - math.log(3 / 2),
        ("elbo", None): -math.inf,
        ("ciwae", 0.0): bounds.iwae(finite)[0] - math.log(3 / 2),
        ("ciwae", 1.0): -math.inf,
        ("ciwae", 0.3): -math.inf,
        ("vr", 0.0): bounds.iwae(finite)[0] - math.log(3 / 2),
        ("vr", 0.5): bounds.vr(finite, 0.5)[0] - math.log(3 / 2) / 0.5,
        ("vr", -1.0): bounds.vr(finite, -1.0)[0] - math.log(3 / 2) / 2.0,
        ("vr", 2.0): -math.inf,
        ("vr", 1.0 + 1e-6): -math.inf,
        ("vr", -math.inf): 0.3,
    }
    for (name, param), value in expected.items():
        got = call(name, log_w, param)
        assert got.dtype == dtype
        torch.testing.assert_close(got, torch.tensor([float(value), -math.inf], dtype=dtype), msg=f"{name} {param}")
