"""An epoch's minibatches, gathered and binarized a chunk of steps at a time, in buffers that stay put.

Drawn one by one (``Dataset.minibatch``), a minibatch costs a gather, a uniform draw and a comparison, each an
operator call with its Python around it and a new tensor, between every two steps. ``EpochMinibatches`` draws the
minibatches of about ``chunk_bytes(device)`` of examples at once (on a CPU a chunk that stays in a core's cache;
on a GPU most or all of the epoch, so that between two replays of the step's CUDA graph there is no other work):
one gather of all their rows, the uniforms of all their steps drawn from the seed's data generator in step
order, and one comparison; a step's minibatch is then a view of the chunk. The numbers drawn, and their order in
the data stream, are those of one ``binarize`` per step, on every device and whatever the chunk's size: on a GPU
each step's uniforms are drawn by a call of their own on a slice of ``binarize``'s shape; on a CPU the chunk's
are drawn by one call, which torch's CPU generator fills with the numbers that one call per step would draw,
one after another (``test_minibatches`` checks this).

On a CPU where torch's threads leave a usable CPU free (``draws_ahead``: one thread for a small step), the next
chunk is drawn ahead, on a thread of its own, while the steps run on the chunk before, into a second set of
buffers. The draws are the same, in the same order: the steps ask for their minibatches in order, and only that
thread draws from the data streams until the chunk is taken (or a checkpoint asks where the streams stand). The
drawing thread looks for its next chunk every ``POLL_S`` seconds instead of being woken for it: waking it from the
training thread at every chunk slowed the steps (docs/performance.md).

A checkpoint taken inside a chunk records the data stream as it stands after the finished steps' draws, not after
the chunk's: ``stream_states(step)`` replays the chunk's draws up to ``step`` from the stream's state at the
chunk's start, so that a resumed run, which draws its first chunk from ``step``, continues the same stream.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from iwae.platform import threads

# the examples of a chunk (its gathered rows, its noise and its binary minibatches: each this size): on a CPU they
# fit in the L2 cache of a core; on a GPU they hold an epoch of a paper's MNIST run (2,500 minibatches of 20 x 784
# float32) for up to 3 stacked seeds. A chunk has at least one step, and no more than the epoch has left.
CPU_CHUNK_BYTES = 1 << 20
GPU_CHUNK_BYTES = 1 << 29
# the drawing thread looks for a chunk to draw this often, and after this long without one waits to be woken
POLL_S = 0.001
IDLE_S = 1.0


def chunk_bytes(device: torch.device) -> int:
    """The bytes of examples a chunk holds on ``device``."""
    return CPU_CHUNK_BYTES if device.type == "cpu" else GPU_CHUNK_BYTES


def draws_ahead(device: torch.device) -> bool:
    """Whether the next chunk is drawn ahead, on a thread of its own: on a CPU where torch's threads (of every
    torchrun rank on this machine) leave a usable CPU (``threads.usable_cpus``) free."""
    return device.type == "cpu" and torch.get_num_threads() * threads.local_ranks() < threads.usable_cpus()


class _Drawer:
    """A thread that runs the functions submitted to it, one after another, each one's result in a Future. It looks
    for the next one every ``POLL_S`` seconds, so that submitting one wakes nothing; once it has had none for
    ``IDLE_S`` seconds it waits for one, and the next submission wakes it."""

    def __init__(self) -> None:
        self.work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="iwae-minibatches", daemon=True).start()

    def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.work.put((future, function, args))
        return future

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            try:
                idle = time.monotonic() - idle_since >= IDLE_S
                future, function, args = self.work.get() if idle else self.work.get_nowait()
            except queue.Empty:
                time.sleep(POLL_S)
                continue
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(*args))
                except BaseException as error:  # raised again where the result is taken
                    future.set_exception(error)
            idle_since = time.monotonic()


@functools.cache
def _drawer(pid: int) -> _Drawer:
    """The thread that draws chunks ahead in process ``pid`` (one per process, as chunks are drawn one after
    another; a forked child, which has no thread of its parent's, makes its own)."""
    return _Drawer()


@dataclass
class _Chunk:
    """Minibatches ``start`` .. ``end`` - 1 of the epoch, ``steps[i]`` that of step start + i (a view of the chunk
    (end - start, S, B, D)), drawn into buffer set ``buffer`` from the data streams as they stood at ``states``."""

    start: int
    end: int
    states: list[Tensor]
    steps: tuple[Tensor, ...] = ()
    buffer: int = 0


class EpochMinibatches:
    """The minibatches of an epoch for S seeds, from minibatch ``step`` on: ``minibatches(i)`` is minibatch i of
    every seed, (S, B, D), or with ``rows`` the rows of one seed's, valid until a minibatch of another chunk is asked
    for. They are asked for in order, and each is a view made with its chunk, so that a step indexes nothing.

    Args:
      train: the training examples (N, D), on the training device.
      batches: each seed's minibatch indices into ``train``, (S, n, B) (``iwae.data.epoch_batches``, stacked).
      generators: each seed's data generator, which draws its binarizations.
      dynamic: whether the examples are binarized afresh (``Dataset.binarization == "dynamic"``), or used as they are.
      step: the first minibatch drawn (0, or where a resumed run continues its epoch).
      ahead: draw the next chunk on a thread of its own while the steps run (``draws_ahead``).
      rows: for one seed (S = 1), the rows of its minibatches to give (a rank's share), (rows, D) each.
    """

    def __init__(self, train: Tensor, batches: Tensor, generators: list[torch.Generator], dynamic: bool,
                 step: int, ahead: bool = False, rows: slice | None = None) -> None:
        seeds, _, batch = batches.shape
        self.train, self.batches, self.generators, self.dynamic = train, batches, generators, dynamic
        self.pick = (slice(None),) if rows is None else (slice(None), 0, rows)  # of a chunk's (n, S, B, D)
        step_bytes = seeds * batch * train.shape[1] * train.element_size()
        self.chunk = max(1, min(chunk_bytes(train.device) // step_bytes, batches.shape[1] - step))
        like = {"dtype": train.dtype, "device": train.device}
        self.buffers = []  # (rows, noise, x): the gathered rows, their uniforms, the binary minibatches
        for _ in range(2 if ahead else 1):
            rows = torch.empty(self.chunk, seeds, batch, train.shape[1], **like)
            noise = torch.empty(seeds, self.chunk, batch, train.shape[1], **like) if dynamic else None
            self.buffers.append((rows, noise, torch.empty_like(rows) if dynamic else rows))
        self.ahead = ahead
        self.drawn = _Chunk(step, step, [])  # the chunk the steps are on (none yet: nothing to replay)
        self.next: Future[_Chunk] | None = None  # the chunk after it, being drawn ahead

    def __call__(self, step: int) -> Tensor:
        if not self.drawn.start <= step < self.drawn.end:
            ahead = self._take_next()
            self.drawn = ahead if ahead is not None else self._draw(step, 0)
            if self.ahead and self.drawn.end < self.batches.shape[1]:
                self.next = _drawer(os.getpid()).submit(self._draw, self.drawn.end, 1 - self.drawn.buffer)
        return self.drawn.steps[step - self.drawn.start]

    def _take_next(self) -> _Chunk | None:
        """The chunk drawn ahead (waiting for it), or None."""
        ahead, self.next = (self.next.result() if self.next is not None else None), None
        return ahead

    def _states(self) -> list[Tensor]:
        return [generator.get_state() for generator in self.generators]

    def _draw(self, step: int, buffer: int) -> _Chunk:
        """Draw the chunk of minibatches that starts at ``step`` (it ends with the epoch) into buffer set
        ``buffer``."""
        end = min(step + self.chunk, self.batches.shape[1])
        n, width = end - step, self.train.shape[1]
        rows, noise, x = self.buffers[buffer]
        states = self._states()
        indices = self.batches[:, step:end].transpose(0, 1).reshape(-1)
        torch.index_select(self.train, 0, indices, out=rows[:n].view(-1, width))
        if noise is not None:
            for seed_noise, generator in zip(noise, self.generators, strict=True):
                draw_uniforms(seed_noise[:n], generator)
            torch.lt(noise[:, :n].transpose(0, 1), rows[:n], out=x[:n])
        return _Chunk(step, end, states, x[:n][self.pick].unbind(0), buffer)

    def stream_states(self, step: int) -> list[Tensor]:
        """Each seed's data generator state after the draws of the minibatches before ``step`` (one of the chunk
        the steps are on, or its end)."""
        if not self.dynamic:  # the minibatches draw nothing
            return self._states()
        if step == self.drawn.end:  # where the chunk after it starts
            return self.next.result().states if self.next is not None else self._states()
        states = []
        for state in self.drawn.states:
            generator = torch.Generator(self.train.device)
            generator.set_state(state)
            draw_uniforms(torch.empty_like(self.buffers[0][1][0, : step - self.drawn.start]), generator)
            states.append(generator.get_state())
        return states


def draw_uniforms(noise: Tensor, generator: torch.Generator) -> Tensor:
    """Fill ``noise`` (n, B, D), contiguous, with the uniforms of n minibatches drawn one after another from
    ``generator``, as ``binarize`` draws each: on a CPU by one call (torch's CPU generator fills n x m numbers with
    those of n calls of m), elsewhere by a call per minibatch."""
    if noise.device.type == "cpu":
        return noise.uniform_(generator=generator)
    for minibatch in noise:
        minibatch.uniform_(generator=generator)
    return noise
