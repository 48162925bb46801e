"""``iwae.platform.compiled``: the CPU graph pass (addmm becomes mm + add, with the same values), and a process
compiling many models one after another, as a grid does."""

from __future__ import annotations

import os
import signal
import time
import warnings

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from iwae.platform.compiled import Compiled, UnfuseBiasOnCpu
from iwae.training import signals


def layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.tanh(torch.nn.functional.linear(x, weight, bias))


@pytest.mark.slow
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


@pytest.mark.slow
def test_many_models_compile_one_after_another() -> None:
    # one bound method (nn.Linear.forward) of more models than dynamo's recompile limit allows one function, each
    # compiled with a backend of its own, as inductor's options make every Compiled's backend a new one
    for _ in range(torch._dynamo.config.recompile_limit + 2):
        model = torch.nn.Linear(3, 2)
        forward = Compiled(model.forward, "a layer", backend=lambda graph, inputs: graph.forward)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to eager warns
            out = forward(torch.ones(4, 3))
        assert forward.compiled
        torch.testing.assert_close(out, model(torch.ones(4, 3)))


@pytest.mark.slow
def test_compiled_tanh_is_within_2e_7_of_tanh() -> None:
    x = torch.cat([torch.linspace(-12, 12, 100_001), torch.logspace(-30, 0, 1001), -torch.logspace(-30, 0, 1001)])
    compiled = Compiled(torch.tanh, "tanh")
    torch.testing.assert_close(compiled(x), torch.tanh(x), rtol=0, atol=2e-7)


def test_a_stop_while_compiling_stops_the_work_not_the_compilation() -> None:
    # a signal handled while the backend compiles raises Interrupted inside torch.compile, which wraps the
    # exceptions of a backend as its own failure: the stop must reach the caller, not become an eager fallback
    def stopped_backend(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs here
        return graph.forward

    compiled = Compiled(lambda x: x + 1, "a sum", backend=stopped_backend)
    with signals.raising_on_signal("the sum", "iwae again"), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(signals.Interrupted, match="the sum stopped by SIGTERM; continue with: iwae again"):
            compiled(torch.ones(3))
