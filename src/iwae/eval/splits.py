"""The binary examples of a dataset's split that an evaluation uses.

An evaluation of N examples of a split uses a random subset of it, never its first N: the first N of a fixed
permutation of the split (seeded with ``SUBSET_SEED``, whatever the evaluation's seed), so that every run, method
and evaluation seed given the same N sees the same examples, and those of a smaller N are among those of a larger.
The first examples of a dataset are not a fair sample of it (MNIST's first 1000 test images are denser than the
rest)."""

from __future__ import annotations

import torch
from torch import Tensor

from iwae import data
from iwae.settings import SettingError

SPLITS = ("test", "train", "valid")
SUBSET_SEED = 0
BINARIZE_ROWS = 4096


def subset(x: Tensor, limit: int | None) -> Tensor:
    """``limit`` rows of ``x`` chosen at random (the first ``limit`` of a permutation seeded with ``SUBSET_SEED``),
    in their order in ``x``; all of ``x`` if ``limit`` is None or not smaller than its length."""
    return x if limit is None or limit >= len(x) else x[_chosen(len(x), limit).to(x.device)]


def _chosen(n: int, limit: int) -> Tensor:
    """The indices, in order, of the ``limit`` rows of ``n`` that ``subset`` takes."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(SUBSET_SEED))[:limit].sort().values


def _binarized_subset(x: Tensor, limit: int | None, seed: int) -> Tensor:
    """``subset(binarize(x, generator seeded with seed), limit)``, binarizing ``BINARIZE_ROWS`` rows of ``x`` at a
    time (in a set of millions of rows, the whole set's noise need not be held at once)."""
    everything = limit is None or limit >= len(x)
    chosen = torch.arange(len(x)) if everything else _chosen(len(x), limit)
    chosen = chosen.to(x.device)
    generator = torch.Generator(x.device).manual_seed(seed)
    parts = []
    for start in range(0, len(x), BINARIZE_ROWS):
        block = data.binarize(x[start:start + BINARIZE_ROWS], generator)
        rows = chosen[(chosen >= start) & (chosen < start + BINARIZE_ROWS)]
        parts.append(block[rows - start])
    return torch.cat(parts)


def split_examples(dataset: data.Dataset, split: str, seed: int, limit: int | None = None) -> Tensor:
    """``limit`` (default: all) binary examples of a split, a random subset (see ``subset``): ``test``/``valid`` as
    loaded (binarized once with a fixed seed for dynamic data), ``train`` binarized here if dynamic: the whole
    split with a generator seeded with ``seed``, then the subset taken, so that at one seed the examples of a
    smaller ``limit`` are those of a larger one, binarized alike."""
    if split == "train":
        return subset(dataset.train, limit) if dataset.binarization == "static" else _binarized_subset(
            dataset.train, limit, seed)
    if split == "test":
        return subset(dataset.test, limit)
    if split == "valid" and dataset.valid is not None:
        return subset(dataset.valid, limit)
    raise SettingError("{0} {split!r} is not available for {name}; choose train or test", ("split",), split=split,
                       name=dataset.name)
