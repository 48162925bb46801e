"""Fixtures shared by the trainer, evaluator and command-line tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from iwae.data import datasets
from iwae.runs import rundir

# tests of the GPU's paths (CUDA graphs, its generators), run wherever a GPU is
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def same_matmul_as(run: Path) -> list[str]:
    """The option that makes a new run multiply on the float32 path the run in ``run`` recorded. Each process
    otherwise times the paths itself, and two may choose differently (so round differently) on a busy machine."""
    return ["--matmul", rundir.read_json(run / rundir.CONFIG)["matmul"]]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The path of a small grey-level dataset (so dynamically binarized): an .npz file with 64 training and
    16 test examples of 16 values in [0, 1]."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, train=rng.random((64, 16), dtype=np.float32), test=rng.random((16, 16), dtype=np.float32))
    return str(path)


@pytest.fixture(autouse=True)
def fresh_data_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a fresh process would: no "reading <dataset> from ..." line printed yet."""
    monkeypatch.setattr(datasets, "_REPORTED", set())
