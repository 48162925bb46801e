"""Importance-weighted autoencoders and multi-sample variational objectives in PyTorch.

The pieces a user works with, importable from ``iwae`` itself::

    import iwae

    model = iwae.burda(layers=1, x_dim=784)
    out = iwae.loss(model, x, "iwae", k=50, estimator="dreg")    # out.loss to minimise, out.bound per example
    log_px = iwae.log_likelihood(model, x, k=5000)
    iwae.train(iwae.TrainConfig(dataset="digits", epochs=10), Path("runs/digits"))

The package's layers, each importing only those above it in this list: ``iwae.settings``, ``iwae.platform``
(devices, torchrun, the matrix-multiply path, memory), ``iwae.data``, ``iwae.models``, ``iwae.core`` (bounds,
objectives, estimators, AIS), ``iwae.eval`` (likelihoods, active units, gradient SNR), ``iwae.training`` (settings,
state, step, loop), ``iwae.plots``, ``iwae.runs`` (run directories: train, evaluate, draw, reproduce the paper's
tables) and ``iwae.cli``.

Importing ``iwae`` before torch sets how long torch's OpenMP threads spin before they sleep while they wait
(unless OMP_WAIT_POLICY or the spin is set): briefly, which keeps a run on a shared machine near its fair share
(``iwae.platform.threads.OPENMP_WAIT``).
"""

from __future__ import annotations

import os

from iwae.platform.threads import openmp_wait

os.environ.update(openmp_wait(os.environ))  # read once, when torch loads OpenMP

import importlib
from typing import Any

from iwae import data, models
from iwae.core import bounds, objectives
from iwae.core.ais import ais_log_likelihood
from iwae.core.objectives import Objective, loss
from iwae.eval.exact import exact_log_likelihood
from iwae.eval.likelihood import log_likelihood
from iwae.models import DeepLatentModel, burda, sbn
from iwae.training.config import TrainConfig

__version__ = "0.1.0"

# Run-level functions, imported on first use: they bring in the run directories' machinery and matplotlib.
_RUNS = {"train": "iwae.runs.lone_run", "resume": "iwae.runs.lone_run", "evaluate_run": "iwae.runs.evaluation",
         "train_stacked": "iwae.runs.stacked_run"}

__all__ = [
    "DeepLatentModel", "Objective", "TrainConfig", "ais_log_likelihood", "bounds", "burda", "data",
    "evaluate_run", "exact_log_likelihood", "log_likelihood", "loss", "models", "objectives", "resume", "sbn",
    "train", "train_stacked",
]


def __getattr__(name: str) -> Any:
    if name in _RUNS:
        return getattr(importlib.import_module(_RUNS[name]), name)
    raise AttributeError(f"module 'iwae' has no attribute {name!r}")
