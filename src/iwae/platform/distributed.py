"""Running as one of several processes launched by torchrun: data-parallel training, sharded evaluation, and grids
spread over the ranks, with torch.distributed.

``torchrun --nproc-per-node N -m iwae COMMAND ...`` starts N copies of the command, which find each other through
torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; ``session`` joins them, with gloo on a CPU and
nccl on a GPU, each rank on GPU LOCAL_RANK). Without torchrun (or with one process) every helper here is the
identity of a single process: rank 0 of 1.

Data-parallel training takes the gradient of the per-batch sum of the bound over a global batch of B examples.
Rank r of W computes the gradient of the sum over its rows ``rows(B)`` (B/W of them), and a SUM all-reduce of the
gradients (``all_reduce_sum``, one flat buffer; a functional collective, so a compiled step keeps it in its graph)
gives every rank the gradient of the whole batch, from which each takes the same Adam step. (torch's
DistributedDataParallel wrapper is not used: its reducer hooks ``loss.backward()``, while the step takes its
gradient with ``torch.autograd.grad``, which DDP does not support; what DDP would add beyond this all-reduce,
bucketing to overlap communication with the backward pass, matters little for models of this size.)

Random numbers: every rank draws those of the whole global batch from the run's own streams (the epoch's
permutation, the binarization of all B rows, and the latents' noise for all B rows, see ``sharded_draws``) and
uses its own rows. So the ranks draw exactly what a single process draws, a run's trajectory does not depend on the
number of ranks (up to the float rounding of summing the gradient in W parts), its checkpoint is the same as a
single process's, and it resumes with any number of ranks that divides B. The price is drawing W times the noise
a rank uses: elementwise work, small beside the matrix products of the rows it trains on.

A rank that dies ends the others within a bounded time: its peers' collectives fail when its connections close
(or after ``IWAE_DIST_TIMEOUT`` seconds, default 600, for one that hangs), and joining fails after that long if the
ranks cannot meet; every rank then stops with a one-line ``DistributedError``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, redirect_stdout, suppress
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from iwae.models import DeepLatentModel
from iwae.models.drawn import Bernoullis, Normals, with_draws

TIMEOUT_ENV = "IWAE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
# The longest timeout taken: torch counts a timeout in nanoseconds in an int64 (up to 9.2e9 s), and a longer one
# (or an infinite one) fails as the ranks join, with an OverflowError or an "Invalid timeout" of gloo's.
MAX_TIMEOUT_S = 1e9
# How long a rank of a spread grid waits at a barrier for peers still training their cells (a dead peer is noticed
# at once, when its connections close).
GRID_WAIT = timedelta(days=7)

T = TypeVar("T")
_alone = False


class DistributedError(ValueError):
    """The ranks could not meet, one of them was lost, or a setting does not suit several ranks; one line."""


def launched() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return launched_ranks() > 1


def launched_ranks() -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 without torchrun), known before they meet.

    Raises:
      DistributedError: if WORLD_SIZE is no whole number of processes.
    """
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise DistributedError(f"WORLD_SIZE={text!r} is not a number of processes (1 or more); torchrun sets it for "
                               "the processes it starts: unset it to run one process, or start the command with "
                               "torchrun")
    return value


def timeout_s() -> float:
    """Seconds a collective (or joining the ranks) may take before it fails: $IWAE_DIST_TIMEOUT or 600 (at most
    ``MAX_TIMEOUT_S``)."""
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_TIMEOUT_S:
        raise DistributedError(f"{TIMEOUT_ENV}={text!r} is not a positive number of seconds up to 1e9 "
                               "(31 years); set it to e.g. 600")
    return value


def world() -> int:
    """The number of ranks training (or evaluating) together: 1 outside torchrun and within ``alone``."""
    return dist.get_world_size() if dist.is_initialized() and not _alone else 1


def rank() -> int:
    """This process's rank among ``world()``: 0 outside torchrun and within ``alone``."""
    return dist.get_rank() if dist.is_initialized() and not _alone else 0


def name() -> str:
    """'rank r of W' for messages (the job's own rank, also within ``alone``)."""
    return f"rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_initialized() else "rank 0 of 1"


@contextmanager
def alone() -> Iterator[None]:
    """Within the body this process works on its own, as rank 0 of 1 (each rank of a spread grid trains and writes
    its own runs), though it stays in the job for ``wait_for_all``."""
    global _alone
    previous, _alone = _alone, True
    try:
        yield
    finally:
        _alone = previous


@contextmanager
def session(backend: str | None = None, again: str = "the same command") -> Iterator[None]:
    """Run the body as one rank of torchrun's job, when launched by it (else just run it).

    Joins the other ranks with ``backend`` (default: nccl on a GPU, gloo otherwise), puts this rank on GPU
    LOCAL_RANK, discards the standard output of ranks other than 0 (rank 0 prints the results), and turns the
    failures of collectives (a lost rank, a timeout) into a one-line ``DistributedError`` that names ``again``, the
    command line that continues the work.
    """
    if not launched():
        yield
        return
    limit = timeout_s()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=limit))
    except (RuntimeError, ValueError) as error:  # DistNetworkError, DistStoreError, a bad MASTER_ADDR...
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise DistributedError(
            f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')} could not meet the other "
            f"ranks at {where} within {limit:g} s ({_first_line(error)}); start every rank with the same "
            f"--nnodes, --master-addr and --master-port (or --rdzv-endpoint), or wait longer with {TIMEOUT_ENV}"
        ) from error
    try:
        with open(os.devnull, "w") as devnull, redirect_stdout(devnull) if dist.get_rank() else nullcontext():
            yield
        dist.barrier()  # no rank tears its connections down while another still uses them
    except dist.DistError as error:
        raise _lost(error, again) from error
    except RuntimeError as error:
        if not _is_collective_failure(error):
            _leave()
            raise
        raise _lost(error, again) from error
    except BaseException:
        _leave()
        raise
    dist.destroy_process_group()


def _leave() -> None:
    """Take this rank out of the job on an error of its own (the other ranks alive): a process group left to the
    interpreter's exit can abort it there (SIGABRT) once another rank has closed its connections."""
    with suppress(Exception):
        dist.destroy_process_group()


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300]


def _is_collective_failure(error: RuntimeError) -> bool:
    """Whether a RuntimeError comes from a collective that failed (gloo and nccl report some failures so)."""
    text = str(error)
    return any(mark in text for mark in ("gloo", "Gloo", "NCCL", "c10d", "Connection closed", "Timed out"))


def _lost(error: BaseException, again: str) -> DistributedError:
    return DistributedError(
        f"{name()}: a collective failed: another rank ended or did not answer within {timeout_s():g} s "
        f"({_first_line(error)}); the job stops; continue with: {again}"
    )


def _device() -> torch.device:
    """The device of this rank's collectives' tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def rows(batch_size: int) -> slice:
    """This rank's rows of a global batch of ``batch_size`` examples (all of them for a single process).

    Raises:
      DistributedError: if the ranks cannot share the batch evenly.
    """
    w = world()
    if batch_size % w:
        divisors = ", ".join(str(d) for d in range(1, batch_size + 1) if batch_size % d == 0)
        raise DistributedError(f"the global batch of {batch_size} examples does not divide among {w} ranks; run on a "
                               f"number of ranks that divides it ({divisors}), or start a new run with a --batch-size "
                               f"that is a multiple of {w} (a resumed run keeps its batch size)")
    n = batch_size // w
    return slice(rank() * n, (rank() + 1) * n)


def shard(n: int) -> range:
    """This rank's contiguous share of ``n`` items (sizes differing by at most one; all of them for one process)."""
    base, extra = divmod(n, world())
    start = rank() * base + min(rank(), extra)
    return range(start, start + base + (rank() < extra))


def assign(costs: list[float]) -> list[int]:
    """The indices of the items (of the given costs) this rank takes, the items spread so as to balance the ranks'
    total costs: the costliest first, each to the rank with the least so far (all of them for one process)."""
    loads = [0.0] * world()
    mine = []
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
        least = loads.index(min(loads))
        loads[least] += costs[index]
        if least == rank():
            mine.append(index)
    return sorted(mine)


def all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Every rank's ``tensors`` summed elementwise over the ranks, as one all-reduce of one flat buffer (a
    functional collective: traceable by torch.compile). The tensors must share a dtype."""
    flat = funcol.all_reduce(torch.cat([t.reshape(-1) for t in tensors]), "sum", dist.group.WORLD)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def maximum(value: int) -> int:
    """The largest of the ranks' ``value`` s, so that every rank takes the same decision (one small all-reduce)."""
    if world() == 1:
        return value
    values = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(values, dist.ReduceOp.MAX)
    return int(values.item())


def gather(value: Any) -> list[Any]:
    """Every rank's (picklable) ``value``, in rank order, on every rank."""
    if world() == 1:
        return [value]
    values: list[Any] = [None] * world()
    dist.all_gather_object(values, value)
    return values


def broadcast(value: T) -> T:
    """Rank 0's (picklable) ``value``, on every rank: e.g. a choice measured on each rank, so that all use one."""
    if world() == 1:
        return value
    values = [value]
    dist.broadcast_object_list(values, src=0)
    return values[0]


def on_rank_zero(fn: Callable[[], T]) -> T | None:
    """``fn()`` on rank 0 alone (a write); every rank returns once it is done, and raises if it failed (rank 0 its
    own exception, the others a DistributedError quoting it). Returns fn's result on rank 0, None elsewhere."""
    if world() == 1:
        return fn()
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as caught:  # reported to every rank, then raised here
            error = caught
    message = [None if error is None else _first_line(error)]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        dist.barrier()  # every rank has the message before any of them, raising, leaves the job
    if error is not None:
        raise error
    if message[0] is not None:
        raise DistributedError(f"{name()}: rank 0 failed: {message[0]}")
    return result


def wait_for_all() -> None:
    """Wait until every rank of the job reaches this point (a spread grid's ranks finishing their cells): as long
    as ``GRID_WAIT`` for live peers, failing at once for a peer whose process ended."""
    if dist.is_initialized():
        dist.monitored_barrier(timeout=GRID_WAIT, wait_all_ranks=True)


def _rows_normals(rows: slice, total: int) -> Normals:
    """Standard normals for this rank's ``rows`` (dimension -2) of a global batch of ``total`` rows, drawn as the
    whole batch's are: a standard normal of the global shape, of which these rows are taken."""
    def normals(shape: torch.Size, like: Tensor) -> Tensor:
        eps = torch.empty((*shape[:-2], total, shape[-1]), dtype=like.dtype, device=like.device)
        return eps.normal_()[..., rows, :]

    return normals


def _rows_bernoullis(rows: slice, total: int) -> Bernoullis:
    """Bernoulli draws for this rank's ``rows`` (dimension -2) of a global batch of ``total`` rows, drawn as the
    whole batch's are (one uniform per element, in order; the other rows' probabilities are placeholders)."""
    def bernoullis(probs: Tensor) -> Tensor:
        full = torch.zeros((*probs.shape[:-2], total, probs.shape[-1]), dtype=probs.dtype, device=probs.device)
        full[..., rows, :] = probs
        return torch.bernoulli(full)[..., rows, :]

    return bernoullis


def sharded_draws(model: DeepLatentModel, rows: slice, total: int) -> DeepLatentModel:
    """``model`` (the same parameters) with the latents of its batch's rows drawn as the rows ``rows`` of a
    global batch of ``total`` rows: given those rows of the batch, it draws the very latents that ``model`` draws
    for them given the whole batch. ``model`` itself when the rows are the whole batch.

    Raises:
      DistributedError: for an encoder layer other than the Gaussian and Bernoulli layers of the paper's
        models and the sigmoid belief networks.
    """
    if (rows.start, rows.stop) == (0, total):
        return model
    layers = []
    normals, bernoullis = _rows_normals(rows, total), _rows_bernoullis(rows, total)
    for index, layer in enumerate(model.encoder):
        drawn = with_draws(layer, normals, bernoullis)
        if drawn is None:
            raise DistributedError(f"data-parallel training draws the latents of Gaussian and Bernoulli layers only; "
                                   f"encoder layer {index} is a {type(layer).__name__}; train it in one process")
        layers.append(drawn)
    return DeepLatentModel(layers, model.conditionals, model.prior)


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a checkpoint the others read)."""
    if world() > 1:
        dist.barrier()
