"""Minibatches as tensor operations: a shuffled index matrix per epoch, a gather, a Bernoulli draw.

Nothing here loops over examples in Python or copies to the host, so with the data, the indices and the
generator on the training device a minibatch costs a few kernel launches and the step that consumes it
can be compiled or captured in a CUDA graph. Typical use, once per epoch::

    for idx in epoch_batches(len(data.train), 20, generator):
        x = data.minibatch(idx, generator)  # binarize(data.train[idx], generator) for dynamic data
"""

import torch
from torch import Tensor


def epoch_batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """A fresh random partition of ``range(n)`` into minibatches, as int64 (n // batch_size, batch_size).

    Iterating over the result yields one index vector per minibatch. The last ``n % batch_size`` indices of
    the permutation are left out so every minibatch has the same shape; a different few each epoch. The
    indices live on ``generator``'s device (the default CPU generator if None).

    Raises:
        ValueError: if ``batch_size`` is not in [1, n].
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be between 1 and the number of examples {n}, got {batch_size}.")
    device = generator.device if generator is not None else None
    permutation = torch.randperm(n, generator=generator, device=device)
    n_batches = n // batch_size
    return permutation[: n_batches * batch_size].view(n_batches, batch_size)


def binarize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A draw x_bin ~ Bernoulli(x), elementwise, as ``x``'s dtype on ``x``'s device.

    Computed as ``u < x`` with u ~ Uniform[0, 1), so pixels at 0 stay 0 and pixels at 1 stay 1. Each call
    draws fresh noise from ``generator``, which must live on ``x``'s device; seeding it makes the sequence
    of draws reproducible.
    """
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (noise < x).to(x.dtype)
