"""The CPU graph pass of ``iwae.compiled``: addmm becomes mm + add, with the same values."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from iwae.compiled import UnfuseBiasOnCpu


def layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.tanh(torch.nn.functional.linear(x, weight, bias))


def test_addmm_is_split_into_product_and_bias() -> None:
    torch.manual_seed(0)
    args = (torch.randn(7, 5), torch.randn(3, 5), torch.randn(3))
    graph = make_fx(layer)(*args)
    targets = [node.target for node in graph.graph.nodes]
    assert torch.ops.aten.addmm.default in targets
    UnfuseBiasOnCpu()(graph.graph)
    graph.recompile()
    targets = [node.target for node in graph.graph.nodes]
    assert torch.ops.aten.addmm.default not in targets
    assert torch.ops.aten.mm.default in targets and torch.ops.aten.add.Tensor in targets
    torch.testing.assert_close(graph(*args), layer(*args))
