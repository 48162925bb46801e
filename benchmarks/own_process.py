"""Benchmark runners, each built and run in a process of its own, that the main process times by turns.

A runner is a callable ``run(n)`` that makes n calls (training steps, products) and returns when they are done.
Timed in one process, contenders slow each other: measured on a 2-core CPU, iwae's compiled K=50, B=20 step ran
10-15 % slower in rounds interleaved with NumPyro's in the same process than in a process of its own, and
NumPyro's 5 % slower beside torch's (both figures from the medians of 7 interleaved rounds; each runtime leaves
its thread pools, allocator and heap to the other). So each contender runs alone in its process, as its users
run it, and the main process only tells them by turns how many calls to make, and times each round.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch

from iwae.platform import gemm, heap

Runner = Callable[[int], None]  # makes n calls and returns when they are done


def _serve(connection: Connection, build: Callable[..., dict[str, Callable[[int], Any]]], args: tuple[Any, ...],
           threads: int, matmul_path: str) -> None:
    """The body of a worker process: build the runners, then run the calls the main process asks for, and send
    back what each run returns."""
    try:
        torch.set_num_threads(threads)
        heap.retain_freed_memory()  # as the iwae command does
        gemm.fastest_fp32_matmul("cpu", matmul_path)
        runners = build(*args)
        connection.send((True, None))
        while (request := connection.recv()) is not None:
            name, calls = request
            connection.send((True, runners[name](calls)))
    except Exception:  # raised in the main process, with this traceback
        connection.send((False, traceback.format_exc()))


class OwnProcess:
    """The runners ``build(*args)`` returns (a dict of them by name), built and run in a new process.

    The process uses the main process's number of torch threads and the float32 matmul path ``matmul_path``
    ("default" or "onednn"), and keeps freed memory in its heap (``iwae.platform.heap``). ``runner(name)`` is a runner
    for the main process: calling it with n makes the runner's n calls in the worker process and returns what
    they returned (a runner may return a result, a profile say) when they are done. An exception in the worker
    process is raised in the main process with the worker's traceback. ``build`` and its arguments are pickled:
    a function of a module (a script's too) and plain values.
    """

    def __init__(self, build: Callable[..., dict[str, Callable[[int], Any]]], *args: Any,
                 matmul_path: str = gemm.DEFAULT) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no state forked from this one
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, build, args, torch.get_num_threads(), matmul_path),
                                       daemon=True)
        self.process.start()
        child.close()
        self._reply()

    def runner(self, name: str) -> Callable[[int], Any]:
        def run(calls: int) -> Any:
            self.connection.send((name, calls))
            return self._reply()

        return run

    def close(self) -> None:
        """End the process."""
        if self.process.is_alive():
            self.connection.send(None)
        self.process.join()
        self.connection.close()

    def __enter__(self) -> OwnProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reply(self) -> Any:
        try:
            ok, value = self.connection.recv()
        except EOFError:
            self.process.join()
            raise RuntimeError(f"a benchmark process ended unexpectedly (exit code {self.process.exitcode})") from None
        if not ok:
            raise RuntimeError(f"in a benchmark process:\n{value}")
        return value
