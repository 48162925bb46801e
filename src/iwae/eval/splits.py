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


def subset(x: Tensor, limit: int | None) -> Tensor:
    """``limit`` rows of ``x`` chosen at random (the first ``limit`` of a permutation seeded with ``SUBSET_SEED``),
    in their order in ``x``; all of ``x`` if ``limit`` is None or not smaller than its length."""
    if limit is None or limit >= len(x):
        return x
    permutation = torch.randperm(len(x), generator=torch.Generator().manual_seed(SUBSET_SEED))
    return x[permutation[:limit].sort().values.to(x.device)]


def split_examples(dataset: data.Dataset, split: str, seed: int, limit: int | None = None) -> Tensor:
    """``limit`` (default: all) binary examples of a split, a random subset (see ``subset``): ``test``/``valid`` as
    loaded (binarized once with a fixed seed for dynamic data), ``train`` binarized here with a generator seeded
    with ``seed`` if dynamic."""
    if split == "train":
        x = subset(dataset.train, limit)
        if dataset.binarization == "static":
            return x
        return data.binarize(x, torch.Generator(x.device).manual_seed(seed))
    if split == "test":
        return subset(dataset.test, limit)
    if split == "valid" and dataset.valid is not None:
        return subset(dataset.valid, limit)
    raise SettingError("{0} {split!r} is not available for {name}; choose train or test", ("split",), split=split,
                       name=dataset.name)
