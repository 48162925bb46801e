"""AIS and BDMC against closed forms: linear-Gaussian models with one and two stochastic layers.

Tolerances are Monte Carlo standard errors: each example's AIS error is independent of the others', so the
mean error over B examples is compared with the standard error estimated from the per-example errors. AIS
estimates p(x) without bias, so its log estimate is biased low (Jensen) by an amount that shrinks as the steps
grow; a finite-step check therefore allows a stated bias below zero and none above it. The margins hold for
any seed (and so on any CPU, where rounding changes which HMC proposals are accepted), not just the one used.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent, MultivariateNormal

from iwae.core import ais
from iwae.core.ais import ais_log_likelihood, bdmc
from iwae.eval.exact import exact_log_likelihood
from iwae.eval.likelihood import log_likelihood
from iwae.models import DeepLatentModel, LinearGaussian, sbn
from iwae.models.linear_gaussian import AffineGaussianEncoder, GaussianPrior, LinearGaussianLikelihood


def model_and_data(n: int = 50) -> tuple[LinearGaussian, torch.Tensor, torch.Tensor]:
    """A float64 linear-Gaussian model (10-dim x, 3-dim z, noise 0.3, so that the posterior is much narrower
    than the prior), n examples drawn from it, and their exact log p(x)."""
    g = torch.Generator().manual_seed(0)
    model = LinearGaussian(10, 3, sigma=0.3, generator=g).double()
    with torch.no_grad():
        z = model.decoder[1].mu + torch.randn(n, 3, generator=g, dtype=torch.float64)
        x = model.likelihood(z).mean + 0.3 * torch.randn(n, 10, generator=g, dtype=torch.float64)
    return model, x, model.log_marginal(x).detach()


def mean_and_se(error: torch.Tensor) -> tuple[float, float]:
    return error.mean().item(), error.std().item() / math.sqrt(len(error))


def assert_biased_low_by_at_most(error: torch.Tensor, bias: float) -> None:
    """The mean error is within 3 standard errors of [-bias, 0]: a lower bound in expectation, and a tight one."""
    mean, se = mean_and_se(error)
    assert se > 0
    assert -bias - 3 * se < mean < 3 * se, (mean, se)


@pytest.mark.slow
def test_ais_error_shrinks_as_steps_grow_to_a_tenth_of_a_nat_at_100_steps() -> None:
    # 16 chains, 5 leapfrog steps from the prior, 200 examples. With 10 steps the estimate is about a nat low
    # (some 8 standard errors); at 100 steps its bias is about 0.08 nats.
    model, x, exact = model_and_data(200)
    results = [ais_log_likelihood(model, x, steps=steps, chains=16, leapfrog=5, start="prior", seed=2)
               for steps in (10, 30, 100)]
    errors = [result.log_likelihood - exact for result in results]
    rms = [error.square().mean().sqrt().item() for error in errors]
    assert rms[0] > rms[1] > rms[2]
    mean, se = mean_and_se(errors[0])
    assert mean < -3 * se
    assert_biased_low_by_at_most(errors[2], 0.1)
    result = results[2]
    assert result.log_likelihood.shape == (200,)
    assert result.acceptance.shape == result.log_weights.shape == result.step_size.shape == (16, 200)
    assert 0.5 < result.acceptance.mean().item() < 0.85  # the pilot's step sizes give about 0.65
    assert bool(((result.ess >= 1) & (result.ess <= 16 + 1e-9)).all())


def test_encoder_start_at_the_exact_posterior_is_exact_and_a_good_q_needs_fewer_steps() -> None:
    model, x, exact = model_and_data()
    model.set_exact_posterior()
    # q = p(z | x): every intermediate density is the posterior and every weight is p(x)
    result = ais_log_likelihood(model, x, steps=3, chains=4, leapfrog=2, start="encoder", seed=3)
    torch.testing.assert_close(result.log_likelihood, exact, rtol=0, atol=1e-9)
    with torch.no_grad():
        model.q.linear.bias.add_(0.1)
    rms = {start: (ais_log_likelihood(model, x, steps=10, chains=16, leapfrog=5, start=start, seed=4).log_likelihood
                   - exact).square().mean().sqrt().item() for start in ("prior", "encoder")}
    assert rms["encoder"] < rms["prior"] / 3


def two_layer_linear_gaussian() -> tuple[DeepLatentModel, torch.Tensor, torch.Tensor]:
    """p(z2) = N(mu, I), p(z1 | z2) = N(W2 z2 + b2, s2^2 I), p(x | z1) = N(W1 z1 + b1, s1^2 I), with
    q(z1 | x) = q(z2 | z1) = N(0, I) (affine Gaussian layers at zero); 40 examples drawn from the model and
    their exact log p(x)."""
    g = torch.Generator().manual_seed(5)
    decoder = [LinearGaussianLikelihood(3, 6), LinearGaussianLikelihood(2, 3)]
    model = DeepLatentModel([AffineGaussianEncoder(6, 3), AffineGaussianEncoder(3, 2)], decoder, GaussianPrior(2))
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
        for layer in model.encoder:
            layer.linear.weight.zero_()
            layer.linear.bias.zero_()
            layer.raw_scale_tril.zero_()
        decoder[0].log_sigma.fill_(math.log(0.3))
        decoder[1].log_sigma.fill_(math.log(0.5))
        z = ais.sample_prior(model, (40,))
        x = decoder[0](z[0]).sample()
    (w1, b1), (w2, b2) = [(layer.linear.weight, layer.linear.bias) for layer in decoder]
    s1, s2 = (layer.log_sigma.exp() for layer in decoder)
    mean = w1 @ (w2 @ model.decoder[2].mu + b2) + b1
    eye = torch.eye(6, dtype=torch.float64)
    cov = w1 @ (w2 @ w2.T + s2**2 * eye[:3, :3]) @ w1.T + s1**2 * eye
    return model, x, MultivariateNormal(mean, cov).log_prob(x).detach()


@pytest.mark.slow
@pytest.mark.parametrize("start", ["prior", "encoder"])
def test_two_stochastic_layers_are_annealed_jointly(start: str) -> None:
    # at 200 steps the bias is about 0.02 nats from the prior and 0.05 from this (poor) encoder
    model, x, exact = two_layer_linear_gaussian()
    result = ais_log_likelihood(model, x, steps=200, chains=16, leapfrog=5, start=start, seed=6)
    assert_biased_low_by_at_most(result.log_likelihood - exact, 0.1)


@pytest.mark.slow
def test_bdmc_brackets_the_exact_marginal_and_its_gap_shrinks() -> None:
    model, _, _ = model_and_data()
    gaps = []
    for steps in (10, 100):
        result = ais.bdmc(model, 50, steps=steps, chains=8, leapfrog=5, seed=7)
        exact = model.log_marginal(result.x).detach()
        below, below_se = mean_and_se(result.forward.log_likelihood - exact)
        above, above_se = mean_and_se(result.backward.log_likelihood - exact)
        assert below < 3 * below_se and above > -3 * above_se  # bounds in expectation
        if steps == 10:  # and clearly apart with few steps
            assert above - below > 3 * math.hypot(below_se, above_se)
        gaps.append(result.gap.mean().item())
    assert gaps[0] > 3 * gaps[1] > 0


def test_bdmc_simulates_x_with_the_likelihoods_noise() -> None:
    # x ~ N(W z + b, sigma^2 I): off the column space of W, x - b is the noise alone, of variance sigma^2 = 0.09 in
    # each of the 7 directions (1400 squares, a relative standard error of 4 %); at p(x | z)'s mean it would be 0
    model, _, _ = model_and_data()
    x = bdmc(model, 200, steps=1, chains=1, leapfrog=1, seed=9).x
    w, b = (p.detach() for p in (model.likelihood.linear.weight, model.likelihood.linear.bias))
    off_columns = torch.eye(10, dtype=torch.float64) - w @ torch.linalg.pinv(w)
    noise = (x - b) @ off_columns
    assert 0.8 < noise.square().sum().item() / (200 * 7) / 0.3**2 < 1.2


def test_bdmc_runs_backward_on_the_forward_pilots_step_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = model_and_data()
    anneal, calls = ais.anneal, []

    def recorded(*args: object) -> ais.Run:
        calls.append((args[4], result := anneal(*args)))
        return result

    monkeypatch.setattr(ais, "anneal", recorded)
    bdmc(model, 2, steps=3, chains=2, leapfrog=1)
    (pilot, (_, _, pilot_steps)), (forward, _), (backward, _) = calls
    assert pilot is None and forward is pilot_steps and backward is pilot_steps


def test_seed_reproduces_and_leaves_the_global_generator_alone() -> None:
    model, x, _ = model_and_data(5)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    first = ais_log_likelihood(model, x, steps=5, chains=2, leapfrog=2, seed=8).log_likelihood
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    again = ais_log_likelihood(model, x, steps=5, chains=2, leapfrog=2, seed=8).log_likelihood
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_each_batch_draws_from_a_stream_of_its_own() -> None:
    model, x, _ = model_and_data(1)
    twice = ais_log_likelihood(model, x.expand(2, -1), steps=2, chains=2, leapfrog=1, batch_size=1).log_likelihood
    assert twice[0] != twice[1]


def test_a_single_step_makes_no_move_and_reports_no_acceptance_rate() -> None:
    model, x, _ = model_and_data(4)
    single = ais_log_likelihood(model, x, steps=1, chains=3, leapfrog=2, seed=0)
    assert bool(single.acceptance.isnan().all()) and bool(single.log_likelihood.isfinite().all())
    assert not ais_log_likelihood(model, x, steps=2, chains=3, leapfrog=2, seed=0).acceptance.isnan().any()


def test_acceptance_is_the_mean_over_the_transitions(monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 steps make 2 transitions, each accepted with probability 0.5 here
    model, x, _ = model_and_data(2)
    transition = ais.hmc_transition

    def half_accepted(*args: object) -> tuple[object, torch.Tensor]:
        state, accept_prob = transition(*args)
        return state, torch.full_like(accept_prob, 0.5)

    monkeypatch.setattr(ais, "hmc_transition", half_accepted)
    result = ais_log_likelihood(model, x, steps=3, chains=2, leapfrog=1)
    torch.testing.assert_close(result.acceptance, torch.full((2, 2), 0.5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_the_reported_step_size_is_the_arithmetic_mean_of_those_used() -> None:
    # one chain of two examples: steps 1 and 3 (mean 2), then 2 and 2; two batches of one example each
    log_step = torch.tensor([[[1.0, 2.0]], [[3.0, 2.0]]], dtype=torch.float64).log()
    runs = [(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
             ais.StepSizes(torch.tensor([0.5, 1.0], dtype=torch.float64), log_step[..., [i]])) for i in (0, 1)]
    torch.testing.assert_close(ais.combine(runs).step_size, torch.tensor([[2.0, 2.0]], dtype=torch.float64))


def test_schedule_is_sigmoidal_from_zero_to_one() -> None:
    betas = ais.sigmoid_schedule(100)
    assert betas[0] == 0 and betas[-1] == 1 and bool((betas.diff() > 0).all())
    assert betas[1] < betas[50] - betas[49]  # denser at the ends than in the middle
    torch.testing.assert_close(ais.sigmoid_schedule(1), torch.tensor([0.0, 1.0], dtype=torch.float64))


class CoinPrior(nn.Module):
    def forward(self) -> Independent:
        return Independent(Bernoulli(probs=torch.full((3,), 0.5)), 1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"chains": 0}, "chains must be a positive integer"),
        ({"leapfrog": -1}, "leapfrog must be a positive integer"),
        ({"start": "posterior"}, "start must be one of prior, encoder"),
        ({"batch_size": 0}, "batch_size must be a positive integer; got 0"),
        ({"batch_size": -1}, "batch_size must be a positive integer; got -1"),
        ({"steps": "2"}, "steps must be a positive integer; got '2'"),
        ({"seed": -1}, r"seed must be an integer from 0 to 2\*\*63 - 1; got -1"),
        ({"seed": 2**63}, r"seed must be an integer from 0 to 2\*\*63 - 1"),
    ],
)
def test_bad_settings_are_refused_in_one_line(settings: dict, message: str) -> None:
    model, x, _ = model_and_data(2)
    with pytest.raises(ValueError, match=message) as error:
        ais_log_likelihood(model, x, **{"steps": 2, "chains": 2, "leapfrog": 2, **settings})
    assert "\n" not in str(error.value)


def test_numpy_integers_are_taken_as_settings_and_text_refused_quoted() -> None:
    model, x, _ = model_and_data(3)
    settings = {"steps": 3, "chains": 2, "leapfrog": 2, "batch_size": 2, "seed": 1}
    given = {name: np.int64(value) for name, value in settings.items()}
    torch.testing.assert_close(ais_log_likelihood(model, x, **given), ais_log_likelihood(model, x, **settings),
                               rtol=0, atol=0)
    torch.testing.assert_close(bdmc(model, np.int32(3), **given), bdmc(model, 3, **settings), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^the number of simulated examples, n, must be a positive integer; got '3'$"):
        bdmc(model, "3", **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, 2**63, "a"])
def test_a_seed_out_of_range_is_refused_by_every_estimator(seed: object) -> None:
    model, x, _ = model_and_data(2)
    for estimate in (lambda: log_likelihood(model, x, k=4, seed=seed),  # type: ignore[arg-type]
                     lambda: bdmc(model, 2, steps=2, chains=2, leapfrog=2, seed=seed)):  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="seed must be an integer from 0"):
            estimate()


def test_no_examples_and_a_fractional_number_to_simulate_are_refused_in_one_line() -> None:
    model, x, _ = model_and_data(2)
    calls = [
        (lambda: ais_log_likelihood(model, x[:0], steps=2, chains=2, leapfrog=2), "x holds no examples"),
        (lambda: log_likelihood(model, x[:0], k=10), "x holds no examples"),
        (lambda: exact_log_likelihood(sbn([2], 4), torch.ones(0, 4)), "x holds no examples"),
        (lambda: bdmc(model, 2.5, steps=2, chains=2, leapfrog=2), "must be a positive integer; got 2.5"),
        (lambda: bdmc(model, 4, steps=2, chains=2, leapfrog=2, batch_size=0), "batch_size must be a positive"),
    ]
    for call, message in calls:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


def test_discrete_latents_are_refused_in_one_line() -> None:
    model = DeepLatentModel([AffineGaussianEncoder(4, 3)], [LinearGaussianLikelihood(3, 4)], CoinPrior())
    with pytest.raises(ValueError, match="AIS needs continuous latents") as error:
        ais_log_likelihood(model, torch.zeros(2, 4), steps=2, chains=2, leapfrog=2)
    assert "\n" not in str(error.value)


def test_step_sizes_interpolate_linearly_in_log_step_and_hold_beyond_the_ends() -> None:
    steps = ais.StepSizes(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64),
                          torch.tensor([[[0.0]], [[1.0]], [[3.0]]], dtype=torch.float64))
    for beta, log_step in [(0.125, 0.25), (0.75, 2.0), (0.0, 0.0), (1.0, 3.0), (1.5, 3.0)]:
        torch.testing.assert_close(steps.at(beta).log().flatten(), torch.tensor([log_step], dtype=torch.float64))


def test_a_proposal_whose_energy_is_not_a_number_is_rejected() -> None:
    model, x, _ = model_and_data(2)
    path = ais.Path(model, x, "prior", [3])
    state = ais._evaluate(path, path.sample_start(4))
    nan_step = torch.full((4, 2, 1), math.nan, dtype=torch.float64)
    moved, accept_prob = ais.hmc_transition(path, state, 0.5, nan_step, 2)
    assert bool((accept_prob == 0).all())
    torch.testing.assert_close(tuple(moved), tuple(state), rtol=0, atol=0)
