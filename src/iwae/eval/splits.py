"""The binary examples of a dataset's split that an evaluation uses."""

from __future__ import annotations

import torch
from torch import Tensor

from iwae import data
from iwae.settings import SettingError

SPLITS = ("test", "train", "valid")


def split_examples(dataset: data.Dataset, split: str, seed: int, limit: int | None = None) -> Tensor:
    """The first ``limit`` (default: all) binary examples of a split: ``test``/``valid`` as loaded (binarized
    once with a fixed seed for dynamic data), ``train`` binarized here with a generator seeded with ``seed``
    if dynamic."""
    if split == "train":
        x = dataset.train[:limit]
        if dataset.binarization == "static":
            return x
        return data.binarize(x, torch.Generator(x.device).manual_seed(seed))
    if split == "test":
        return dataset.test[:limit]
    if split == "valid" and dataset.valid is not None:
        return dataset.valid[:limit]
    raise SettingError("{0} {split!r} is not available for {name}; choose train or test", ("split",), split=split,
                       name=dataset.name)
