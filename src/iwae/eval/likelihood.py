"""The importance-sampled log-likelihood of a model and the statistics of its weights (Burda et al. 2016, section 5).

    log p(x) ~= log (1/k) sum_{i=1..k} w_i,    w_i = p(x, z_i) / q(z_i | x),  z_i ~ q(z | x),

with k = 5000 for the test NLL. It is the IWAE bound L_k, a consistent estimate of log p(x) whose bias
vanishes as k grows. The k samples are drawn in chunks and combined by a running logsumexp, so peak memory
depends on the chunk size and the number of examples per pass, never on k. From the same samples:

    L_g for g in {1, 5, 50} (g dividing k): the mean of IWAE_g over the k/g disjoint groups of g samples,
        an unbiased estimate of L_g (L_1 is the ELBO);
    the effective sample size (sum_i w_i)^2 / sum_i w_i^2, between 1 and k.

The active units are in ``iwae.eval.activity``; the exact log p(x) of small discrete models in
``iwae.eval.exact``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from iwae.core import bounds
from iwae.core.objectives import Objective
from iwae.models import DeepLatentModel
from iwae.platform import gemm
from iwae.platform.compiled import Compiled
from iwae.platform.device import batch_seed, seeded
from iwae.settings import check_examples, check_integer, check_seed

GROUP_SIZES = (1, 5, 50)
# Evaluation passes cover at most about this many (sample, example) rows (16 examples x 500 samples), so that a
# 784-wide float32 layer output (25 MB) stays under the 32 MB up to which glibc's malloc reuses freed heap memory
# rather than mapping (and page-faulting) a buffer afresh on every pass.
PASS_ROWS = 8192
EXAMPLES_PER_PASS = 16
CHUNK_SIZE = 500  # samples per pass, by default


class WeightStatistics(NamedTuple):
    """Per-example statistics of k importance weights, each of shape (B,).

    ``log_likelihood``: log (1/k) sum_i w_i. ``bounds``: for each group size g, the mean of IWAE_g over the
    disjoint groups of g samples (g = k gives ``log_likelihood``). ``ess``: (sum_i w_i)^2 / sum_i w_i^2.
    """

    log_likelihood: Tensor
    bounds: dict[int, Tensor]
    ess: Tensor

    def to(self, device: torch.device | str) -> WeightStatistics:
        """The same statistics on ``device``."""
        return WeightStatistics(self.log_likelihood.to(device), {g: b.to(device) for g, b in self.bounds.items()},
                                self.ess.to(device))

    def cpu(self) -> WeightStatistics:
        """The same statistics on the CPU."""
        return self.to("cpu")


@torch.no_grad()
def importance_statistics(
    model: DeepLatentModel,
    x: Tensor,
    k: int = 5000,
    *,
    chunk_size: int = CHUNK_SIZE,
    batch_size: int = EXAMPLES_PER_PASS,
    group_sizes: tuple[int, ...] = GROUP_SIZES,
    progress: bool = False,
    compile: bool = False,
    seed: int | None = None,
    first_batch: int = 0,
) -> WeightStatistics:
    """Statistics of k importance weights per example of ``x`` (B, D), drawn ``chunk_size`` at a time for
    ``batch_size`` examples at a time: those of ``batch_statistics``' batches, joined.

    ``progress`` shows a bar of the samples drawn, with the time left (on a terminal).

    Returns:
      ``WeightStatistics`` in float64 on ``x``'s device, the bounds keyed by the g in ``group_sizes`` that
      qualify, and by k.
    """
    if isinstance(model, DeepLatentModel):
        x = model.as_batch(x)  # a batch (B, D), before it is counted and split
    check_examples(x)
    with progress_bar(len(x), k, progress) as bar:
        return concatenate(list(batch_statistics(model, x, k, chunk_size=chunk_size, batch_size=batch_size,
                                                 group_sizes=group_sizes, compile=compile, seed=seed,
                                                 first_batch=first_batch, on_pass=bar.update)))


def progress_bar(examples: int, k: int, progress: bool, done: int = 0) -> tqdm:
    """A bar of the ``examples`` x ``k`` samples of an evaluation (``done`` examples finished already), with its
    rate and the time left; shown on a terminal when ``progress``."""
    return tqdm(total=examples * k, initial=done * k, desc=f"evaluating k={k}", unit="sample", unit_scale=True,
                disable=None if progress else True)


@torch.no_grad()
def batch_statistics(
    model: DeepLatentModel,
    x: Tensor,
    k: int = 5000,
    *,
    chunk_size: int = CHUNK_SIZE,
    batch_size: int = EXAMPLES_PER_PASS,
    group_sizes: tuple[int, ...] = GROUP_SIZES,
    compile: bool = False,
    seed: int | None = None,
    first_batch: int = 0,
    on_pass: Callable[[int], object] | None = None,
) -> Iterator[WeightStatistics]:
    """``WeightStatistics`` of k importance weights per example, for one batch of ``batch_size`` examples of
    ``x`` (B, D) after another, drawn ``chunk_size`` at a time; ``on_pass(samples)`` after each pass.

    The samples come from torch's generator as it stands; or, with ``seed``, batch j (counted from
    ``first_batch``) draws them from the generator seeded with ``batch_seed(seed, j)``, which is restored
    once the batches are done, and every batch has ``batch_size`` rows (the last padded) even when x has fewer
    examples. An example's estimates then depend only on the seed, its batch's index and its batch's examples,
    so that ranks evaluating their own whole batches (``iwae.platform.distributed``), or an evaluation continued
    from its finished batches, get those of one process evaluating all of them.

    Peak memory is that of one ``model.log_weights`` call on ``batch_size`` examples and ``chunk_size``
    samples, whatever k and B. Group size g is reported when it divides both k and min(chunk_size, k), so
    no group straddles two chunks. The last batch is padded (with its first example) to ``batch_size``, so every
    pass has one shape; with ``compile`` the passes run as one program compiled by torch.compile, drawing
    the same random numbers as the eager passes.
    """
    k, chunk_size, batch_size = (check_integer(value, name, 1) for name, value in
                                 (("k", k), ("chunk_size", chunk_size), ("batch_size", batch_size)))
    if len(x) == 0:  # no batch (an evaluation continued after its last one)
        return
    chunk_size = min(chunk_size, k)
    groups = [g for g in group_sizes if g < k and k % g == 0 and chunk_size % g == 0]
    batch_size = batch_size if seed is not None else min(batch_size, len(x))
    log_weights = model.log_weights
    if compile:
        log_weights = Compiled(model.log_weights, "the evaluator", options={"fallback_random": True})
    with seeded(seed, x.device) if seed is not None else nullcontext():
        for index, batch in enumerate(x.split(batch_size), first_batch):
            if seed is not None:
                torch.manual_seed(batch_seed(seed, index))
            n = len(batch)
            batch = torch.cat([batch, batch[:1].expand(batch_size - n, *batch.shape[1:])])
            lse, lse_sq, group_sums = _weight_sums(log_weights, batch, n, k, chunk_size, groups, on_pass)
            log_lik = lse - math.log(k)
            yield WeightStatistics(log_lik, {**{g: group_sums[g] / (k // g) for g in groups}, k: log_lik},
                                   (2 * lse - lse_sq).exp())


def _weight_sums(log_weights: Callable[[Tensor, int], Tensor], batch: Tensor, n: int, k: int, chunk_size: int,
                 groups: list[int], on_pass: Callable[[int], object] | None
                 ) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """log sum_i w_i, log sum_i w_i^2 and, per group size g, the sum of IWAE_g over the k/g groups, for the first
    ``n`` examples of ``batch``, from k samples drawn ``chunk_size`` at a time."""
    # float64 accumulators: sums over thousands of samples keep their precision for float32 models
    lse = torch.full((n,), -math.inf, dtype=torch.float64, device=batch.device)
    lse_sq = lse.clone()
    group_sums = {g: torch.zeros_like(lse) for g in groups}
    for start in range(0, k, chunk_size):
        c = min(chunk_size, k - start)
        log_w = log_weights(batch, c)[:, :n]  # (c, n)
        lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
        lse_sq = torch.logaddexp(lse_sq, torch.logsumexp(2 * log_w, 0))
        for g in groups:
            group_sums[g] += bounds.miwae(log_w, c // g) * (c // g)  # the sum of IWAE_g over c/g groups
        if on_pass is not None:
            on_pass(c * n)
    return lse, lse_sq, group_sums


def evaluation_matmul_path(model: DeepLatentModel, x: Tensor, k: int, chunk_size: int, batch_size: int) -> str:
    """Switch to the faster float32 matrix-multiply path (``gemm.fastest_fp32_matmul``) on a pass of
    ``importance_statistics``: ``min(k, chunk_size)`` samples for ``batch_size`` examples of ``x`` (measured once
    per process for models and passes of one shape); return it."""
    @torch.no_grad()
    def one_pass() -> None:
        model.log_weights(x[:batch_size], min(k, chunk_size))

    shapes = ("evaluation pass", type(model).__name__, *(tuple(p.shape) for p in model.parameters()),
              tuple(x[:batch_size].shape), min(k, chunk_size))
    return gemm.fastest_fp32_matmul(x.device, None, one_pass, shapes)


def concatenate(parts: list[WeightStatistics]) -> WeightStatistics:
    """The statistics of consecutive parts of the examples, as those of all of them."""
    return WeightStatistics(torch.cat([p.log_likelihood for p in parts]),
                            {g: torch.cat([p.bounds[g] for p in parts]) for g in parts[0].bounds},
                            torch.cat([p.ess for p in parts]))


def log_likelihood(
    model: DeepLatentModel,
    x: Tensor,
    k: int = 5000,
    *,
    chunk_size: int = CHUNK_SIZE,
    batch_size: int = EXAMPLES_PER_PASS,
    seed: int | None = None,
) -> Tensor:
    """The importance-sampled estimate of log p(x) with k samples, per example: shape (B,).

    log (1/k) sum_i w_i, computed under ``torch.no_grad`` in chunks of ``chunk_size`` samples for
    ``batch_size`` examples at a time, so that peak memory does not grow with k. With ``seed``, the
    samples come from a generator seeded with it and torch's global generator is left as it was.
    """
    x = model.as_batch(x)  # before its device is read
    if seed is not None:
        seed = check_seed(seed)
    with seeded(seed, x.device) if seed is not None else nullcontext():
        return importance_statistics(model, x, k, chunk_size=chunk_size, batch_size=batch_size).log_likelihood


@torch.no_grad()
def objective_bound(model: DeepLatentModel, x: Tensor, objective: Objective, max_rows: int = PASS_ROWS) -> Tensor:
    """The objective's bound at its own k per example of ``x``: shape (B,), in passes of at most about
    ``max_rows`` (sample, example) pairs."""
    per_pass = max(1, max_rows // objective.k)
    return torch.cat([objective.bound(model.log_weights(batch, objective.k)) for batch in x.split(per_pass)])
