"""Objectives and gradient estimators against exact answers (linear-Gaussian) and slow references."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from iwae.core import bounds
from iwae.core.objectives import OBJECTIVES, SETTING_READERS, Objective, loss
from iwae.core.objectives import REPARAMETERIZED_ESTIMATORS as ESTIMATORS
from iwae.models import DeepLatentModel, LinearGaussian, burda
from iwae.settings import SettingError

PARAMS = {"m": 5, "beta": 0.3, "alpha": 0.5}


def settings_of(objective: str) -> dict:
    """The settings of ``PARAMS`` that ``objective`` reads."""
    return {name: value for name, value in PARAMS.items() if objective in SETTING_READERS[name]}


def perturbed_linear_gaussian(seed: int = 0) -> LinearGaussian:
    """A linear-Gaussian model whose q is near, but not at, the exact posterior (shifted mean, wider scale)."""
    model = LinearGaussian(8, 4, sigma=0.8, generator=torch.Generator().manual_seed(seed)).double()
    model.set_exact_posterior()
    with torch.no_grad():
        model.q.linear.bias.add_(0.3)
        model.q.raw_scale_tril.diagonal().add_(math.log(1.3))
    return model


def flat_grad(params: list[Tensor]) -> Tensor:
    return torch.cat([p.grad.flatten() for p in params])


def estimator_gradients(model: DeepLatentModel, x: Tensor, seed: int, estimator: str, objective: str = "iwae",
                        k: int = 50, **params: float) -> tuple[Tensor, Tensor]:
    """(inference, generative) gradients of one draw, seeded so that estimators can be compared draw by draw."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=False)
    loss(model, x, objective, k=k, estimator=estimator, **params).loss.backward()
    return flat_grad(list(model.encoder.parameters())), flat_grad(list(model.decoder.parameters()))


def test_iwae_increases_with_k_and_stays_below_log_px() -> None:
    model = perturbed_linear_gaussian()
    x = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    log_px = model.log_marginal(x).detach()
    torch.manual_seed(0)
    means, ses = [], []
    for k in (1, 5, 50):
        with torch.no_grad():
            draws = bounds.iwae(model.log_weights(x.repeat(400, 1), k)).reshape(400, -1) - log_px
        means.append(draws.mean())
        ses.append(draws.mean(1).std() / 400**0.5)
    for i in range(2):
        assert means[i + 1] - means[i] > 3 * math.hypot(ses[i], ses[i + 1])
    assert means[-1] < 0  # below log p(x), and for k = 1, 5 significantly so:
    assert all(mean + 3 * se < 0 for mean, se in zip(means[:2], ses[:2], strict=True))


def test_iwae_5000_within_three_standard_errors_of_log_px() -> None:
    """The delta-method standard error of log mean w is std(w) / (sqrt(k) mean(w)), per example."""
    model = perturbed_linear_gaussian(seed=4)
    x = torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(1)
    with torch.no_grad():
        log_w = model.log_weights(x, 5000)
        w = torch.exp(log_w - log_w.amax(0))
        se = w.std(0) / (5000**0.5 * w.mean(0))
        error = bounds.iwae(log_w) - model.log_marginal(x)
    assert error.mean().abs() < 3 * se.pow(2).sum().sqrt() / len(se)
    assert (error.abs() < 5 * se).all()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_exact_posterior_zeroes_stl_and_dreg_inference_gradients(objective: str) -> None:
    model = LinearGaussian(6, 3, generator=torch.Generator().manual_seed(6)).double()
    model.set_exact_posterior()
    x = torch.randn(4, 6, dtype=torch.float64)
    for seed in range(3):
        for estimator in ESTIMATORS:
            if objective == "vr" and estimator == "dreg" and PARAMS["alpha"] == -math.inf:
                continue
            inference, generative = estimator_gradients(model, x, seed, estimator, objective, k=10,
                                                        **settings_of(objective))
            if estimator == "standard":
                assert inference.abs().max() > 1e-3
            else:
                assert inference.abs().max() < 1e-12
            assert generative.abs().max() > 1e-3


def group_gradients(model: DeepLatentModel, x: Tensor, replicas: int, groups: int, estimators: tuple[str, ...],
                    objective: str = "iwae", k: int = 50, **params: float) -> dict[str, Tensor]:
    """Inference-network gradients, shape (groups, P): each the mean over ``replicas`` independent draws
    (x repeated in the batch), the same draws for every estimator, so the estimators can be compared paired."""
    batch = x.repeat(replicas, 1)
    return {e: torch.stack([estimator_gradients(model, batch, g, e, objective, k, **params)[0] for g in range(groups)])
            for e in estimators}


def paired_z_scores(a: Tensor, b: Tensor) -> Tensor:
    d = a - b
    return d.mean(0) / (d.std(0) / len(d) ** 0.5).clamp_min(1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("layers", [1, 2])
def test_dreg_is_unbiased_and_has_lower_variance_on_burda_models(layers: int) -> None:
    """Paired over draws: standard - dreg has mean zero in every direction; standard - stl does not (1 layer)."""
    torch.manual_seed(0)
    model = burda(layers)
    x = (torch.rand(1, 784) < 0.2).float()
    grads = group_gradients(model, x, replicas=10, groups=40, estimators=ESTIMATORS)
    directions = torch.randn(grads["standard"].shape[1], 8, generator=torch.Generator().manual_seed(1))
    projected = {e: g @ directions for e, g in grads.items()}

    assert paired_z_scores(projected["standard"], projected["dreg"]).abs().max() < 4
    if layers == 1:  # the test has the power to see a biased estimator: STL is biased for the IWAE bound
        assert paired_z_scores(projected["standard"], projected["stl"]).abs().max() > 4
    assert grads["dreg"].var(0).sum() < 0.9 * grads["standard"].var(0).sum()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("objective", "params"),
    [("iwae", {}), ("miwae", {"m": 5}), ("ciwae", {"beta": 0.3}), ("piwae", {"m": 5}), ("vr", {"alpha": 0.5}),
     ("vr", {"alpha": -1.0}), ("vr", {"alpha": 2.0}), ("elbo", {})],
)
def test_dreg_matches_standard_in_expectation_for_every_objective(objective: str, params: dict) -> None:
    model = perturbed_linear_gaussian(seed=7)
    with torch.no_grad():
        model.q.raw_scale_tril.diagonal().add_(0.4)  # a poorer q, so the weights differ appreciably
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    grads = group_gradients(model, x, 10, 160, ("standard", "dreg"), objective, k=10, **params)
    assert paired_z_scores(grads["standard"], grads["dreg"]).abs().max() < 4.5  # over 55 inference parameters


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_generative_gradient_is_the_same_for_every_estimator(objective: str) -> None:
    model = burda(2, x_dim=30).double()
    x = (torch.rand(3, 30) < 0.3).double()
    reference = estimator_gradients(model, x, 0, "standard", objective, k=10, **settings_of(objective))[1]
    for estimator in ("stl", "dreg"):
        generative = estimator_gradients(model, x, 0, estimator, objective, k=10, **settings_of(objective))[1]
        torch.testing.assert_close(generative, reference, rtol=1e-10, atol=1e-12)


def test_single_pass_dreg_equals_slow_reference_on_two_layer_model() -> None:
    """Reference: dlog w_i/dz_i from one autograd pass over leaf copies of z with a frozen copy of q,
    then sum_i w~_i^2 dlog w_i/dz_i dz_i/dphi through the sampling path, and sum_i w~_i dlog w_i/dtheta."""
    torch.manual_seed(0)
    model = burda(2, x_dim=40).double()
    x = (torch.rand(3, 40) < 0.3).double()
    k = 9
    inference, generative = estimator_gradients(model, x, 11, "dreg", k=k)

    torch.manual_seed(11)
    sample = model.sample_posterior(x, k)
    frozen_q = copy.deepcopy(model.encoder).requires_grad_(False)
    leaves = [z.detach().requires_grad_() for z in sample.z]
    log_q = frozen_q[0](x).log_prob(leaves[0]) + frozen_q[1](leaves[0]).log_prob(leaves[1])
    log_w = model.log_joint(x, leaves) - log_q
    w = torch.softmax(log_w.detach(), 0)
    dlogw_dz = torch.autograd.grad(log_w.sum(), leaves, retain_graph=True)
    decoder_params = list(model.decoder.parameters())
    expected_generative = torch.autograd.grad((w * log_w).sum(), decoder_params)
    path = sum(((w**2)[..., None] * g * z).sum() for g, z in zip(dlogw_dz, sample.z, strict=True))
    expected_inference = torch.autograd.grad(path, list(model.encoder.parameters()))

    # the loss is minus the batch mean
    torch.testing.assert_close(inference, -torch.cat([g.flatten() for g in expected_inference]) / 3)
    torch.testing.assert_close(generative, -torch.cat([g.flatten() for g in expected_generative]) / 3)


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_frozen_log_q_evaluates_only_the_layers_above_the_first_again(estimator: str) -> None:
    """With x a constant, q(z_1 | x) with frozen parameters is q(z_1 | x) with its parameters detached: the
    first encoder layer runs once per step; q(z_2 | z_1) is evaluated again (it is differentiable in z_1)."""
    torch.manual_seed(0)
    model = burda(2, x_dim=40)
    calls: list[torch.nn.Module] = []
    for layer in model.encoder:
        layer.register_forward_hook(lambda module, inputs, output: calls.append(module))
    loss(model, (torch.rand(3, 40) < 0.3).float(), "iwae", 5, estimator)
    assert [calls.count(layer) for layer in model.encoder] == [1, 2]


def test_loss_value_is_minus_the_bound() -> None:
    model = burda(1, x_dim=20)
    x = (torch.rand(4, 20) < 0.5).float()
    for objective in OBJECTIVES:
        for estimator in ESTIMATORS:
            for reduction, reduce in (("mean", torch.mean), ("sum", torch.sum)):
                result = loss(model, x, objective, k=10, estimator=estimator, reduction=reduction,
                              **settings_of(objective))
                bound = Objective(objective, 10, **settings_of(objective)).bound(result.log_w)
                torch.testing.assert_close(result.bound, bound)
                torch.testing.assert_close(result.loss.detach(), -reduce(bound))


def test_numpy_integers_count_samples_and_groups_as_ints_do() -> None:
    model = burda(1, x_dim=20)
    x = (torch.rand(4, 20) < 0.5).float()
    for objective in ("miwae", "piwae"):
        plain = Objective(objective, 10, m=5)
        given = Objective(objective, np.int64(10), m=np.int32(5))
        assert given == plain and type(given.k) is int and type(given.m) is int
        torch.manual_seed(0)
        expected = loss(model, x, objective, k=10, m=5).loss
        torch.manual_seed(0)
        torch.testing.assert_close(loss(model, x, objective, k=np.int64(10), m=np.int64(5)).loss, expected)


def test_refused_combinations_name_the_problem() -> None:
    model = burda(1, x_dim=4)
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="dreg has no form for the VR-max bound"):
        loss(model, x, "vr", k=5, estimator="dreg", alpha=-math.inf)
    with pytest.raises(ValueError, match="unknown estimator 'reinforce'"):
        loss(model, x, "iwae", k=5, estimator="reinforce")
    with pytest.raises(ValueError, match="unknown objective 'iwea'"):
        loss(model, x, "iwea", k=5)
    with pytest.raises(ValueError, match="m must be a positive integer dividing k"):
        loss(model, x, "piwae", k=10, m=3)
    with pytest.raises(ValueError, match="m must be a positive integer dividing k"):
        loss(model, x, "miwae", k=4, m=True)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        loss(model, x, "iwae", k=0)
    with pytest.raises(ValueError, match="beta must lie in"):
        loss(model, x, "ciwae", k=4, beta=-0.1)
    for estimator in ("standard", "stl"):  # VR-max itself is fine
        loss(model, x, "vr", k=5, estimator=estimator, alpha=-math.inf).loss.backward()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_standard_estimator_is_the_plain_gradient_of_the_bound(objective: str) -> None:
    model = burda(2, x_dim=30).double()
    x = (torch.rand(3, 30) < 0.3).double()
    inference, generative = estimator_gradients(model, x, 0, "standard", objective, k=10, **settings_of(objective))
    torch.manual_seed(0)
    model.zero_grad()
    log_w = model.log_weights(x, 10)
    inference_objective = "miwae" if objective == "piwae" else objective
    inference_bound = Objective(inference_objective, 10, **settings_of(inference_objective)).bound(log_w)
    (-inference_bound.mean()).backward()
    torch.testing.assert_close(inference, flat_grad(list(model.encoder.parameters())), rtol=1e-10, atol=1e-12)
    if objective != "piwae":
        torch.testing.assert_close(generative, flat_grad(list(model.decoder.parameters())), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [-math.inf, -1.0, 2.0])
def test_standard_estimator_is_the_plain_gradient_of_the_vr_bound_at_every_alpha(alpha: float) -> None:
    # VR-max (alpha = -inf) trains on the largest weight's gradient alone: d/dtheta max_i log w_i
    model = burda(2, x_dim=30).double()
    x = (torch.rand(3, 30) < 0.3).double()
    inference, generative = estimator_gradients(model, x, 0, "standard", "vr", k=10, alpha=alpha)
    torch.manual_seed(0)
    model.zero_grad()
    (-Objective("vr", 10, alpha=alpha).bound(model.log_weights(x, 10)).mean()).backward()
    torch.testing.assert_close(inference, flat_grad(list(model.encoder.parameters())), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(generative, flat_grad(list(model.decoder.parameters())), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_piwae_trains_inference_on_miwae_and_generative_on_iwae(estimator: str) -> None:
    model = burda(2, x_dim=30).double()
    x = (torch.rand(3, 30) < 0.3).double()
    inference, generative = estimator_gradients(model, x, 0, estimator, "piwae", k=12, m=3)
    torch.testing.assert_close(inference, estimator_gradients(model, x, 0, estimator, "miwae", k=12, m=3)[0])
    torch.testing.assert_close(generative, estimator_gradients(model, x, 0, estimator, "iwae", k=12)[1])


class _BoundedSupportDecoder(torch.nn.Module):
    """p(x | z) = Uniform(z + shift - 1, z + shift + 1) per unit: a sample z with |x - z - shift| >= 1 has
    p(x, z) = 0."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.shift = shift

    def forward(self, z: Tensor) -> torch.distributions.Distribution:
        centre = self.scale * z + self.shift
        uniform = torch.distributions.Uniform(centre - 1, centre + 1, validate_args=False)
        return torch.distributions.Independent(uniform, 1)


@pytest.mark.parametrize(("objective", "estimator", "params"), [
    *[("iwae", e, {}) for e in (*ESTIMATORS, "vimco", "rws")],
    *[("vr", e, {"alpha": 0.5}) for e in ESTIMATORS], ("vr", "stl", {"alpha": -math.inf}),
    *[("piwae", e, {"m": 2}) for e in ESTIMATORS],  # its MIWAE side may hold a group of zero weights
])
@pytest.mark.filterwarnings("ignore:the data x lie outside the support")  # of p(x | z) for some z: the point here
def test_a_zero_probability_sample_keeps_the_loss_finite(objective: str, estimator: str, params: dict) -> None:
    """Bounds that stay finite when one of the K samples has p(x, z_i) = 0 give loss = -(mean bound) and
    finite gradients (the zero-weight term is 0, not 0 * -inf = nan)."""
    model = LinearGaussian(1, 1, generator=torch.Generator().manual_seed(0)).double()
    model = DeepLatentModel([model.q], [_BoundedSupportDecoder()], model.decoder[1])
    x = torch.tensor([[0.5], [-0.3]], dtype=torch.float64)
    torch.manual_seed(3)
    result = loss(model, x, objective, k=20, estimator=estimator, **params)
    zero = torch.isinf(result.log_w)
    assert zero.any(0).all() and not zero.all(0).any()  # every example has zero and positive weights
    assert torch.isfinite(result.bound).all()
    torch.testing.assert_close(result.loss.detach(), -result.bound.mean())
    result.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("objective", [*OBJECTIVES, "vr-max"])
def test_a_group_of_zero_weights_has_weights_zero_not_nan(objective: str) -> None:
    """Where every weight of an example (or, for MIWAE, of one of its groups) is 0, a_i and the DReG weights are 0
    (CIWAE: its ELBO part's beta / K), not the nan of softmax over -inf, and MIWAE's other group keeps its weights:
    PIWAE, whose generative bound (IWAE) stays finite, trains on them."""
    inf = math.inf
    log_w = torch.tensor([[-1.0, -inf], [-2.0, -inf], [-inf, -inf], [-inf, -inf]], dtype=torch.float64)
    settings = {"alpha": -inf} if objective == "vr-max" else {**settings_of(objective), "m": 2} if objective in (
        "miwae", "piwae") else settings_of(objective)
    spec = Objective("vr" if objective == "vr-max" else objective, 4, **settings)
    for inference in (False, True):
        for weights in spec.weights(log_w, inference):
            if weights is not None:
                assert not weights.isnan().any(), (inference, weights)
                if objective not in ("elbo", "ciwae", "vr-max"):  # 1/K, beta/K, the argmax's one-hot, regardless
                    assert (weights[2:] == 0).all() and (weights[:, 1] == 0).all()
                    assert (weights[:2, 0] > 0).all()


@pytest.mark.parametrize(("objective", "estimator"), [
    *[(o, e) for o in OBJECTIVES for e in ESTIMATORS], ("vr", "vr-max"), ("iwae", "vimco"), ("iwae", "rws")])
@pytest.mark.filterwarnings("ignore:the data x lie outside the support")
def test_an_example_of_probability_zero_gives_an_infinite_loss(objective: str, estimator: str) -> None:
    """Where every sample of an example has p(x, z_i) = 0, the bound is -inf and the loss +inf (minus the bound),
    not the nan of -inf - -inf."""
    model = LinearGaussian(1, 1, generator=torch.Generator().manual_seed(0)).double()
    model = DeepLatentModel([model.q], [_BoundedSupportDecoder(shift=100.0)], model.decoder[1])
    x = torch.tensor([[0.5]], dtype=torch.float64)
    settings = {"alpha": -math.inf} if estimator == "vr-max" else settings_of(objective)
    if objective in ("miwae", "piwae"):
        settings["m"] = 2
    result = loss(model, x, objective, k=4, estimator="stl" if estimator == "vr-max" else estimator, **settings)
    assert result.bound.item() == -math.inf and result.loss.item() == math.inf


def test_settings_an_objective_does_not_read_are_refused() -> None:
    model = burda(1, x_dim=20)
    x = (torch.rand(4, 20) < 0.5).float()
    cases = [
        (lambda: loss(model, x, "iwae", 4, m=2), "m applies only to objective miwae or piwae, not iwae"),
        (lambda: loss(model, x, "vr", 4, beta=0.2), "beta applies only to objective ciwae, not vr"),
        (lambda: loss(model, x, "iwae", 4, alpha=0.5), "alpha applies only to objective vr, not iwae"),
        (lambda: loss(model, x, "iwae", 4, m=1), "m applies only to objective miwae or piwae, not iwae"),
        (lambda: loss(model, x, "elbo", 4, beta=0.5), "beta applies only to objective ciwae, not elbo"),
        (lambda: Objective("ciwae", 4, alpha=2.0), "alpha applies only to objective vr, not ciwae"),
        (lambda: loss(model, x, Objective("iwae", 3), k=7), "k given with an Objective, which carries its own"),
        (lambda: loss(model, x, Objective("vr", 3), k=7, alpha=2), "k and alpha given with an Objective"),
        (lambda: loss(model, x, "vr", 4, alpha="a"), "alpha must be a real number; got alpha='a'"),
        (lambda: Objective("vr", 4, alpha=True), "alpha must be a real number; got alpha=True"),
        (lambda: loss(model, x, "iwae", k="5"), "k must be a positive integer number of samples; got k='5'"),
    ]
    for call, message in cases:
        with pytest.raises(SettingError) as error:
            call()
        assert message in str(error.value) and "\n" not in str(error.value)
    assert loss(model, x, Objective("vr", 3, alpha=2.0)).log_w.shape == (3, 4)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_piwae_keeps_gradients_finite_where_a_samples_weight_is_subnormal(estimator: str) -> None:
    """PIWAE rescales the path gradient of sample i by (its MIWAE weight) / (its IWAE weight a_i): where a_i is
    positive but below the smallest normal float, the ratio would overflow, so that sample passes no path
    gradient (the module's stated limitation), and the gradients stay finite."""
    torch.manual_seed(0)
    model = burda(2, x_dim=12)
    x = torch.bernoulli(torch.full((1, 12), 0.5))
    objective = Objective("piwae", 4, m=4)
    subnormal = 0
    for draw in range(40):
        torch.manual_seed(draw)
        model.zero_grad()
        result = loss(model, x, objective, estimator=estimator)
        result.loss.backward()
        a = objective.weights(result.log_w)[0]
        subnormal += int(((a > 0) & (a < torch.finfo(a.dtype).tiny)).any())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), draw
    assert subnormal > 0  # the case arose
