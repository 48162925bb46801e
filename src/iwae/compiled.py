"""A function compiled by torch.compile on its first call, which falls back to running eagerly if that fails."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch


class Compiled:
    """``fn`` compiled as one graph (``fullgraph``) with ``backend``, built and timed on the first call.

    The first call prints the compile time once. If tracing or code generation fails there, a one-line
    warning names the reason and ``fn`` runs eagerly from then on; a later failure is raised.

    Args:
      fn: the function.
      what: its name in messages ("the training step").
      backend: "inductor", another ``torch.compile`` backend's name, or a backend callable.
      options: inductor options (ignored by other backends).
      dynamo_config: ``torch._dynamo.config`` settings in force whenever ``fn`` is traced.
    """

    def __init__(self, fn: Callable[..., Any], what: str, *, backend: str | Callable[..., Any] = "inductor",
                 options: dict[str, Any] | None = None, dynamo_config: dict[str, Any] | None = None) -> None:
        self.fn, self.what, self.dynamo_config = fn, what, dynamo_config or {}
        self.compiled_fn = torch.compile(fn, fullgraph=True, backend=backend,
                                         options=options if backend == "inductor" else None)
        self.compiled, self.seconds = True, None

    def __call__(self, *args: Any) -> Any:
        if not self.compiled:
            return self.fn(*args)
        start = time.perf_counter()
        try:
            with torch._dynamo.config.patch(**self.dynamo_config):
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
