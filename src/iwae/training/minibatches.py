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

A checkpoint taken inside a chunk records the data stream as it stands after the finished steps' draws, not after
the chunk's: ``stream_states(step)`` replays the chunk's draws up to ``step`` from the stream's state at the
chunk's start, so that a resumed run, which draws its first chunk from ``step``, continues the same stream.
"""

from __future__ import annotations

import torch
from torch import Tensor

# the examples of a chunk (its gathered rows, its noise and its binary minibatches: each this size): on a CPU they
# fit in the L2 cache of a core; on a GPU they hold an epoch of a paper's MNIST run (2,500 minibatches of 20 x 784
# float32) for up to 3 stacked seeds. A chunk has at least one step, and no more than the epoch has left.
CPU_CHUNK_BYTES = 1 << 20
GPU_CHUNK_BYTES = 1 << 29


def chunk_bytes(device: torch.device) -> int:
    """The bytes of examples a chunk holds on ``device``."""
    return CPU_CHUNK_BYTES if device.type == "cpu" else GPU_CHUNK_BYTES


class EpochMinibatches:
    """The minibatches of an epoch for S seeds, from minibatch ``step`` on: ``minibatches(i)`` is minibatch i of
    every seed, (S, B, D), valid until the next chunk is drawn.

    Args:
      train: the training examples (N, D), on the training device.
      batches: each seed's minibatch indices into ``train``, (S, n, B) (``iwae.data.epoch_batches``, stacked).
      generators: each seed's data generator, which draws its binarizations.
      dynamic: whether the examples are binarized afresh (``Dataset.binarization == "dynamic"``), or used as they are.
      step: the first minibatch drawn (0, or where a resumed run continues its epoch).
    """

    def __init__(self, train: Tensor, batches: Tensor, generators: list[torch.Generator], dynamic: bool,
                 step: int) -> None:
        seeds, _, batch = batches.shape
        self.train, self.batches, self.generators, self.dynamic = train, batches, generators, dynamic
        step_bytes = seeds * batch * train.shape[1] * train.element_size()
        self.chunk = max(1, min(chunk_bytes(train.device) // step_bytes, batches.shape[1] - step))
        like = {"dtype": train.dtype, "device": train.device}
        self.rows = torch.empty(self.chunk, seeds, batch, train.shape[1], **like)
        self.noise = torch.empty(seeds, self.chunk, batch, train.shape[1], **like) if dynamic else None
        self.x = torch.empty_like(self.rows) if dynamic else self.rows
        self.start = self.end = step  # the chunk drawn holds minibatches start .. end - 1
        self.states = [generator.get_state() for generator in generators]  # the streams at the chunk's start

    def __call__(self, step: int) -> Tensor:
        if not self.start <= step < self.end:
            self._draw(step)
        return self.x[step - self.start]

    def _draw(self, step: int) -> None:
        """Draw the chunk of minibatches that starts at ``step`` (it ends with the epoch)."""
        end = min(step + self.chunk, self.batches.shape[1])
        n, width = end - step, self.train.shape[1]
        self.states = [generator.get_state() for generator in self.generators]
        indices = self.batches[:, step:end].transpose(0, 1).reshape(-1)
        torch.index_select(self.train, 0, indices, out=self.rows[:n].view(-1, width))
        if self.noise is not None:
            for noise, generator in zip(self.noise, self.generators, strict=True):
                draw_uniforms(noise[:n], generator)
            torch.lt(self.noise[:, :n].transpose(0, 1), self.rows[:n], out=self.x[:n])
        self.start, self.end = step, end

    def stream_states(self, step: int) -> list[Tensor]:
        """Each seed's data generator state after the draws of the minibatches before ``step`` (one of the chunk
        drawn, or its end)."""
        if self.noise is None or step == self.end:
            return [generator.get_state() for generator in self.generators]
        states = []
        for state in self.states:
            generator = torch.Generator(self.train.device)
            generator.set_state(state)
            draw_uniforms(torch.empty_like(self.noise[0, : step - self.start]), generator)
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
