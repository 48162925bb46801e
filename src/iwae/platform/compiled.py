"""A function compiled by torch.compile on its first call, which falls back to running eagerly if that fails."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


class UnfuseBiasOnCpu(CustomGraphPass):
    """Inductor graph pass: rewrite ``addmm(bias, a, b)`` on a CPU as ``mm(a, b) + bias``.

    torch's CPU addmm first copies the broadcast bias into its output and then accumulates the product onto it,
    one extra pass over every layer's output; as a separate add, inductor fuses the bias into the kernel that
    follows (tanh, the Bernoulli log-density). Inductor makes the same rewrite on GPUs only.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        addmm = torch.ops.aten.addmm.default
        for node in list(graph.nodes):
            value = node.meta.get("val")
            if node.target is not addmm or node.kwargs or value is None or value.device.type != "cpu":
                continue
            bias, a, b = node.args
            with graph.inserting_before(node):
                product = graph.call_function(torch.ops.aten.mm.default, (a, b))
                biased = graph.call_function(torch.ops.aten.add.Tensor, (product, bias))
            product.meta, biased.meta = dict(node.meta), dict(node.meta)
            node.replace_all_uses_with(biased)
            graph.erase_node(node)

    def uuid(self) -> bytes | None:
        return get_hash_for_files((__file__,))


class Compiled:
    """``fn`` compiled as one graph (``fullgraph``) with ``backend``, built and timed on the first call.

    The first call prints the compile time once. If tracing or code generation fails there, a one-line
    warning names the reason and ``fn`` runs eagerly from then on; a later failure is raised.

    Args:
      fn: the function.
      what: its name in messages ("the training step").
      backend: "inductor", another ``torch.compile`` backend's name, or a backend callable.
      options: inductor options (ignored by other backends). Unless replaced, ``UnfuseBiasOnCpu`` runs, and
        tanh on a CPU is computed as 2 / (1 + exp(-2x)) - 1 (``cpp.use_decompose_tanh``): about 3 times faster
        than the vectorised tanh, within 2e-7 of tanh(x) (absolute, not relative, error near 0), well inside
        the rounding of the products the activations feed.
      dynamo_config: ``torch._dynamo.config`` settings in force whenever ``fn`` is traced.
    """

    def __init__(self, fn: Callable[..., Any], what: str, *, backend: str | Callable[..., Any] = "inductor",
                 options: dict[str, Any] | None = None, dynamo_config: dict[str, Any] | None = None) -> None:
        self.fn, self.what = fn, what
        # dynamo's settings, in force at every call (any call may recompile): one patch, made here (making one
        # builds a class) and entered at each call
        self._dynamo_config = torch._dynamo.config.patch(**(dynamo_config or {}))
        options = {"post_grad_custom_post_pass": UnfuseBiasOnCpu(), "cpp.use_decompose_tanh": True, **(options or {})}

        def call(*args: Any) -> Any:
            return fn(*args)

        # dynamo keeps its compiled graphs, and counts them against its recompile limit, per code object: with a
        # code object of its own, each Compiled (a model's evaluator, a run's step) compiles for itself, however
        # many models a process compiles one after another (a grid's cells), and its graphs go when it goes
        call.__code__ = call.__code__.replace()
        self.compiled_fn = torch.compile(call, fullgraph=True, backend=backend,
                                         options=options if backend == "inductor" else None)
        self.compiled, self.seconds = True, None

    def __call__(self, *args: Any) -> Any:
        if not self.compiled:
            return self.fn(*args)
        start = time.perf_counter()
        try:
            with self._dynamo_config:
                result = self.compiled_fn(*args)
        except Exception as error:  # any failure of tracing or code generation: run eagerly instead
            if self.seconds is not None:
                raise
            reason = " ".join(str(error).split())[:200]
            warnings.warn(f"iwae: compiling {self.what} failed ({type(error).__name__}: {reason}); running it "
                          "eagerly instead", RuntimeWarning, stacklevel=2)
            self.compiled = False
            return self.fn(*args)
        if self.seconds is None:
            self.seconds = time.perf_counter() - start
            print(f"iwae: compiled {self.what} in {self.seconds:.1f} s", file=sys.stderr)
        return result
