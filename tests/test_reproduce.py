"""Grids of runs and their reports (``iwae.runs.reproduce``), on a tiny grid over the tiny dataset: finished runs are
skipped, unfinished ones resumed to the parameters of an uninterrupted run, continued cells start from their base
cell's parameters, and the report holds our numbers beside the published ones, missing data listed."""

from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import messages, overlapping, tick_label_boxes
from matplotlib.figure import Figure
from PIL import Image

from iwae import cli
from iwae.runs import checkpoint, lone_run, reproduce, rundir
from iwae.runs.published import PUBLISHED
from iwae.runs.reproduce import Cell, Options
from iwae.training import config as train_config

TABLE = "burda-table2"
OPTIONS = Options(budget=0.001, seeds=2, eval_k=10, device="cpu")  # stages of 1 epoch (2 the last): 9 epochs


def tiny_grid(dataset: str) -> list[Cell]:
    """Table 2's cells on the tiny dataset (batches of 8, k of 2), the last one on data that is missing."""
    base = {**reproduce.BASE, "dataset": dataset, "layers": 1, "batch_size": 8, "monitor_examples": 8}
    continued = {**base, "schedule": "constant", "lr": 1e-4}
    return [
        Cell("mnist-l1-vae-k1", {**base, "objective": "elbo", "k": 1}),
        Cell("mnist-l1-iwae-k50", {**base, "objective": "iwae", "k": 2}),
        Cell("vae-k1-to-iwae-k50", {**continued, "objective": "iwae", "k": 2}, init_from="mnist-l1-vae-k1"),
        Cell("iwae-k50-to-vae-k1", {**continued, "dataset": "/nonexistent/absent.npz", "objective": "elbo", "k": 1},
             init_from="mnist-l1-iwae-k50"),
    ]


@pytest.fixture(scope="module")
def finished(tiny_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A tiny table run to the end, and its log."""
    out, log = tmp_path_factory.mktemp("grid"), []
    reproduce.run_table(TABLE, out, OPTIONS, cells=tiny_grid(tiny_dataset), progress=False, log=log.append)
    return out, log


@pytest.mark.slow
def test_grid_trains_every_seed_of_every_cell_with_data(finished: tuple[Path, list[str]]) -> None:
    out, log = finished
    assert log[:3] == [f"{cell}: trained (2 seeds stacked)" for cell in
                       ("mnist-l1-vae-k1", "mnist-l1-iwae-k50", "vae-k1-to-iwae-k50")]
    assert log[3] == "iwae-k50-to-vae-k1: skipped, data missing"
    config = rundir.read_json(reproduce.run_dir(out, "mnist-l1-vae-k1", 1) / rundir.CONFIG)
    assert (config["seed"], config["epochs"], config["schedule_scale"], config["eval_k"]) == (1, 9, 0.001, 10)
    continued = rundir.read_json(reproduce.run_dir(out, "vae-k1-to-iwae-k50", 1) / rundir.CONFIG)
    assert continued["init_from"] == str(reproduce.run_dir(out, "mnist-l1-vae-k1", 1))
    assert (continued["epochs"], continued["lr"]) == (2, 1e-4)  # round(3^7 * 0.001) epochs at 1e-4


@pytest.mark.slow
def test_finished_runs_are_skipped(finished: tuple[Path, list[str]], tiny_dataset: str) -> None:
    out, _ = finished
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob(rundir.CHECKPOINT)}
    log: list[str] = []
    reproduce.run_table(TABLE, out, OPTIONS, cells=tiny_grid(tiny_dataset), progress=False, log=log.append)
    assert all(line.endswith(": skipped (2 seeds stacked)") for line in log[:3])
    assert stamps == {path: path.stat().st_mtime_ns for path in out.rglob(rundir.CHECKPOINT)}


@pytest.mark.slow
def test_an_unfinished_run_resumes_to_the_uninterrupted_parameters(
    finished: tuple[Path, list[str]], tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference, _ = finished
    cells = tiny_grid(tiny_dataset)[:1]
    appended, append = [], rundir.append_metrics

    def fail_in_epoch_3(run_dir: Path, record: dict) -> None:  # a crash in epoch 3's metrics, before its checkpoint
        append(run_dir, record)
        appended.append(record)
        if len(appended) == 5:  # seed 0's third epoch
            raise RuntimeError("killed")

    monkeypatch.setattr(rundir, "append_metrics", fail_in_epoch_3)
    with pytest.raises(RuntimeError, match="killed"):
        reproduce.run_table(TABLE, tmp_path, OPTIONS, cells=cells, progress=False, log=lambda line: None)
    monkeypatch.undo()
    path = reproduce.run_dir(tmp_path, cells[0].name, 0)
    assert checkpoint.load(path)["epoch"] == 2
    log: list[str] = []
    moved = replace(OPTIONS, data_dir=str(tmp_path / "data-moved-here"))  # the runs read their data where it is now
    reproduce.run_table(TABLE, tmp_path, moved, cells=cells, progress=False, log=log.append)
    assert log == [f"{cells[0].name}: resumed (2 seeds stacked)"]
    for seed in (0, 1):
        ours, theirs = (checkpoint.load(reproduce.run_dir(root, cells[0].name, seed)) for root in (tmp_path, reference))
        assert all(torch.equal(ours["model"][name], theirs["model"][name]) for name in theirs["model"])
        assert ours["config"]["data_dir"] == moved.data_dir
    assert [m["epoch"] for m in rundir.read_metrics(path)] == list(range(1, 10))


@pytest.mark.slow
def test_a_new_cell_takes_one_thread_where_its_step_is_faster_on_one_and_resumes_on_it(
    tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from iwae.platform import gemm, threads, timing
    from iwae.training import preflight

    def a_process_that_finds_two_cpus_free() -> None:
        monkeypatch.setattr(threads, "_used", [])
        monkeypatch.setattr(threads, "_chosen", [])
        monkeypatch.setattr(threads, "choose", lambda: threads.ThreadChoice(2, "2 of 2 CPUs free",
                                                                            from_free_cpus=True))

    a_process_that_finds_two_cpus_free()
    monkeypatch.setattr(preflight, "THREAD_TIMING_MIN_STEPS", 1)
    monkeypatch.setattr(gemm, "_chosen", {})
    # the step timed by turns: faster on one thread than on two (the matmul paths alike)
    monkeypatch.setattr(timing, "by_turns", lambda workload, settings, rounds: {
        setting: 0.001 if setting == 1 else 0.004 for setting in settings})
    cells = tiny_grid(tiny_dataset)[:1]
    counts, append = [], rundir.append_metrics

    def record_threads_and_fail_in_epoch_3(run_dir: Path, record: dict) -> None:
        append(run_dir, record)
        counts.append(torch.get_num_threads())
        if len(counts) == 5:  # seed 0's third epoch
            raise RuntimeError("killed")

    monkeypatch.setattr(rundir, "append_metrics", record_threads_and_fail_in_epoch_3)
    before = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="killed"):
            reproduce.run_table(TABLE, tmp_path, OPTIONS, cells=cells, progress=False, log=lambda line: None)
        assert counts == [1] * 5
        for seed in (0, 1):
            assert rundir.read_json(reproduce.run_dir(tmp_path, cells[0].name, seed) / rundir.CONFIG)["threads"] == 1
        a_process_that_finds_two_cpus_free()  # a later command: the cell resumes on the count it recorded
        counts.clear()
        monkeypatch.setattr(rundir, "append_metrics", lambda run_dir, record: (append(run_dir, record),
                                                                               counts.append(torch.get_num_threads())))
        log: list[str] = []
        reproduce.run_table(TABLE, tmp_path, OPTIONS, cells=cells, progress=False, log=log.append)
        assert log == [f"{cells[0].name}: resumed (2 seeds stacked)"]
        assert counts == [1] * 14  # epochs 3 to 9 of both seeds
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_a_command_with_another_budget_is_refused_before_anything_runs(
    finished: tuple[Path, list[str]], tiny_dataset: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, _ = finished
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}
    for options, option in ((replace(OPTIONS, budget=0.002), "--budget"), (replace(OPTIONS, eval_k=20), "--eval-k")):
        with pytest.raises(ValueError, match=f"was started with .*; give the {option} it was started with"):
            reproduce.run_table(TABLE, out, options, cells=tiny_grid(tiny_dataset), progress=False,
                                log=lambda line: None)
    monkeypatch.setitem(reproduce.GRIDS, TABLE, lambda: tiny_grid(tiny_dataset))
    argv = ["reproduce", TABLE, "--out", str(out), "--budget", "0.5", "--seeds", "2", "--eval-k", "10"]
    assert cli.main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("iwae: error: ") and "schedule_scale 0.001 (this command: 0.5)" in err
    assert err.count("\n") == 1
    assert stamps == {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}


@pytest.mark.slow
def test_a_run_directory_is_refused_as_the_grids_out(finished: tuple[Path, list[str]], tiny_dataset: str,
                                                     tmp_path: Path) -> None:
    run = reproduce.run_dir(finished[0], "mnist-l1-vae-k1", 0)
    kept = tmp_path / "kept"  # a finished run kept as results are: without its checkpoint
    shutil.copytree(run, kept, ignore=shutil.ignore_patterns(rundir.CHECKPOINT))
    for out in (run, run.parent, kept):  # a lone run, a stacked one, one kept without its checkpoint
        with pytest.raises(ValueError, match="holds a training run, not a grid's runs"):
            reproduce.run_table(TABLE, out, OPTIONS, cells=tiny_grid(tiny_dataset), progress=False,
                                log=lambda line: None)
        assert not (out / "mnist-l1-vae-k1").exists()


@pytest.mark.parametrize(("name", "text"), [("report.md", "my notes\n"), ("notes.txt", "mine\n"),
                                            ("report.md", f"# {reproduce.TITLES['dreg']}\n")])
def test_an_out_with_files_the_grid_does_not_write_is_refused(name: str, text: str, tiny_dataset: str,
                                                               tmp_path: Path) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"holds files that are not {TABLE}'s grid or report ({name}); "
                                                   "give the grid an --out of its own")):
        reproduce.run_table(TABLE, tmp_path, OPTIONS, cells=tiny_grid(tiny_dataset), progress=False,
                            log=lambda line: None)
    assert [path.name for path in tmp_path.iterdir()] == [name] and (tmp_path / name).read_text() == text


@pytest.mark.slow
def test_another_tables_grid_is_refused_as_the_out(finished: tuple[Path, list[str]], tiny_dataset: str,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "grid"
    shutil.copytree(finished[0], out)
    report = (out / "report.md").read_bytes()
    for table in ("dreg", "burda-table1"):  # cells of table 2 that dreg lacks, and one that table 1 lacks
        with pytest.raises(ValueError, match=f"holds runs of cells that {table} does not have .*"
                                             f"vae-k1-to-iwae-k50.*give {table} an --out of its own"):
            reproduce.run_table(table, out, OPTIONS, progress=False, log=lambda line: None)
    assert (out / "report.md").read_bytes() == report
    for name in ("standard-k1", "mnist-l1-vae-k5"):
        assert not (out / name).exists()
    reproduce.check_same_table(TABLE, out)  # its own grid is accepted


@pytest.mark.slow
def test_more_seeds_are_trained_beside_the_finished_ones(
    finished: tuple[Path, list[str]], tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference, _ = finished
    out = tmp_path / "grid"
    shutil.copytree(reference, out)
    cells = tiny_grid(tiny_dataset)[:2]
    for seed in range(2):  # the second cell's finished runs kept as results are committed: without checkpoints
        (reproduce.run_dir(out, cells[1].name, seed) / rundir.CHECKPOINT).unlink()
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()
              and path.parent.name in ("seed-0", "seed-1")}
    # seed 2 of the first cell started by the cell's own command (a lone run), and killed in its third epoch
    lone = reproduce.cell_config(cells[0], 2, OPTIONS, out)
    append = rundir.append_metrics

    def fail_in_epoch_3(run_dir: Path, record: dict) -> None:
        append(run_dir, record)
        if record["epoch"] == 3:
            raise RuntimeError("killed")

    monkeypatch.setattr(rundir, "append_metrics", fail_in_epoch_3)
    with pytest.raises(RuntimeError, match="killed"):
        lone_run.train(lone, reproduce.run_dir(out, cells[0].name, 2), progress=False)
    monkeypatch.undo()

    log: list[str] = []
    more = replace(OPTIONS, seeds=4)
    reproduce.run_table(TABLE, out, more, cells=cells, progress=False, log=log.append)
    assert log == [f"{cells[0].name}: resumed (1 run alone), trained (1 seed)",
                   f"{cells[1].name}: trained (2 seeds stacked)"]
    assert stamps == {path: path.stat().st_mtime_ns for path in stamps}  # seeds 0 and 1 were left alone
    for cell in cells:
        for seed in range(4):
            assert rundir.is_finished(reproduce.run_dir(out, cell.name, seed))
    with (out / "report.csv").open() as file:
        table = {row["cell"]: row for row in csv.DictReader(file)}
    assert all(len(table[cell.name]["nll_per_seed"].split()) == 4 for cell in cells)
    assert all(table[cell.name]["status"] == "done" for cell in cells)
    log.clear()
    reproduce.run_table(TABLE, out, more, cells=cells, progress=False, log=log.append)
    assert log == [f"{cell.name}: skipped (4 seeds stacked)" for cell in cells]


@pytest.mark.slow
def test_a_continued_cell_whose_base_runs_were_kept_without_checkpoints_is_refused_before_training(
    finished: tuple[Path, list[str]], tiny_dataset: str, tmp_path: Path,
) -> None:
    reference, _ = finished
    out = tmp_path / "grid"
    shutil.copytree(reference, out)
    base, other, continued = tiny_grid(tiny_dataset)[:3]
    for seed in range(2):
        (reproduce.run_dir(out, base.name, seed) / rundir.CHECKPOINT).unlink()
    for cell in (other, continued):  # still to train
        shutil.rmtree(out / cell.name)
    with pytest.raises(ValueError, match=re.escape(
            f"{reproduce.run_dir(out, continued.name, 0)} starts from the parameters of "
            f"{reproduce.run_dir(out, base.name, 0)}, a finished run kept without its checkpoint.pt")):
        reproduce.run_table(TABLE, out, OPTIONS, cells=[base, other, continued], progress=False, log=lambda line: None)
    assert not (out / other.name).exists() and not (out / continued.name).exists()  # nothing trained


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [True, False])
def test_an_unfinished_cell_without_its_checkpoints_is_refused_before_training(
    finished: tuple[Path, list[str]], tiny_dataset: str, tmp_path: Path, stacked: bool,
) -> None:
    reference, _ = finished
    out = tmp_path / "grid"
    shutil.copytree(reference, out)
    first, second = tiny_grid(tiny_dataset)[:2]
    shutil.rmtree(out / first.name)  # still to train
    seed = reproduce.run_dir(out, second.name, 1)
    if not stacked:  # a lone run of the cell's own command
        (out / second.name / rundir.STACK).unlink()
    for name in (rundir.CHECKPOINT, rundir.EVAL):
        (seed / name).unlink()
    delete = seed.parent if stacked else seed
    with pytest.raises(ValueError, match=re.escape(
            f"{seed} holds an unfinished run without its checkpoint.pt, which cannot continue; delete {delete} ")):
        reproduce.run_table(TABLE, out, OPTIONS, cells=[first, second], progress=False, log=lambda line: None)
    assert not (out / first.name).exists()  # nothing trained


@pytest.mark.slow
def test_a_cell_whose_seeds_ran_on_several_devices_lists_them(finished: tuple[Path, list[str]],
                                                              tiny_dataset: str, tmp_path: Path) -> None:
    reference, _ = finished
    out = tmp_path / "grid"
    shutil.copytree(reference, out)
    cell = tiny_grid(tiny_dataset)[0]
    path = reproduce.run_dir(out, cell.name, 0) / rundir.CONFIG
    rundir.write_json(path, {**rundir.read_json(path), "device": "cuda:0"})  # seed 0 trained on a GPU
    assert reproduce.collect(out, cell, 2, None).device == "cuda:0, cpu"


@pytest.mark.slow
def test_report_holds_our_numbers_beside_the_published_ones(finished: tuple[Path, list[str]]) -> None:
    out, _ = finished
    with (out / "report.csv").open() as file:
        table = {row["cell"]: row for row in csv.DictReader(file)}
    assert list(table) == ["mnist-l1-vae-k1", "mnist-l1-iwae-k50", "vae-k1-to-iwae-k50", "iwae-k50-to-vae-k1"]
    assert list(next(iter(table.values()))) == list(reproduce.COLUMNS)
    for cell in list(table)[:3]:
        row = table[cell]
        nll = [rundir.read_json(reproduce.run_dir(out, cell, s) / rundir.EVAL)["nll"] for s in (0, 1)]
        published = PUBLISHED[TABLE][cell].nll
        assert float(row["nll_mean"]) == pytest.approx(statistics.fmean(nll), abs=0.006)
        assert float(row["nll_sd"]) == pytest.approx(statistics.stdev(nll), abs=0.006)
        assert row["nll_per_seed"] == " ".join(f"{v:.2f}" for v in nll)
        assert float(row["published_nll"]) == published
        assert float(row["difference"]) == pytest.approx(statistics.fmean(nll) - published, abs=0.006)
        assert row["published_active_units"] == PUBLISHED[TABLE][cell].active_units
        assert len(row["active_units"].split()) == 2 and row["status"] == "done" and row["device"] == "cpu"
        assert float(row["steps_per_s"]) > 0 and row["budget"] == "0.001"
        assert row["command"].startswith("for s in 0 1; do iwae train --out ")
    assert table["vae-k1-to-iwae-k50"]["epochs"] == "2" and "--init-from" in table["vae-k1-to-iwae-k50"]["command"]
    missing = table["iwae-k50-to-vae-k1"]
    assert missing["status"].startswith("data missing: /nonexistent/absent.npz")
    assert missing["nll_mean"] == "" and missing["difference"] == "" and missing["published_nll"] == "86.02"

    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# Burda et al. 2016, table 2") and "REDUCED BUDGET 0.001" in markdown.splitlines()[0]
    assert (f"Made by `iwae reproduce {TABLE} --out {os.path.relpath(out)} --budget 0.001 --seeds 2 --eval-k 10 "
            "--device cpu`") in markdown
    assert f"--out {out}" not in markdown  # paths relative to where the command ran
    body = table_rows(markdown)[1:]
    assert len(body) == 4 and all("0.001" in cells for cells in body)  # the budget stated in every row
    assert "## Missing" in markdown and "- /nonexistent/absent.npz: " in markdown
    assert markdown.count("/nonexistent/absent.npz: ") == 1  # the reason is said once, not in every row
    assert (out / "curves.png").stat().st_size > 1000


def test_a_reports_command_runs_in_the_mode_its_seeds_ran(finished: tuple[Path, list[str]]) -> None:
    # stacked seeds decide compilation on their steps together, and time their matmul path: a lone run of the
    # command would decide both for itself, and differ from the cell's numbers by rounding that training amplifies
    out, _ = finished
    with (out / "report.csv").open() as file:
        table = {row["cell"]: row for row in csv.DictReader(file)}
    for cell in list(table)[:3]:
        words = shlex.split(table[cell]["command"].split("; do ")[1].split("; done")[0].replace("$s", "0"))
        args = cli.build_parser().parse_args(words[1:])
        for seed in (0, 1):
            recorded = rundir.read_config(reproduce.run_dir(out, cell, seed))
            assert (args.compile, args.matmul) == (recorded["compile"], recorded["matmul"])


@pytest.mark.slow
def test_continued_run_starts_from_the_base_runs_parameters(finished: tuple[Path, list[str]], tiny_dataset: str,
                                                            tmp_path: Path) -> None:
    out, _ = finished
    base = reproduce.run_dir(out, "mnist-l1-vae-k1", 0)
    config = train_config.TrainConfig(dataset=tiny_dataset, epochs=1, lr=1e-30, batch_size=8, k=1, objective="elbo",
                               estimator="standard", eval_k=0, monitor_examples=8, device="cpu", init_from=str(base))
    lone_run.train(config, tmp_path / "run", progress=False)
    start, end = checkpoint.load(base)["model"], checkpoint.load(tmp_path / "run")["model"]
    assert all(torch.equal(start[name], end[name]) for name in start)  # a step of 1e-30 changes nothing


@pytest.mark.parametrize(("argv", "message"), [
    (["reproduce", "burda-table9"], "unknown table 'burda-table9'; choose one of burda-table1"),
    (["reproduce", "dreg", "--budget", "0"], "--budget must be a positive fraction"),
    (["reproduce", "dreg", "--budget", "-0.5"], "--budget must be a positive fraction"),
    (["reproduce", "dreg", "--budget", "nan"], "--budget must be a positive fraction"),
    (["reproduce", "dreg", "--budget", "1e308"], "--budget must be a positive fraction"),
    (["reproduce", "dreg", "--seeds", "0"], "--seeds must be a positive number"),
    (["reproduce", "dreg", "--eval-k", "0"], "--eval-k must be a positive number"),
    (["reproduce", "dreg", "--device", "tpu"], "unknown device 'tpu'; choose cpu, cuda or auto"),
    (["reproduce", "dreg", "--cells", "dreg-k5", "iwae-k5"], "--cells: dreg has no cell 'iwae-k5'; its cells are "
                                                             "standard-k1, standard-k5"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv: list[str], message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"iwae: error: {message}") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.slow
def test_finished_cells_are_reported_without_their_data(finished: tuple[Path, list[str]], tiny_dataset: str,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "grid"
    shutil.copytree(finished[0], out)
    looked_for: list[str] = []

    def gone(name: str, *args: object, **kwargs: object) -> None:
        looked_for.append(name)
        raise reproduce.data.DataError(f"{name} is gone")

    monkeypatch.setattr(reproduce.data, "load", gone)  # no dataset can be read, nor downloaded
    log: list[str] = []
    reproduce.run_table(TABLE, out, OPTIONS, cells=tiny_grid(tiny_dataset), progress=False, log=log.append)
    assert looked_for == ["/nonexistent/absent.npz"]  # the only cell still to train
    assert log[:3] == [f"{cell}: skipped (2 seeds stacked)" for cell in
                       ("mnist-l1-vae-k1", "mnist-l1-iwae-k50", "vae-k1-to-iwae-k50")]
    with (out / "report.csv").open() as file:
        status = {row["cell"]: row["status"] for row in csv.DictReader(file)}
    assert list(status.values())[:3] == ["done"] * 3
    assert status["iwae-k50-to-vae-k1"].startswith("data missing")
    assert "- /nonexistent/absent.npz: /nonexistent/absent.npz is gone" in (out / "report.md").read_text()


def test_a_table_of_which_no_cell_has_its_data_fails_and_says_so(tmp_path: Path) -> None:
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "IWAE_DATA_DIR"}, "OMP_NUM_THREADS": "1",
           "IWAE_DATA_URL": (tmp_path / "no-mirror").as_uri()}  # no download from the network
    done = subprocess.run([sys.executable, "-m", "iwae.cli", "reproduce", "dreg", "--cells", "dreg-k5", "--budget",
                           "0.001", "--data-dir", str(empty), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert messages(done.stderr)[:-1] == ["iwae: dreg-k5: skipped, data missing"]
    assert messages(done.stderr)[-1].startswith(
        "iwae: error: no cell of dreg was trained, the data of every one missing (the report out/report.md lists "
        f"them): mnist: Downloading {(tmp_path / 'no-mirror').as_uri()}/mnist/train-images-idx3-ubyte.gz failed")
    assert "Traceback" not in done.stderr
    assert "## Missing" in (out / "report.md").read_text()


@pytest.mark.parametrize("epochs", [2, 36, 3280])
@pytest.mark.parametrize("cells", [1, 12])
def test_curves_have_room_for_their_ticks(epochs: int, cells: int, tmp_path: Path,
                                          saved_figures: list[Figure]) -> None:
    curve = [(epoch, -100 + epoch / epochs) for epoch in range(1, epochs + 1)]
    results = [reproduce.CellResult(f"cell-{i}", [0], [], [], None, "", 0.0, None, {0: curve}, None)
               for i in range(cells)]
    path = reproduce.plot_curves(tmp_path / "curves.png", "a heading that is longer than one panel is wide", results)
    (fig,) = saved_figures
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            assert len(tick_label_boxes(axis)) >= 2
            assert not overlapping(tick_label_boxes(axis))
    with Image.open(path) as png:
        assert png.size[0] >= 576 and png.size[1] >= 324  # a lone cell's too: 6.4 x 3.6 in at 90 dpi


def test_every_table_has_a_grid_with_published_values_for_its_cells() -> None:
    for table, grid in reproduce.GRIDS.items():
        cells = grid()
        names = [cell.name for cell in cells]
        assert len(set(names)) == len(names)
        with_paper = [name for name in names if name in PUBLISHED[table]]
        assert set(PUBLISHED[table]) <= set(names), table
        assert with_paper, table
        for cell in cells:  # every cell is a valid configuration at a reduced budget
            reproduce.cell_config(cell, 0, Options(budget=0.01), Path("out"))
    assert len(reproduce.GRIDS["burda-table1"]()) == 24 and len(reproduce.GRIDS["dreg"]()) == 9


def test_cells_selects_part_of_a_table_with_the_cells_they_continue() -> None:
    assert reproduce.select("burda-table1", None) == reproduce.GRIDS["burda-table1"]()
    picked = reproduce.select("burda-table1", ("mnist-l1-iwae-k50", "mnist-l1-vae-k1"))
    assert [cell.name for cell in picked] == ["mnist-l1-vae-k1", "mnist-l1-iwae-k50"]  # in the table's order
    continued = reproduce.select("burda-table2", ("iwae-k50-to-vae-k1",))
    assert [cell.name for cell in continued] == ["mnist-l1-iwae-k50", "iwae-k50-to-vae-k1"]


@pytest.mark.slow
def test_a_report_of_some_cells_says_how_it_was_made(tiny_dataset: str, tmp_path: Path) -> None:
    cells = tiny_grid(tiny_dataset)[:2]
    options = replace(OPTIONS, seeds=1, cells=("mnist-l1-iwae-k50",))
    paths = reproduce.run_table(TABLE, tmp_path, options, cells=cells[1:], progress=False, log=lambda line: None)
    report = paths["md"].read_text()
    assert "--cells mnist-l1-iwae-k50`" in report
    assert "| mnist-l1-iwae-k50 |" in report and "mnist-l1-vae-k1" not in report


def _traceable_numbers(out: Path, cell: str, seeds: int) -> set[str]:
    """Every number a report row of ``cell`` may show, computed here from the runs' own files (eval.json,
    config.json, metrics.jsonl) and the published table, independently of the report's code."""
    evals = [rundir.read_json(reproduce.run_dir(out, cell, s) / rundir.EVAL) for s in range(seeds)]
    configs = [rundir.read_json(reproduce.run_dir(out, cell, s) / rundir.CONFIG) for s in range(seeds)]
    metrics = [rundir.read_metrics(reproduce.run_dir(out, cell, s)) for s in range(seeds)]
    nll = [e["nll"] for e in evals]
    paper = PUBLISHED[TABLE][cell]
    numbers = {f"{v:.2f}" for v in nll} | {f"{statistics.fmean(nll):.2f}", f"{statistics.stdev(nll):.2f}"}
    numbers |= {f"{paper.nll:.2f}", f"{statistics.fmean(nll) - paper.nll:.2f}"}
    numbers |= {str(units) for e in evals for units in e["active_units"]}
    numbers |= set(re.findall(r"\d+", paper.active_units or ""))
    numbers |= {str(c["epochs"]) for c in configs} | {f"{c['schedule_scale']:g}" for c in configs}
    numbers.add(f"{OPTIONS.budget:g}")  # a continued cell's budget is the --budget of the Made-by line
    numbers.add(f"{sum(m[-1]['wall_time_s'] / m[-1].get('stacked_seeds', 1) for m in metrics):.0f}")
    rates = [statistics.median(r["examples_per_s"] for r in m) / c["batch_size"]
             for m, c in zip(metrics, configs, strict=True)]
    numbers.add(f"{statistics.fmean(rates):.1f}")
    return numbers


def table_rows(markdown: str) -> list[list[str]]:
    """The cells (stripped) of a report's table rows, its header first, the separator row left out."""
    return [[part.strip() for part in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| ") and "---" not in line]


@pytest.mark.slow
def test_every_number_in_a_report_is_traceable_to_a_run_file(finished: tuple[Path, list[str]]) -> None:
    out, _ = finished
    markdown = (out / "report.md").read_text()
    checked = 0
    for cell, *values, _status in table_rows(markdown)[1:]:
        if "data missing" in _status:
            continue
        allowed = _traceable_numbers(out, cell, OPTIONS.seeds)
        for value in values:
            for number in re.findall(r"-?\d+(?:\.\d+)?", value):
                assert number in allowed, f"{cell}: {number} (in {value!r}) comes from no run file"
                checked += 1
    assert checked >= 3 * 10  # three cells with runs, each with its NLLs, AUs, published value and protocol


def test_steps_per_s_is_the_median_epochs_so_a_paused_epoch_does_not_lower_it(tmp_path: Path) -> None:
    cell = Cell("mnist-l1-vae-k1", {**reproduce.BASE, "objective": "elbo", "k": 1})
    epochs = [(1, 900.0, 60.0), (2, 1000.0, 50.0), (3, 20.0, 2500.0), (4, 1100.0, 45.0)]  # epoch 3 was stopped
    for seed, scale in ((0, 1.0), (1, 2.0)):
        path = reproduce.run_dir(tmp_path, cell.name, seed)
        path.mkdir(parents=True)
        rundir.write_json(path / rundir.CONFIG, {"epochs": 4, "device": "cpu", "batch_size": 20})
        for epoch, rate, seconds in epochs:
            rundir.append_metrics(path, {"epoch": epoch, "lr": 1e-3, "train_bound": -90.0, "test_bound": -90.0,
                                         "examples_per_s": rate * scale, "epoch_time_s": seconds,
                                         "wall_time_s": 10.0 * epoch})
    result = reproduce.collect(tmp_path, cell, seeds=2, missing=None)
    # seed 0: median of 20, 900, 1000, 1100 examples/s is 950, 47.5 steps of 20; seed 1: 95 steps/s
    assert result.steps_per_s == pytest.approx((47.5 + 95.0) / 2)


def test_the_title_states_a_budget_other_than_the_papers() -> None:
    assert reproduce.title("burda-table1", reproduce.Options(budget=1)) == reproduce.TITLES["burda-table1"]
    assert reproduce.title("burda-table1", reproduce.Options(budget=0.001)).endswith(
        " — REDUCED BUDGET 0.001 of the paper's schedule (9 of 3280 epochs)")
    assert reproduce.title("burda-table1", reproduce.Options(budget=2)).endswith(
        " — BUDGET 2 of the paper's schedule (6560 of 3280 epochs)")


@pytest.mark.parametrize("budget", [0.0012345678, 1 / 3, 0.001, 1, 2.5])
def test_a_reports_command_gives_its_budget_exactly(budget: float, tmp_path: Path) -> None:
    options = reproduce.Options(budget=budget)
    markdown = reproduce.render_markdown("dreg", tmp_path, options, [], {})
    given = re.search(r"--budget (\S+) ", markdown).group(1)
    assert float(given) == budget and given == reproduce.budget_text(budget)
    assert reproduce.budget_text(0.001) == "0.001" and reproduce.budget_text(1) == "1"


@pytest.mark.parametrize(("options", "message"), [
    (reproduce.Options(budget=True), "--budget must be a positive fraction"),
    (reproduce.Options(seeds=True), "--seeds must be a positive number"),
    (reproduce.Options(eval_k=True), "--eval-k must be a positive number"),
    (reproduce.Options(cells="standard-k1"), "cells must be a tuple of cell names"),  # type: ignore[arg-type]
])
def test_options_of_the_wrong_type_are_refused(options: reproduce.Options, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        reproduce.check("dreg", options)


def test_numpy_numbers_are_taken_as_pythons() -> None:
    options = reproduce.Options(budget=np.float64(0.01), seeds=np.int64(2), eval_k=np.int32(10), threads=np.int8(1))
    assert options == reproduce.Options(budget=0.01, seeds=2, eval_k=10, threads=1)
    assert [type(value) for value in (options.budget, options.seeds, options.eval_k, options.threads)] == [
        float, int, int, int]
    reproduce.check("dreg", reproduce.Options(budget=np.float32(0.5)))
    assert reproduce.Options(budget=np.float32(0.01)).budget == 0.01  # the number written, not float32's nearest


@pytest.mark.parametrize("budget", [0.0003, 0.01])
def test_a_continued_cells_command_names_its_epochs_however_few(budget: float, tmp_path: Path) -> None:
    (cell,) = [cell for cell in reproduce.GRIDS["burda-table2"]() if cell.init_from is not None][:1]
    options = reproduce.Options(budget=budget)
    config = reproduce.cell_config(cell, 0, options, tmp_path)
    line = reproduce.command("burda-table2", cell, config, tmp_path, 1)
    assert f" --epochs {config.epochs} " in line and config.epochs == max(1, round(2187 * budget))


@pytest.mark.parametrize("table", ["burda-table1", "burda-table2", "burda-table3"])
def test_burdas_cells_train_under_the_papers_protocol(table: str) -> None:
    """At budget 1 every cell of Burda et al.'s tables trains as section 5 says: 3280 epochs of the staged schedule
    (a continued run 3^7 epochs at 1e-4), Adam (0.9, 0.999, 1e-4), minibatches of 20, the standard estimator,
    evaluated with k = 5000 on the paper's split."""
    datasets = {"burda-table1": {"mnist", "omniglot"}, "burda-table2": {"mnist"}, "burda-table3": {"binarized-mnist"}}
    for cell in reproduce.GRIDS[table]():
        config = reproduce.cell_config(cell, 3, Options(), Path("out"))
        assert (config.estimator, config.batch_size, config.beta1, config.beta2, config.adam_eps, config.eval_k,
                config.data_split, config.seed, config.model) == (
            "standard", 20, 0.9, 0.999, 1e-4, 5000, "paper", 3, "burda")
        assert config.dataset in datasets[table]
        if cell.init_from is None:
            assert (config.schedule, config.schedule_scale, config.epochs) == ("burda", 1.0, 3280)
            name = {"elbo": "vae", "iwae": "iwae"}[config.objective]
            assert cell.name == f"{config.dataset}-l{config.layers}-{name}-k{config.k}"
        else:
            assert (config.schedule, config.lr, config.epochs) == ("constant", 1e-4, 3**7)
            assert config.init_from == str(Path("out") / cell.init_from / "seed-3")


def test_summary_is_the_mean_and_sample_sd_of_the_finished_seeds() -> None:
    # a skewed spread: the mean (82) is not the median (81); an unfinished seed (None) counts for neither
    assert reproduce.summary([80.0, 81.0, None, 85.0]) == (82.0, pytest.approx(7.0**0.5, rel=1e-12))
    assert reproduce.summary([84.5, None]) == (84.5, None)  # one finished seed: no spread
    assert reproduce.summary([None, None]) == (None, None)


def test_a_row_gives_the_published_sd_where_one_was_published_and_the_commands_eval_k(tmp_path: Path) -> None:
    options = Options(budget=0.01, seeds=2, eval_k=7)
    for table, cell, sd in (("rainforth-table1", "iwae", "0.02"), ("rainforth-table1", "vae", "0.19"),
                            (TABLE, "mnist-l1-iwae-k50", "")):
        (row,), _ = reproduce.rows(table, tmp_path, reproduce.select(table, (cell,))[-1:], options, {})
        assert (row["cell"], row["published_nll"], row["published_sd"]) == (
            cell, f"{PUBLISHED[table][cell].nll:.2f}", sd)
        assert row["eval_k"] == "7" and row["status"] == "0 of 2 seeds done"


@pytest.mark.slow
def test_report_md_columns_hold_the_csv_rows_values_and_the_published_ones(finished: tuple[Path, list[str]]) -> None:
    out, _ = finished
    with (out / "report.csv").open() as file:
        table = {row["cell"]: row for row in csv.DictReader(file)}
    markdown = (out / "report.md").read_text()
    header, *body = table_rows(markdown)
    assert header == ["cell", "NLL", "per seed", "AU", "published", "diff", "published AU", "epochs", "budget",
                      "device", "wall s", "steps/s", "status"]
    assert [cells[0] for cells in body] == list(table)
    for cells in body:
        shown, row, paper = dict(zip(header, cells, strict=True)), table[cells[0]], PUBLISHED[TABLE][cells[0]]
        assert shown["NLL"] == (f"{row['nll_mean']} +- {row['nll_sd']}" if row["nll_mean"] else "-")
        assert (shown["per seed"], shown["AU"]) == (row["nll_per_seed"], row["active_units"])
        assert shown["published"] == f"{paper.nll:.2f}" and shown["published AU"] == paper.active_units
        assert shown["diff"] == (row["difference"] or "-")
        assert (shown["epochs"], shown["budget"], shown["status"]) == (row["epochs"], row["budget"], row["status"])
        assert (shown["device"], shown["wall s"]) == (row["device"] or "-", row["wall_time_s"])
    assert [table[cells[0]]["status"] for cells in body].count("done") == 3  # rows with numbers of both seeds


@pytest.mark.slow
def test_the_curves_are_the_test_bound_of_each_seeds_epochs(finished: tuple[Path, list[str]],
                                                            tiny_dataset: str) -> None:
    out, _ = finished
    cell = tiny_grid(tiny_dataset)[1]
    result = reproduce.collect(out, cell, OPTIONS.seeds, None)
    for seed in range(OPTIONS.seeds):
        metrics = rundir.read_metrics(reproduce.run_dir(out, cell.name, seed))
        assert result.curves[seed] == [(m["epoch"], m["test_bound"]) for m in metrics]
        assert any(m["test_bound"] != m["train_bound"] for m in metrics)  # the other bound would not pass


@pytest.mark.slow
def test_a_cell_with_a_seed_left_to_finish_is_neither_finished_nor_done(
    finished: tuple[Path, list[str]], tiny_dataset: str, tmp_path: Path,
) -> None:
    out = tmp_path / "grid"
    shutil.copytree(finished[0], out)
    first, second = tiny_grid(tiny_dataset)[:2]
    assert reproduce.cell_finished(out, second, OPTIONS)
    shutil.rmtree(reproduce.run_dir(out, second.name, 1))  # seed 0 finished, seed 1 not started
    assert not reproduce.cell_finished(out, second, OPTIONS)
    table_rows, _ = reproduce.rows(TABLE, out, [first, second], OPTIONS, {})
    assert [row["status"] for row in table_rows] == ["done", "1 of 2 seeds done"]
    # the data of both cells' dataset missing: the finished cell's row is still that of its run files
    table_rows, _ = reproduce.rows(TABLE, out, [first, second], OPTIONS, {tiny_dataset: "gone"})
    assert [row["status"] for row in table_rows] == ["done", f"data missing: {tiny_dataset} (see Missing)"]
    assert table_rows[1]["nll_per_seed"].endswith(" -")
