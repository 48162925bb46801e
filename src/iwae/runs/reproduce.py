"""The papers' tables as grids of training runs, and a report of the results beside the published numbers.

``run_table(table, out)`` trains every cell of a table (``GRIDS``) for each seed into an ordinary run directory
``OUT/<cell>/seed-<s>`` (``iwae evaluate`` and ``iwae sample`` work on each), the seeds of a cell trained together
as one stacked model (``iwae.training.stacked``), skipping finished cells and resuming unfinished ones from their
checkpoints (seeds added by a later command with more seeds train beside the finished ones; runs started with
another budget, evaluation k or device are refused), and writes

    OUT/report.md     the table: per cell our test NLL (mean +- sd over seeds, and each seed's), active units, the
                      published value and our difference from it, the protocol used, device, wall time, steps/s
                      of the training loop at its median epoch, and the command that trains the cell; cells
                      whose data is missing, with the reason
    OUT/report.csv    the same, one row per cell
    OUT/curves.png    the test bound (on the monitor subset) against epoch for every cell and seed

The schedule is the paper's (3^i epochs at 1e-3 * 10^(-i/7), i = 0..7: 3280 epochs) with every stage's epochs
multiplied by ``budget``; a report made under a budget below 1 says so in its title and in every row. Burda et
al.'s table 2 continues a trained run with the other objective for 3^7 epochs (times ``budget``) at 1e-4: its
cells start from the parameters of a base cell's run of the same seed (``TrainConfig.init_from``).
"""

from __future__ import annotations

import csv
import io
import math
import os
import shlex
import statistics
import sys
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

from iwae import data
from iwae.platform import distributed
from iwae.platform.device import resolve_device
from iwae.platform.threads import use_threads
from iwae.runs import lone_run, rundir, stacked_run
from iwae.runs.published import PUBLISHED, Published, burda_cell
from iwae.settings import plain_number
from iwae.training import config as train_config
from iwae.training.config import TrainConfig

PAPER_EPOCHS = 3280
CONTINUATION_EPOCHS, CONTINUATION_LR = 3**7, 1e-4  # Burda et al. table 2
BASE = {"schedule": "burda", "estimator": "standard", "batch_size": 20, "data_split": "paper"}


@dataclass(frozen=True)
class Cell:
    """One cell of a table: the training settings shared by its seeds (``TrainConfig`` fields, without seed,
    schedule scale, evaluation or device), and for a continued run the cell whose run of the same seed it
    starts from."""

    name: str
    settings: dict[str, Any] = field(hash=False)
    init_from: str | None = None


def _burda_grid(datasets: tuple[str, ...]) -> list[Cell]:
    return [
        Cell(burda_cell(dataset, layers, name, k),
             {**BASE, "dataset": dataset, "layers": layers, "objective": objective, "k": k})
        for dataset in datasets for layers in (1, 2) for name, objective in (("vae", "elbo"), ("iwae", "iwae"))
        for k in (1, 5, 50)
    ]


def _table2() -> list[Cell]:
    vae, iwae = burda_cell("mnist", 1, "vae", 1), burda_cell("mnist", 1, "iwae", 50)
    base = {**BASE, "dataset": "mnist", "layers": 1}
    continued = {**base, "schedule": "constant", "lr": CONTINUATION_LR}
    return [
        Cell(vae, {**base, "objective": "elbo", "k": 1}),
        Cell(iwae, {**base, "objective": "iwae", "k": 50}),
        Cell("vae-k1-to-iwae-k50", {**continued, "objective": "iwae", "k": 50}, init_from=vae),
        Cell("iwae-k50-to-vae-k1", {**continued, "objective": "elbo", "k": 1}, init_from=iwae),
    ]


def _rainforth() -> list[Cell]:
    base = {**BASE, "dataset": "mnist", "layers": 1}
    return [
        Cell("iwae", {**base, "objective": "iwae", "k": 64}),
        Cell("piwae", {**base, "objective": "piwae", "k": 64, "m": 8}),
        Cell("miwae", {**base, "objective": "miwae", "k": 64, "m": 8}),
        Cell("ciwae", {**base, "objective": "ciwae", "k": 64, "beta": 0.5}),
        Cell("vae", {**base, "objective": "elbo", "k": 64}),
    ]


def _dreg() -> list[Cell]:
    base = {**BASE, "dataset": "mnist", "layers": 1, "objective": "iwae"}
    return [Cell(f"{estimator}-k{k}", {**base, "estimator": estimator, "k": k})
            for estimator in ("standard", "stl", "dreg") for k in (1, 5, 50)]


GRIDS: dict[str, Callable[[], list[Cell]]] = {
    "burda-table1": lambda: _burda_grid(("mnist", "omniglot")),
    "burda-table2": _table2,
    "burda-table3": lambda: _burda_grid(("binarized-mnist",)),
    "rainforth-table1": _rainforth,
    "dreg": _dreg,
}
TITLES = {
    "burda-table1": "Burda et al. 2016, table 1: VAE and IWAE, dynamically binarized MNIST and Omniglot",
    "burda-table2": "Burda et al. 2016, table 2: training continued with the other objective (1 layer, MNIST)",
    "burda-table3": "Burda et al. 2016, table 3: VAE and IWAE on fixed-binarization MNIST",
    "rainforth-table1": "Rainforth et al. 2018, table 1: objectives at a budget of M*K = 64 (1 layer, MNIST)",
    "dreg": "IWAE with the standard, STL and DReG gradient estimators (1 layer, MNIST)",
}


@dataclass(frozen=True)
class Options:
    """How a table is run: ``budget`` scales the schedule's epochs, ``seeds`` runs seeds 0..seeds-1, ``eval_k``
    samples per test example of the final evaluation; ``device`` and ``data_dir`` as for ``iwae train``;
    ``cells`` names the cells to run and report (None: all; see ``select``); ``threads``, torch's threads for
    every cell (None: one per CPU that other processes leave free, shared by torchrun's ranks on a machine, or one
    for a new cell whose step runs faster on one; a resumed cell on the count it recorded)."""

    budget: float = 1.0
    seeds: int = 1
    eval_k: int = 5000
    device: str = "auto"
    data_dir: str | None = None
    cells: tuple[str, ...] | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("budget", "seeds", "eval_k", "threads"):  # NumPy's numbers as Python's
            object.__setattr__(self, name, plain_number(getattr(self, name)))


def check(table: str, options: Options) -> None:
    """Raise ValueError naming the problem and the fix for an unknown table or unusable options."""
    if table not in GRIDS:
        raise ValueError(f"unknown table {table!r}; choose one of {', '.join(GRIDS)}")
    budget = options.budget
    if not (_real(budget) and budget > 0 and math.isfinite(budget * PAPER_EPOCHS)):
        raise ValueError(f"--budget must be a positive fraction of the paper's schedule (e.g. 0.01); got {budget!r}")
    if not _count(options.seeds):
        raise ValueError(f"--seeds must be a positive number of seeds; got {options.seeds!r}")
    if not _count(options.eval_k):
        raise ValueError(f"--eval-k must be a positive number of samples; got {options.eval_k!r}")
    select(table, options.cells)
    resolve_device(options.device)  # an unknown or absent device is refused before any data is read


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def select(table: str, names: tuple[str, ...] | None) -> list[Cell]:
    """The cells of ``table`` named in ``names`` (all of them for None), in the table's order, with the cell that
    each named one continues (its runs are where the named one starts).

    Raises:
        ValueError: for a name that is not one of the table's cells.
    """
    grid = GRIDS[table]()
    if names is None:
        return grid
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"cells must be a tuple of cell names, e.g. ({grid[0].name!r},); got {names!r}")
    known = [cell.name for cell in grid]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        problem = f"{table} has no cell {unknown[0]!r}" if unknown else "no cell named"
        raise ValueError(f"--cells: {problem}; its cells are {', '.join(known)}")
    wanted = set(names)
    for cell in reversed(grid):  # the grids list a continued cell after the cell it starts from
        if cell.name in wanted and cell.init_from is not None:
            wanted.add(cell.init_from)
    return [cell for cell in grid if cell.name in wanted]


def cell_config(cell: Cell, seed: int, options: Options, out: Path) -> TrainConfig:
    """The training configuration of one seed of a cell under ``options``, with runs in ``out``."""
    settings = dict(cell.settings)
    if settings["schedule"] == "burda":
        settings["schedule_scale"] = options.budget
    else:
        settings["epochs"] = max(1, round(CONTINUATION_EPOCHS * options.budget))
    init_from = None if cell.init_from is None else str(run_dir(out, cell.init_from, seed))
    return TrainConfig(**settings, seed=seed, eval_k=options.eval_k, device=options.device,
                       data_dir=options.data_dir, init_from=init_from, threads=options.threads)


def run_dir(out: Path, cell: str, seed: int) -> Path:
    """The run directory of one seed of a cell: OUT/<cell>/seed-<seed>."""
    return out / cell / f"seed-{seed}"


def command(table: str, cell: Cell, config: TrainConfig, out: Path, seeds: int,
            modes: dict[str, Any] | None = None) -> str:
    """The shell command that trains every seed of ``cell`` as ``run_table`` does; with ``modes``, the ``compile``
    and ``matmul`` its seeds ran with (``CellResult.modes``), which decide its numbers' rounding: a lone run
    decides them for itself otherwise, and may decide otherwise than a stack of seeds did."""
    defaults = TrainConfig(epochs=1)
    flags = []
    for key, value in asdict(config).items():
        if key in ("seed", "device", "data_dir", "init_from", "compile", "matmul", "threads") or value is None:
            continue
        if config.schedule == "burda" and key in ("epochs", "lr"):
            continue  # fixed by the schedule
        if value != getattr(defaults, key) or key in ("dataset", "objective", "k", "estimator", "epochs"):
            flags.append(f"--{key.replace('_', '-')} {shlex.quote(str(value))}")
    modes = modes or {}
    if "compile" in modes:
        flags.append("--compile" if modes["compile"] else "--no-compile")
    if "matmul" in modes:
        flags.append(f"--matmul {shlex.quote(str(modes['matmul']))}")
    if cell.init_from is not None:
        flags.append(f"--init-from {shlex.quote(shown(out / cell.init_from))}/seed-$s")
    seed_list = " ".join(str(s) for s in range(seeds))
    return (f"for s in {seed_list}; do iwae train --out {shlex.quote(shown(out / cell.name))}/seed-$s --seed $s "
            + " ".join(flags) + "; done")


def shown(path: Path | str) -> str:
    """``path`` as a report names it: relative to the directory the command runs in, so that a report names no
    folder of the machine it was made on."""
    return os.path.relpath(path)


def shown_text(text: str) -> str:
    """``text`` (e.g. a loader's message) with the working directory and the home folder written as . and ~."""
    return text.replace(str(Path.cwd()), ".").replace(str(Path.home()), "~")


def missing_data(dataset: str, data_dir: str | None) -> str | None:
    """Why ``dataset`` cannot be loaded here (the loader's message), or None if it can."""
    try:
        data.load(dataset, data_dir)
    except data.DataError as error:
        return " ".join(str(error).split())
    return None


def cell_finished(out: Path, cell: Cell, options: Options) -> bool:
    """Whether every seed of ``cell`` in the grid ``out`` trained all its epochs and was evaluated."""
    return all(rundir.is_finished(run_dir(out, cell.name, seed)) for seed in range(options.seeds))


def run_cell(configs: list[TrainConfig], path: Path, *, changes: dict[str, Any] | None = None,
             progress: bool | None = None) -> str:
    """Bring a cell's seeds (runs in ``path``) to their end, and say what that took: nothing ("skipped"), resuming
    started runs from their checkpoints (an unfinished stacked run, or lone runs that ``iwae train`` started; with
    ``changes`` as for ``lone_run.resume``), and training the seeds not yet started together as one stacked run
    (``iwae.training.stacked``), beside those that have."""
    runs = {config.seed: path / f"seed-{config.seed}" for config in configs}
    if all(rundir.is_finished(run) for run in runs.values()):
        return f"skipped ({_seeds_text(len(runs))})"
    done = []
    if stacked_run.is_stacked(path):
        stack = rundir.read_json(path / stacked_run.STACK)["seeds"]
        if not all(rundir.is_finished(path / f"seed-{seed}") for seed in stack):
            stacked_run.resume_stacked(path, changes, progress=progress)
            done.append(f"resumed ({_seeds_text(len(stack))})")
    started = [run for run in runs.values() if (run / rundir.CHECKPOINT).is_file() and not rundir.is_finished(run)]
    for run in started:
        lone_run.resume(run, changes, progress=progress)
    if started:
        done.append(f"resumed ({len(started)} {'run' if len(started) == 1 else 'runs'} alone)")
    # a finished run needs no checkpoint (results are kept without them)
    new = [config for config in configs if not (runs[config.seed] / rundir.CHECKPOINT).is_file()
           and not rundir.is_finished(runs[config.seed])]
    if new:
        stacked_run.train_stacked(new, path, progress=progress, beside_finished=True)
        done.append(f"trained ({_seeds_text(len(new))})")
    return ", ".join(done)


def _seeds_text(seeds: int) -> str:
    return f"{seeds} seeds stacked" if seeds > 1 else "1 seed"


def check_same_table(table: str, out: Path) -> None:
    """Raise ValueError if ``out`` holds runs of cells that ``table`` does not have: another table's grid, whose
    report this table's would be written over."""
    if not out.is_dir():
        return
    known = {cell.name for cell in GRIDS[table]()}
    others = sorted(path.name for path in out.iterdir() if path.is_dir() and path.name not in known and (
        stacked_run.is_stacked(path) or any((seed / rundir.CONFIG).is_file() for seed in path.glob("seed-*"))))
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ValueError(f"{shown(out)} holds runs of cells that {table} does not have ({listed}): another table's "
                         f"grid, whose report this one would replace; give {table} an --out of its own")


REPORT_FILES = ("report.md", "report.csv", "curves.png")


def check_no_other_files(table: str, out: Path) -> None:
    """Raise ValueError if ``out`` holds files that the grid would not write (a user's), or a report.md that is
    not a report of ``table``: the report is written over its own files only."""
    if not out.is_dir():
        return
    others = sorted(path.name for path in out.iterdir() if path.is_file() and not path.name.startswith(".")
                    and path.name not in REPORT_FILES)
    report = out / REPORT_FILES[0]
    if report.is_file() and not report.read_text(errors="replace").startswith(f"# {TITLES[table]}"):
        others.insert(0, report.name)
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ValueError(f"{shown(out)} holds files that are not {table}'s grid or report ({listed}); give the grid "
                         "an --out of its own")


def check_existing(cells: list[Cell], configs: dict[str, list[TrainConfig]], out: Path, device: str) -> None:
    """Raise ValueError if a run already in ``out`` was started with settings other than these (another
    --budget, --eval-k or --device): continuing it, or reporting it, under this command's would mislabel it; or if a
    run still to start from a base cell's run would find it kept without its checkpoint."""
    if any((out / name).is_file() for name in (rundir.CHECKPOINT, rundir.CONFIG, rundir.EVAL)) or \
            stacked_run.is_stacked(out):
        raise ValueError(f"{out} holds a training run, not a grid's runs; give the grid an --out of its own")
    names = {"schedule_scale": "--budget", "epochs": "--budget", "eval_k": "--eval-k", "device": "--device"}
    asked_device = None if device == "auto" else str(resolve_device(device))
    for cell in cells:
        for config in configs[cell.name]:
            path = run_dir(out, cell.name, config.seed)
            _check_base(path, config)
            _check_continuable(path)
            if not (path / rundir.CONFIG).is_file():
                continue
            saved, wanted = rundir.read_config(path), asdict(config)
            # a run continues on the device it started on, unless this command names another
            wanted["device"] = saved.get("device") if asked_device is None else asked_device
            differing = [key for key, value in wanted.items()
                         if key not in (*train_config.RUNTIME_KEYS, "matmul", "init_from", "dataset_sha256")
                         and saved.get(key) != value]
            if differing:
                listed = ", ".join(f"{key} {saved.get(key)!r} (this command: {wanted[key]!r})" for key in differing)
                options = sorted({names[key] for key in differing if key in names}) or ["settings"]
                raise ValueError(f"{path} was started with {listed}; give the {' and '.join(options)} it was "
                                 "started with, or a new --out")


def _check_base(path: Path, config: TrainConfig) -> None:
    """Raise ValueError if the run in ``path``, still to start from the parameters of a base cell's run, would find
    that run kept without its checkpoint."""
    base = None if config.init_from is None else Path(config.init_from)
    if base is None or (path / rundir.CHECKPOINT).is_file() or rundir.is_finished(path):
        return
    if rundir.is_finished(base) and not (base / rundir.CHECKPOINT).is_file():
        raise ValueError(f"{path} starts from the parameters of {base}, a finished run kept without its "
                         f"{rundir.CHECKPOINT} (as results are kept); restore its checkpoint, or give the grid a new "
                         "--out")


def _check_continuable(path: Path) -> None:
    """Raise ValueError if ``path`` holds an unfinished run without a checkpoint to continue from (removed, or the
    run stopped before its first), naming what to delete to train it afresh."""
    if not (path / rundir.CONFIG).is_file() or rundir.is_finished(path) or any(
            (path / name).is_file() for name in (rundir.CHECKPOINT, stacked_run.NEXT)):
        return
    stacked = stacked_run.is_stacked(path.parent)
    fresh = f"delete {path.parent} to train the cell's seeds afresh" if stacked else f"delete {path} to train it afresh"
    raise ValueError(f"{path} holds an unfinished run without its {rundir.CHECKPOINT}, which cannot continue; {fresh}, "
                     "or give the grid a new --out")


def run_table(table: str, out: Path, options: Options, *, cells: list[Cell] | None = None,
              progress: bool | None = None, log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Run the grid of ``table`` (or the given ``cells``) into ``out``, then write its report.

    Every setting is checked before anything is trained. Under torchrun (``iwae.platform.distributed``) the cells are
    spread over the ranks, each rank training its cells on its own device as a single process would, the cells
    that others continue before them (``levels``), and rank 0 writes the report once every rank is done.

    Returns:
      The paths of the report files (none on ranks other than 0).

    Raises:
      DataError: after writing the report, if the data of every cell is missing, so none was trained.
    """
    check(table, options)
    rundir.check_writable(out)
    check_same_table(table, out)
    # this process's thread count (under torchrun, its rank's share of the machine's CPUs). A new cell trains on
    # it, or, where the count came from the free CPUs, on one thread if its own step runs faster on one (as
    # ``iwae train`` does); a resumed cell on the count it recorded (so that it resumes bit for bit), unless
    # --threads gives another or torchrun's ranks share the machine
    count = use_threads(options.threads)
    cells = select(table, options.cells) if cells is None else cells
    say = log or (lambda line: print(f"iwae: {line}", file=sys.stderr))
    missing = {}
    # the data of the cells still to train (a finished cell needs none: its report comes from its run files)
    for dataset in sorted({cell.settings["dataset"] for cell in cells if not cell_finished(out, cell, options)}):
        reason = missing_data(dataset, options.data_dir)
        if reason is not None:
            missing[dataset] = reason
    configs = {cell.name: [cell_config(cell, s, options, out) for s in range(options.seeds)] for cell in cells}
    check_existing(cells, configs, out, options.device)
    check_no_other_files(table, out)
    distributed.wait_for_all()  # no rank writes a run before every rank has checked them
    changes: dict[str, Any] = {"threads": count} if options.threads is not None or distributed.launched() else {}
    if options.data_dir is not None:
        changes["data_dir"] = options.data_dir  # where the data is now
    where = f" on {distributed.name()}" if distributed.launched() else ""
    for level in levels(cells):
        runnable = [cell for cell in level if cell.settings["dataset"] not in missing]
        mine = {runnable[i].name for i in distributed.assign([cost(configs[cell.name][0]) for cell in runnable])}
        for cell in level:
            if cell.settings["dataset"] in missing:
                say(f"{cell.name}: skipped, data missing")
            elif cell.name in mine:
                with distributed.alone():
                    what = run_cell(configs[cell.name], out / cell.name, changes=changes, progress=progress)
                say(f"{cell.name}: {what}{where}")
        distributed.wait_for_all()
    paths = distributed.on_rank_zero(lambda: write_report(table, out, cells, options, missing)) or {}
    if cells and all(cell.settings["dataset"] in missing for cell in cells):
        raise data.DataError(f"no cell of {table} was trained, the data of every one missing (the report "
                             f"{shown(out / 'report.md')} lists them): "
                             + "; ".join(f"{dataset}: {reason}" for dataset, reason in sorted(missing.items())))
    return paths


def levels(cells: list[Cell]) -> list[list[Cell]]:
    """The cells in groups, in order, each cell in a group after that of the cell it continues (if any)."""
    depth: dict[str, int] = {}
    for cell in cells:  # the grids list a continued cell after the cell it starts from
        depth[cell.name] = 0 if cell.init_from is None else depth.get(cell.init_from, -1) + 1
    return [[cell for cell in cells if depth[cell.name] == d] for d in range(max(depth.values(), default=-1) + 1)]


def cost(config: TrainConfig) -> float:
    """A cell's training cost in arbitrary units, to balance the ranks: epochs times samples times layers."""
    return config.epochs * config.k * config.layers


@dataclass
class CellResult:
    """What the report says about one cell."""

    cell: str
    seeds: list[int]
    nll: list[float | None]
    active_units: list[str | None]
    epochs: int | None
    device: str
    wall_time_s: float
    steps_per_s: float | None
    curves: dict[int, list[tuple[int, float]]]
    missing: str | None = None
    modes: dict[str, Any] = field(default_factory=dict)  # the compile and matmul that every started seed records


def collect(out: Path, cell: Cell, seeds: int, missing: str | None) -> CellResult:
    """The results of a cell's runs as far as they got (an unfinished seed has no NLL); ``missing``, why its data
    is absent, kept while a seed is unfinished (a finished cell's row comes from its run files)."""
    result = CellResult(cell.name, list(range(seeds)), [], [], None, "", 0.0, None, {})
    rates: list[float] = []
    devices: list[str] = []  # every device its seeds ran on (seeds added later may have run elsewhere)
    configs: list[dict[str, Any]] = []
    for seed in range(seeds):
        path = run_dir(out, cell.name, seed)
        metrics = rundir.read_metrics(path)
        evaluation = rundir.read_json(path / rundir.EVAL) if rundir.is_finished(path) else None
        result.nll.append(None if evaluation is None else evaluation["nll"])
        result.active_units.append(None if evaluation is None else "+".join(map(str, evaluation["active_units"])))
        if (path / rundir.CONFIG).is_file():
            config = rundir.read_config(path)
            configs.append(config)
            result.epochs = config["epochs"]
            devices.append(config["device"])
            batch = config["batch_size"]
            if metrics:
                # the median epoch: an epoch slowed or paused by other work on the machine does not move it
                rates.append(statistics.median(m["examples_per_s"] for m in metrics) / batch)
                # seeds trained as one stack share its wall time
                result.wall_time_s += metrics[-1]["wall_time_s"] / metrics[-1].get("stacked_seeds", 1)
        result.curves[seed] = [(m["epoch"], m["test_bound"]) for m in metrics]
    result.steps_per_s = statistics.fmean(rates) if rates else None
    result.device = ", ".join(dict.fromkeys(devices))
    for key in ("compile", "matmul"):
        recorded = {config.get(key) for config in configs}
        if len(recorded) == 1 and None not in recorded:
            result.modes[key] = recorded.pop()
    result.missing = missing if None in result.nll else None
    return result


def summary(values: list[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample sd) of the finished seeds' values; sd is None for fewer than two."""
    done = [v for v in values if v is not None]
    if not done:
        return None, None
    return statistics.fmean(done), statistics.stdev(done) if len(done) > 1 else None


COLUMNS = ("cell", "nll_mean", "nll_sd", "nll_per_seed", "active_units", "published_nll", "published_sd",
           "difference", "published_active_units", "epochs", "budget", "eval_k", "device", "wall_time_s",
           "steps_per_s", "status", "command", "source")


def _number(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def rows(table: str, out: Path, cells: list[Cell], options: Options, missing: dict[str, str]
         ) -> tuple[list[dict[str, str]], list[CellResult]]:
    """One report row per cell (values as text, keyed by ``COLUMNS``) and the cells' results."""
    published = PUBLISHED[table]
    table_rows, results = [], []
    for cell in cells:
        dataset = cell.settings["dataset"]
        result = collect(out, cell, options.seeds,
                         f"data missing: {dataset} (see Missing)" if dataset in missing else None)
        results.append(result)
        mean, sd = summary(result.nll)
        paper: Published | None = published.get(cell.name)
        done = sum(v is not None for v in result.nll)
        status = result.missing or ("done" if done == options.seeds else f"{done} of {options.seeds} seeds done")
        config = cell_config(cell, 0, options, out)
        table_rows.append({
            "cell": cell.name,
            "nll_mean": _number(mean), "nll_sd": _number(sd),
            "nll_per_seed": " ".join("-" if v is None else f"{v:.2f}" for v in result.nll),
            "active_units": " ".join("-" if a is None else a for a in result.active_units),
            "published_nll": _number(paper.nll if paper else None),
            "published_sd": _number(paper.sd if paper else None),
            "difference": _number(mean - paper.nll if paper and mean is not None else None),
            "published_active_units": (paper.active_units or "") if paper else "",
            "epochs": str(config.epochs), "budget": budget_text(options.budget), "eval_k": str(options.eval_k),
            "device": result.device, "wall_time_s": f"{result.wall_time_s:.0f}",
            "steps_per_s": _number(result.steps_per_s, 1), "status": status,
            "command": command(table, cell, config, out, options.seeds, result.modes),
            "source": paper.source if paper else "",
        })
    return table_rows, results


def budget_text(budget: float) -> str:
    """``budget`` as short as it can be written and read back as the same number (1, 0.01, 0.0012345678)."""
    short = f"{budget:g}"
    return short if float(short) == budget else repr(float(budget))


def title(table: str, options: Options) -> str:
    """The report's title, which states a budget other than the paper's."""
    text = TITLES[table]
    if options.budget != 1:
        epochs = sum(e for e, _ in train_config.burda_schedule(options.budget))
        budget = "REDUCED BUDGET" if options.budget < 1 else "BUDGET"
        text += f" — {budget} {budget_text(options.budget)} of the paper's schedule ({epochs} of {PAPER_EPOCHS} epochs)"
    return text


def write_report(table: str, out: Path, cells: list[Cell], options: Options, missing: dict[str, str]
                 ) -> dict[str, Path]:
    """Write OUT/report.md, OUT/report.csv and OUT/curves.png from the runs as they are; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    table_rows, results = rows(table, out, cells, options, missing)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table_rows)
    paths = dict(zip(("md", "csv", "png"), (out / name for name in REPORT_FILES), strict=True))
    text = buffer.getvalue()
    rundir.write_atomic(paths["csv"], lambda file: file.write(text.encode()))
    markdown = render_markdown(table, out, options, table_rows, missing)
    rundir.write_atomic(paths["md"], lambda file: file.write(markdown.encode()))
    plot_curves(paths["png"], title(table, options), results)
    return paths


def render_markdown(table: str, out: Path, options: Options, table_rows: list[dict[str, str]],
                    missing: dict[str, str]) -> str:
    """The report as Markdown: title, how it was made, the table, the missing data, the commands."""
    budget = budget_text(options.budget)
    made_by = (f"iwae reproduce {table} --out {shown(out)} --budget {budget} --seeds {options.seeds} "
               f"--eval-k {options.eval_k} --device {options.device}"
               + (f" --data-dir {shown(options.data_dir)}" if options.data_dir else "")
               + (f" --cells {' '.join(options.cells)}" if options.cells else ""))
    lines = [
        f"# {title(table, options)}", "",
        f"Made by `{made_by}`. Test NLL in nats (lower is better): mean +- sd over seeds (sd: the sample standard "
        "deviation, n - 1 in its denominator), estimated with "
        f"k = {options.eval_k} importance samples per test example; difference = ours - published. Budget "
        f"{budget}: every stage of the paper's schedule (3^i epochs at 1e-3 * 10^(-i/7), i = 0..7) "
        "is scaled by it. Steps/s: training steps per second at the median epoch of each seed, averaged over "
        "seeds.", "",
        "| cell | NLL | per seed | AU | published | diff | published AU | epochs | budget | device | wall s | "
        "steps/s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table_rows:
        nll = row["nll_mean"] + (f" +- {row['nll_sd']}" if row["nll_sd"] else "")
        paper = row["published_nll"] + (f" +- {row['published_sd']}" if row["published_sd"] else "")
        lines.append("| " + " | ".join([
            row["cell"], nll or "-", row["nll_per_seed"], row["active_units"], paper or "-", row["difference"] or "-",
            row["published_active_units"] or "-", row["epochs"], row["budget"], row["device"] or "-",
            row["wall_time_s"], row["steps_per_s"] or "-", row["status"],
        ]) + " |")
    if missing:
        lines += ["", "## Missing", ""]
        lines += [f"- {dataset}: {shown_text(reason)}" for dataset, reason in sorted(missing.items())]
    lines += ["", "## Commands", ""]
    lines += [f"- {row['cell']}: `{row['command']}`" for row in table_rows]
    sources = sorted({row["source"] for row in table_rows if row["source"]})
    lines += ["", "## Sources", ""] + [f"- {source}" for source in sources]
    return "\n".join(lines) + "\n"


def plot_curves(path: Path, heading: str, results: list[CellResult]) -> Path:
    """The test bound against epoch, one panel per cell, one line per seed."""
    columns = min(4, max(1, len(results)))
    rows_ = math.ceil(len(results) / columns)
    width = max(6.4, 3.2 * columns)  # a lone panel as wide as two, so that its ticks have room
    fig = Figure(figsize=(width, max(3.6, 2.6 * rows_ + 0.6)), layout="constrained")
    fig.suptitle(textwrap.fill(heading, int(15 * width)), fontsize=9)  # about 15 characters per inch
    for index, result in enumerate(results):
        ax = fig.add_subplot(rows_, columns, index + 1)
        ax.set_title(result.cell, fontsize=8)
        for seed, curve in result.curves.items():
            if curve:
                epochs, bound = zip(*curve, strict=True)
                ax.plot(epochs, bound, label=f"seed {seed}", linewidth=1, marker="o" if len(curve) == 1 else None)
        if result.missing:
            ax.text(0.5, 0.5, "data missing", ha="center", va="center", transform=ax.transAxes)
        elif any(result.curves.values()):
            ax.set_xscale("log")
            longest = max(len(curve) for curve in result.curves.values())
            # epochs 1, 2, 5, 10, 20, 50, 100; beyond, the powers of 10 alone
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if longest <= 100 else (1.0,)))
            ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())  # unlabelled: they crowd a short range
            ax.legend(fontsize=6)
        ax.set_xlabel("epoch", fontsize=7)
        ax.set_ylabel("test bound (nats)", fontsize=7)
        ax.tick_params(labelsize=6)
    rundir.write_atomic(path, lambda file: fig.savefig(file, format="png", dpi=90))
    return path

