"""The files of a run directory, and writing them so that a kill at any moment leaves a readable copy.

    RUN/config.json       the resolved training configuration (written once, at the start)
    RUN/checkpoint.pt     the latest checkpoint (see ``iwae.runs.checkpoint``)
    RUN/metrics.jsonl     one JSON object per finished epoch
    RUN/eval.json         the run's own evaluation on its test set (``iwae.eval.likelihood``)
    RUN/eval-*.json       evaluations with other settings, one file each (``iwae.runs.evaluation.eval_path``)
    RUN/figures/*.png     samples, reconstructions, training curves, bound against k (``iwae.plots``)

Every whole-file write goes to a temporary file beside the target, is flushed to disk, and is then renamed
over the target: ``os.replace`` is atomic on POSIX, so readers see the old file or the new one, never half.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from iwae.platform.files import DiskFullError, append_durably, write_atomic

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
FIGURES = "figures"
METRIC_KEYS = ("epoch", "lr", "train_bound", "test_bound")  # in every epoch's record of RUN/metrics.jsonl
STACK = "stack.json"  # in the directory of a stacked run, beside its seed-<s> run directories (iwae.training.stacked)


class RunDirError(ValueError):
    """A run directory cannot be created or written; the message names the directory and the fix."""


@contextmanager
def unstarted(paths: list[Path]) -> Iterator[None]:
    """Remove ``paths`` (the files and directories a new run made) if the block fails, so that a run whose first
    checkpoint could not be written (a full disk) leaves nothing that stops the same command from running again."""
    try:
        yield
    except Exception as error:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        if isinstance(error, DiskFullError):
            raise DiskFullError(f"{error}, then run the same command again") from error
        raise


def create(run_dir: Path) -> Path:
    """Create a new, empty run directory (and its parents); an existing empty directory is accepted.

    Raises:
        RunDirError: if ``run_dir`` already holds files (it is never overwritten), or cannot be created
            or written.
    """
    if run_dir.is_dir() and any(run_dir.iterdir()):
        stacked = (run_dir / STACK).is_file()
        seeds = [config.parent for config in sorted(run_dir.glob(f"seed-*/{CONFIG}"))]
        runs = seeds if stacked else [run_dir]
        if runs and all(is_finished(run) and not (run / CHECKPOINT).is_file() for run in runs):
            kept = ("finished runs kept without their checkpoints" if stacked
                    else "a finished run kept without its checkpoint")
            what = f"holds {kept} (as results are kept); choose a new --out"
        elif (run_dir / CHECKPOINT).is_file() or stacked:
            what = f"holds a run; choose a new --out, or continue that run with: iwae train --resume {run_dir}"
        elif (run_dir / CONFIG).is_file() or seeds:  # killed between writing the configuration and the checkpoint
            what = ("holds a run stopped before its first checkpoint, with nothing to resume; delete the directory "
                    "and run the same command again, or choose a new --out")
        else:
            what = "holds files that are not a run's; choose a new --out"
        raise RunDirError(f"run directory {run_dir} already exists and {what}")
    check_writable(run_dir)  # names a file in the way
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise RunDirError(
            f"cannot create or write the run directory {run_dir} ({error.strerror or error}); "
            "choose an --out in a writable directory"
        ) from error
    return run_dir


OUT_FIX = "choose an --out in a writable directory"


def check_writable(directory: Path, fix: str = OUT_FIX) -> None:
    """Raise RunDirError unless ``directory`` is a directory, or can be created as one, that this process may
    write in; nothing is created, so a command can check its output directory before it starts its work. The
    message of a directory that is not writable ends with ``fix``."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        choose = ("choose an --out that is a directory or does not exist yet" if fix == OUT_FIX
                  else "give the directory of a run started with iwae train --out")
        raise RunDirError(f"cannot write into {directory}: {existing} is a file, not a directory; {choose}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write into {directory}: {existing} is not writable; {fix}")


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON, atomically; an undefined float (NaN: a standard error of one example, the
    slope of one point) is written as null, which JSON parsers other than Python's accept. (Infinities, such as
    VR-max's alpha = -inf, are kept as Python writes them.)"""
    text = json.dumps(_nan_to_none(value), indent=2) + "\n"
    write_atomic(path, lambda file: file.write(text.encode()))


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(item) for item in value]
    return value


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; a missing or unreadable file raises RunDirError naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise RunDirError(f"{path} does not exist; is {path.parent} a run directory made by iwae train?") from error
    except (OSError, ValueError) as error:
        raise RunDirError(f"{path} is not readable JSON ({error}); restore it or re-create it") from error


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's settings in RUN/config.json; a missing or unreadable file, or one that is not a run's settings
    (a JSON object with its epochs), raises RunDirError naming it."""
    path = run_dir / CONFIG
    config = read_json(path)
    if not isinstance(config, dict) or isinstance(config.get("epochs"), bool) or not isinstance(
            config.get("epochs"), int):
        raise RunDirError(f"{path} is not a run's settings (a JSON object with its epochs and the rest); restore it "
                          "or re-create it")
    return config


def is_finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` trained all its epochs and holds its final evaluation, whether or not its
    checkpoint is kept (results are kept without theirs)."""
    if not (run_dir / CONFIG).is_file():
        return False
    epochs = read_config(run_dir)["epochs"]
    metrics = read_metrics(run_dir)
    return bool(metrics) and metrics[-1]["epoch"] == epochs and has_final_evaluation(run_dir, epochs)


def has_final_evaluation(run_dir: Path, epochs: int) -> bool:
    """Whether RUN/eval.json evaluates the run's checkpoint after its last epoch (of ``epochs``): ``iwae evaluate``
    of an earlier checkpoint writes the same file, which the run's final evaluation then replaces."""
    path = run_dir / EVAL
    if not path.is_file():
        return False
    result = read_json(path)
    return isinstance(result, dict) and result.get("epoch") == epochs


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run, in order; a line that is not a whole epoch's record (an incomplete last
    line after a kill mid-write, or a damaged one) is skipped."""
    path = run_dir / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and all(key in record for key in METRIC_KEYS):
            records.append(record)
    return records


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one epoch's metrics as a JSON line and flush it to disk."""
    append_durably(run_dir / METRICS, json.dumps(record) + "\n")


def check_metrics(run_dir: Path, epochs: int) -> None:
    """Raise RunDirError unless the metrics hold a record of each of the first ``epochs`` epochs: those a run
    resumed from a checkpoint after ``epochs`` epochs does not repeat, so a record missing among them (a line
    cut short or damaged after the epoch was checkpointed) could not be written again."""
    recorded = {record["epoch"] for record in read_metrics(run_dir)}
    missing = [epoch for epoch in range(1, epochs + 1) if epoch not in recorded]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise RunDirError(
            f"{run_dir / METRICS} has no whole record of epoch {shown}, though the checkpoint is after epoch "
            f"{epochs} (a line was cut short or damaged); resuming would lose that record for good: restore "
            f"{METRICS} from a copy, or start a new run with a new --out"
        )


def truncate_metrics(run_dir: Path, epochs: int) -> None:
    """Keep only the metrics of the first ``epochs`` epochs: those a resumed run does not repeat."""
    kept = [record for record in read_metrics(run_dir) if record["epoch"] <= epochs]
    text = "".join(json.dumps(record) + "\n" for record in kept)
    write_atomic(run_dir / METRICS, lambda file: file.write(text.encode()))
