"""The float32 matrix-multiply paths: both accurate to float32 rounding, the choice made once and kept, and a
training step's gradients the same on either path."""

from __future__ import annotations

import pytest
import torch

from iwae import gemm
from iwae.models import burda
from iwae.objectives import loss


def test_both_paths_are_float32_accurate() -> None:
    result = gemm.measure(rows=200, inner=100, cols=300, rounds=1)
    for path in (gemm.DEFAULT, gemm.ONEDNN):
        assert result[path]["error"] < 1e-5 and result[path]["seconds"] > 0


def test_the_choice_is_a_known_path_and_restores_nothing_else() -> None:
    before = torch.backends.mkldnn.matmul.fp32_precision
    try:
        chosen = gemm.fastest_fp32_matmul("cpu")
        assert chosen in (gemm.DEFAULT, gemm.ONEDNN)
        assert gemm.fastest_fp32_matmul("cpu") == chosen  # measured once per process
        assert gemm.fastest_fp32_matmul("meta") == gemm.DEFAULT  # no faster path elsewhere
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


@pytest.mark.parametrize("layers", [1, 2])
def test_gradients_agree_on_both_paths(layers: int) -> None:
    torch.manual_seed(0)
    x = (torch.rand(8, 784) < 0.3).float()
    model = burda(layers, train_mean=x.mean(0))
    grads = {}
    for path in (gemm.DEFAULT, gemm.ONEDNN):
        with gemm.matmul_path(path):
            torch.manual_seed(1)
            out = loss(model, x, "iwae", k=5, estimator="dreg", reduction="sum")
            grads[path] = torch.autograd.grad(out.loss, list(model.parameters()))
    for a, b in zip(grads[gemm.DEFAULT], grads[gemm.ONEDNN], strict=True):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max().clamp_min(1e-3)
