"""Every published value the reports compare with names where it was published, and matches the reference file
of published numbers; every report committed in results/ names a source for each published value it shows."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest

from iwae.runs.published import PUBLISHED

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _reference_file() -> Path | None:
    """The reference file of published numbers (shared/reference/burda2015.md), found beside the data folder that
    IWAE_DATA_DIR names or beside the repository; None where neither holds it."""
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "reference" / "burda2015.md"]
    if os.environ.get("IWAE_DATA_DIR"):
        candidates.insert(0, Path(os.environ["IWAE_DATA_DIR"]).resolve().parent / "reference" / "burda2015.md")
    return next((path for path in candidates if path.is_file()), None)


def test_every_published_value_names_a_table_or_a_named_reimplementation() -> None:
    for table, cells in PUBLISHED.items():
        for cell, value in cells.items():
            where = value.source
            assert re.search(r"\b(table|figure) \d", where) or "reimplementation" in where, (table, cell, where)
            assert re.search(r"\b(19|20)\d\d\b", where) or "GitHub" in where, (table, cell, where)


def test_published_values_are_those_of_the_reference_file() -> None:
    path = _reference_file()
    if path is None:
        pytest.skip("shared/reference/burda2015.md is not here (set IWAE_DATA_DIR to shared/data)")
    text = path.read_text()
    numbers = set(re.findall(r"\d+\.\d+", text))
    for table, cells in PUBLISHED.items():
        for cell, value in cells.items():
            assert f"{value.nll:.2f}" in numbers, (table, cell, value.nll)
            if value.sd is not None:
                assert f"{value.sd:.2f}" in numbers, (table, cell, value.sd)
            if value.active_units is not None:
                assert value.active_units in text, (table, cell, value.active_units)


def _table_after(text: str, heading: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first Markdown table after the line of ``text`` that starts with
    ``heading``."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("|---"))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip().startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _reference_cells(text: str) -> dict[str, dict[str, tuple[str, str | None, str | None]]]:
    """Each table's cells as the reference file states them, read from the cell's own row: (NLL, sd, AU) as
    printed there (sd and AU None where the row gives none)."""
    burda = {"burda-table1": {}, "burda-table3": {}, "burda-table2": {}}
    for layers, k, *values in _table_after(text, "## Table 1"):
        for dataset, (vae, vae_au, iwae, iwae_au) in zip(("mnist", "omniglot"), (values[:4], values[4:]),
                                                         strict=True):
            burda["burda-table1"][f"{dataset}-l{layers}-vae-k{k}"] = (vae, None, vae_au)
            burda["burda-table1"][f"{dataset}-l{layers}-iwae-k{k}"] = (iwae, None, iwae_au)
    for layers, k, vae, vae_au, iwae, iwae_au in _table_after(text, "## Table 3"):
        burda["burda-table3"][f"binarized-mnist-l{layers}-vae-k{k}"] = (vae, None, vae_au)
        burda["burda-table3"][f"binarized-mnist-l{layers}-iwae-k{k}"] = (iwae, None, iwae_au)
    line = re.search(r"VAE \((\S+), (\d+) AU\) -> IWAE k=50: (\S+), (\d+) AU\. +IWAE k=50 \((\S+), (\d+) AU\) -> "
                     r"VAE: (\S+), (\d+) AU\.", text)
    vae, vae_au, to_iwae, to_iwae_au, iwae, iwae_au, to_vae, to_vae_au = line.groups()
    burda["burda-table2"] = {"mnist-l1-vae-k1": (vae, None, vae_au), "mnist-l1-iwae-k50": (iwae, None, iwae_au),
                             "vae-k1-to-iwae-k50": (to_iwae, None, to_iwae_au),
                             "iwae-k50-to-vae-k1": (to_vae, None, to_vae_au)}
    rainforth = {}
    for objective, _bound, log_p, _kl in _table_after(text, "- Rainforth et al. 2018"):
        mean, sd = re.fullmatch(r"-(\S+) \+- (\S+)", log_p).groups()
        rainforth[objective.split()[0].lower()] = (mean, sd, None)
    dreg = {}
    for standard, dreg_value, k in re.findall(r"(\d+\.\d+) / (\d+\.\d+) \(k=(\d+)\)", text):
        dreg[f"standard-k{k}"], dreg[f"dreg-k{k}"] = (standard, None, None), (dreg_value, None, None)
    return {**burda, "rainforth-table1": rainforth, "dreg": dreg}


def test_each_published_cell_holds_the_numbers_of_its_own_row_of_the_reference_file() -> None:
    path = _reference_file()
    if path is None:
        pytest.skip("shared/reference/burda2015.md is not here (set IWAE_DATA_DIR to shared/data)")
    reference = _reference_cells(path.read_text())
    assert len(reference["burda-table1"]) == 24 and len(reference["rainforth-table1"]) == 5
    ours = {table: {cell: (f"{value.nll:.2f}", None if value.sd is None else f"{value.sd:.2f}", value.active_units)
                    for cell, value in cells.items()} for table, cells in PUBLISHED.items()}
    assert ours == reference


def test_the_checker_fails_on_a_value_without_a_source(monkeypatch: pytest.MonkeyPatch) -> None:
    from iwae.runs.published import Published

    monkeypatch.setitem(PUBLISHED, "made-up", {"cell": Published(80.0, None, "a blog post")})
    with pytest.raises(AssertionError):
        test_every_published_value_names_a_table_or_a_named_reimplementation()


@pytest.mark.parametrize("report", sorted(RESULTS.glob("*.csv")), ids=lambda path: path.name)
def test_committed_reports_show_published_values_with_their_sources(report: Path) -> None:
    with report.open() as file:
        rows = list(csv.DictReader(file))
    if not rows or "published_nll" not in rows[0]:
        pytest.skip(f"{report.name} compares with no published values")
    made_by = re.search(r"Made by `iwae reproduce (\S+)", report.with_suffix(".md").read_text())
    assert made_by, f"{report.with_suffix('.md').name} does not say which table it remakes"
    published = PUBLISHED[made_by.group(1)]
    for row in rows:
        if row["published_nll"]:
            paper = published[row["cell"]]
            assert row["source"] == paper.source, f"{report.name}: {row['cell']}: source {row['source']!r}"
            assert row["published_nll"] == f"{paper.nll:.2f}", f"{report.name}: {row['cell']}"
