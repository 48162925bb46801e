"""The evaluator against closed forms: exact log-likelihoods, group bounds, ESS, chunking, active units."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from iwae.core.objectives import Objective
from iwae.eval import activity, likelihood
from iwae.models import DeepLatentModel, LinearGaussian, burda
from iwae.models.linear_gaussian import AffineGaussianEncoder, GaussianPrior, LinearGaussianLikelihood
from iwae.platform import device as devices


def linear_gaussian(q_shift: float) -> tuple[LinearGaussian, torch.Tensor]:
    """A float64 linear-Gaussian model whose q is the exact posterior with its mean moved by ``q_shift``,
    and 200 standard normal examples."""
    g = torch.Generator().manual_seed(0)
    model = LinearGaussian(5, 3, sigma=0.5, generator=g).double()
    model.set_exact_posterior()
    with torch.no_grad():
        model.q.linear.bias.add_(q_shift)
    return model, torch.randn(200, 5, generator=g, dtype=torch.float64)


def test_exact_posterior_gives_the_marginal_exactly() -> None:
    # With q = p(z|x) every weight equals p(x), so any k recovers log p(x) up to rounding.
    model, x = linear_gaussian(0.0)
    got = likelihood.log_likelihood(model, x, k=50, seed=0)
    assert got.shape == (200,)
    torch.testing.assert_close(got, model.log_marginal(x).detach(), rtol=0, atol=1e-10)


def test_nll_matches_closed_form_within_three_standard_errors() -> None:
    # An imperfect q: the estimate is random, and its error per example is independent across examples, so
    # the mean error is compared with the standard error estimated from the per-example errors themselves.
    model, x = linear_gaussian(0.3)
    error = (likelihood.log_likelihood(model, x, k=5000, batch_size=200, seed=1) - model.log_marginal(x)).detach()
    standard_error = error.std().item() / math.sqrt(len(error))
    assert standard_error > 0
    assert abs(error.mean().item()) < 3 * standard_error


def test_group_bounds_increase_with_k_towards_the_marginal() -> None:
    model, x = linear_gaussian(0.3)
    with devices.seeded(2, x.device):
        stats = likelihood.importance_statistics(model, x, k=5000, batch_size=200)
    assert sorted(stats.bounds) == [1, 5, 50, 5000]
    means = [stats.bounds[g].mean().item() for g in (1, 5, 50, 5000)]
    assert means == sorted(means)
    assert means[-1] <= model.log_marginal(x).mean().item() + 0.01
    assert bool(((stats.ess >= 1) & (stats.ess <= 5000)).all())


class ScriptedWeights(torch.nn.Module):
    """A stand-in model whose ``log_weights`` hands out the rows of a fixed (K, B) array in order."""

    def __init__(self, log_w: np.ndarray) -> None:
        super().__init__()
        self.log_w = torch.from_numpy(log_w)
        self.taken = 0
        self.largest_request = 0

    def log_weights(self, x: torch.Tensor, k: int) -> torch.Tensor:
        assert x.shape[0] == self.log_w.shape[1]
        self.largest_request = max(self.largest_request, k)
        rows = self.log_w[self.taken:self.taken + k]
        self.taken += k
        return rows


@pytest.mark.parametrize("chunk_size", [50, 100, 1000])
def test_statistics_equal_their_definitions_whatever_the_chunk_size(chunk_size: int) -> None:
    log_w = np.random.default_rng(0).normal(-50.0, 3.0, size=(100, 6))
    model = ScriptedWeights(log_w)
    stats = likelihood.importance_statistics(model, torch.zeros(6, 1), k=100, chunk_size=chunk_size, batch_size=6)
    assert model.largest_request == min(chunk_size, 100)
    np.testing.assert_allclose(stats.log_likelihood.numpy(), logsumexp(log_w, 0) - math.log(100), rtol=1e-12)
    for g in (1, 5, 50):
        groups = log_w.reshape(100 // g, g, 6)
        expected = (logsumexp(groups, 1) - math.log(g)).mean(0)
        np.testing.assert_allclose(stats.bounds[g].numpy(), expected, rtol=1e-12)
    w = np.exp(log_w - log_w.max(0))
    np.testing.assert_allclose(stats.ess.numpy(), w.sum(0) ** 2 / (w**2).sum(0), rtol=1e-10)


def test_groups_that_would_straddle_chunks_are_left_out() -> None:
    log_w = np.zeros((100, 2))
    stats = likelihood.importance_statistics(ScriptedWeights(log_w), torch.zeros(2, 1), k=100, chunk_size=20)
    assert sorted(stats.bounds) == [1, 5, 100]


def test_groups_are_reported_only_where_they_divide_k() -> None:
    # k = 110 in chunks of 50 (the last of 10): 50 divides the chunks but not k, so only g = 1 and 5 are reported
    log_w = np.random.default_rng(1).normal(-20.0, 2.0, size=(110, 3))
    stats = likelihood.importance_statistics(ScriptedWeights(log_w), torch.zeros(3, 1), k=110, chunk_size=50)
    assert sorted(stats.bounds) == [1, 5, 110]
    expected = (logsumexp(log_w.reshape(22, 5, 3), 1) - math.log(5)).mean(0)  # IWAE_5 over the 22 groups
    np.testing.assert_allclose(stats.bounds[5].numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(stats.bounds[110].numpy(), logsumexp(log_w, 0) - math.log(110), rtol=1e-12)


def test_chunking_does_not_change_the_estimate_for_the_same_seed() -> None:
    model, x = linear_gaussian(0.3)
    whole = likelihood.log_likelihood(model, x, k=2000, chunk_size=2000, batch_size=200, seed=3)
    for chunk_size in (500, 48):
        chunked = likelihood.log_likelihood(model, x, k=2000, chunk_size=chunk_size, batch_size=200, seed=3)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-10)


def test_seeded_evaluation_leaves_the_global_generator_alone() -> None:
    model, x = linear_gaussian(0.3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = likelihood.log_likelihood(model, x[:10], k=20, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    torch.testing.assert_close(likelihood.log_likelihood(model, x[:10], k=20, seed=5), first, rtol=0, atol=0)


def test_active_units_count_units_whose_posterior_mean_varies() -> None:
    model, x = linear_gaussian(0.0)
    with torch.no_grad():
        model.q.linear.weight.zero_()
        model.q.linear.weight[0, 0] = 1.0  # Var_x = Var(x_0) = 1: active
        model.q.linear.weight[1, 1] = 0.05  # Var_x = 0.0025 < 0.01: inactive
    assert activity.active_units(model, x) == [1]


def test_a_unit_is_active_when_the_population_variance_of_its_mean_exceeds_0_01() -> None:
    model, _ = linear_gaussian(0.0)
    x = torch.zeros(2, 5, dtype=torch.float64)
    x[1, 0] = 1.0  # two examples, x_0 = 0 and 1
    with torch.no_grad():
        model.q.linear.bias.zero_()
        model.q.linear.weight.zero_()
        model.q.linear.weight[:, 0] = torch.tensor([1.0, 0.06**0.5, 0.5], dtype=torch.float64)  # E_q[z_u | x] = w_u x_0
    variances = activity.posterior_mean_variances(model, x)[0]
    # the variance over the examples, not the sample variance (n - 1: 0.5, 0.03, 0.125)
    assert variances[0].item() == 0.25 and variances[2].item() == 0.0625
    assert variances[1].item() == pytest.approx(0.015, rel=1e-12)
    assert activity.active_units(model, x) == [3]  # 0.015 is above 0.01
    assert activity.active_units(model, x, threshold=0.0625) == [1]  # a variance equal to the threshold is not


def test_active_units_has_one_count_per_stochastic_layer() -> None:
    torch.manual_seed(0)
    model = burda(2, x_dim=20)
    counts = activity.active_units(model, (torch.rand(100, 20) < 0.5).float())
    assert len(counts) == 2 and 0 <= counts[0] <= 100 and 0 <= counts[1] <= 50


def test_upper_layers_mean_is_taken_at_a_z1_drawn_from_q() -> None:
    """q(z1 | x) = N(0, 3^2 I) whatever x, q(z2 | z1) = N(z1, I): E_q[z1 | x] does not vary (variance 0), while
    the mean of z2's layer at a drawn z1, the authors' convention (docs/evaluation.md), varies with variance 9."""
    first, second = AffineGaussianEncoder(4, 2), AffineGaussianEncoder(2, 2)
    with torch.no_grad():
        for parameter in (*first.parameters(), *second.parameters()):
            parameter.zero_()
        first.raw_scale_tril.diagonal().fill_(math.log(3.0))
        second.linear.weight.copy_(torch.eye(2))
    model = DeepLatentModel([first, second], [LinearGaussianLikelihood(2, 4), LinearGaussianLikelihood(2, 2)],
                            GaussianPrior(2)).double()
    torch.manual_seed(0)
    variances = activity.posterior_mean_variances(model, torch.randn(500, 4, dtype=torch.float64))
    assert variances[0].max() == 0
    assert ((variances[1] - 9).abs() < 1.5).all(), variances[1]


class RecordedWeights(torch.nn.Module):
    """A stand-in model with log w_i(x) = i - sum(x) that records the (sample, example) pairs of each request."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[int] = []

    def log_weights(self, x: torch.Tensor, k: int) -> torch.Tensor:
        self.requests.append(k * len(x))
        return torch.arange(k, dtype=x.dtype)[:, None] - x.sum(1)


@pytest.mark.parametrize(("k", "max_rows"), [(5, 12), (5, 5), (7, 100), (10, 3)])
def test_objective_bound_takes_passes_of_at_most_max_rows_pairs(k: int, max_rows: int) -> None:
    model, x = RecordedWeights(), torch.randn(23, 3, dtype=torch.float64)
    objective = Objective("iwae", k)
    bound = likelihood.objective_bound(model, x, objective, max_rows=max_rows)
    torch.testing.assert_close(bound, objective.bound(model.log_weights(x, k)), rtol=1e-12, atol=1e-12)
    passes = model.requests[:-1]
    assert sum(passes) == k * len(x) and max(passes) <= max(max_rows, k)


@pytest.mark.slow
def test_compiled_evaluation_equals_eager() -> None:
    """Same seed, same samples: the compiled passes (last batch padded) give the eager estimates."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = LinearGaussian(5, 2), torch.randn(10, 5)
    results = []
    for compile in (False, True):
        torch.manual_seed(3)
        results.append(likelihood.importance_statistics(model, x, k=100, chunk_size=50, batch_size=4, compile=compile))
    eager, compiled = results
    torch.testing.assert_close(compiled.log_likelihood, eager.log_likelihood, rtol=0, atol=1e-4)
    torch.testing.assert_close(compiled.ess, eager.ess, rtol=1e-3, atol=0)
    assert compiled.bounds.keys() == eager.bounds.keys()


def test_a_limited_evaluation_uses_a_random_subset_the_same_for_every_seed() -> None:
    # The examples of --examples N: not the split's first N, the same whatever the evaluation's seed, nested in N.
    from iwae.data import Dataset
    from iwae.eval.splits import split_examples

    test = torch.arange(1000, dtype=torch.float32).unsqueeze(1).expand(1000, 4).contiguous()
    dataset = Dataset("rows", torch.zeros(10, 4), test, "static")
    small, large = split_examples(dataset, "test", 0, 100), split_examples(dataset, "test", 7, 300)
    rows = small[:, 0].long()
    assert len(small) == 100 and not torch.equal(rows, torch.arange(100))
    assert rows.max() > 500 and bool((rows.diff() > 0).all())  # spread over the split, in its order
    assert set(rows.tolist()) <= set(large[:, 0].long().tolist())
    torch.testing.assert_close(split_examples(dataset, "test", 3, 100), small)
    torch.testing.assert_close(split_examples(dataset, "test", 0, None), test)
    torch.testing.assert_close(split_examples(dataset, "test", 0, 5000), test)


def test_the_subset_is_that_of_the_fixed_permutation_and_valid_is_the_valid_split() -> None:
    from iwae.data import Dataset
    from iwae.eval import splits

    # the first rows of torch.randperm seeded with 0, sorted: reports of --examples N name these rows
    assert splits.subset(torch.arange(10), 4).tolist() == [1, 4, 5, 7]
    assert splits.subset(torch.arange(20), 5).tolist() == [4, 5, 7, 13, 19]
    rows = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    dataset = Dataset("rows", rows, rows + 100, "static", valid=rows + 200)
    assert torch.equal(splits.split_examples(dataset, "valid", 0), rows + 200)
    assert torch.equal(splits.split_examples(dataset, "valid", 0, 4), rows[[1, 4, 5, 7]] + 200)
    assert torch.equal(splits.split_examples(dataset, "test", 0, 4), rows[[1, 4, 5, 7]] + 100)


def test_a_limited_evaluation_of_dynamic_training_data_binarizes_its_subsets_alike() -> None:
    # At one seed, the training examples of --examples N are those of a larger N binarized alike, and all of them
    # are the whole split's binarization (drawn a block of rows at a time, more rows than one block here)
    from iwae.data import Dataset, binarize
    from iwae.eval import splits

    train = torch.rand(2 * splits.BINARIZE_ROWS + 300, 3, generator=torch.Generator().manual_seed(1))
    dataset = Dataset("grey", train, torch.zeros(4, 3), "dynamic")
    whole = binarize(train, torch.Generator().manual_seed(5))
    torch.testing.assert_close(splits.split_examples(dataset, "train", 5), whole)
    rows = torch.arange(len(train)).unsqueeze(1)
    for n in (100, 3000):
        chosen = splits.subset(rows, n).squeeze(1)  # the rows of --examples n
        torch.testing.assert_close(splits.split_examples(dataset, "train", 5, n), whole[chosen])
    small = splits.split_examples(dataset, "train", 5, 100)
    assert not torch.equal(splits.split_examples(dataset, "train", 6, 100), small)  # the seed draws the binarization
