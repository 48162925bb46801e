"""The cross-check report: `iwae`'s runs beside the independent reference's, cell by cell and seed by seed.

Reads each side's run directories (``<side>/<cell>/seed-<s>/`` holding ``eval.json`` and ``metrics.jsonl``) and
writes ``OUT.md``, ``OUT.csv`` and ``OUT.png`` (the test bound against epoch, both sides):

    python crosscheck/report.py --iwae runs/crosscheck-iwae --reference runs/crosscheck-ref \
        --cells mnist-l1-vae-k1 mnist-l1-iwae-k50 --lockstep results/crosscheck/lockstep --out results/crosscheck

A cell's seeds are those with a run directory on either side (``--seeds N``: only seeds 0..N-1). With
``--lockstep DIR``, the report also shows the outputs of ``crosscheck/lockstep.py`` saved in DIR (``*.txt``, the
command on their first line): the two sides' training steps on identical inputs.

Each side binarizes the test set once with a draw of its own, and two draws of the 10,000 binary images differ in
mean NLL by about as much as the seeds do. So the iwae runs are also evaluated on the reference's binary test
images (``crosscheck/shared_test_set.py`` writes them, ``iwae evaluate RUN --dataset crosscheck-test.npz --k 5000``
evaluates on them, into ``eval-crosscheck-test-test-k5000.json``), and the verdict compares the two sides on the
same images. A cell agrees when the difference of the two sides' mean NLLs is within 2 standard errors of that
difference (from the seeds' spread on each side: sqrt(sd_iwae^2 / n_iwae + sd_ref^2 / n_ref)) and within
``--tolerance`` nats.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

SIDES = ("iwae", "reference")
SHARED_EVAL = "eval-crosscheck-test-test-k5000.json"  # an iwae run evaluated on the reference's binary test images
TEST_IMAGES = {True: "the same (the reference's)", False: "each side's own"}


@dataclass
class SeedRun:
    """What one side's run of one seed left: its final NLLs (None while unfinished) and its curves."""

    seed: int
    nll: float | None
    nll_se: float | None
    nll_shared: float | None  # on the reference's binary test images (for the reference, its own NLL)
    epochs_done: int
    train_bound: float | None
    test_curve: list[tuple[int, float]]
    examples_per_s: float | None


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_run(path: Path, seed: int, side: str) -> SeedRun:
    """One seed's run directory as the report needs it."""
    metrics = []
    if (path / "metrics.jsonl").is_file():
        for line in (path / "metrics.jsonl").read_text().splitlines():
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: the run resumes from its last checkpoint
    evaluation = _read_json(path / "eval.json")
    shared = evaluation if side == "reference" else _read_json(path / SHARED_EVAL)
    rates = [m["examples_per_s"] for m in metrics if "examples_per_s" in m]
    return SeedRun(
        seed=seed,
        nll=None if evaluation is None else evaluation["nll"],
        nll_se=None if evaluation is None else evaluation["nll_se"],
        nll_shared=None if shared is None else shared["nll"],
        epochs_done=metrics[-1]["epoch"] if metrics else 0,
        train_bound=metrics[-1]["train_bound"] if metrics else None,
        test_curve=[(m["epoch"], m["test_bound"]) for m in metrics],
        examples_per_s=statistics.median(rates) if rates else None,
    )


@dataclass
class Comparison:
    """The two sides' finished NLLs of one cell on one set of test images, and whether they agree."""

    cell: str
    shared: bool
    nll: dict[str, list[float]]
    difference: float | None
    difference_se: float | None
    agree: bool | None


def compare(cell: str, runs: dict[str, list[SeedRun]], tolerance: float, shared: bool) -> Comparison:
    """Difference of means (iwae - reference), its standard error over seeds, and the verdict; with ``shared``, of
    the NLLs on the same binary test images (the reference's)."""
    nll = {side: [v for r in runs[side] if (v := r.nll_shared if shared else r.nll) is not None] for side in SIDES}
    if any(len(values) < 2 for values in nll.values()):
        return Comparison(cell, shared, nll, None, None, None)
    difference = statistics.fmean(nll["iwae"]) - statistics.fmean(nll["reference"])
    se = math.sqrt(sum(statistics.variance(values) / len(values) for values in nll.values()))
    return Comparison(cell, shared, nll, difference, se, abs(difference) < 2 * se and abs(difference) < tolerance)


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = f" +- {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.2f}{sd} ({len(values)})"


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(args: argparse.Namespace, runs: dict[str, dict[str, list[SeedRun]]], comparisons: list[Comparison]
             ) -> str:
    """The report's text."""
    lines = [
        "# Cross-check: `iwae` against an independent JAX implementation of the paper's protocol", "",
        f"Budget {args.budget:g} of the paper's schedule, {_seed_counts(runs)}; test NLL in nats "
        "by 5000 importance samples per example over all 10,000 MNIST test images, mean +- sd over the seeds "
        "finished (their number in brackets); difference = iwae - reference, its standard error from the seeds' "
        f"spread on each side. Agreement: |difference| < 2 standard errors and < {args.tolerance:g} nats. Made by:",
        "", "```bash", *args.commands,
        f"python crosscheck/report.py --iwae {args.iwae} --reference {args.reference} --cells "
        f"{' '.join(args.cells)}{_seeds_option(args)} --budget {args.budget:g}{_lockstep_option(args)} "
        f"--out {args.out}",
        "```", "",
        "| cell | test images | iwae NLL | reference NLL | difference | SE of difference | agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        verdict = "-" if c.agree is None else ("yes" if c.agree else "NO")
        lines.append(f"| {c.cell} | {TEST_IMAGES[c.shared]} | {_mean_sd(c.nll['iwae'])} | "
                     f"{_mean_sd(c.nll['reference'])} | {_number(c.difference)} | {_number(c.difference_se)} | "
                     f"{verdict} |")
    lines += _test_set_note(runs)
    lines += ["", "## Per seed", "",
              "| cell | side | seed | epochs done | NLL | its standard error (over examples) | NLL on the reference's "
              "test images | last train bound | examples/s (median epoch) |", "|---|---|---|---|---|---|---|---|---|"]
    for cell in args.cells:
        for side in SIDES:
            for r in runs[cell][side]:
                lines.append(f"| {cell} | {side} | {r.seed} | {r.epochs_done} | {_number(r.nll)} | "
                             f"{_number(r.nll_se)} | {_number(r.nll_shared)} | {_number(r.train_bound)} | "
                             f"{_number(r.examples_per_s, 0)} |")
    lines += lockstep_section(args.lockstep)
    lines += ["", f"Curves: `{Path(args.out).name}.png`, the test bound on each run's fixed subset of 1000 test "
              "images after each epoch, both sides (each on its own binarization of those images).", ""]
    return "\n".join(lines)


def _seed_counts(runs: dict[str, dict[str, list[SeedRun]]]) -> str:
    return "seeds per cell (iwae, reference): " + ", ".join(
        f"{cell} {len(sides['iwae'])} and {len(sides['reference'])}" for cell, sides in runs.items())


def _test_set_note(runs: dict[str, dict[str, list[SeedRun]]]) -> list[str]:
    """What separates the two rows of a cell: the iwae models' NLL on their own test binarization less that on
    the reference's, averaged over the seeds evaluated on both."""
    shifts = {cell: [r.nll - r.nll_shared for r in sides["iwae"] if r.nll is not None and r.nll_shared is not None]
              for cell, sides in runs.items()}
    measured = [f"{cell} {statistics.fmean(values):+.2f} nats ({len(values)} seeds)"
                for cell, values in shifts.items() if values]
    if not measured:
        return []
    return ["", "Each side binarizes the test images once, with its own random draws. The first row of a cell "
            "scores both sides' models on one binarization (the reference's), so its difference is the models'; "
            "the second scores each on its own, and adds the difference between the two binarizations: the same "
            "iwae models' NLL on their own binarization less that on the reference's is " + "; ".join(measured)
            + "."]


def _seeds_option(args: argparse.Namespace) -> str:
    return "" if args.seeds is None else f" --seeds {args.seeds}"


def _lockstep_option(args: argparse.Namespace) -> str:
    return "" if args.lockstep is None else f" --lockstep {os.path.relpath(args.lockstep)}"


def lockstep_section(folder: str | None) -> list[str]:
    """The lock-step comparisons saved in ``folder``: each file's command, its first and last compared step."""
    files = sorted(Path(folder).glob("*.txt")) if folder else []
    if not files:
        return []
    lines = ["", "## The training step on identical inputs (`crosscheck/lockstep.py`)", "",
             "Both sides start from the same parameters and take Adam steps on the same minibatches and the same "
             "normal draws; the relative difference of their parameters is printed beside that of the reference "
             "and a second reference run whose initial parameters were perturbed by a relative 1e-7 (how fast the "
             "training itself amplifies a rounding difference).", "",
             "| file | command | first step | last step |", "|---|---|---|---|"]
    for path in files:
        text = path.read_text().splitlines()
        steps = [line for line in text if line.startswith("step ")]
        lines.append(f"| `{path.name}` | `{text[0].lstrip('$ ')}` | {steps[0]} | {steps[-1]} |")
    return lines


def seeds_of(roots: dict[str, Path], cell: str, limit: int | None) -> list[int]:
    """The seeds with a run directory of ``cell`` on either side (those below ``limit`` if given)."""
    found = {int(p.name.removeprefix("seed-")) for root in roots.values() for p in (root / cell).glob("seed-*")}
    return sorted(s for s in found if limit is None or s < limit)


def write_csv(path: Path, runs: dict[str, dict[str, list[SeedRun]]]) -> None:
    """One row per cell, side and seed."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["cell", "side", "seed", "epochs_done", "nll", "nll_se", "nll_on_reference_test_images",
                         "train_bound", "examples_per_s"])
        for cell, sides in runs.items():
            for side, seeds in sides.items():
                for r in seeds:
                    writer.writerow([cell, side, r.seed, r.epochs_done, _number(r.nll, 4), _number(r.nll_se, 4),
                                     _number(r.nll_shared, 4), _number(r.train_bound, 4),
                                     _number(r.examples_per_s, 0)])


def plot(path: Path, runs: dict[str, dict[str, list[SeedRun]]]) -> None:
    """The test bound against epoch, a panel per cell, a line per seed coloured by side."""
    fig = Figure(figsize=(5.0 * len(runs), 3.6), layout="constrained")
    for index, (cell, sides) in enumerate(runs.items()):
        ax = fig.add_subplot(1, len(runs), index + 1)
        ax.set_title(cell, fontsize=9)
        for side, color in zip(SIDES, ("tab:blue", "tab:orange"), strict=True):
            for n, r in enumerate(run for run in sides[side] if run.test_curve):
                epochs, bound = zip(*r.test_curve, strict=True)
                ax.plot(epochs, bound, color=color, linewidth=0.8, alpha=0.8, label=side if n == 0 else None)
        if not ax.lines:
            ax.text(0.5, 0.5, "no epoch yet", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.set_xscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test bound (nats)")
        ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iwae", required=True, help="the iwae side's grid folder (iwae reproduce --out)")
    parser.add_argument("--reference", required=True, help="the reference side's folder of cells")
    parser.add_argument("--cells", nargs="+", required=True)
    parser.add_argument("--seeds", type=int, default=None, help="only seeds 0..N-1 (default: every seed found)")
    parser.add_argument("--lockstep", default=None, help="a folder of crosscheck/lockstep.py outputs (*.txt)")
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--tolerance", type=float, default=0.3)
    parser.add_argument("--command", dest="commands", action="append", default=[],
                        help="a command that made the runs, written at the top of the report (repeatable)")
    parser.add_argument("--out", required=True, help="path of the report without its suffix")
    args = parser.parse_args()
    roots = {"iwae": Path(args.iwae), "reference": Path(args.reference)}
    runs = {cell: {side: [read_run(roots[side] / cell / f"seed-{s}", s, side)
                          for s in seeds_of(roots, cell, args.seeds)] for side in SIDES} for cell in args.cells}
    comparisons = [compare(cell, runs[cell], args.tolerance, shared) for cell in args.cells for shared in (True, False)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    args.out = os.path.relpath(out)
    out.with_suffix(".md").write_text(markdown(args, runs, comparisons))
    write_csv(out.with_suffix(".csv"), runs)
    plot(out.with_suffix(".png"), runs)
    for c in comparisons:
        print(f"{c.cell} on {TEST_IMAGES[c.shared]} test images: difference {_number(c.difference)} +- "
              f"{_number(c.difference_se)}, agree: {c.agree}")


if __name__ == "__main__":
    main()
