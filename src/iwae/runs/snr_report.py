"""The files of a gradient-SNR diagnosis (``iwae diagnose``): snr.csv, slopes.json, slopes_se.json, snr.png, and
settings.json (what was diagnosed, and how)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iwae import plots
from iwae.eval.snr_diagnostics import CSV_COLUMNS, SNRResult, labels, slopes_json
from iwae.platform.files import write_atomic
from iwae.runs import rundir


def write_results(results: Sequence[SNRResult], out: Path, title: str, settings: dict[str, Any]) -> list[Path]:
    """Write ``out``/snr.csv (``CSV_COLUMNS``), slopes.json, slopes_se.json, snr.png and settings.json (``settings``,
    with ``title``: what was diagnosed and how, which the other files do not name); return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_json(out / "settings.json", {"title": title, **settings})
    text = io.StringIO()
    writer = csv.DictWriter(text, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(point.row() for result in results for point in result.points)
    write_atomic(out / "snr.csv", lambda file: file.write(text.getvalue().encode()))
    slopes, ses = slopes_json(results)
    rundir.write_json(out / "slopes.json", slopes)
    rundir.write_json(out / "slopes_se.json", ses)
    plot = plots.plot_snr(out / "snr.png", results, title, labels(results))
    return [out / "snr.csv", out / "slopes.json", out / "slopes_se.json", plot, out / "settings.json"]
