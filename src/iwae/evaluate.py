"""Evaluation: the importance-sampled log-likelihood and the diagnostics of Burda et al. (2016), section 5.

    log p(x) ~= log (1/k) sum_{i=1..k} w_i,    w_i = p(x, z_i) / q(z_i | x),  z_i ~ q(z | x),

with k = 5000 for the test NLL. It is the IWAE bound L_k, a consistent estimate of log p(x) whose bias
vanishes as k grows. The k samples are drawn in chunks and combined by a running logsumexp, so peak memory
depends on the chunk size and the number of examples per pass, never on k. From the same samples:

    L_g for g in {1, 5, 50} (g dividing k): the mean of IWAE_g over the k/g disjoint groups of g samples,
        an unbiased estimate of L_g (L_1 is the ELBO);
    the effective sample size (sum_i w_i)^2 / sum_i w_i^2, between 1 and k;

and, from q's means on the first 500 training examples, the active units: a unit u of layer l is active
when Var_x(E_q[u | x]) > 0.01, the mean of layer l taken given a z_{l-1} sampled from q (for a binary unit,
the variance of its probability of being on).

For discrete latents with few joint values (sigmoid belief networks of up to about 20 units in all),
``exact_log_likelihood`` gives log p(x) = log sum_z p(x, z) itself, summed over every configuration of z.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from iwae import bounds, checkpoint, data, distributed, gemm, memory, rundir
from iwae.ais import ais_log_likelihood as ais_log_likelihood
from iwae.compiled import Compiled
from iwae.device import resolve_device, seeded
from iwae.models import DeepLatentModel, enumerate_values, value_count
from iwae.objectives import Objective
from iwae.settings import SettingError, check_integer, check_seed

DEFAULT_K = 5000
SPLITS = ("test", "train", "valid")
GROUP_SIZES = (1, 5, 50)
ACTIVE_UNIT_EXAMPLES = 500
ACTIVE_UNIT_THRESHOLD = 0.01
# evaluate_run compiles evaluations of at least this many samples (examples times k) unless told otherwise
AUTO_COMPILE_SAMPLES = 5_000_000
MAX_STATES = 2**20
# Evaluation passes cover at most about this many (sample, example) rows (16 examples x 500 samples), so that a
# 784-wide float32 layer output (25 MB) stays under the 32 MB up to which glibc's malloc reuses freed heap memory
# rather than mapping (and page-faulting) a buffer afresh on every pass.
PASS_ROWS = 8192
EXAMPLES_PER_PASS = 16


class WeightStatistics(NamedTuple):
    """Per-example statistics of k importance weights, each of shape (B,).

    ``log_likelihood``: log (1/k) sum_i w_i. ``bounds``: for each group size g, the mean of IWAE_g over the
    disjoint groups of g samples (g = k gives ``log_likelihood``). ``ess``: (sum_i w_i)^2 / sum_i w_i^2.
    """

    log_likelihood: Tensor
    bounds: dict[int, Tensor]
    ess: Tensor

    def cpu(self) -> WeightStatistics:
        """The same statistics on the CPU."""
        return WeightStatistics(self.log_likelihood.cpu(), {g: b.cpu() for g, b in self.bounds.items()},
                                self.ess.cpu())


@torch.no_grad()
def importance_statistics(
    model: DeepLatentModel,
    x: Tensor,
    k: int = 5000,
    *,
    chunk_size: int = 500,
    batch_size: int = EXAMPLES_PER_PASS,
    group_sizes: tuple[int, ...] = GROUP_SIZES,
    progress: bool = False,
    compile: bool = False,
    seed: int | None = None,
    first_batch: int = 0,
) -> WeightStatistics:
    """Statistics of k importance weights per example of ``x`` (B, D), drawn ``chunk_size`` at a time for
    ``batch_size`` examples at a time.

    The samples come from torch's generator as it stands; or, with ``seed``, batch j (counted from
    ``first_batch``) draws them from the generator seeded with ``batch_seed(seed, j)``, which is then restored,
    and every batch has ``batch_size`` rows (the last padded) even when x has fewer examples. An example's
    estimates then depend only on the seed, its batch's index and its batch's examples, so that ranks evaluating
    their own whole batches (``iwae.distributed``) get those of one process evaluating all of them.

    Peak memory is that of one ``model.log_weights`` call on ``batch_size`` examples and ``chunk_size``
    samples, whatever k and B. Group size g is reported when it divides both k and min(chunk_size, k), so
    no group straddles two chunks. The last batch is padded (with its first example) to ``batch_size``, so every
    pass has one shape; with ``compile`` the passes run as one program compiled by torch.compile, drawing
    the same random numbers as the eager passes.

    Returns:
      ``WeightStatistics`` in float64 on ``x``'s device, the bounds keyed by the g in ``group_sizes`` that
      qualify, and by k.
    """
    for name, value in (("k", k), ("chunk_size", chunk_size), ("batch_size", batch_size)):
        check_integer(value, name, 1)
    chunk_size = min(chunk_size, k)
    groups = [g for g in group_sizes if g < k and k % g == 0 and chunk_size % g == 0]
    log_lik: list[Tensor] = []
    log_ess: list[Tensor] = []
    grouped: dict[int, list[Tensor]] = {g: [] for g in groups}
    batch_size = batch_size if seed is not None else min(batch_size, len(x))
    log_weights = model.log_weights
    if compile:
        log_weights = Compiled(model.log_weights, "the evaluator", options={"fallback_random": True})
    bar = tqdm(total=len(x), desc=f"evaluating k={k}", unit="example", disable=None if progress else True)
    with seeded(seed, x.device) if seed is not None else nullcontext(), bar:
        for index, batch in enumerate(x.split(batch_size), first_batch):
            if seed is not None:
                torch.manual_seed(batch_seed(seed, index))
            n = len(batch)
            batch = torch.cat([batch, batch[:1].expand(batch_size - n, *batch.shape[1:])])
            lse, lse_sq, group_sums = _weight_sums(log_weights, batch, n, k, chunk_size, groups)
            log_lik.append(lse - math.log(k))
            log_ess.append(2 * lse - lse_sq)
            for g in groups:
                grouped[g].append(group_sums[g] / (k // g))
            bar.update(n)
    ll = torch.cat(log_lik)
    return WeightStatistics(ll, {**{g: torch.cat(v) for g, v in grouped.items()}, k: ll}, torch.cat(log_ess).exp())


def _weight_sums(log_weights: Callable[[Tensor, int], Tensor], batch: Tensor, n: int, k: int, chunk_size: int,
                 groups: list[int]) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
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


def batch_seed(seed: int, index: int) -> int:
    """The seed of the samples of batch ``index`` of an evaluation seeded with ``seed``: independent streams."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


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
    chunk_size: int = 500,
    batch_size: int = EXAMPLES_PER_PASS,
    seed: int | None = None,
) -> Tensor:
    """The importance-sampled estimate of log p(x) with k samples, per example: shape (B,).

    log (1/k) sum_i w_i, computed under ``torch.no_grad`` in chunks of ``chunk_size`` samples for
    ``batch_size`` examples at a time, so that peak memory does not grow with k. With ``seed``, the
    samples come from a generator seeded with it and torch's global generator is left as it was.
    """
    with seeded(seed, x.device) if seed is not None else nullcontext():
        return importance_statistics(model, x, k, chunk_size=chunk_size, batch_size=batch_size).log_likelihood


def exact_log_likelihood(model: DeepLatentModel, x: Tensor, *, max_states: int = MAX_STATES,
                         max_rows: int = 2**16) -> Tensor:
    """The exact log p(x) = log sum_z p(x, z_1..z_L) per example of ``x`` (B, D), shape (B,), by summing
    over every joint configuration of discrete latents (Bernoulli units, one-hot categorical groups).

    The configurations are taken in passes of at most about ``max_rows`` (configuration, example) pairs
    and combined by a running logsumexp; q plays no part. Differentiable in p's parameters.

    Raises:
      ValueError: if a latent layer is not discrete, or there are more than ``max_states`` joint
        configurations (use ``log_likelihood``, the importance-sampled estimate, for such models).
    """
    layers = [model.prior()]  # p(z_L), then p(z_l | z_{l+1}) at z_{l+1} = 0, top-down: only their kinds and shapes
    for layer in reversed(model.conditionals[1:]):
        layers.insert(0, layer(torch.zeros(layers[0].event_shape, dtype=x.dtype, device=x.device)))
    try:
        counts = [value_count(dist) for dist in layers]
    except ValueError as error:
        raise ValueError(f"{error}; estimate log p(x) with log_likelihood (importance sampling) instead") from None
    total = math.prod(counts)
    if total > max_states:
        raise ValueError(f"the model's latents have about 2^{math.log2(total):.0f} joint configurations, more "
                         f"than max_states={max_states} to sum over; estimate log p(x) with log_likelihood "
                         "(importance sampling) instead")
    values = [enumerate_values(dist).to(x.dtype) for dist in layers]
    per_pass = max(1, max_rows // len(x))
    result = torch.full(x.shape[:1], -math.inf, dtype=x.dtype, device=x.device)
    for start in range(0, total, per_pass):
        index = torch.arange(start, min(start + per_pass, total), device=x.device)
        z = []
        for count, value in zip(counts, values, strict=True):  # mixed radix: layer 1 varies fastest
            z.append(value[index % count].unsqueeze(1).expand(-1, len(x), -1))
            index = index // count
        result = torch.logaddexp(result, torch.logsumexp(model.log_joint(x, z), 0))
    return result


@torch.no_grad()
def objective_bound(model: DeepLatentModel, x: Tensor, objective: Objective, max_rows: int = PASS_ROWS) -> Tensor:
    """The objective's bound at its own k per example of ``x``: shape (B,), in passes of at most about
    ``max_rows`` (sample, example) pairs."""
    per_pass = max(1, max_rows // objective.k)
    return torch.cat([objective.bound(model.log_weights(batch, objective.k)) for batch in x.split(per_pass)])


@torch.no_grad()
def posterior_mean_variances(model: DeepLatentModel, x: Tensor) -> list[Tensor]:
    """For each stochastic layer, the population variance over the examples ``x`` of each unit's posterior
    mean, shape (d_l,); for layer l >= 2 the mean is that of q(z_l | z_{l-1}) at one z_{l-1} sampled from q."""
    variances, h = [], x
    for layer in model.encoder:
        q = layer(h)
        variances.append(q.mean.var(0, unbiased=False))
        h = q.sample()
    return variances


def active_units(model: DeepLatentModel, x: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> list[int]:
    """The number of active units of each stochastic layer on the examples ``x`` (Burda et al. 2016): units
    whose posterior mean has a variance over ``x`` above ``threshold`` (see ``posterior_mean_variances``)."""
    return [int((v > threshold).sum()) for v in posterior_mean_variances(model, x)]


def split_examples(dataset: data.Dataset, split: str, seed: int, limit: int | None = None) -> Tensor:
    """The first ``limit`` (default: all) binary examples of a split: ``test``/``valid`` as loaded (binarized
    once with a fixed seed for dynamic data), ``train`` binarized here with a generator seeded with ``seed``
    if dynamic."""
    if split == "train":
        x = dataset.train[:limit]
        if dataset.binarization == "static":
            return x
        return data.binarize(x, torch.Generator(x.device).manual_seed(seed))
    if split == "test":
        return dataset.test[:limit]
    if split == "valid" and dataset.valid is not None:
        return dataset.valid[:limit]
    raise SettingError("{0} {split!r} is not available for {name}; choose train or test", ("split",), split=split,
                       name=dataset.name)


def own_k(run_dir: Path) -> int:
    """The k of a run's own evaluation: that of the final evaluation of its training (``eval_k``), or
    ``DEFAULT_K`` if the training skipped it."""
    return rundir.read_json(run_dir / rundir.CONFIG).get("eval_k") or DEFAULT_K


def eval_path(run_dir: Path, split: str = "test", dataset: str | None = None, *, k: int | None = None,
              examples: int | None = None, seed: int = 0) -> Path:
    """The file that holds the evaluation of a run with these settings: one file per setting, so that no
    evaluation replaces one made with other settings.

    RUN/eval.json is the run's own evaluation: its own test split, every example, seed 0, and k None or
    ``own_k(run_dir)`` (what training's final evaluation writes, and ``iwae sample`` draws). Any other
    setting goes to RUN/eval[-<data>]-<split>-k<k>[-n<examples>][-seed<seed>].json, <data> being the stem of
    ``dataset``'s name or path.
    """
    if dataset is None and split == "test" and examples is None and seed == 0 and k in (None, own_k(run_dir)):
        return run_dir / rundir.EVAL
    k = own_k(run_dir) if k is None else k
    parts = [Path(dataset).stem] if dataset is not None else []
    parts += [split, f"k{k}"]
    parts += [f"n{examples}"] if examples is not None else []
    parts += [f"seed{seed}"] if seed != 0 else []
    return run_dir / f"eval-{'-'.join(parts)}.json"


def load_examples(
    run_dir: Path, *, split: str, dataset: str | None, data_dir: str | None, examples: int | None, device: str,
    seed: int, loaded: data.Dataset | None = None,
) -> tuple[dict[str, Any], DeepLatentModel, data.Dataset, Tensor]:
    """A run's checkpoint state and model on ``device``, the data it is evaluated on (its own, or ``dataset``;
    ``loaded`` if given: the run's own data, loaded already), and the first ``examples`` (default: all) binary
    examples of ``split`` (see ``split_examples``).

    Raises:
      SettingError: for a bad ``examples``, ``seed`` or ``split``, before anything is read.
    """
    if examples is not None:
        check_integer(examples, "examples", 1)
    check_seed(seed)
    if split not in SPLITS:
        raise SettingError("unknown {0} {split!r}; choose one of {known}", ("split",), split=split,
                           known=", ".join(SPLITS))
    torch_device = resolve_device(device)
    state, model = checkpoint.load_model(run_dir, torch_device)
    config = state["config"]
    split_protocol = config["data_split"] if dataset is None else "paper"
    if loaded is None:
        loaded = data.load(dataset or config["dataset"], data_dir or config["data_dir"], split=split_protocol)
    loaded = loaded.to(torch_device)
    x = split_examples(loaded, split, seed, examples)
    if x.shape[1] != state["x_dim"]:
        raise ValueError(
            f"{loaded.name} has {x.shape[1]} values per example but the model in {run_dir} was trained on "
            f"{state['x_dim']}; evaluate it on data of the same dimension"
        )
    return state, model, loaded, x


def evaluate_run(
    run_dir: Path,
    *,
    k: int = DEFAULT_K,
    split: str = "test",
    dataset: str | None = None,
    data_dir: str | None = None,
    examples: int | None = None,
    device: str = "auto",
    seed: int = 0,
    chunk_size: int = 500,
    batch_size: int = EXAMPLES_PER_PASS,
    progress: bool = False,
    compile: bool | None = None,
    loaded: data.Dataset | None = None,
) -> dict[str, Any]:
    """Evaluate a run's latest checkpoint and write the result as JSON in the run directory.

    Args:
      run_dir: a directory written by ``iwae train``.
      k: importance samples per example.
      split: "test", "train" or "valid".
      dataset: a dataset name or .npy/.npz path to evaluate on instead of the run's own data.
      data_dir: where to find the dataset's files (default: the run's setting).
      examples: evaluate on the first ``examples`` examples of the split only.
      device: "cpu", "cuda" or "auto".
      seed: seeds the samples (and the binarization of a dynamic training split).
      chunk_size, batch_size: samples and examples per pass (memory ~ their product).
      progress: show a progress bar (on a terminal).
      compile: compile the evaluation passes (``importance_statistics``); None compiles evaluations of at
        least ``AUTO_COMPILE_SAMPLES`` samples in all, where the compile time is won back.
      loaded: the run's own data, loaded already (by its training), to evaluate on instead of loading it again.

    Returns:
      The result also written to ``eval_path(run_dir, split, dataset, k=k, examples=examples, seed=seed)``
      (a file per setting): ``nll`` and ``nll_se`` (mean and standard error over examples of
      -log (1/k) sum_i w_i), ``k``, ``bounds`` and ``bounds_se`` (L_g keyed by g), ``ess`` and ``ess_per_k``
      (the mean ESS over examples, and that divided by k: 1 when q is the posterior), ``active_units`` (one
      count per stochastic layer, of ``latent_units``), and what was evaluated.

    Raises:
      SettingError: for a bad setting, or passes too large for the memory available, before any work.
    """
    for name, value in (("k", k), ("chunk_size", chunk_size), ("batch_size", batch_size)):
        check_integer(value, name, 1)
    start = time.perf_counter()
    state, model, loaded, x = load_examples(run_dir, split=split, dataset=dataset, data_dir=data_dir,
                                            examples=examples, device=device, seed=seed, loaded=loaded)
    torch_device = x.device
    memory.check_fits(memory.pass_bytes(model, state["x_dim"], min(k, chunk_size) * batch_size, training=False),
                      torch_device, "evaluating with {0} {chunk} and {1} {batch}", ("chunk_size", "batch_size"),
                      chunk=min(k, chunk_size), batch=batch_size)
    if compile is None:
        compile = len(x) * k >= AUTO_COMPILE_SAMPLES
    path = distributed.broadcast(evaluation_matmul_path(model, x, k, chunk_size, batch_size))
    gemm.fastest_fp32_matmul(torch_device, path)  # rank 0's path on every rank
    batch_size = min(batch_size, len(x))
    mine = distributed.shard(math.ceil(len(x) / batch_size))  # with several ranks, each takes whole batches
    with seeded(seed, torch_device):
        stats = importance_statistics(model, x[mine.start * batch_size: mine.stop * batch_size], k,
                                      chunk_size=chunk_size, batch_size=batch_size, seed=seed,
                                      first_batch=mine.start, progress=progress and distributed.rank() == 0,
                                      compile=compile) if mine else None
        variances = posterior_mean_variances(model, split_examples(loaded, "train", seed, ACTIVE_UNIT_EXAMPLES))
    if distributed.world() > 1:  # every rank's examples, in order
        parts = distributed.gather(None if stats is None else stats.cpu())
        stats = concatenate([part for part in parts if part is not None])
    result = _result(run_dir, loaded, split, state["epoch"], k, seed, stats, variances, time.perf_counter() - start)
    if distributed.rank() == 0:
        evaluated = examples_evaluated(examples, result["examples"])
        rundir.write_json(eval_path(run_dir, split, dataset, k=k, examples=evaluated, seed=seed), result)
    return result


def _result(run_dir: Path, loaded: data.Dataset, split: str, epoch: int, k: int, seed: int, stats: WeightStatistics,
            variances: list[Tensor], seconds: float) -> dict[str, Any]:
    """An evaluation's result (see ``evaluate_run``) from the statistics of its examples."""
    nll = -stats.log_likelihood.cpu()
    n = len(nll)
    return {
        "run": str(run_dir),
        "dataset": loaded.name,
        "split": split,
        "examples": n,
        "epoch": epoch,
        "k": k,
        "seed": seed,
        "nll": nll.mean().item(),
        "nll_se": nll.std().item() / math.sqrt(n) if n > 1 else math.nan,
        "bounds": {str(g): b.mean().item() for g, b in stats.bounds.items()},
        "bounds_se": {str(g): b.std().item() / math.sqrt(n) if n > 1 else math.nan for g, b in stats.bounds.items()},
        "ess": stats.ess.mean().item(),
        "ess_per_k": stats.ess.mean().item() / k,
        "active_units": [int((v > ACTIVE_UNIT_THRESHOLD).sum()) for v in variances],
        "latent_units": [len(v) for v in variances],
        "active_units_examples": min(ACTIVE_UNIT_EXAMPLES, len(loaded.train)),
        "active_units_threshold": ACTIVE_UNIT_THRESHOLD,
        "time_s": round(seconds, 2),
    }


def examples_evaluated(asked: int | None, evaluated: int) -> int | None:
    """The ``examples`` an evaluation's file is named after: None (every example) when ``asked`` is None or more
    than the split holds, so that a file never names examples that were not evaluated."""
    return None if asked is None or asked > evaluated else asked


def _active_units_of(result: dict[str, Any]) -> str:
    """'a of d units' per stochastic layer, joined by +; results written before ``latent_units`` give 'a units'."""
    if "latent_units" not in result:
        return " + ".join(map(str, result["active_units"])) + " units"
    pairs = zip(result["active_units"], result["latent_units"], strict=True)
    return " + ".join(f"{active} of {units}" for active, units in pairs) + " units"


def format_evaluation(result: dict[str, Any]) -> str:
    """The evaluation result as a small text table."""
    k = result["k"]
    rows = [
        ("data", f"{result['dataset']} {result['split']}, {result['examples']} examples"),
        ("checkpoint", f"{result['run']} after epoch {result['epoch']}"),
        (f"NLL (k={k})", f"{result['nll']:.2f} +- {result['nll_se']:.2f} nats (standard error over examples)"),
    ]
    rows += [
        (f"L_{g}", f"{value:.2f} +- {result['bounds_se'][g]:.2f}")
        for g, value in sorted(result["bounds"].items(), key=lambda item: int(item[0]))
    ]
    rows += [
        ("ESS", f"{result['ess']:.1f} of {k}"),
        ("ESS/k", f"{result['ess_per_k']:.4f} (1 when q is the posterior)"),
        ("active units", f"{_active_units_of(result)} (variance of the posterior mean over "
         f"{result['active_units_examples']} training examples > {result['active_units_threshold']})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
