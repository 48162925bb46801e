"""Minibatch production: epoch permutations, dynamic binarization and the one-time test binarization."""

import math

import pytest
import torch

from iwae.data import Dataset, binarize, epoch_batches, load


def _binomial_tolerance(p: torch.Tensor, draws: int, z: float = 5.0) -> float:
    """z standard errors of the mean of ``draws`` Bernoulli(p) samples of every element of ``p``."""
    return z * math.sqrt(float((p * (1 - p)).sum()) * draws) / (p.numel() * draws)


def test_epoch_batches_partition_a_permutation():
    batches = epoch_batches(103, 10, torch.Generator().manual_seed(0))
    assert batches.shape == (10, 10) and batches.dtype == torch.int64
    assert batches.unique().numel() == 100 and batches.min() >= 0 and batches.max() < 103


def test_epoch_batches_fresh_each_epoch_and_reproducible():
    generator = torch.Generator().manual_seed(1)
    first, second = epoch_batches(1000, 20, generator), epoch_batches(1000, 20, generator)
    assert not torch.equal(first, second)
    replay = torch.Generator().manual_seed(1)
    assert torch.equal(epoch_batches(1000, 20, replay), first)
    assert torch.equal(epoch_batches(1000, 20, replay), second)


def test_epoch_batches_of_the_whole_set_as_one_batch():
    batches = epoch_batches(10, 10, torch.Generator().manual_seed(0))
    assert batches.shape == (1, 10) and sorted(batches[0].tolist()) == list(range(10))


@pytest.mark.parametrize("batch_size", [0, 11])
def test_epoch_batches_rejects_impossible_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        epoch_batches(10, batch_size)


def test_binarize_is_binary_keeps_dtype_and_certain_pixels():
    x = torch.tensor([[0.0, 1.0, 0.5, 0.0, 1.0]]).repeat(1000, 1)
    bits = binarize(x, torch.Generator().manual_seed(0))
    assert bits.dtype == x.dtype and set(bits.unique().tolist()) <= {0.0, 1.0}
    assert (bits[:, [0, 3]] == 0).all() and (bits[:, [1, 4]] == 1).all()


# torch's CPU generator seeded with 1 draws exactly 0.0 as uniform number 2,753,120 of 2**24 (the uniforms lie in
# [0, 1)): a pixel at 0 must stay 0 where its uniform is 0
ZERO_UNIFORM_SEED, ZERO_UNIFORM_DRAWS = 1, 2**24


def test_binarize_keeps_a_black_pixel_black_when_its_uniform_is_zero():
    generator = torch.Generator().manual_seed(ZERO_UNIFORM_SEED)
    assert (torch.rand(ZERO_UNIFORM_DRAWS, generator=generator) == 0).any()  # the case this test is about
    black = binarize(torch.zeros(ZERO_UNIFORM_DRAWS), torch.Generator().manual_seed(ZERO_UNIFORM_SEED))
    assert not black.any()


def test_binarize_fresh_draws_reproducible_under_seed():
    x = torch.full((50, 784), 0.5)
    generator = torch.Generator().manual_seed(2)
    first, second = binarize(x, generator), binarize(x, generator)
    assert not torch.equal(first, second)
    replay = torch.Generator().manual_seed(2)
    assert torch.equal(binarize(x, replay), first) and torch.equal(binarize(x, replay), second)


def test_binarize_mean_matches_grey_levels():
    grey = load("digits").train
    draws = 20
    generator = torch.Generator().manual_seed(3)
    mean = torch.stack([binarize(grey, generator) for _ in range(draws)]).mean()
    assert abs(float(mean) - float(grey.mean())) < _binomial_tolerance(grey, draws)


def test_binarize_each_pixel_is_bernoulli_of_its_grey_level():
    p = torch.linspace(0, 1, 101)
    draws = 4000
    frequency = binarize(p.expand(draws, -1), torch.Generator().manual_seed(4)).mean(0)
    standard_error = (p * (1 - p) / draws).sqrt()
    assert ((frequency - p).abs() <= 5 * standard_error + 1e-6).all()


def test_minibatch_binarizes_dynamic_and_gathers_static():
    grey = torch.rand(30, 4, generator=torch.Generator().manual_seed(5))
    idx = torch.tensor([3, 7, 7, 0])
    dynamic = Dataset("toy", grey, grey, "dynamic")
    bits = dynamic.minibatch(idx, torch.Generator().manual_seed(6))
    assert torch.equal(bits, binarize(grey[idx], torch.Generator().manual_seed(6)))
    static = Dataset("toy", grey.round(), grey.round(), "static")
    assert torch.equal(static.minibatch(idx), grey.round()[idx])


def test_test_set_binarized_once_with_the_eval_seed():
    first, again, other = load("digits"), load("digits"), load("digits", eval_seed=1)
    assert set(first.test.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(first.test, again.test) and not torch.equal(first.test, other.test)
    assert torch.equal(first.train, other.train) and len(first.train.unique()) == 17


def test_digits_split_and_shape():
    digits = load("digits")
    assert digits.train.shape == (1500, 64) and digits.test.shape == (297, 64)
    assert digits.train.dtype == torch.float32 and digits.valid is None
    assert digits.image_shape == (8, 8) and digits.binarization == "dynamic"
    moved = digits.to("cpu")
    assert torch.equal(moved.train, digits.train) and moved.name == "digits"


def test_digits_are_their_intensities_over_16():
    train = load("digits").train
    assert set(train.unique().tolist()) == {level / 16 for level in range(17)} and train.max() == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_minibatches_on_cuda_never_synchronise_with_the_host():
    data = load("digits").to("cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for idx in epoch_batches(len(data.train), 20, generator):
            x = data.minibatch(idx, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.device.type == "cuda" and x.shape == (20, 64)
