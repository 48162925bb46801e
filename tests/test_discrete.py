"""Discrete latents against exact answers: log p(x) by enumeration, the IWAE bound converging to it, and the
score-function estimators' expectations computed by enumerating every configuration of the k samples."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import Tensor

from iwae.cli import main
from iwae.core import bounds, score_function
from iwae.core.objectives import REPARAMETERIZED_ESTIMATORS, Objective, loss
from iwae.eval.exact import exact_log_likelihood
from iwae.models import (
    BernoulliLayer,
    BernoulliPrior,
    CategoricalLayer,
    DeepLatentModel,
    burda,
    enumerate_values,
    sbn,
)
from iwae.runs import rundir
from iwae.training.config import TrainConfig

Z_LIMIT = 4.5  # |z| of a Monte Carlo mean against its exact value; two-sided p < 7e-6 per coordinate


def random_sbn(widths: list[int], x_dim: int, seed: int = 0, scale: float = 1.0) -> DeepLatentModel:
    """An SBN in float64 with every parameter drawn from N(0, scale^2)."""
    generator = torch.Generator().manual_seed(seed)
    model = sbn(widths, x_dim).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def all_binary(d: int) -> Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=torch.float64)


def enumerate_samples(model: DeepLatentModel, x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every configuration of k iid samples z_1..z_k ~ q(z | x) for one example x (1, D) of a one-layer SBN,
    as a function of q's logits: (probability (S^k,), log_w (k, S^k), z (k, S^k, d), logits), the logits a
    leaf so that autograd gives exact gradients of expectations."""
    logits = model.encoder[0](x).base_dist.logits.detach().requires_grad_()
    q = torch.distributions.Independent(torch.distributions.Bernoulli(logits=logits), 1)
    z = enumerate_values(q)
    log_q = q.log_prob(z.unsqueeze(1))[:, 0]
    log_w = model.log_joint(x, [z.unsqueeze(1)])[:, 0].detach() - log_q
    tuples = torch.cartesian_prod(*[torch.arange(len(z))] * k).reshape(-1, k).T  # (k, S^k)
    return log_q[tuples].sum(0).exp(), log_w[tuples], z[tuples], logits


@contextmanager
def logits_of_q(model: DeepLatentModel) -> Iterator[list[Tensor]]:
    """Within the block, the list holds the logits tensor(s) of q(z_1 | x) computed, with their gradient kept,
    so that per-example gradients of a summed loss can be read off them."""
    seen: list[Tensor] = []

    def keep(module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        output.retain_grad()
        seen.append(output)

    handle = model.encoder[0].logits.register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


def per_draw_gradients(model: DeepLatentModel, x: Tensor, k: int, draws: int, estimator: str, seed: int) -> Tensor:
    """``draws`` independent estimates of the gradient of the mean bound w.r.t. q's logits at x (1, D), one
    per row: the per-example gradients of ``loss(..., reduction="sum")`` on x repeated."""
    torch.manual_seed(seed)
    with logits_of_q(model) as seen:
        result = loss(model, x.expand(draws, -1), "iwae", k=k, estimator=estimator, reduction="sum")
        return -torch.autograd.grad(result.loss, seen[0])[0]


def reinforce_gradients(model: DeepLatentModel, x: Tensor, k: int, draws: int, seed: int) -> Tensor:
    """Plain REINFORCE for the IWAE bound, sum_i (L - w~_i) grad log q(z_i | x), in the same form."""
    torch.manual_seed(seed)
    with logits_of_q(model) as seen:
        xs = x.expand(draws, -1)
        sample = model.sample_posterior(xs, k, detach=True)
        log_p, log_q = model.log_joint(xs, sample.z), model.log_posterior(xs, sample)
        log_w = (log_p - log_q).detach()
        weights = torch.softmax(log_w, 0)
        surrogate = ((bounds.iwae(log_w) - weights) * log_q).sum()
        return torch.autograd.grad(surrogate, seen[0])[0]


def z_scores(draws: Tensor, exact: Tensor) -> Tensor:
    return (draws.mean(0) - exact) / (draws.std(0) / math.sqrt(len(draws)))


# --- the model as built, and its latents' values ---------------------------------------------------------


def test_an_sbn_starts_with_glorot_weights_zero_biases_and_zero_prior_logits() -> None:
    model = sbn([200, 100, 50], 784)
    linears = [layer for layer in model.modules() if isinstance(layer, torch.nn.Linear)]
    assert len(linears) == 6  # one linear conditional per layer in q and in p
    for layer in linears:
        bound = math.sqrt(6 / (layer.in_features + layer.out_features))
        assert 0.9 * bound < layer.weight.abs().max() <= bound
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    assert isinstance(model.prior, BernoulliPrior)
    assert torch.equal(model.prior.logits, torch.zeros(50))


def test_an_sbns_output_bias_is_the_logit_of_the_clipped_training_mean() -> None:
    """An untrained SBN predicts the training set's pixel means, clipped to [0.001, 0.999]."""
    mean = torch.linspace(0.0, 1.0, 9)
    mean[1:3] = torch.tensor([1e-4, 0.9995])  # means the clipping changes
    model = sbn([4, 3], 9, train_mean=mean)
    torch.testing.assert_close(torch.sigmoid(model.decoder[0].logits.bias), mean.clamp(1e-3, 1 - 1e-3),
                               rtol=1e-4, atol=1e-6)
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear) and layer is not model.decoder[0].logits:
            assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_binary_values_are_enumerated_in_the_order_of_the_integers_they_write_first_unit_lowest() -> None:
    q = torch.distributions.Independent(torch.distributions.Bernoulli(logits=torch.zeros(3, dtype=torch.float64)), 1)
    values = enumerate_values(q)
    assert values.dtype == torch.float64
    assert values.tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0],
                               [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]]


# --- exact log p(x) -------------------------------------------------------------------------------------


def test_exact_marginal_sums_to_one_over_every_x() -> None:
    x = all_binary(5)
    two_layers = random_sbn([3, 2], 5)
    torch.testing.assert_close(exact_log_likelihood(two_layers, x).exp().sum().item(), 1.0, rtol=0, atol=1e-12)
    # passes of a few configurations at a time give the same numbers
    torch.testing.assert_close(exact_log_likelihood(two_layers, x, max_rows=7), exact_log_likelihood(two_layers, x))
    # z_1: two one-hot groups of 3 categories (9 values) given z_2: two binary units
    categorical = DeepLatentModel([CategoricalLayer(5, (), 2, 3), BernoulliLayer(6, (), 2)],
                                  [BernoulliLayer(6, (), 5), CategoricalLayer(2, (), 2, 3)], BernoulliPrior(2))
    with torch.no_grad():
        categorical.decoder[2].logits.normal_()
    total = exact_log_likelihood(categorical.double(), x).exp().sum().item()
    torch.testing.assert_close(total, 1.0, rtol=0, atol=1e-12)
    result = loss(categorical, x, "iwae", k=3, estimator="vimco")  # trains with a score-function estimator
    result.loss.backward()
    assert categorical.encoder[0].logits.weight.grad.abs().sum() > 0


def test_exact_marginal_of_one_unit_is_its_mixture() -> None:
    """One binary latent: p(x) = sum_z p(z) p(x | z), written out."""
    model = random_sbn([1], 3, seed=2)
    x = all_binary(3)
    prior, likelihood = model.decoder[1](), model.decoder[0]
    terms = [prior.log_prob(z) + likelihood(z).log_prob(x) for z in (torch.zeros(1).double(), torch.ones(1).double())]
    torch.testing.assert_close(exact_log_likelihood(model, x), torch.logaddexp(*terms))


def test_enumeration_is_refused_for_continuous_or_too_many_latents() -> None:
    with pytest.raises(ValueError, match=r"no finite set of values.*log_likelihood"):
        exact_log_likelihood(burda(1, x_dim=5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"2\^21 joint configurations.*log_likelihood"):
        exact_log_likelihood(sbn([11, 10], 5), torch.zeros(2, 5))


# --- the IWAE bound against the exact log p(x) ------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted_sbn() -> tuple[DeepLatentModel, Tensor, Tensor]:
    """(model, x, log p(x)): 10 binary latents, 20 visible units, 4 examples; q fitted for 20 Adam steps on
    the exact ELBO (summed over all 1024 z), so that it is reasonable but not exact."""
    model = random_sbn([10], 20)
    x = (torch.rand(4, 20, generator=torch.Generator().manual_seed(0)) < 0.5).double()
    z = enumerate_values(model.encoder[0](x)).unsqueeze(1).expand(-1, len(x), -1)
    log_p = model.log_joint(x, [z]).detach()
    optimizer = torch.optim.Adam(model.encoder.parameters(), lr=0.05)
    for _ in range(20):
        log_q = model.encoder[0](x).log_prob(z)
        optimizer.zero_grad()
        (-(log_q.exp() * (log_p - log_q)).sum()).backward()
        optimizer.step()
    return model, x, exact_log_likelihood(model, x).detach()


def test_iwae_bound_approaches_the_exact_log_likelihood_monotonically(
        fitted_sbn: tuple[DeepLatentModel, Tensor, Tensor]) -> None:
    """E[L_k] - log p(x) from 300 independent L_k per example, for k = 1, 10, 100, 1000: each step up in k
    raises it by more than 3 standard errors, it stays below 0 (within 3 SE), and at k=1000 it is within
    0.05 nats. (Measured: -1.57, -0.41, -0.10, -0.015, standard errors 0.05 to 0.006.)"""
    model, x, log_px = fitted_sbn
    torch.manual_seed(0)
    means, ses = [], []
    for k in (1, 10, 100, 1000):
        with torch.no_grad():
            gaps = bounds.iwae(model.log_weights(x.repeat(300, 1), k)).reshape(300, -1) - log_px
        means.append(gaps.mean().item())
        ses.append(gaps.mean(1).std().item() / math.sqrt(300))
    for i in range(3):
        assert means[i + 1] - means[i] > 3 * math.hypot(ses[i], ses[i + 1]), (means, ses)
    assert all(mean < 3 * se for mean, se in zip(means, ses, strict=True)), (means, ses)
    assert means[-1] > -0.05, (means, ses)


def test_elbo_mean_equals_its_enumerated_value(fitted_sbn: tuple[DeepLatentModel, Tensor, Tensor]) -> None:
    model, x, _ = fitted_sbn
    exact = []
    for i in range(len(x)):
        probability, log_w, _, _ = enumerate_samples(model, x[i:i + 1], 1)
        exact.append((probability * log_w[0]).sum().detach())
    torch.manual_seed(1)
    with torch.no_grad():
        draws = model.log_weights(x, 20000)
    assert z_scores(draws, torch.stack(exact)).abs().max() < Z_LIMIT


# --- VIMCO and RWS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("latents", "k"), [(10, 2), (4, 4)])
def test_vimco_is_unbiased_and_beats_reinforce(latents: int, k: int) -> None:
    """The mean of 20000 VIMCO gradients w.r.t. q's logits equals the exact gradient of E[L_k], computed by
    enumerating all (2^latents)^k sample configurations, within 4.5 standard errors per coordinate; and its
    variance (trace of the covariance) is at least 20 times below plain REINFORCE's (measured: 50 for
    10 latents and k=2, 510 for 4 latents and k=4; max |z| 0.9 and 1.1)."""
    model = random_sbn([latents], 20)
    x = (torch.rand(1, 20, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    probability, log_w, _, logits = enumerate_samples(model, x, k)
    exact = torch.autograd.grad((probability * bounds.iwae(log_w)).sum(), logits)[0][0]
    vimco = per_draw_gradients(model, x, k, 20000, "vimco", seed=3)
    z = z_scores(vimco, exact)
    assert z.abs().max() < Z_LIMIT, z
    assert (vimco.std(0) / math.sqrt(len(vimco))).max() < 0.05 * exact.abs().max()  # the test can see a bias
    reinforce = reinforce_gradients(model, x, k, 20000, seed=4)
    assert z_scores(reinforce, exact).abs().max() < Z_LIMIT
    assert reinforce.var(0).sum() > 20 * vimco.var(0).sum()


def test_vimco_baseline_is_the_geometric_mean_leave_one_out() -> None:
    """For K=3 written out: L_{-1} = log((w_2 + w_3 + sqrt(w_2 w_3)) / 3), and so on."""
    log_q = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    log_p = torch.randn(3, 2, dtype=torch.float64)
    (grad,) = torch.autograd.grad(score_function.vimco(log_p, log_q).sum(), log_q)
    w = (log_p - log_q).detach().exp()
    bound = torch.log(w.mean(0))
    for i in range(3):
        others = w[[j for j in range(3) if j != i]]
        leave_one_out = torch.log((others.sum(0) + others.prod(0).sqrt()) / 3)
        torch.testing.assert_close(grad[i], bound - leave_one_out - w[i] / w.sum(0))


def test_score_function_estimators_with_a_zero_probability_sample() -> None:
    """Sample 0 has p(x, z_0) = 0: VIMCO's baseline for it is the others' (L_{-0} = log((w_1 + w_2 +
    sqrt(w_1 w_2)) / 3)) and its q-gradient L - L_{-0}, the others' leave-one-out means are 0 (their w^_{-i}
    includes w_0 = 0); RWS gives it no weight; the surrogates' values are finite."""
    log_q = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)
    log_p = torch.tensor([[-math.inf], [-1.0], [-2.5]], dtype=torch.float64, requires_grad=True)
    w = (log_p - log_q).detach().exp()
    bound = torch.log(w.mean(0))
    leave_one_out = torch.log(torch.stack([(w[1] + w[2] + (w[1] * w[2]).sqrt()) / 3, (w[0] + w[2]) / 3,
                                           (w[0] + w[1]) / 3]))
    expected = {"vimco": bound - leave_one_out - w / w.sum(0), "rws": w / w.sum(0)}
    for name, surrogate in score_function.SURROGATES.items():
        value = surrogate(log_p, log_q)
        assert torch.isfinite(value).all(), name
        grad_p, grad_q = torch.autograd.grad(value.sum(), (log_p, log_q))
        torch.testing.assert_close(grad_q, expected[name], msg=name)
        torch.testing.assert_close(grad_p, w / w.sum(0), msg=name)


def test_rws_q_update_equals_its_definition_in_expectation() -> None:
    """The mean of 20000 RWS q-updates w.r.t. q's logits equals E[sum_i w~_i grad log q(z_i | x)], the
    wake-phase update, enumerated over all 16^4 configurations of k=4 samples (z < 4.5 per coordinate)."""
    model = random_sbn([4], 20)
    x = (torch.rand(1, 20, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    probability, log_w, z, logits = enumerate_samples(model, x, 4)
    # grad_logits log q(z | x) = z - sigmoid(logits) for Bernoulli units
    update = (torch.softmax(log_w, 0).unsqueeze(-1) * (z - torch.sigmoid(logits))).sum(0)
    exact = (probability.unsqueeze(-1) * update).sum(0).detach()
    rws = per_draw_gradients(model, x, 4, 20000, "rws", seed=5)
    assert z_scores(rws, exact).abs().max() < Z_LIMIT


def test_vimco_and_rws_train_p_on_the_iwae_gradient() -> None:
    """For the generative network both are sum_i w~_i grad log p(x, z_i): equal draw by draw."""
    model = random_sbn([6, 3], 20)
    x = (torch.rand(5, 20, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    gradients = []
    for estimator in ("vimco", "rws"):
        torch.manual_seed(7)
        model.zero_grad()
        loss(model, x, "iwae", k=6, estimator=estimator).loss.backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.decoder.parameters()]))
    torch.testing.assert_close(gradients[0], gradients[1])
    assert gradients[0].abs().sum() > 0


def test_combinations_that_are_undefined_are_refused() -> None:
    model, x = sbn([4], 6), torch.zeros(2, 6)
    for estimator in REPARAMETERIZED_ESTIMATORS:
        with pytest.raises(ValueError, match=rf"estimator {estimator} needs a reparameterizable q.*use estimator "
                                             r"vimco or rws"):
            loss(model, x, "iwae", k=3, estimator=estimator)
        with pytest.raises(ValueError, match="use estimator vimco or rws"):
            TrainConfig(model="sbn-4", estimator=estimator, epochs=1)
    with pytest.raises(ValueError, match=r"estimator vimco is defined for objective iwae only; give objective iwae "
                                         r"\(got elbo\)"):
        Objective("elbo", 5).check_estimator("vimco")
    with pytest.raises(ValueError, match="vimco needs k >= 2"):
        loss(model, x, "iwae", k=1, estimator="vimco")
    with pytest.raises(ValueError, match="unknown model 'sbn-0'"):
        TrainConfig(model="sbn-0", estimator="rws", epochs=1)
    for surrogate in (score_function.vimco, score_function.rws):  # never broadcast: samples paired as drawn
        with pytest.raises(ValueError, match=r"same shape \(K, \*batch\).*got \(3, 2\) and \(3, 1\)"):
            surrogate(torch.zeros(3, 2), torch.zeros(3, 1))


@pytest.mark.slow
def test_sbn_trains_evaluates_samples_and_resumes_from_the_command_line(
        tiny_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    options = ["--dataset", tiny_dataset, "--model", "sbn-6-3", "--estimator", "vimco", "--k", "4", "--epochs", "1",
               "--batch-size", "8", "--monitor-examples", "8", "--device", "cpu"]
    assert main(["train", *options, "--eval-k", "10", "--out", str(run)]) == 0
    result = json.loads((run / rundir.EVAL).read_text())
    assert len(result["active_units"]) == 2 and math.isfinite(result["nll"])
    assert main(["evaluate", str(run), "--k", "20"]) == 0
    assert main(["sample", str(run)]) == 0
    assert (run / rundir.FIGURES / "samples.png").is_file()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--model", "sbn-6-4"]) == 2
    assert "model (run: 'sbn-6-3', given: 'sbn-6-4')" in capsys.readouterr().err
