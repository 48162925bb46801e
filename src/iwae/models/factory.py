"""The model a training run's settings name, freshly initialised."""

from __future__ import annotations

from torch import Tensor

from iwae.models.burda import burda
from iwae.models.discrete import sbn, sbn_widths
from iwae.models.latent import DeepLatentModel


def build_model(name: str, layers: int, x_dim: int, train_mean: Tensor | None = None) -> DeepLatentModel:
    """The freshly initialised model of a run, for data of dimension ``x_dim``.

    Args:
      name: "burda" (the paper's architecture with ``layers`` stochastic layers) or a sigmoid belief network
        "sbn-H1-...-HL" (``layers`` is then not used).
      layers: the stochastic layers of the paper's architecture, 1 or 2.
      x_dim: the data dimension.
      train_mean: the training-set means, shape (x_dim,); if given, the output bias is set from them.

    Returns:
      The model, on the CPU, initialised from torch's global generator.
    """
    if name == "burda":
        return burda(layers, x_dim, train_mean=train_mean)
    return sbn(sbn_widths(name), x_dim, train_mean=train_mean)
