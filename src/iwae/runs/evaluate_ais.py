"""Evaluating a run with annealed importance sampling (``iwae evaluate RUN --method ais|bdmc``).

    RUN/eval_ais.json              AIS on N examples of a split (a seeded random subset, as ``iwae evaluate
                                   --examples`` takes), beside the k-sample importance-sampled estimate on them
    RUN/eval_bdmc.json             BDMC on N examples simulated from the model: forward and backward AIS
    RUN/figures/ais_vs_steps.png   the AIS estimate against the number of steps, and IS against k

each for the default setting; any other setting's go to files named after it (``result_path``), so that no
result replaces one made with other settings.

The machinery is ``iwae.core.ais``; this module loads the run, runs it, and writes the results.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from iwae import plots
from iwae.core import ais
from iwae.eval import likelihood
from iwae.models import DeepLatentModel
from iwae.platform import duration, memory
from iwae.platform.device import resolve_device, seeded
from iwae.runs import checkpoint, evaluation, resumable, rundir
from iwae.settings import SettingError, check_integer

AIS_FILE = "eval_ais.json"
BDMC_FILE = "eval_bdmc.json"
FIGURE = "ais_vs_steps.png"
DEFAULT_EXAMPLES = 100
BATCH_SIZE = 100  # examples per pass
# the setting whose results go to AIS_FILE, BDMC_FILE and FIGURE
DEFAULTS = {"dataset": None, "split": "test", "steps": 1000, "chains": 16, "leapfrog": 10, "start": "prior",
            "k": 5000, "examples": DEFAULT_EXAMPLES, "seed": 0}


def step_values(steps: int | Sequence[int]) -> list[int]:
    """The distinct numbers of AIS steps in ``steps`` (one number, or a sweep's), in increasing order; SettingError
    for a sweep of none."""
    values = sorted({steps} if isinstance(steps, numbers.Integral) else set(steps))
    if not values:
        raise SettingError("{0} must be a number of AIS steps or a sweep of them; got none", ("steps",))
    return values


def _checked_sweep(steps: int | Sequence[int], chains: int, leapfrog: int, start: str, batch_size: int
                   ) -> tuple[list[int], int, int, int]:
    """``step_values(steps)``, ``chains``, ``leapfrog`` and ``batch_size`` as ints (NumPy's integers taken), after
    ``ais.check_settings`` has checked them with each number of steps."""
    checked = [ais.check_settings(value, chains, leapfrog, start, batch_size=batch_size)
               for value in step_values(steps)]
    return [values[0] for values in checked], *checked[0][1:]


def result_path(run_dir: Path, method: str, *, dataset: str | None = None, split: str = "test",
                steps: int | Sequence[int] = 1000, chains: int = 16, leapfrog: int = 10, start: str = "prior",
                k: int = 5000, examples: int = DEFAULT_EXAMPLES, seed: int = 0) -> Path:
    """The file of the ``method`` ("ais" or "bdmc") result with these settings (``steps``: the number of steps, or
    every number of steps of a sweep): RUN/eval_<method>.json for the default setting (``DEFAULTS``), else
    RUN/eval_<method>[-<data>][-<split>]-s<steps>-c<chains>-l<leapfrog>[-encoder]-k<k>-n<examples>[-seed<seed>].json,
    <steps> a sweep's numbers of steps joined by _ (s10_100_1000), <data> as ``iwae evaluate --dataset`` names it
    (``evaluation.data_label``; BDMC names no data or split: it simulates its own)."""
    values = step_values(steps)
    setting = {"dataset": dataset, "split": split, "steps": values, "chains": chains, "leapfrog": leapfrog,
               "start": start, "k": k, "examples": examples, "seed": seed}
    if setting == {**DEFAULTS, "steps": [DEFAULTS["steps"]]}:
        return run_dir / (AIS_FILE if method == "ais" else BDMC_FILE)
    parts = [evaluation.data_label(dataset)] if dataset is not None else []
    parts += [split] if method == "ais" else []
    parts += ["s" + "_".join(map(str, values)), f"c{chains}", f"l{leapfrog}"]
    parts += ["encoder"] if start == "encoder" else []
    parts += [f"k{k}", f"n{examples}", *([f"seed{seed}"] if seed != 0 else [])]
    return run_dir / f"eval_{method}-{'-'.join(parts)}.json"


def figure_path(run_dir: Path, result: Path) -> Path:
    """The figure of the AIS result in ``result``: FIGURE, or FIGURE's stem followed by the result's setting."""
    setting = result.stem.removeprefix("eval_ais")
    return run_dir / rundir.FIGURES / f"{Path(FIGURE).stem}{setting}{Path(FIGURE).suffix}"


def _mean_se(values: Tensor) -> tuple[float, float]:
    """The mean of per-example values and its standard error."""
    values = values.double().cpu()
    n = len(values)
    return values.mean().item(), values.std().item() / math.sqrt(n) if n > 1 else math.nan


def _settings(steps: int, chains: int, leapfrog: int, start: str, batch_size: int) -> dict[str, Any]:
    """The settings a result records; ``batch_size`` decides which of the seed's draws each example gets."""
    return {"steps": steps, "chains": chains, "leapfrog": leapfrog, "start": start,
            "schedule": f"sigmoid, radius {ais.SIGMOID_RADIUS}", "pilot_steps": min(steps, ais.PILOT_STEPS),
            "batch_size": batch_size}


def _diagnostics(result: ais.AISResult) -> dict[str, float]:
    return {"acceptance": result.acceptance.mean().item(), "ess": result.ess.mean().item(),
            "step_size": result.step_size.mean().item()}


def check_ais_memory(model: nn.Module, x_dim: int, *, steps: int, chains: int, batch_size: int, examples: int,
                     device: torch.device, schedule: bool = True) -> None:
    """Refuse (SettingError) an AIS run whose passes (a forward and a backward pass on ``chains`` x
    ``batch_size`` rows), ``examples`` examples and (with ``schedule``) schedule of ``steps`` steps would not fit
    in ``device``'s memory."""
    needed = (memory.pass_bytes(model, x_dim, chains * min(batch_size, examples), training=True)
              + 4 * examples * x_dim + (8 * (steps + 1) if schedule else 0))
    memory.check_fits(needed, device, "AIS of {0} {steps} with {1} {chains} and {2} {batch_size} on {3} {examples}",
                      ("steps", "chains", "batch_size", "examples"), steps=steps, chains=chains,
                      batch_size=batch_size, examples=examples)


def check_ais_cost(model: DeepLatentModel, x: Tensor | None, steps: Sequence[int], *, x_dim: int, chains: int,
                   leapfrog: int, start: ais.Start, batch_size: int, examples: int, limit_s: float | None) -> None:
    """Refuse (SettingError), before any work, AIS runs of each number of ``steps`` on the examples ``x`` (None:
    BDMC's forward and backward runs on ``examples`` examples simulated from the model) that would not fit in
    memory, or that a timed step says would take more than ``limit_s`` seconds."""
    device = next(model.parameters()).device
    directions = 1 if x is not None else 2
    memory_check = functools.partial(check_ais_memory, model, x_dim, steps=max(steps), chains=chains,
                                     batch_size=batch_size, examples=examples, device=device)
    memory_check(schedule=False)  # the passes, before a step is timed on them
    if x is None:
        with seeded(0, device), torch.no_grad():  # data like the model's, to time a step on
            x = model.decoder[0](ais.sample_prior(model, (min(batch_size, examples),))[0]).sample()
    check_ais_time(model, x, steps, chains=chains, leapfrog=leapfrog, start=start, batch_size=batch_size,
                   examples=examples, limit_s=limit_s, directions=directions)
    memory_check()  # and the schedule


def check_ais_time(model: DeepLatentModel, x: Tensor, steps: Sequence[int], *, chains: int, leapfrog: int,
                   start: ais.Start, batch_size: int, examples: int, limit_s: float | None, directions: int) -> None:
    """Refuse (SettingError) AIS runs of each number of ``steps`` (forward, and backward too for ``directions``
    2) on ``examples`` examples if a step timed on a batch of ``x`` says they would take more than ``limit_s``."""
    seconds = ais.seconds_per_step(model, x[:batch_size], chains=chains, leapfrog=leapfrog, start=start)
    per_batch = sum(directions * value + min(value, ais.PILOT_STEPS) for value in steps)
    batches = math.ceil(examples / batch_size)
    estimate = seconds * batches * per_batch
    if limit_s is not None and seconds * batches * (directions + 1) > limit_s:  # too long at a single step:
        duration.check_duration(estimate, limit_s, "AIS of {steps} steps with {0} {leapfrog} on {examples} examples",
                                "leapfrog", int(leapfrog * limit_s / estimate), "time_limit_s", steps=max(steps),
                                leapfrog=leapfrog, examples=examples)  # name the leapfrog steps
    affordable = int(limit_s / (seconds * batches)) if limit_s is not None else per_batch
    fits = max((affordable - ais.PILOT_STEPS) // directions, 1)
    duration.check_duration(estimate, limit_s, "AIS of {0} {steps} on {examples} examples",
                            "steps", fits, "time_limit_s", steps=max(steps), examples=examples)


def _plain(value: Any) -> Any:
    """``value`` (tensors in tuples) on the CPU, its named tuples as plain ones: what ``resumable.Pieces`` keeps."""
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return value


def _run(piece: tuple[Tensor, Tensor, tuple[Tensor, Tensor]], device: torch.device) -> ais.Run:
    """An AIS run kept by ``_plain``, back on ``device``."""
    log_w, acceptance, (betas, log_step) = piece
    return log_w.to(device), acceptance.to(device), ais.StepSizes(betas.to(device), log_step.to(device))


def _pieces(pieces: resumable.Pieces, first: int, count: int,
            batches: Callable[[int], Generator[Any, None, None]]) -> list[tuple[Any, float]]:
    """Pieces ``first`` .. ``first + count - 1`` of ``pieces``, each a batch's result and its seconds: those finished
    already, then the rest from ``batches(done)``, the generator of the batches from index ``done`` on (kept on a
    stop by the block of ``_kept`` that ``pieces`` come from)."""
    done = max(0, min(len(pieces.done) - first, count))
    rest = batches(done)
    while len(pieces.done) < first + count:
        began = time.perf_counter()
        item = next(rest)
        pieces.add((_plain(item), time.perf_counter() - began))
    rest.close()
    return pieces.done[first:first + count]


def _importance_sampled(pieces: resumable.Pieces, model: DeepLatentModel, x: Tensor, k: int, *, seed: int,
                        batch_size: int, progress: bool) -> likelihood.WeightStatistics:
    """The k-sample importance-sampled statistics of ``x``: the first of ``pieces``, computed if it is not there."""
    def statistics(done: int) -> Generator[tuple[Tensor, ...], None, None]:
        with seeded(seed, x.device):
            yield tuple(likelihood.importance_statistics(model, x, k, batch_size=batch_size, progress=progress))

    return likelihood.WeightStatistics(*_pieces(pieces, 0, 1, statistics)[0][0]).to(x.device)


def _sweep(model: nn.Module, x: Tensor, steps: list[int], *, chains: int, leapfrog: int, start: ais.Start,
           seed: int, batch_size: int, progress: bool, pieces: resumable.Pieces
           ) -> tuple[list[dict[str, Any]], ais.AISResult]:
    """AIS on ``x`` for each number of steps: one entry per run (its NLL, time and diagnostics), and the last run.
    Each run's batches are pieces of ``pieces`` after the first (the IS statistics)."""
    sweep, count = [], math.ceil(len(x) / batch_size)
    for position, value in enumerate(steps):
        with ais.ais_bar(value, chains, count - max(0, min(len(pieces.done) - 1 - position * count, count)),
                         progress) as bar:
            runs = _pieces(pieces, 1 + position * count, count, lambda done, value=value, bar=bar: ais.ais_batches(
                model, x[done * batch_size:], steps=value, chains=chains, leapfrog=leapfrog, start=start, seed=seed,
                batch_size=batch_size, first_batch=done, bar=bar))
        result = ais.combine([_run(run, x.device) for run, _ in runs])
        nll, nll_se = _mean_se(-result.log_likelihood)
        elapsed = sum(seconds for _, seconds in runs)
        sweep.append({"steps": value, "nll": nll, "nll_se": nll_se, "time_s": round(elapsed, 2),
                      **_diagnostics(result)})
    return sweep, result


def evaluate_ais(
    run_dir: Path,
    *,
    steps: int | Sequence[int] = (1000,),
    chains: int = 16,
    leapfrog: int = 10,
    start: ais.Start = "prior",
    k: int = 5000,
    split: str = "test",
    dataset: str | None = None,
    data_dir: str | None = None,
    examples: int | None = DEFAULT_EXAMPLES,
    device: str = "auto",
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    progress: bool = False,
    time_limit_s: float | None = duration.TIME_LIMIT_S,
    save_every_s: float | None = resumable.SAVE_EVERY_S,
) -> dict[str, Any]:
    """AIS and the k-sample importance-sampled estimate of log p(x) on the same examples of a run's data.

    AIS runs once for each number of steps in ``steps``; the largest gives the reported ``nll``, and all of
    them, with the IS bounds L_1, L_5, L_50, L_k, go into RUN/figures/ais_vs_steps.png. Finished batches are kept
    every ``save_every_s`` seconds (None: never; ``iwae.runs.resumable``), for the same evaluation to continue
    from; ``time_limit_s`` (None: no limit) refuses one estimated to take longer.

    Returns:
      The result also written to ``result_path(run_dir, "ais", ...)`` (RUN/eval_ais.json for the default
      setting), its figure to ``figure_path``: ``nll`` and ``nll_se`` (mean and standard error over
      examples of -log (1/C) sum_c w_c), ``steps``, ``chains``, ``leapfrog``, ``start``, ``schedule``, the
      chains' mean ``acceptance``, ``ess`` and ``step_size``; ``is_nll``, ``is_nll_se`` and ``k`` for the
      importance-sampled estimate, ``is_minus_ais`` (IS NLL minus AIS NLL, positive when AIS finds more mass)
      with its paired standard error; ``sweep`` (one per number of steps); ``time_s``, ``time_per_example_s``.
    """
    steps, chains, leapfrog, batch_size = _checked_sweep(steps, chains, leapfrog, start, batch_size)
    k = check_integer(k, "k", 1)
    rundir.check_writable(run_dir, evaluation.EVALUATE_FIX)
    dataset = evaluation.other_data(run_dir, dataset)
    state, model, loaded, x = evaluation.load_examples(run_dir, split=split, dataset=dataset, data_dir=data_dir,
                                                     examples=examples, device=device, seed=seed)
    ais.check_model(model, x, start)
    check_ais_cost(model, x, steps, x_dim=x.shape[1], chains=chains, leapfrog=leapfrog, start=start,
                   batch_size=batch_size, examples=len(x), limit_s=time_limit_s)
    path = result_path(run_dir, "ais", dataset=dataset, split=split, steps=steps, chains=chains,
                       leapfrog=leapfrog, start=start, k=k, examples=examples_named(examples, len(x)), seed=seed)
    with _kept(state, path, {"method": "ais", "steps": steps, "chains": chains, "leapfrog": leapfrog, "start": start,
                               "k": k, "split": split, "data": evaluation.data_identity(loaded.name),
                               "examples": len(x), "seed": seed, "batch_size": batch_size}, save_every_s) as pieces:
        stats = _importance_sampled(pieces, model, x, k, seed=seed, batch_size=batch_size, progress=progress)
        sweep, result = _sweep(model, x, steps, chains=chains, leapfrog=leapfrog, start=start, seed=seed,
                               batch_size=batch_size, progress=progress, pieces=pieces)
        out = {"run": str(run_dir), "dataset": loaded.name, "split": split, "examples": len(x), "epoch": state["epoch"],
               "seed": seed, "method": "ais", **_settings(steps[-1], chains, leapfrog, start, batch_size),
               **_ais_numbers(sweep, result, stats, k), "device": str(x.device)}
        rundir.write_json(path, out)
        (run_dir / rundir.FIGURES).mkdir(exist_ok=True)
        plots.plot_ais_vs_steps(figure_path(run_dir, path), out)
    return {**out, "path": str(path)}


def _ais_numbers(sweep: list[dict[str, Any]], result: ais.AISResult, stats: likelihood.WeightStatistics,
                 k: int) -> dict[str, Any]:
    """An AIS result's estimates beside the k-sample importance-sampled ones (see ``evaluate_ais``)."""
    is_nll, is_nll_se = _mean_se(-stats.log_likelihood)
    difference, difference_se = _mean_se(result.log_likelihood - stats.log_likelihood)
    return {
        "nll": sweep[-1]["nll"], "nll_se": sweep[-1]["nll_se"], **_diagnostics(result),
        "k": k, "is_nll": is_nll, "is_nll_se": is_nll_se,
        "is_bounds": {str(g): _mean_se(b)[0] for g, b in stats.bounds.items()},
        "is_bounds_se": {str(g): _mean_se(b)[1] for g, b in stats.bounds.items()},
        "is_minus_ais": difference, "is_minus_ais_se": difference_se,
        "sweep": sweep, "time_s": sweep[-1]["time_s"],
        "time_per_example_s": sweep[-1]["time_s"] / len(stats.log_likelihood),
    }


@contextmanager
def _kept(state: dict[str, Any], result: Path, setting: dict[str, Any], save_every_s: float | None
          ) -> Iterator[resumable.Pieces]:
    """Within the block, the finished batches of the evaluation with ``setting`` whose result goes to ``result``,
    made with the checkpoint ``state``: all of them written if the block stops (after the last batch too, while
    the result is made), removed once it ends."""
    pieces = resumable.Pieces(resumable.partial_path(result), {**setting, "checkpoint": checkpoint.digest(state)},
                              save_every_s)
    with pieces.kept_on_stop():
        yield pieces
    pieces.remove()


def examples_named(asked: int | None, evaluated: int) -> int:
    """The ``examples`` an AIS result's file is named after: those evaluated when fewer than ``asked`` (or all,
    when None) were."""
    return evaluated if asked is None else min(asked, evaluated)


def evaluate_bdmc(
    run_dir: Path,
    *,
    steps: int = 1000,
    chains: int = 16,
    leapfrog: int = 10,
    start: ais.Start = "prior",
    k: int = 5000,
    examples: int | None = DEFAULT_EXAMPLES,
    device: str = "auto",
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    progress: bool = False,
    time_limit_s: float | None = duration.TIME_LIMIT_S,
    save_every_s: float | None = resumable.SAVE_EVERY_S,
) -> dict[str, Any]:
    """Bidirectional Monte Carlo on ``examples`` examples simulated from a run's model; the finished batches kept,
    and the time limited, as for ``evaluate_ais``.

    Returns:
      The result also written to ``result_path(run_dir, "bdmc", ...)`` (RUN/eval_bdmc.json for the default
      setting): ``log_p_lower`` and ``log_p_upper`` (means over the simulated examples of the forward and
      backward AIS bounds, each with ``_se``), ``gap`` and ``gap_se``
      (their difference, paired), ``nll`` and ``nll_se`` (the forward estimate as an NLL), the settings, the
      forward and backward chains' diagnostics, the k-sample IS estimate on the same simulated examples
      (``is_nll``, ``is_nll_se``), and ``time_s``, ``time_per_example_s``.
    """
    steps, chains, leapfrog, batch_size = ais.check_settings(steps, chains, leapfrog, start, batch_size=batch_size,
                                                             seed=seed)
    k = check_integer(k, "k", 1)
    examples = ais.check_simulated(DEFAULT_EXAMPLES if examples is None else examples, "examples")
    rundir.check_writable(run_dir, evaluation.EVALUATE_FIX)
    state, model = checkpoint.load_model(run_dir, resolve_device(device))
    check_ais_cost(model, None, [steps], x_dim=state["x_dim"], chains=chains, leapfrog=leapfrog, start=start,
                   batch_size=batch_size, examples=examples, limit_s=time_limit_s)
    path = result_path(run_dir, "bdmc", steps=steps, chains=chains, leapfrog=leapfrog, start=start, k=k,
                       examples=examples, seed=seed)
    with _kept(state, path, {"method": "bdmc", "steps": steps, "chains": chains, "leapfrog": leapfrog,
                               "start": start, "k": k, "examples": examples, "seed": seed, "batch_size": batch_size},
               save_every_s) as pieces:
        result, elapsed = _bdmc_batches(pieces, model, examples, steps=steps, chains=chains, leapfrog=leapfrog,
                                        start=start, seed=seed, batch_size=batch_size, progress=progress)
        with seeded(seed, result.x.device):
            is_log_likelihood = likelihood.importance_statistics(model, result.x, k,
                                                                 batch_size=batch_size).log_likelihood
        lower, lower_se = _mean_se(result.forward.log_likelihood)
        upper, upper_se = _mean_se(result.backward.log_likelihood)
        gap, gap_se = _mean_se(result.gap)
        is_nll, is_nll_se = _mean_se(-is_log_likelihood)
        out = {
            "run": str(run_dir), "data": "simulated from the model", "examples": examples, "epoch": state["epoch"],
            "seed": seed, "method": "bdmc", **_settings(steps, chains, leapfrog, start, batch_size),
            "nll": -lower, "nll_se": lower_se, "log_p_lower": lower, "log_p_lower_se": lower_se,
            "log_p_upper": upper, "log_p_upper_se": upper_se, "gap": gap, "gap_se": gap_se,
            "forward": _diagnostics(result.forward), "backward": _diagnostics(result.backward),
            "k": k, "is_nll": is_nll, "is_nll_se": is_nll_se,
            "time_s": round(elapsed, 2), "time_per_example_s": elapsed / examples, "device": str(result.x.device),
        }
        rundir.write_json(path, out)
    return {**out, "path": str(path)}


def _bdmc_batches(pieces: resumable.Pieces, model: DeepLatentModel, examples: int, *, steps: int, chains: int,
                  leapfrog: int, start: ais.Start, seed: int, batch_size: int, progress: bool
                  ) -> tuple[ais.BDMCResult, float]:
    """BDMC on ``examples`` simulated examples, its batches those of ``pieces``, and its seconds."""
    count = math.ceil(examples / batch_size)
    device = next(model.parameters()).device
    with ais.ais_bar(steps, chains, count - min(len(pieces.done), count), progress, directions=2) as bar:
        batches = _pieces(pieces, 0, count, lambda done: ais.bdmc_batches(
            model, examples, steps=steps, chains=chains, leapfrog=leapfrog, start=start, seed=seed,
            batch_size=batch_size, first_batch=done, bar=bar))
    result = ais.combine_bdmc([(x.to(device), _run(forward, device), _run(backward, device))
                               for (x, forward, backward), _ in batches])
    return result, sum(seconds for _, seconds in batches)


def format_ais_table(result: dict[str, Any]) -> str:
    """An AIS or BDMC result as a small text table beside the importance-sampled estimate."""
    setting = (f"{result['steps']} steps x {result['chains']} chains, {result['leapfrog']} leapfrog steps, "
               f"{result['start']} start")
    if result["method"] == "ais":
        rows = [
            ("data", f"{result['dataset']} {result['split']}, {result['examples']} examples"),
            (f"NLL, IS k={result['k']}", f"{result['is_nll']:.2f} +- {result['is_nll_se']:.2f} nats"),
            ("NLL, AIS", f"{result['nll']:.2f} +- {result['nll_se']:.2f} nats ({setting})"),
            ("IS - AIS", f"{result['is_minus_ais']:.2f} +- {result['is_minus_ais_se']:.2f} nats (paired)"),
            *((f"  AIS {s['steps']} steps", f"{s['nll']:.2f} +- {s['nll_se']:.2f}  ({s['time_s']:.0f} s)")
              for s in result["sweep"][:-1]),
            ("acceptance, ESS", f"{result['acceptance']:.2f}, {result['ess']:.1f} of {result['chains']}"),
        ]
    else:
        rows = [
            ("data", f"{result['examples']} examples simulated from the model"),
            ("log p(x) >=", f"{result['log_p_lower']:.2f} +- {result['log_p_lower_se']:.2f} (forward AIS, {setting})"),
            ("log p(x) <=", f"{result['log_p_upper']:.2f} +- {result['log_p_upper_se']:.2f} (backward AIS)"),
            ("BDMC gap", f"{result['gap']:.2f} +- {result['gap_se']:.2f} nats"),
            (f"NLL, IS k={result['k']}", f"{result['is_nll']:.2f} +- {result['is_nll_se']:.2f} nats"),
            ("acceptance", f"{result['forward']['acceptance']:.2f} forward, {result['backward']['acceptance']:.2f} "
             "backward"),
        ]
    rows.append(("time", f"{result['time_s']:.0f} s, {result['time_per_example_s']:.2f} s per example "
                 f"on {result['device']}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
