"""The datasets by name, their train/valid/test splits and their binarization, as tensors in memory.

Dynamic binarization (Burda et al. 2016, after Salakhutdinov & Murray 2008) treats grey levels as
Bernoulli means: ``.train`` keeps the grey levels and every minibatch is binarized afresh
(``Dataset.minibatch``), while the held-out sets ``.valid`` and ``.test`` are binarized once, at load time,
with a fixed seed, so every evaluation (all k samples, every run) sees the same binary x. Static datasets
are binary already and used as they are.
"""

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from iwae.data.batching import binarize
from iwae.data.catalogue import FILES, file_digest
from iwae.data.errors import DataError
from iwae.data.formats import read_amat, read_chardata, read_idx_images, read_user_arrays
from iwae.data.sources import locate

Binarization = Literal["dynamic", "static"]
Split = Literal["paper", "code"]
PathLike = str | os.PathLike[str]
Arrays = dict[str, np.ndarray]

DIGITS_TEST = 297
USER_SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    """A dataset held as float32 tensors of shape (N, D) with values in [0, 1].

    Attributes:
        name: the name given to ``load``.
        train: training examples; grey levels for dynamic binarization.
        test: test examples; for dynamic binarization already binarized once with ``load``'s ``eval_seed``.
        binarization: "dynamic" (binarize each training minibatch afresh) or "static" (already binary).
        valid: held-out examples binarized like ``test``, or None when the split has none.
        image_shape: (height, width) for drawing examples as images, or None if D is not a known image.
    """

    name: str
    train: Tensor = field(repr=False)
    test: Tensor = field(repr=False)
    binarization: Binarization
    valid: Tensor | None = field(default=None, repr=False)
    image_shape: tuple[int, int] | None = None

    def to(self, device: torch.device | str) -> "Dataset":
        """The same dataset with its tensors on ``device``."""
        valid = None if self.valid is None else self.valid.to(device)
        return replace(self, train=self.train.to(device), test=self.test.to(device), valid=valid)

    def minibatch(self, idx: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The training examples at ``idx``, freshly binarized with ``generator`` if dynamic."""
        x = self.train[idx]
        return binarize(x, generator) if self.binarization == "dynamic" else x


@dataclass(frozen=True)
class _Spec:
    """How to read a named dataset, and the official code's held-out split of its training set."""

    read: Callable[[PathLike | None, bool], Arrays]
    binarization: Binarization
    image_shape: tuple[int, int]
    code_holdout: int | None = None
    code_shuffle_seed: int | None = None


def load(
    name: PathLike,
    data_dir: PathLike | None = None,
    download: bool = True,
    *,
    split: Split = "paper",
    test_fraction: float = 0.1,
    eval_seed: int = 0,
    sha256: str | None = None,
) -> Dataset:
    """Load a dataset by name, or a user's array file, into memory.

    Names and splits:
        ``mnist``: LeCun's IDX files, 60,000 train / 10,000 test, dynamic. ``split="code"``: the official
            IWAE code's split, the first 59,600 training images for training and the last 400 as ``valid``.
        ``fashion-mnist``: Zalando's IDX files, 60,000 / 10,000, dynamic.
        ``binarized-mnist``: Larochelle's fixed binarization, 50,000 train / 10,000 valid / 10,000 test, static.
        ``omniglot``: the IWAE paper's 28x28 ``chardata.mat``, 24,345 train / 8,070 test, dynamic.
            ``split="code"``: the official code's split, the training set shuffled by
            ``numpy.random.RandomState(123).permutation`` and its last 1,345 held out as ``valid``.
        ``digits``: scikit-learn's 8x8 digits (no download), intensity/16, dynamic; the first 1,500 train, the last 297.
        a path ending in ``.npy`` or ``.npz``: the user's (N, D) array(s) with values in [0, 1]. An .npz
            may hold ``train`` and optionally ``valid``/``test``; without ``test``, a ``test_fraction`` of
            the rows, chosen by a permutation seeded with 0, is held out as the test set. Static if every
            value is 0 or 1, else dynamic.

    Files are searched for in ``data_dir``, then ``$IWAE_DATA_DIR``, then the per-user cache, and else
    downloaded into the cache (if ``download``); every file's checksum is verified, and the folder read
    from is printed to stderr.

    Args:
        name: a name above or a path to a .npy/.npz file.
        data_dir: a directory holding the files, in per-dataset folders (``mnist/``, ``fashion_mnist/``,
            ``binarized_mnist/``, ``omniglot/``) or directly.
        download: whether a file found nowhere may be downloaded.
        split: "paper" (the paper's train/test split) or "code" (the official code's held-out split).
        test_fraction: the fraction of a user's array held out as test set when the file has no ``test``.
        eval_seed: the seed of the one-time binarization of ``test`` (and of ``valid``, with seed + 1).
        sha256: the SHA-256 that a user's file must have (the one its run recorded: ``user_file_sha256``).

    Raises:
        DataError: for an unknown name, an unavailable split, a missing, unverifiable, corrupt or changed file, or
            a user array of the wrong shape, dtype or value range.
    """
    key = os.fspath(name)
    _check_numbers(test_fraction, eval_seed)
    spec = _spec(key, split)
    if spec is not None:
        arrays = spec.read(data_dir, download)
        if split == "code":
            arrays = _code_split(arrays, spec.code_holdout, spec.code_shuffle_seed)
        binarization, image_shape = spec.binarization, spec.image_shape
    else:
        arrays, binarization, image_shape = _user_arrays(key, test_fraction, sha256)
    tensors = {split_name: torch.from_numpy(np.asarray(a, np.float32)) for split_name, a in arrays.items()}
    if binarization == "dynamic":
        tensors = _held_out_binarized(tensors, eval_seed)
    return Dataset(key, tensors["train"], tensors["test"], binarization, tensors.get("valid"), image_shape)


def _held_out_binarized(tensors: dict[str, Tensor], eval_seed: int) -> dict[str, Tensor]:
    """``tensors`` with ``test`` binarized once with seed ``eval_seed``, and ``valid`` with ``eval_seed + 1``."""
    binarized = dict(tensors)
    for offset, held_out in enumerate(("test", "valid")):
        if held_out in tensors:
            binarized[held_out] = binarize(tensors[held_out], torch.Generator().manual_seed(eval_seed + offset))
    return binarized


def recorded_name(name: PathLike) -> str:
    """The name a run records for dataset ``name``: a catalogue name as it is, the path of a user's .npy/.npz file
    made absolute (and ``..`` taken out: one file, one name), so that the run's data is found from whatever
    directory it is resumed or evaluated in."""
    key = os.fspath(name)
    return os.path.abspath(Path(key).expanduser()) if _is_user_file(key) else key


def user_file_sha256(name: PathLike) -> str | None:
    """The SHA-256 of the user's .npy/.npz file ``name``, which a run records to know its file again (changed, or
    moved); None for a catalogue name (whose files are checked against their published checksums) or a file that
    is not there."""
    key = os.fspath(name)
    path = Path(key).expanduser()
    return file_digest(path, "sha256") if _is_user_file(key) and path.is_file() else None


def reads_data_dir(name: PathLike) -> bool:
    """Whether dataset ``name`` is read from files searched for in a data directory (``load``'s ``data_dir``): a
    catalogue dataset other than ``digits`` (bundled with scikit-learn), not a user's file."""
    key = os.fspath(name)
    return not _is_user_file(key) and key != "digits"


def _check_numbers(test_fraction: float, eval_seed: int) -> None:
    """Refuse a ``test_fraction`` that is not a finite number (one that leaves an empty train or test set is
    refused where the rows are counted), or an ``eval_seed`` that is no integer in [0, 2**63 - 2] (``valid`` is
    binarized with ``eval_seed + 1``, and ``torch.Generator.manual_seed`` takes at most 2**63 - 1)."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, int | float | np.floating) or not (
            math.isfinite(test_fraction)):
        raise DataError(f"test_fraction must be a number between 0 and 1 (the share of the rows held out as the "
                        f"test set); got {test_fraction!r}.")
    if isinstance(eval_seed, bool) or not isinstance(eval_seed, int | np.integer) or not 0 <= eval_seed < 2**63 - 1:
        raise DataError(f"eval_seed must be an integer from 0 to 2**63 - 2; got {eval_seed!r}.")


def _is_user_file(key: str) -> bool:
    """Whether dataset ``key`` names a user's .npy/.npz file rather than a catalogue dataset."""
    return key.lower().endswith((".npy", ".npz"))


def _spec(key: str, split: Split) -> _Spec | None:
    """How to read the dataset named ``key`` (None for a user's file), checked to have ``split``."""
    spec = _SPECS.get(key)
    if split not in ("paper", "code"):
        raise DataError(f"Split '{split}' is unknown; choose 'paper' or 'code'.")
    if split == "code" and (spec is None or spec.code_holdout is None):
        raise DataError(f"Split 'code' is not available for {key}; it exists for mnist and omniglot.")
    return spec


def _user_arrays(key: str, test_fraction: float, sha256: str | None
                 ) -> tuple[Arrays, Binarization, tuple[int, int] | None]:
    """A user's .npy/.npz file's arrays (see ``load``), their binarization and image shape (square, or None)."""
    if not _is_user_file(key):
        raise DataError(
            f"Dataset '{key}' is unknown; choose one of {', '.join(DATASETS)}, or give the path of a .npy or "
            ".npz file of shape (N, D) with values in [0, 1]."
        )
    arrays = _read_user(Path(key).expanduser(), test_fraction, sha256)
    binary = all(np.isin(array, (0, 1)).all() for array in arrays.values())
    side = math.isqrt(arrays["train"].shape[1])
    image_shape = (side, side) if side * side == arrays["train"].shape[1] else None
    return arrays, "static" if binary else "dynamic", image_shape


_REPORTED: set[str] = set()  # "reading ... from ..." lines printed already by this process


def _locate_all(name: str, data_dir: PathLike | None, download: bool) -> dict[str, Path]:
    """The verified path of each of ``name``'s files, printing the folder(s) they were found in (once per
    process: training, its evaluation and its figures read the same files)."""
    paths = {part: locate(remote, data_dir, download) for part, remote in FILES[name].items()}
    folders = ", ".join(sorted({str(path.parent) for path in paths.values()}))
    line = f"iwae: reading {name} from {folders}"
    if line not in _REPORTED:
        _REPORTED.add(line)
        print(line, file=sys.stderr)
    return paths


def _read_idx(name: str, data_dir: PathLike | None, download: bool) -> Arrays:
    paths = _locate_all(name, data_dir, download)
    return {part: np.divide(read_idx_images(path), 255, dtype=np.float32) for part, path in paths.items()}


def _read_binarized_mnist(data_dir: PathLike | None, download: bool) -> Arrays:
    paths = _locate_all("binarized-mnist", data_dir, download)
    return {part: read_amat(path) for part, path in paths.items()}


def _read_omniglot(data_dir: PathLike | None, download: bool) -> Arrays:
    train, test = read_chardata(_locate_all("omniglot", data_dir, download)["chardata"])
    return {"train": train, "test": test}


def _read_digits(data_dir: PathLike | None, download: bool) -> Arrays:
    from sklearn.datasets import load_digits  # scikit-learn is slow to import; only this dataset needs it

    images = load_digits().data.astype(np.float32) / 16
    return {"train": images[:-DIGITS_TEST], "test": images[-DIGITS_TEST:]}


def _read_user(path: Path, test_fraction: float, sha256: str | None) -> Arrays:
    if not path.is_file():
        if sha256 is not None:  # a run's own file
            raise DataError(f"{path}, the file the run trained on, does not exist; if it has moved, give the run its "
                            "new place once with: iwae train --resume RUN --dataset NEW_PATH (the file is known by "
                            "its SHA-256), and every command finds it there")
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(
            f"{path} {what}; give the path of a .npy or .npz file of shape (N, D) with values in [0, 1]."
        )
    if sha256 is not None and file_digest(path, "sha256") != sha256:
        raise DataError(f"{path} has changed since the run started on it (its SHA-256 is not the one the run "
                        "recorded); restore the file the run trained on, or start a new run on this one")
    arrays = read_user_arrays(path)
    if "test" in arrays:
        return arrays
    n = arrays["train"].shape[0]
    n_test = round(test_fraction * n)
    if not 1 <= n_test < n:
        raise DataError(
            f"{path} has no 'test' array and test_fraction {test_fraction} of its {n} rows leaves an empty "
            "train or test set; save a 'test' array beside 'train' (numpy.savez(path, train=x_train, "
            "test=x_test)), or give the file more rows."
        )
    order = np.random.default_rng(USER_SPLIT_SEED).permutation(n)
    return {**arrays, "train": arrays["train"][order[:-n_test]], "test": arrays["train"][order[-n_test:]]}


def _code_split(arrays: Arrays, holdout: int, shuffle_seed: int | None) -> Arrays:
    """The official code's split: shuffle the training set (if it does), then hold out its last rows."""
    train = arrays["train"]
    if shuffle_seed is not None:
        train = train[np.random.RandomState(shuffle_seed).permutation(len(train))]
    return {**arrays, "train": train[:-holdout], "valid": train[-holdout:]}


_SPECS: dict[str, _Spec] = {
    "mnist": _Spec(partial(_read_idx, "mnist"), "dynamic", (28, 28), code_holdout=400),
    "binarized-mnist": _Spec(_read_binarized_mnist, "static", (28, 28)),
    "omniglot": _Spec(_read_omniglot, "dynamic", (28, 28), code_holdout=1345, code_shuffle_seed=123),
    "fashion-mnist": _Spec(partial(_read_idx, "fashion-mnist"), "dynamic", (28, 28)),
    "digits": _Spec(_read_digits, "dynamic", (8, 8)),
}
DATASETS: tuple[str, ...] = tuple(_SPECS)
