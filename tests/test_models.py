"""The paper's architectures, the generic model with user modules, and the linear-Gaussian model's exact answers."""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch import nn
from torch.distributions import Bernoulli, Independent, Normal

from iwae.core import bounds
from iwae.core.ais import ais_batches, ais_log_likelihood
from iwae.core.objectives import loss
from iwae.eval.activity import active_units, posterior_mean_variances
from iwae.eval.exact import exact_log_likelihood
from iwae.eval.likelihood import log_likelihood
from iwae.models import (
    BernoulliLayer,
    DeepLatentModel,
    FactorisedBernoulli,
    GaussianLayer,
    LinearGaussian,
    StandardNormal,
    bernoulli_log_density,
    burda,
    sbn,
)


def linear_shapes(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def test_burda_one_layer_architecture() -> None:
    model = burda(1)
    assert linear_shapes(model.encoder) == [(784, 200), (200, 200), (200, 50), (200, 50)]
    assert linear_shapes(model.decoder) == [(50, 200), (200, 200), (200, 784)]
    leaves = {type(m) for m in model.modules() if not any(m.children())}
    assert leaves == {nn.Linear, nn.Tanh, StandardNormal}


def test_burda_two_layer_architecture() -> None:
    model = burda(2)
    q1, q2 = model.encoder
    p_x, p_z1, prior = model.decoder
    assert linear_shapes(q1) == [(784, 200), (200, 200), (200, 100), (200, 100)]
    assert linear_shapes(q2) == [(100, 100), (100, 100), (100, 50), (100, 50)]
    assert linear_shapes(p_z1) == [(50, 100), (100, 100), (100, 100), (100, 100)]
    assert linear_shapes(p_x) == [(100, 200), (200, 200), (200, 784)]
    assert isinstance(p_x, BernoulliLayer) and isinstance(p_z1, GaussianLayer) and isinstance(prior, StandardNormal)
    assert prior.loc.shape == (50,)


@pytest.mark.parametrize("layers", [1, 2])
def test_glorot_init_and_output_bias(layers: int) -> None:
    mean = torch.rand(784)
    mean[:3] = torch.tensor([0.0, 1.0, 1e-4])  # means the clipping changes
    model = burda(layers, train_mean=mean)
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            bound = math.sqrt(6 / (layer.in_features + layer.out_features))
            assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
            if layer is not model.decoder[0].logits:
                assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    p = mean.clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(torch.sigmoid(model.decoder[0].logits.bias), p, rtol=1e-4, atol=1e-6)


def test_encoder_and_decoder_partition_the_parameters() -> None:
    for model in (burda(1), burda(2), LinearGaussian(5, 3)):
        enc = {id(p) for p in model.encoder.parameters()}
        dec = {id(p) for p in model.decoder.parameters()}
        assert not enc & dec and enc | dec == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("layers", [1, 2])
def test_log_weights_shape_and_gradients(layers: int) -> None:
    model = burda(layers, x_dim=20)
    x = (torch.rand(3, 20) < 0.5).float()
    log_w = model.log_weights(x, 7)
    assert log_w.shape == (7, 3) and torch.isfinite(log_w).all()
    log_w.sum().backward()
    for part in (model.encoder, model.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_bad_arguments() -> None:
    for layers in (3, True, 2.0, "2"):  # an integer, not one that compares equal to it
        with pytest.raises(ValueError, match="layers must be 1 or 2"):
            burda(layers)
    assert len(burda(np.int64(2), x_dim=4).decoder) == len(burda(2, x_dim=4).decoder)
    with pytest.raises(ValueError, match="k must be a positive"):
        burda(1, x_dim=4).log_weights(torch.zeros(2, 4), 0)
    with pytest.raises(ValueError, match="one decoder layer per encoder layer"):
        DeepLatentModel([GaussianLayer(4, [], 2)], [], StandardNormal(2))


@pytest.mark.parametrize("x_dim", [0, -5, 2.5, "64", True])
def test_a_data_dimension_that_is_not_a_positive_integer_is_refused_by_each_architecture(x_dim: object) -> None:
    for build in (functools.partial(burda, 1), functools.partial(sbn, [3])):
        with pytest.raises(ValueError, match=re.escape(f"x_dim must be an integer >= 1; got {x_dim!r}")):
            build(x_dim=x_dim)


def test_sigmoid_belief_net_widths_are_checked_and_numpy_integers_taken() -> None:
    for widths in ([], "200", 5):
        with pytest.raises(ValueError, match="widths must be a sequence of at least one layer width"):
            sbn(widths, x_dim=6)
    with pytest.raises(ValueError, match="each of widths must be an integer >= 1; got 0"):
        sbn([4, 0], x_dim=6)
    model = sbn(np.array([4, 2]), x_dim=np.int64(6))
    assert linear_shapes(model.encoder) == [(6, 4), (4, 2)] and model.x_dim == 6 and type(model.x_dim) is int


@pytest.mark.parametrize("bad", [math.nan, 1.5, -0.25])
def test_training_means_that_are_not_probabilities_are_refused(bad: float) -> None:
    mean = torch.tensor([0.5, 0.25, bad, 0.0])
    for build in (functools.partial(burda, 1), functools.partial(sbn, [3])):
        with pytest.raises(ValueError, match=re.escape(f"mean must hold probabilities in [0, 1] (the training "
                                                       f"set's means); entry 2 is {bad:g}")):
            build(x_dim=4, train_mean=mean)


def test_data_of_another_dimension_is_refused_naming_the_models() -> None:
    model = burda(1, x_dim=16)
    message = (r"x has shape \(4, 17\), but the model is built for data of dimension x_dim=16; give x of shape "
               r"\(B, 16\), or build the model for x_dim=17")
    with pytest.raises(ValueError, match=message):
        loss(model, torch.ones(4, 17), "iwae", k=3)
    with pytest.raises(ValueError, match=message):
        model.log_weights(torch.ones(4, 17), 3)
    with pytest.raises(ValueError, match=message):
        ais_log_likelihood(model, torch.ones(4, 17), steps=2, chains=2, leapfrog=1)
    with pytest.raises(ValueError, match=message):
        active_units(model, torch.ones(4, 17))
    with pytest.raises(ValueError, match=message.replace("16", "6").replace("17", "7")):
        exact_log_likelihood(sbn([3], x_dim=6), torch.ones(4, 7))


@pytest.mark.parametrize("x_dim", [36, None])
def test_data_not_a_batch_of_vectors_is_refused_with_its_fix(x_dim: int | None) -> None:
    # one example, or images left unflattened: named with their shape and the fix, by every function that takes x,
    # before any of them counts or splits the examples (a vector would be taken for 36 examples)
    model = burda(1, x_dim=36)
    model.x_dim = x_dim
    calls = [lambda x: loss(model, x, "iwae", k=3), lambda x: model.log_weights(x, 3),
             lambda x: log_likelihood(model, x, k=3), lambda x: log_likelihood(model, x, k=3, seed=0),
             lambda x: active_units(model, x), lambda x: ais_log_likelihood(model, x, steps=2, chains=2, leapfrog=1)]
    for call in calls:
        with pytest.raises(ValueError) as error:
            call(torch.ones(36))
        assert str(error.value) == "x has shape (36,); give a batch of examples of shape (B, D): x[None] for a " \
                                   "single example"
        if x_dim is not None:  # unflattened images: flattened, not a model for rows of 6
            with pytest.raises(ValueError) as error:
                call(torch.ones(4, 6, 6))
            assert str(error.value) == ("x has shape (4, 6, 6), but the model is built for data of dimension "
                                        "x_dim=36; give x of shape (B, 36): x.flatten(1) flattens each example")


def test_a_stack_of_batches_is_refused_by_every_function_of_one_batch() -> None:
    # training takes (S, B, D) for a stack of seeds; an estimate per example or the active units would take its S
    # batches for S examples (or count S x B posterior means: 1000 active units of a layer of 50)
    model = burda(1, x_dim=4)
    calls = [lambda x: log_likelihood(model, x, k=3), lambda x: log_likelihood(model, x, k=3, seed=0),
             lambda x: active_units(model, x), lambda x: posterior_mean_variances(model, x),
             lambda x: ais_log_likelihood(model, x, steps=2, chains=2, leapfrog=1),
             lambda x: next(ais_batches(model, x, steps=2, chains=2, leapfrog=1)),
             lambda x: exact_log_likelihood(sbn([2], x_dim=4), x)]
    for call in calls:
        with pytest.raises(ValueError) as error:
            call(torch.ones(2, 3, 4))
        assert str(error.value) == ("x has shape (2, 3, 4); give a batch of examples of shape (B, D): "
                                    "x.flatten(0, -2) joins a stack of batches into one")


def test_no_examples_are_refused_in_one_line() -> None:
    model = burda(1, x_dim=4)
    for call in (lambda: loss(model, torch.ones(0, 4), "iwae", k=3), lambda: active_units(model, torch.ones(0, 4))):
        with pytest.raises(ValueError, match=r"^x holds no examples; give at least one$"):
            call()


def test_data_that_is_not_a_tensor_or_is_on_another_device_is_refused_in_one_line() -> None:
    model = burda(1, x_dim=4)
    calls = [lambda x: loss(model, x, "iwae", k=3), lambda x: model.log_weights(x, 3),
             lambda x: log_likelihood(model, x, k=3), lambda x: log_likelihood(model, x, k=3, seed=0),
             lambda x: active_units(model, x), lambda x: ais_log_likelihood(model, x, steps=2, chains=2, leapfrog=1)]
    for call in calls:
        with pytest.raises(ValueError) as error:
            call(np.ones((2, 4), dtype=np.float32))
        assert str(error.value) == ("x is a numpy.ndarray, not a torch.Tensor; give torch.as_tensor(x, "
                                    "dtype=torch.float32)")
        with pytest.raises(ValueError) as error:
            call(torch.ones(2, 4, device="meta"))
        assert str(error.value) == "x is on meta, the model's parameters on cpu; give x.to('cpu')"


def test_a_number_of_samples_that_is_not_a_positive_integer_is_refused_and_numpy_integers_taken() -> None:
    model, x = burda(1, x_dim=4), torch.ones(2, 4)
    for k in (0, 2.5, None, True):
        with pytest.raises(ValueError, match=re.escape(f"k must be a positive integer number of samples; got "
                                                       f"k={k!r}")):
            model.log_weights(x, k)
    torch.manual_seed(0)
    given = model.log_weights(x, np.int64(3))
    torch.manual_seed(0)
    assert torch.equal(given, model.log_weights(x, 3))
    expected = log_likelihood(model, x, k=10, seed=1)
    assert torch.equal(log_likelihood(model, x, k=np.int64(10), seed=np.int64(1), batch_size=np.int32(16)), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool])
def test_data_of_another_dtype_is_cast_when_no_value_changes(dtype: torch.dtype) -> None:
    model, x = burda(1, x_dim=16), (torch.rand(4, 16) < 0.5).float()
    results = []
    for given in (x, x.to(dtype)):
        torch.manual_seed(0)
        results.append(loss(model, given, "iwae", k=3, estimator="dreg"))
        torch.manual_seed(0)
        results.append(model.log_weights(given, 3))
    assert torch.equal(results[0].loss, results[2].loss) and torch.equal(results[1], results[3])


def test_data_that_a_cast_would_change_are_refused_naming_the_dtypes() -> None:
    x = torch.full((4, 16), 0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x is float64, the model's parameters float32, and not every value of x is "
                       r"exact in float32; give x.to\(torch.float32\), or move the model to float64 with "
                       r"model.to\(torch.float64\)"):
        loss(burda(1, x_dim=16), x, "iwae", k=3)
    integers = torch.full((4, 16), 2**25 + 1, dtype=torch.int64)  # a model cannot move to integers
    with pytest.raises(ValueError, match=r"exact in float32; give x.to\(torch.float32\)$"):
        loss(burda(1, x_dim=16), integers, "iwae", k=3)
    with pytest.warns(UserWarning, match="outside the support"):  # grey levels: only their dtype matters here
        assert loss(burda(1, x_dim=16).double(), x, "iwae", k=3).loss.dtype == torch.float64


class ConvEncoder(nn.Module):
    """A user's own encoder: any module returning a reparameterizable distribution over the latent."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 2 * 6)

    def forward(self, x: torch.Tensor) -> Independent:
        loc, log_scale = self.head(torch.relu(self.conv(x.view(-1, 1, 8, 8))).flatten(1)).chunk(2, -1)
        return Independent(Normal(loc, log_scale.exp()), 1)


def test_the_support_check_leaves_a_compiled_program_alone() -> None:
    # the flag that the first eager call sets is not read when compiled: a guard on it would compile anew every
    # program that calls the model once an eager call has checked (a training step, after the first epoch's test
    # bound; on a GPU, where every guard is checked, also recording a second CUDA graph)
    torch.manual_seed(0)
    model, x = burda(1, 16), (torch.rand(4, 16) < 0.5).float()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(lambda x: loss(model, x, "iwae", k=3).loss, backend="eager", fullgraph=True)
    compiled(x)
    loss(model, x, "iwae", k=3)  # eagerly: checks the support
    compiled(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_data_outside_the_decoders_support_warn_once(recwarn: pytest.WarningsRecorder) -> None:
    """Grey levels given to a Bernoulli decoder: a warning from loss() and from log_weights(), one per model
    (only its first batch is checked); binary data: none."""
    torch.manual_seed(0)
    grey, binary = torch.rand(4, 16), (torch.rand(4, 16) < 0.5).float()
    model = burda(1, 16)
    with pytest.warns(UserWarning, match=r"outside the support of p\(x \| z\), a Bernoulli .* binarize x first"):
        loss(model, grey, "iwae", k=3)
    loss(model, grey, "iwae", k=3)
    with pytest.warns(UserWarning, match="outside the support"):
        burda(2, 16).log_weights(grey, 3)
    recwarn.clear()
    fresh = burda(1, 16)
    loss(fresh, binary, "iwae", k=3)
    fresh.log_weights(binary, 3)
    assert not recwarn.list


def test_user_modules_plug_in() -> None:
    model = DeepLatentModel([ConvEncoder()], [BernoulliLayer(6, [32], 64)], StandardNormal(6))
    x = (torch.rand(5, 64) < 0.4).float()
    for estimator in ("standard", "stl", "dreg"):
        model.zero_grad()
        result = loss(model, x, "iwae", k=4, estimator=estimator)
        result.loss.backward()
        assert result.log_w.shape == (4, 5)
        assert model.encoder[0].conv.weight.grad.abs().sum() > 0


def test_linear_gaussian_marginal_matches_scipy() -> None:
    model = LinearGaussian(6, 3, sigma=0.7, generator=torch.Generator().manual_seed(1)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    w, b = model.likelihood.linear.weight.detach(), model.likelihood.linear.bias.detach()
    mu, var = model.decoder[1].mu.detach(), model.likelihood.log_sigma.detach().exp() ** 2
    cov = w @ w.T + var * torch.eye(6, dtype=torch.float64)
    expected = multivariate_normal(mean=(w @ mu + b).numpy(), cov=cov.numpy()).logpdf(x)
    torch.testing.assert_close(model.log_marginal(x).detach(), torch.as_tensor(expected), rtol=1e-12, atol=1e-10)


def test_linear_gaussian_exact_posterior_makes_every_weight_exact() -> None:
    """Bayes' rule: log p(x, z) - log p(z | x) = log p(x) for every z; with q = p(z | x) every log w_i is log p(x)."""
    model = LinearGaussian(7, 3, sigma=0.5, generator=torch.Generator().manual_seed(2)).double()
    x = torch.randn(5, 7, dtype=torch.float64) * 2
    log_px = model.log_marginal(x).detach()
    z = torch.randn(11, 5, 3, dtype=torch.float64)
    joint = model.log_joint(x, [z]) - model.exact_posterior(x).log_prob(z)
    torch.testing.assert_close(joint.detach(), log_px.expand(11, 5), rtol=0, atol=1e-10)

    assert (model.log_weights(x, 3) - log_px).abs().max() > 1e-3  # random q is not the posterior
    model.set_exact_posterior()
    log_w = model.log_weights(x, 200).detach()
    torch.testing.assert_close(log_w, log_px.expand(200, 5), rtol=0, atol=1e-10)
    for value in (bounds.elbo(log_w), bounds.iwae(log_w), bounds.miwae(log_w, 8), bounds.ciwae(log_w, 0.3),
                  bounds.vr(log_w, 0.5), bounds.vr(log_w, -math.inf)):
        torch.testing.assert_close(value, log_px, rtol=0, atol=1e-10)


@pytest.mark.parametrize("units", [1, 16, 50, 784])
def test_bernoulli_log_density_matches_torch_in_float64(units: int) -> None:
    # blocks of 16 units, padded where the units do not fill the last block; logits broadcast against x as the
    # k samples of a minibatch do
    torch.manual_seed(0)
    logits = (torch.randn(5, 3, units) * 6).double()
    x = (torch.rand(3, units) < 0.3).double()
    expected = Independent(Bernoulli(logits=logits), 1).log_prob(x)
    for blocked in (True, False):
        torch.testing.assert_close(bernoulli_log_density(logits, x, blocked), expected, rtol=1e-12, atol=1e-12)
    assert FactorisedBernoulli(logits).log_prob(x).shape == (5, 3)


def test_bernoulli_log_density_gradients_are_exact() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(4, 2, 19) * 3).double().requires_grad_()
    x = torch.rand(2, 19, dtype=torch.float64, requires_grad=True)  # grey levels: the density is linear in x
    blocked = functools.partial(bernoulli_log_density, blocked=True)
    assert torch.autograd.gradcheck(blocked, (logits, x))
    assert torch.autograd.gradgradcheck(blocked, (logits, x))


def test_bernoulli_log_density_in_float32_is_as_accurate_as_per_unit_terms() -> None:
    torch.manual_seed(0)
    for scale in (1.0, 5.0, 15.0):
        logits = torch.randn(1000, 784) * scale
        x = (torch.rand(1000, 784) < torch.sigmoid(logits)).float()
        exact = Independent(Bernoulli(logits=logits.double()), 1).log_prob(x.double())
        per_unit = Independent(Bernoulli(logits=logits), 1).log_prob(x)
        error = (bernoulli_log_density(logits, x, blocked=True).double() - exact).abs().max()
        assert error <= 2 * (per_unit.double() - exact).abs().max() + 1e-6


@pytest.mark.parametrize("wrong", ["encoder", "decoder", "prior"])
def test_a_layer_of_elementwise_distributions_is_named_with_its_fix(wrong: str) -> None:
    class Layer(nn.Module):
        def __init__(self, in_dim: int, out_dim: int, elementwise: bool) -> None:
            super().__init__()
            self.linear, self.elementwise = nn.Linear(in_dim, out_dim), elementwise

        def forward(self, h: torch.Tensor) -> torch.distributions.Distribution:
            normal = Normal(self.linear(h), 1.0)
            return normal if self.elementwise else Independent(normal, 1)

    class Prior(nn.Module):
        def forward(self) -> torch.distributions.Distribution:
            normal = Normal(torch.zeros(3), 1.0)
            return normal if wrong == "prior" else Independent(normal, 1)

    model = DeepLatentModel([Layer(5, 3, wrong == "encoder")], [Layer(3, 5, wrong == "decoder")], Prior(), x_dim=5)
    name = {"encoder": "encoder[0]", "decoder": "decoder[0]", "prior": "the prior"}[wrong]
    with pytest.raises(ValueError, match=re.escape(f"{name} returned a distribution of event shape (), not a "
                                                   "distribution over vectors (event shape (d,))")):
        loss(model, torch.zeros(4, 5), "iwae", k=2)
