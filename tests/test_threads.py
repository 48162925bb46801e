"""The thread count: the CPUs a process may use (affinity, cgroup quota) less those other processes keep busy."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iwae.platform import threads
from iwae.settings import SettingError


def _cgroup(tmp_path: Path, line: str, files: dict[str, str]) -> tuple[Path, Path]:
    own = tmp_path / "cgroup"
    own.write_text(line + "\n")
    root = tmp_path / "fs"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return own, root


@pytest.mark.parametrize(("line", "files", "quota"), [
    ("0::/job", {"job/cpu.max": "150000 100000\n"}, 1.5),
    ("0::/job", {"job/cpu.max": "max 100000\n"}, None),
    ("0::/job/task", {"job/cpu.max": "200000 100000\n", "job/task/cpu.max": "max 100000\n"}, 2.0),  # a parent's
    ("0::/job/task", {"cpu.max": "100000 100000\n", "job/task/cpu.max": "300000 100000\n"}, 1.0),  # the smallest
    ("4:cpu,cpuacct:/job", {"cpu,cpuacct/job/cpu.cfs_quota_us": "300000\n",
                            "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"}, 3.0),
    ("4:cpu,cpuacct:/job", {"cpu,cpuacct/job/cpu.cfs_quota_us": "-1\n",
                            "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"}, None),
    ("4:memory:/job", {}, None),
])
def test_the_cgroup_quota_is_read_in_cpus(tmp_path: Path, line: str, files: dict[str, str],
                                          quota: float | None) -> None:
    own, root = _cgroup(tmp_path, line, files)
    assert threads.cgroup_quota(own, root) == quota


def test_a_quota_caps_the_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "affinity", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 2.5)
    assert threads.usable_cpus() == 2
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 0.5)
    assert threads.usable_cpus() == 1
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    assert threads.usable_cpus() == 4


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.LOCAL_RANKS, raising=False)
    monkeypatch.setattr(threads, "affinity", lambda: {0, 1})
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    return monkeypatch


@pytest.mark.parametrize(("busy", "expected"), [(0.05, 2), (0.4, 2), (0.6, 1), (0.97, 1), (1.6, 1), (2.0, 1)])
def test_one_thread_per_free_cpu(two_cpus: pytest.MonkeyPatch, busy: float, expected: int) -> None:
    two_cpus.setattr(threads, "busy_cpus", lambda cpus, seconds=0.0: busy)
    choice = threads.choose()
    assert choice.threads == expected
    assert choice.line() == f"{expected} torch thread{'s' if expected > 1 else ''}: {expected} of 2 CPUs free"


def test_a_quota_below_the_free_cpus_caps_the_count(two_cpus: pytest.MonkeyPatch) -> None:
    two_cpus.setattr(threads, "cgroup_quota", lambda: 1.5)
    two_cpus.setattr(threads, "busy_cpus", lambda cpus, seconds=0.0: 0.0)
    assert threads.choose() == threads.ThreadChoice(1, "1 of 1 CPUs free", from_free_cpus=True)


def test_torchrun_ranks_share_the_free_cpus(two_cpus: pytest.MonkeyPatch) -> None:
    two_cpus.setattr(threads, "affinity", lambda: {0, 1, 2, 3})
    two_cpus.setattr(threads, "busy_cpus", lambda cpus, seconds=0.0: 0.0)
    two_cpus.setenv(threads.LOCAL_RANKS, "2")
    assert threads.choose() == threads.ThreadChoice(2, "4 of 4 CPUs free, shared by 2 ranks")
    two_cpus.setenv(threads.LOCAL_RANKS, "8")
    assert threads.choose().threads == 1


def test_omp_num_threads_wins_over_the_machine(two_cpus: pytest.MonkeyPatch) -> None:
    two_cpus.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose() == threads.ThreadChoice(3, "set by OMP_NUM_THREADS")


def test_busy_cpus_reads_proc_stat_deltas(monkeypatch: pytest.MonkeyPatch) -> None:
    samples = iter([(1.0, 4.0), (1.5, 6.0)])  # 0.5 busy of 2 CPU-seconds on 2 CPUs: half a CPU busy
    monkeypatch.setattr(threads, "_cpu_times", lambda cpus: next(samples))
    monkeypatch.setattr(time, "process_time", lambda: 0.0)
    assert threads.busy_cpus({0, 1}, seconds=0.0) == pytest.approx(0.5)


def test_busy_cpus_does_not_count_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    samples = iter([(1.0, 4.0), (1.5, 6.0)])
    own = iter([10.0, 10.4])  # this process spent 0.4 of the 0.5 busy CPU-seconds
    monkeypatch.setattr(threads, "_cpu_times", lambda cpus: next(samples))
    monkeypatch.setattr(time, "process_time", lambda: next(own))
    assert threads.busy_cpus({0, 1}, seconds=0.0) == pytest.approx(0.1)


def test_busy_cpus_on_this_machine_is_within_its_cpus() -> None:
    cpus = threads.affinity()
    assert 0.0 <= threads.busy_cpus(cpus, seconds=0.05) <= len(cpus)


def test_a_busy_thread_elsewhere_is_seen() -> None:
    """A process spinning on one CPU counts as about one busy CPU (a loaded machine sees more)."""
    cpus = threads.affinity()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert threads.busy_cpus(cpus, seconds=0.5) >= 0.8
    finally:
        spinner.kill()
        spinner.wait()


def test_use_threads_sets_torch_and_says_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_used", [])
    monkeypatch.setattr(threads, "_chosen", [])
    monkeypatch.setattr(threads, "choose", lambda: threads.ThreadChoice(1, "1 of 2 CPUs free"))
    said: list[str] = []
    before = torch.get_num_threads()
    try:
        assert threads.use_threads(say=said.append) == 1
        assert torch.get_num_threads() == 1
        assert threads.use_threads(say=said.append) == 1  # the process's choice holds, unsaid
        assert threads.use_threads(1, "the run's own count", say=said.append) == 1
        assert threads.use_threads(2, say=said.append) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert said == ["1 torch thread: 1 of 2 CPUs free", "2 torch threads: set by --threads"]


def test_more_threads_than_usable_cpus_are_used_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_used", [])
    monkeypatch.setattr(threads, "_chosen", [])
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    said: list[str] = []
    before = torch.get_num_threads()
    try:
        assert threads.use_threads(3, say=said.append) == 3
        assert threads.use_run_threads(2, "the run's own count", say=said.append) == 2
        assert threads.use_run_threads(4, "the run's own count", say=said.append) == 4
    finally:
        torch.set_num_threads(before)
    assert said == ["3 torch threads: set by --threads; more than the 2 CPUs this process may use, so slower",
                    "2 torch threads: the run's own count",
                    "4 torch threads: the run's own count; more than the 2 CPUs this process may use, so slower"]


def paced_by_threads(seconds: dict[int, float]) -> object:
    """A workload that takes ``seconds[n]`` on n torch threads, and draws from the global generator."""
    def workload() -> None:
        torch.rand(3)
        time.sleep(seconds[torch.get_num_threads()])
    return workload


@pytest.mark.parametrize(("seconds", "expected"), [({2: 0.004, 1: 0.001}, 1), ({2: 0.001, 1: 0.004}, 2)])
def test_a_count_from_the_free_cpus_drops_to_one_where_the_step_runs_faster_on_one(
        monkeypatch: pytest.MonkeyPatch, seconds: dict[int, float], expected: int) -> None:
    monkeypatch.setattr(threads, "_used", [])
    monkeypatch.setattr(threads, "_chosen", [])
    monkeypatch.setattr(threads, "choose", lambda: threads.ThreadChoice(2, "2 of 2 CPUs free", from_free_cpus=True))
    said: list[str] = []
    before = torch.get_num_threads()
    try:
        torch.manual_seed(0)
        assert threads.fastest(paced_by_threads(seconds), say=said.append) == expected
        assert torch.get_num_threads() == expected
        # the global generator left as it was
        assert torch.equal(torch.rand(1), torch.rand(1, generator=torch.Generator().manual_seed(0)))
    finally:
        torch.set_num_threads(before)
    assert said[0] == "2 torch threads: 2 of 2 CPUs free"
    try:  # the process's own choice stays for what follows the run (its evaluation, another run)
        assert threads.use_threads(say=said.append) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    if expected == 1:
        assert said.pop() == "2 torch threads: 2 of 2 CPUs free"
        assert re.fullmatch(r"1 torch thread: 2 of 2 CPUs free, but this run's step is faster on 1 \(\S+ ms against "
                            r"\S+ ms on 2\)", said[1])
    assert len(said) == (2 if expected == 1 else 1)


@pytest.mark.parametrize("reason", ["set by --threads", "the run's own count"])
def test_a_count_the_user_set_is_never_timed(monkeypatch: pytest.MonkeyPatch, reason: str) -> None:
    monkeypatch.setattr(threads, "_used", [])
    monkeypatch.setattr(threads, "_chosen", [])
    before = torch.get_num_threads()
    try:
        threads.use_threads(2, reason, say=lambda line: None)
        timed: list[int] = []
        assert threads.fastest(lambda: timed.append(1)) == 2 and not timed
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("count", [0, -1, 1.5, True])
def test_use_threads_refuses_a_count_that_is_not_positive(count: object) -> None:
    with pytest.raises(SettingError, match="threads must be an integer >= 1"):
        threads.use_threads(count)  # type: ignore[arg-type]


def test_a_count_far_beyond_the_machines_cpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    for use in (threads.use_threads, lambda count: threads.use_run_threads(count, "the run's own count")):
        with pytest.raises(SettingError, match="threads 100000 is more than 8 per CPU of this machine's 2; give at "
                                               "most 16"):
            use(100_000)
    assert torch.get_num_threads() == before


def test_threads_set_after_torch_starts_take_effect() -> None:
    """torch.set_num_threads after torch has run parallel regions changes the OpenMP team that later ones use."""
    code = ("import torch\nx = torch.rand(2000, 2000)\nx @ x\ntorch.set_num_threads(1)\n"
            "print(torch.get_num_threads(), torch.__config__.parallel_info().count('omp_get_max_threads() : 1'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "", "OMP_NUM_THREADS": "2"}).stdout.split()
    assert out == ["1", "1"]


@pytest.mark.parametrize(("env", "expected"), [
    ({}, {"OMP_WAIT_POLICY": None, **threads.OPENMP_WAIT}),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None, "KMP_BLOCKTIME": None}),
    ({"GOMP_SPINCOUNT": "INFINITY"}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "INFINITY", "KMP_BLOCKTIME": None}),
])
def test_a_short_openmp_spin_is_set_before_torch_loads_unless_the_user_chose_a_wait(
        env: dict[str, str], expected: dict[str, str | None]) -> None:
    # the environment as it stands when torch starts to load, which is when OpenMP reads it
    code = """if True:
        import json, os, sys
        seen = {}
        class Watch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" and not seen:
                    seen.update({key: os.environ.get(key) for key in sys.argv[1:]})
        sys.meta_path.insert(0, Watch())
        import iwae
        print(json.dumps(seen))"""
    out = subprocess.run([sys.executable, "-c", code, *expected], capture_output=True, text=True, check=True,
                         env={"PATH": "", **env}).stdout
    assert json.loads(out) == expected


def _tiny_run(dataset: str, run: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", dataset, "--epochs", "1", "--batch-size", "8", "--k", "2", "--eval-k", "0",
            "--monitor-examples", "8", "--device", "cpu", "--no-compile", "--matmul", "default", "--out", str(run),
            *extra]


def test_a_run_records_its_threads_and_resumes_on_them(tiny_dataset: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from iwae.cli import main
    from iwae.runs import lone_run, rundir

    monkeypatch.setattr(threads, "_used", [])
    monkeypatch.setattr(threads, "_chosen", [])
    before = torch.get_num_threads()
    try:
        assert main(_tiny_run(tiny_dataset, tmp_path / "run", "--threads", "1")) == 0
        assert "iwae: 1 torch thread: set by --threads" in capsys.readouterr().err
        assert rundir.read_json(tmp_path / "run" / rundir.CONFIG)["threads"] == 1
        threads.use_threads(2)  # the process moved on; the run resumes on its own count, unless given another
        saved = lone_run.resumed_config(rundir.read_json(tmp_path / "run" / rundir.CONFIG), None, tmp_path / "run")
        assert lone_run.resumed_threads(saved, None) == 1 and torch.get_num_threads() == 1
        assert "iwae: 1 torch thread: the run's own count" in capsys.readouterr().err
        given = lone_run.resumed_config(rundir.read_json(tmp_path / "run" / rundir.CONFIG), {"threads": 2},
                                        tmp_path / "run")
        assert lone_run.resumed_threads(given, {"threads": 2}) == 2
        assert "iwae: 2 torch threads: set by --threads" in capsys.readouterr().err
        threads.use_threads(1)  # a grid's own count; a resumed cell's is its own, and the next cell's the grid's
        assert lone_run.resumed_threads(given, {"threads": 2}) == 2 and torch.get_num_threads() == 2
        assert threads.use_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_config_from_before_the_setting_loads_and_chooses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from iwae.runs import lone_run
    from iwae.training.config import TrainConfig, resumed_config

    saved = {k: v for k, v in TrainConfig(epochs=1).__dict__.items() if k != "threads"}
    config = resumed_config(saved, None, tmp_path)
    assert config.threads is None
    monkeypatch.setattr(threads, "_used", [])
    monkeypatch.setattr(threads, "_chosen", [])
    monkeypatch.setattr(threads, "choose", lambda: threads.ThreadChoice(1, "1 of 2 CPUs free"))
    before = torch.get_num_threads()
    try:
        assert lone_run.resumed_threads(config, None) == 1
    finally:
        torch.set_num_threads(before)


def test_reproduce_runs_every_cell_on_its_threads(tmp_path: Path) -> None:
    from iwae.runs import reproduce

    cell = reproduce.GRIDS["dreg"]()[0]
    config = reproduce.cell_config(cell, 0, reproduce.Options(budget=0.01, threads=1), tmp_path)
    assert config.threads == 1
    assert "--threads" not in reproduce.command("dreg", cell, config, tmp_path, 1)


def test_every_command_takes_threads() -> None:
    from iwae.cli import build_parser

    parser = build_parser()
    for argv in (["train", "--out", "x"], ["evaluate", "run"], ["sample", "run"], ["diagnose", "snr", "--toy",
                 "--out", "x"], ["reproduce", "dreg"]):
        assert parser.parse_args([*argv, "--threads", "3"]).threads == 3
