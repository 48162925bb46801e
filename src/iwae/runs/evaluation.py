"""Evaluating a run (``iwae evaluate``): its checkpoint's importance-sampled log-likelihood, bounds, effective
sample size and active units on a split of its data, written to RUN/eval.json (its own evaluation) or
RUN/eval-*.json (one file per other setting)."""

from __future__ import annotations

import glob
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iwae import data, plots
from iwae.eval.activity import ACTIVE_UNIT_EXAMPLES, ACTIVE_UNIT_THRESHOLD, posterior_mean_variances
from iwae.eval.likelihood import (
    CHUNK_SIZE,
    EXAMPLES_PER_PASS,
    WeightStatistics,
    batch_statistics,
    concatenate,
    evaluation_matmul_path,
    progress_bar,
)
from iwae.eval.splits import SPLITS, split_examples
from iwae.models import DeepLatentModel
from iwae.platform import distributed, duration, gemm, memory
from iwae.platform.device import resolve_device, seeded
from iwae.platform.threads import use_threads
from iwae.runs import checkpoint, resumable, rundir
from iwae.settings import SettingError, check_integer, check_seed

DEFAULT_K = 5000


# evaluate_run compiles evaluations of at least this many samples (examples times k) unless told otherwise
AUTO_COMPILE_SAMPLES = 5_000_000


def own_k(run_dir: Path) -> int:
    """The k of a run's own evaluation: that of the final evaluation of its training (``eval_k``), or
    ``DEFAULT_K`` if the training skipped it."""
    return rundir.read_config(run_dir).get("eval_k") or DEFAULT_K


# what the readers of an evaluation's file take from it (format_evaluation, the figures, a finished run's resume)
EVALUATION_KEYS = ("run", "epoch", "dataset", "split", "examples", "k", "nll", "nll_se", "bounds", "bounds_se", "ess",
                   "active_units", "active_units_examples", "active_units_threshold")


def read_evaluation(path: Path) -> dict[str, Any]:
    """An evaluation result as ``evaluate_run`` returned it, from its file: the standard errors that JSON holds as
    null (those of one example, undefined) are NaN again, as the result had them."""
    result = rundir.read_json(path)
    missing = [key for key in EVALUATION_KEYS if key not in result] if isinstance(result, dict) else EVALUATION_KEYS
    if missing:
        raise rundir.RunDirError(
            f"{path} is not an evaluation written by iwae (it lacks {', '.join(missing)}); remove it and evaluate "
            f"the run again with iwae evaluate {path.parent}"
        )
    result["nll_se"] = _nan_if_null(result["nll_se"])
    result["bounds_se"] = {g: _nan_if_null(se) for g, se in result["bounds_se"].items()}
    return result


def _nan_if_null(value: float | None) -> float:
    return math.nan if value is None else value


def eval_path(run_dir: Path, split: str = "test", dataset: str | None = None, *, k: int | None = None,
              examples: int | None = None, seed: int = 0) -> Path:
    """The file that holds the evaluation of a run with these settings: one file per setting, so that no
    evaluation replaces one made with other settings.

    RUN/eval.json is the run's own evaluation: its own test split, every example, seed 0, and k None or
    ``own_k(run_dir)`` (what training's final evaluation writes, and ``iwae sample`` draws). Any other
    setting goes to RUN/eval[-<data>]-<split>-k<k>[-n<examples>][-seed<seed>].json, <data> being a catalogue
    dataset's name, or a user's file's stem and the first 8 hex digits of the SHA-256 of its absolute path (so that
    files of one name in two folders, or a file named like a catalogue dataset, have evaluations of their own).
    """
    if dataset is None and split == "test" and examples is None and seed == 0 and k in (None, own_k(run_dir)):
        return run_dir / rundir.EVAL
    k = own_k(run_dir) if k is None else k
    parts = [] if dataset is None else [data_label(dataset)]
    parts += [split, f"k{k}"]
    parts += [f"n{examples}"] if examples is not None else []
    parts += [f"seed{seed}"] if seed != 0 else []
    return run_dir / f"eval-{'-'.join(parts)}.json"


def other_data(run_dir: Path, dataset: str | None) -> str | None:
    """``dataset``, the data an evaluation of the run in ``run_dir`` is asked for, or None where that is the run's
    own: the same catalogue dataset, or the same file unchanged, of a run on the paper's split (whose evaluation
    is then the run's own, e.g. RUN/eval.json, not one of other data)."""
    if dataset is None:
        return None
    try:
        config = rundir.read_config(run_dir)
    except rundir.RunDirError:
        return dataset  # the checkpoint's loading says what is wrong
    own = (data.recorded_name(dataset) == config.get("dataset") and config.get("data_split") == "paper"
           and data.user_file_sha256(dataset) == config.get("dataset_sha256"))
    return None if own else dataset


def data_label(dataset: str) -> str:
    """``dataset`` as the name of an evaluation's file gives it: a catalogue dataset's name, or a user's file's stem
    and the first 8 hex digits of the SHA-256 of its absolute path."""
    if dataset in data.DATASETS:
        return dataset
    return f"{Path(dataset).stem}-{hashlib.sha256(data.recorded_name(dataset).encode()).hexdigest()[:8]}"


def data_identity(name: str) -> str:
    """What ties an evaluation's finished batches to the data they were made on: a catalogue dataset's name (its
    files are checked against their checksums), or a user's file's absolute path and the SHA-256 of its bytes."""
    sha256 = data.user_file_sha256(name)
    return data.recorded_name(name) + (f" sha256 {sha256}" if sha256 else "")


def load_examples(
    run_dir: Path, *, split: str, dataset: str | None, data_dir: str | None, examples: int | None, device: str,
    seed: int, loaded: data.Dataset | None = None,
) -> tuple[dict[str, Any], DeepLatentModel, data.Dataset, Tensor]:
    """A run's checkpoint state and model on ``device`` (the same checkpoint on every rank), the data it is
    evaluated on (its own, or ``dataset``; ``loaded`` if given: the run's own data, loaded already), and
    ``examples`` (default: all) binary examples of ``split`` (see ``split_examples``).

    Raises:
      SettingError: for a bad ``examples``, ``seed`` or ``split``, before anything is read.
    """
    if examples is not None:
        examples = check_integer(examples, "examples", 1)
    seed = check_seed(seed)
    if split not in SPLITS:
        raise SettingError("unknown {0} {split!r}; choose one of {known}", ("split",), split=split,
                           known=", ".join(SPLITS))
    torch_device = resolve_device(device)
    state, model = checkpoint.load_model(run_dir, torch_device)
    _check_one_checkpoint(run_dir, state)
    config = state["config"]
    split_protocol = config["data_split"] if dataset is None else "paper"
    if loaded is None:
        loaded = data.load(dataset or config["dataset"], data_dir or config["data_dir"], split=split_protocol,
                           sha256=None if dataset else config.get("dataset_sha256"))
    loaded = loaded.to(torch_device)
    x = split_examples(loaded, split, seed, examples)
    if x.shape[1] != state["x_dim"]:
        raise ValueError(
            f"{loaded.name} has {x.shape[1]} values per example but the model in {run_dir} was trained on "
            f"{state['x_dim']}; evaluate it on data of the same dimension"
        )
    return state, model, loaded, x


def evaluate_run(
    run_dir: Path | str,
    *,
    k: int = DEFAULT_K,
    split: str = "test",
    dataset: str | None = None,
    data_dir: str | None = None,
    examples: int | None = None,
    device: str = "auto",
    seed: int = 0,
    chunk_size: int = CHUNK_SIZE,
    batch_size: int = EXAMPLES_PER_PASS,
    progress: bool = False,
    compile: bool | None = None,
    loaded: data.Dataset | None = None,
    save_every_s: float | None = resumable.SAVE_EVERY_S,
    time_limit_s: float | None = duration.TIME_LIMIT_S,
    matmul: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Evaluate a run's latest checkpoint and write the result as JSON in the run directory, refusing (SettingError,
    RunDirError) a bad setting, passes too large for memory, an evaluation longer than ``time_limit_s`` or a run
    directory that cannot be written before any work.

    Args:
      run_dir: a directory written by ``iwae train``; k: importance samples per example.
      split, examples: "test", "train" or "valid"; that many of its examples, a random subset (default: all).
      dataset, data_dir: a dataset name or .npy/.npz path to evaluate on instead of the run's own data, and where
        to find its files (default: the run's); loaded: the run's own data, loaded already (by its training).
      device, threads, seed: "cpu", "cuda" or "auto"; torch's threads (None: chosen); seeds the samples.
      chunk_size, batch_size: samples and examples per pass (memory ~ their product); progress: show a bar.
      compile: compile the evaluation passes; None compiles those of at least ``AUTO_COMPILE_SAMPLES`` samples.
      save_every_s, time_limit_s: keep the finished batches this often, to continue from; refuse an evaluation
        estimated (from a timed pass) to take longer (None: never, no limit).
      matmul: the CPU's float32 matmul path (default, onednn); None: the continued evaluation's, else the faster.

    Returns the result, also written to its ``path`` (``eval_path``'s; the run's own data as ``dataset`` is none):
      ``nll``, ``nll_se`` (of -log mean_i w_i), ``k``, ``bounds``, ``bounds_se`` (L_g by g), ``ess``, ``ess_per_k``,
      ``active_units`` (per layer, of ``latent_units``), ``matmul`` and the pass sizes (which set the draws' order).
    """
    run_dir, dataset = _checked(Path(run_dir), dataset, device, matmul, k=k, chunk_size=chunk_size,
                                batch_size=batch_size)
    start = time.perf_counter()
    state, model, loaded, x = load_examples(run_dir, split=split, dataset=dataset, data_dir=data_dir,
                                            examples=examples, device=device, seed=seed, loaded=loaded)
    out = eval_path(run_dir, split, dataset, k=k, examples=examples_evaluated(examples, loaded, split), seed=seed)
    compile = len(x) * k >= AUTO_COMPILE_SAMPLES if compile is None else compile
    pieces = _pieces(state, out, {"method": "is", "k": k, "split": split, "data": data_identity(loaded.name),
                                    "examples": len(x), "seed": seed, "chunk_size": chunk_size,
                                    "batch_size": batch_size, "compile": compile}, save_every_s, matmul)
    _prepare_passes(model, x, k, chunk_size, batch_size, pieces.chosen, threads)
    with seeded(seed, x.device):
        stats = _statistics_of_all_ranks(model, x, k, chunk_size=chunk_size, batch_size=batch_size, seed=seed,
                                         progress=progress, compile=compile, pieces=pieces, time_limit_s=time_limit_s)
    with pieces.kept_on_stop():  # a stop from here on keeps every batch
        result = _result(run_dir, loaded, state, stats, _unit_variances(model, loaded, seed, x.device), start, pieces)
        distributed.on_rank_zero(lambda: _write_result(run_dir, out, result))
    pieces.remove()
    distributed.on_rank_zero(lambda: _remove_partials(out))
    return {**result, "path": str(out)}


def _check_one_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Refuse an evaluation whose ranks read different checkpoints of the run (a training run wrote a new one
    between their reads), whose batches would come from different models."""
    positions = distributed.gather((state["epoch"], state["step"], state["wall_time_s"]))
    if len(set(positions)) > 1:
        read = ", ".join(f"rank {rank}: epoch {epoch} step {step}" for rank, (epoch, step, _) in enumerate(positions))
        raise ValueError(f"the ranks read different checkpoints of {run_dir} ({read}): a new one was written as they "
                         "started, so the run is still training; evaluate it once it stops, or a copy of it "
                         "(cp -r RUN COPY)")


def _write_result(run_dir: Path, out: Path, result: dict[str, Any]) -> None:
    """Write ``result`` to ``out``; where that is the run's own evaluation (RUN/eval.json), draw its figure of the
    bounds against k (RUN/figures/bound_vs_k.png) afresh, which would otherwise show the numbers it replaced."""
    rundir.write_json(out, result)
    if out == eval_path(run_dir):
        (run_dir / rundir.FIGURES).mkdir(exist_ok=True)
        plots.plot_bound_vs_k(run_dir / rundir.FIGURES / BOUND_VS_K, result)


def _unit_variances(model: DeepLatentModel, loaded: data.Dataset, seed: int, device: torch.device
                           ) -> list[Tensor]:
    """``posterior_mean_variances`` on the active units' training examples, drawn afresh from ``seed``, whatever
    the evaluation's passes drew before (a continued evaluation's draw less)."""
    with seeded(seed, device):
        return posterior_mean_variances(model, split_examples(loaded, "train", seed, ACTIVE_UNIT_EXAMPLES))


def _remove_partials(out: Path) -> None:
    """Delete the finished batches of every evaluation whose result ``out`` now holds: those kept by each rank of
    an evaluation under torchrun, or by one process, that another number of ranks then finished afresh."""
    path = resumable.partial_path(out)
    for partial in [path, *path.parent.glob(f"{glob.escape(path.stem)}-rank*{path.suffix}")]:
        partial.unlink(missing_ok=True)


# the figure of a run's own evaluation (RUN/figures/), drawn with it
BOUND_VS_K = "bound_vs_k.png"
# what to do about a run directory that the evaluation cannot write its result into
EVALUATE_FIX = "copy the run directory somewhere writable (cp -r RUN COPY) and evaluate the copy"


def _pieces(state: dict[str, Any], out: Path, setting: dict[str, Any], save_every_s: float | None,
            matmul: str | None) -> resumable.Pieces:
    """The finished batches of the evaluation with ``setting`` whose result goes to ``out`` (this rank's, if
    several), made with the checkpoint ``state``; ``matmul``, if given, the path it is to multiply on."""
    path = resumable.partial_path(out)
    if distributed.world() > 1:
        path = path.with_name(f"{path.stem}-rank{distributed.rank()}{path.suffix}")
    pieces = resumable.Pieces(path, {**setting, "checkpoint": checkpoint.digest(state), "world": distributed.world()},
                              save_every_s)
    if matmul is not None:
        pieces.chosen["matmul"] = matmul
    return pieces


def _prepare_passes(model: DeepLatentModel, x: Tensor, k: int, chunk_size: int, batch_size: int,
                    chosen: dict[str, Any], threads: int | None = None) -> None:
    """Refuse passes too large for the memory available; run torch on ``threads`` (``use_threads``); switch to the
    faster float32 matrix-multiply path on them (rank 0's, on every rank; that recorded in ``chosen`` by an
    evaluation being continued, else recorded there)."""
    memory.check_fits(memory.pass_bytes(model, x.shape[1], min(k, chunk_size) * batch_size, training=False),
                      x.device, "evaluating with {0} {chunk} and {1} {batch}", ("chunk_size", "batch_size"),
                      chunk=min(k, chunk_size), batch=batch_size)
    use_threads(threads)
    mine = chosen["matmul"] if "matmul" in chosen else evaluation_matmul_path(model, x, k, chunk_size, batch_size)
    chosen["matmul"] = distributed.broadcast(mine)
    gemm.fastest_fp32_matmul(x.device, chosen["matmul"])


def _statistics_of_all_ranks(model: DeepLatentModel, x: Tensor, k: int, *, chunk_size: int, batch_size: int,
                             seed: int, progress: bool, compile: bool, pieces: resumable.Pieces,
                             time_limit_s: float | None) -> WeightStatistics:
    """``importance_statistics`` of every example of ``x``: with several ranks, each takes whole batches and the
    ranks' statistics are gathered in order."""
    batch_size = min(batch_size, len(x))
    mine = distributed.shard(math.ceil(len(x) / batch_size))
    stats = None
    if mine:
        stats = _continued_statistics(model, x[mine.start * batch_size: mine.stop * batch_size], k,
                                      chunk_size=chunk_size, batch_size=batch_size, seed=seed, first_batch=mine.start,
                                      progress=progress and distributed.rank() == 0, compile=compile, pieces=pieces,
                                      time_limit_s=time_limit_s)
    if distributed.world() > 1:
        with pieces.kept_on_stop():  # another rank lost at the gather: this rank's batches are kept
            parts = distributed.gather(None if stats is None else stats.cpu())
        stats = concatenate([part for part in parts if part is not None])
    return stats


def _continued_statistics(model: DeepLatentModel, x: Tensor, k: int, *, chunk_size: int, batch_size: int, seed: int,
                          first_batch: int, progress: bool, compile: bool, pieces: resumable.Pieces,
                          time_limit_s: float | None) -> WeightStatistics:
    """The statistics of ``x``'s batches, those in ``pieces`` read back and the rest evaluated (after a check of
    their time), each added to ``pieces`` as it finishes."""
    done = len(pieces.done)
    rest = x[done * batch_size:]
    _check_time(model, rest, k, chunk_size, batch_size, time_limit_s)
    with progress_bar(len(x), k, progress, done=len(x) - len(rest)) as bar, pieces.kept_on_stop():
        for stats in batch_statistics(model, rest, k, chunk_size=chunk_size, batch_size=batch_size, seed=seed,
                                      first_batch=first_batch + done, compile=compile, on_pass=bar.update):
            pieces.add(tuple(stats.cpu()))
    return concatenate([WeightStatistics(*piece) for piece in pieces.done]).to(x.device)


def _check_time(model: DeepLatentModel, x: Tensor, k: int, chunk_size: int, batch_size: int,
                limit_s: float | None) -> None:
    """Refuse (SettingError) evaluating ``x``'s batches if a timed pass says it would take more than ``limit_s``."""
    if len(x) == 0:
        return
    chunk = min(k, chunk_size)
    with torch.no_grad():
        seconds = duration.seconds_per_call(lambda: model.log_weights(x[:batch_size], chunk))
    batches = math.ceil(len(x) / batch_size)
    estimate = seconds * batches * math.ceil(k / chunk)
    fits = int(limit_s / (seconds * batches)) * chunk if limit_s is not None else k
    duration.check_duration(estimate, limit_s, "evaluating {examples} examples with {0} {k}", "k", fits,
                            "time_limit_s", examples=len(x), k=k)


def _checked(run_dir: Path, dataset: str | None, device: str, matmul: str | None, **sizes: int
             ) -> tuple[Path, str | None]:
    """``run_dir`` and ``other_data(run_dir, dataset)``, after refusing a size of the evaluation below 1, a ``matmul``
    path that ``device`` does not take, and a run directory it cannot write in."""
    for name, value in sizes.items():
        check_integer(value, name, 1)
    gemm.check_path(matmul, device)
    rundir.check_writable(run_dir, EVALUATE_FIX)
    return run_dir, other_data(run_dir, dataset)


def _result(run_dir: Path, loaded: data.Dataset, state: dict[str, Any], stats: WeightStatistics,
            variances: list[Tensor], start: float, pieces: resumable.Pieces) -> dict[str, Any]:
    """An evaluation's result (see ``evaluate_run``) from the statistics of its examples, of the checkpoint
    ``state``, started at ``start`` (``time.perf_counter``), with the setting and matmul path of its ``pieces``."""
    split, k, seed = pieces.setting["split"], pieces.setting["k"], pieces.setting["seed"]
    nll = -stats.log_likelihood.cpu()
    n = len(nll)
    return {
        "run": str(run_dir),
        "dataset": loaded.name,
        "split": split,
        "examples": n,
        "epoch": state["epoch"],
        "step": state["step"],
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
        "time_s": round(time.perf_counter() - start, 2),
        "matmul": pieces.chosen["matmul"],
        "chunk_size": pieces.setting["chunk_size"],
        "batch_size": pieces.setting["batch_size"],
    }


def examples_evaluated(asked: int | None, loaded: data.Dataset, split: str) -> int | None:
    """The ``examples`` an evaluation of ``loaded``'s ``split`` is named after: None (every example) when ``asked`` is
    None or at least the split's (all of them, as ``splits.subset`` takes them), so that a file never names
    examples that were not evaluated, nor names all of them in two ways."""
    return None if asked is None or asked >= len(getattr(loaded, split)) else asked


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
        ("checkpoint", f"{result['run']} after epoch {result['epoch']}" + (
            f" and {result['step']} minibatches of epoch {result['epoch'] + 1}" if result.get("step") else "")),
        (f"NLL (k={k})", f"{result['nll']:.2f} +- {result['nll_se']:.2f} nats (standard error over examples)"),
    ]
    rows += [
        (f"L_{g}", f"{value:.2f} +- {result['bounds_se'][g]:.2f}")
        for g, value in sorted(result["bounds"].items(), key=lambda item: int(item[0]))
    ]
    rows += [
        ("ESS", f"{result['ess']:.1f} of {k}"),
        ("ESS/k", f"{result['ess'] / k:.4f} (1 when q is the posterior)"),
        ("active units", f"{_active_units_of(result)} (variance of the posterior mean over "
         f"{result['active_units_examples']} training examples > {result['active_units_threshold']})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
