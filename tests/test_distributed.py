"""Several ranks on 127.0.0.1 with gloo (``iwae.platform.distributed``), launched as torchrun launches them (each
process
given RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT) or by torchrun itself: two ranks train to the parameters of
one process with the same global batch and seeds, evaluate to its very estimates, resume a run stopped by SIGTERM
to the launcher to the bit, spread a grid into the same report, end with one line when a rank dies or the ranks
cannot meet, and keep the gradient all-reduce inside the compiled step."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_cli import one_line_error as cli_error
from test_reproduce import TABLE, tiny_grid

from iwae import cli
from iwae.core.objectives import Objective
from iwae.eval import likelihood
from iwae.models import burda, sbn
from iwae.platform import distributed, gemm
from iwae.runs import checkpoint, evaluation, lone_run, reproduce, rundir, runlock
from iwae.runs.reproduce import Options
from iwae.training.config import TrainConfig
from iwae.training.step import TrainStep, make_adam

WAIT_S = 240  # a generous bound for one launch on a loaded machine; launches take seconds
TRAIN = ["--epochs", "3", "--batch-size", "8", "--k", "4", "--monitor-examples", "8", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


# ``python -m iwae`` on the default float32 matrix-multiply path: every process (and this one, ``default_matmul``)
# multiplies alike, where each would otherwise pick the path it measures to be faster
IWAE = [sys.executable, "-c", "import sys; from iwae import cli; from iwae.platform import gemm; "
        "gemm.choose = lambda workload: gemm.DEFAULT; sys.exit(cli.main())"]


@pytest.fixture(autouse=True, scope="module")
def default_matmul() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gemm, "choose", lambda workload: gemm.DEFAULT)
        patch.setattr(gemm, "_chosen", {})  # nothing an earlier test chose
        yield


@contextmanager
def one_thread() -> Iterator[None]:
    """This process computes on one thread, as the ranks do (``environment``: OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def start(command: list[str], **env: str) -> subprocess.Popen:
    """The command, its standard error kept in a file (a pipe could fill up and stall it)."""
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed with the process object)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True, env=environment(**env))
    process.log = log  # type: ignore[attr-defined]
    return process


def ranks(args: list[str], world: int = 2, only: list[int] | None = None, command: list[str] = IWAE,
          **extra: str) -> list[subprocess.Popen]:
    """``python -m iwae ARGS`` (or another command) as ranks ``only`` (default: all) of ``world``, each in the
    environment torchrun gives its ranks."""
    port = str(free_port())
    return [start([*command, *args], RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=port, **extra) for r in (range(world) if only is None else only)]


def torchrun(args: list[str]) -> subprocess.Popen:
    """``torchrun --nproc-per-node 2 -m iwae ARGS`` on 127.0.0.1."""
    return start([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                  "127.0.0.1", "--master-port", str(free_port()), "--no-python", *IWAE, *args])


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Each process's exit status and standard error, once all have ended."""
    results = []
    for process in processes:
        status = process.wait(WAIT_S)
        process.log.seek(0)  # type: ignore[attr-defined]
        results.append((status, process.log.read()))  # type: ignore[attr-defined]
    return results


def succeed(processes: list[subprocess.Popen]) -> None:
    for status, stderr in finish(processes):
        assert status == 0, stderr[-3000:]


def assert_parameters(a: Path, b: Path, *, exact: bool) -> None:
    """The runs in a and b reached the same position with the same parameters, Adam moments and generator states:
    bit for bit, or within float rounding (gradients summed over the ranks in another order; after a few dozen
    Adam steps of size ~1e-3 the rounding of float32 sums stays below 1e-5)."""
    first, second = checkpoint.load(a), checkpoint.load(b)
    assert (first["epoch"], first["step"]) == (second["epoch"], second["step"])
    close = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-5}
    for name, tensor in first["model"].items():
        torch.testing.assert_close(tensor, second["model"][name], **close, msg=name)
    for index, moments in first["optimizer"]["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(value, second["optimizer"]["state"][index][key], **close)
    for key in ("cpu", "data"):
        assert torch.equal(first["rng"][key], second["rng"][key]), key  # the ranks draw what one process draws
    torch.testing.assert_close(torch.as_tensor(first["bound_sum"]), torch.as_tensor(second["bound_sum"]),
                               rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def two_ranks(tiny_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same run trained by two ranks (torchrun's environment) and by this process."""
    root = tmp_path_factory.mktemp("distributed")
    succeed(ranks(["train", "--out", str(root / "two"), "--dataset", tiny_dataset, "--eval-k", "0", *TRAIN]))
    config = TrainConfig(dataset=tiny_dataset, epochs=3, batch_size=8, k=4, monitor_examples=8, eval_k=0,
                         device="cpu")
    lone_run.train(config, root / "one", progress=False)
    return root / "two", root / "one"


@pytest.mark.slow
def test_two_ranks_train_to_the_parameters_of_one_process(two_ranks: tuple[Path, Path]) -> None:
    two, one = two_ranks
    assert_parameters(two, one, exact=False)
    configs = [rundir.read_json(path / rundir.CONFIG) for path in (two, one)]
    # each rank records its own thread count (the ranks share the machine's CPUs), the rest is one configuration
    without_threads = [{key: value for key, value in c.items() if key != "threads"} for c in configs]
    assert without_threads[0] == without_threads[1]
    metrics = [rundir.read_metrics(path) for path in (two, one)]
    assert [m["epoch"] for m in metrics[0]] == [1, 2, 3]  # rank 0 alone wrote them, once each
    for record, single in zip(*metrics, strict=True):
        assert record["train_bound"] == pytest.approx(single["train_bound"], rel=1e-6)  # summed over the ranks
        assert record["test_bound"] == pytest.approx(single["test_bound"], rel=1e-5)


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process(two_ranks: tuple[Path, Path]) -> None:
    """16 test examples in batches of 3: rank 0 takes batches 0-2, rank 1 batches 3-5 (the last one padded); the
    per-example estimates, hence every number of the result, are those of one process."""
    two, _ = two_ranks
    settings = {"k": 12, "batch_size": 3, "chunk_size": 6, "seed": 4}
    succeed(ranks(["evaluate", str(two), *(f"--{key.replace('_', '-')}={value}" for key, value in settings.items()),
                   "--device", "cpu"]))
    path = evaluation.eval_path(two, k=12, seed=4)
    sharded = rundir.read_json(path)
    path.unlink()
    single = evaluation.evaluate_run(two, device="cpu", **settings)
    for key in ("nll", "nll_se", "bounds", "bounds_se", "ess", "active_units", "examples"):
        assert sharded[key] == single[key], key


def test_per_batch_streams_do_not_depend_on_the_other_batches() -> None:
    """What lets ranks evaluate their own batches: with a seed, a batch's estimates are the same evaluated alone."""
    torch.manual_seed(0)
    model, x = burda(1, 6), torch.rand(7, 6).bernoulli()
    whole = likelihood.importance_statistics(model, x, 10, batch_size=2, seed=3)
    for first in (0, 2, 3):
        part = likelihood.importance_statistics(model, x[2 * first:], 10, batch_size=2, seed=3, first_batch=first)
        assert torch.equal(part.log_likelihood, whole.log_likelihood[2 * first:])
        assert torch.equal(part.ess, whole.ess[2 * first:])


def test_a_ranks_binary_latents_are_one_with_their_probability() -> None:
    """The binary latents a rank draws for its rows are Bernoulli(p): ones where q gives p near 1, zeros where it
    gives p near 0 (not the other way round), and log q of the draws is that of q's own distribution."""
    model = sbn([400], 6)
    with torch.no_grad():
        model.encoder[0].logits.weight.zero_()
        model.encoder[0].logits.bias.copy_(torch.cat([torch.full((200,), 6.0), torch.full((200,), -6.0)]))
    sharded = distributed.sharded_draws(model, slice(2, 4), 4)  # this rank's rows 2 and 3 of a batch of 4
    x = torch.zeros(2, 6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        q = sharded.encoder[0](x)
        z = q.sample((3,))
    assert z.shape == (3, 2, 400) and set(z.unique().tolist()) <= {0.0, 1.0}
    assert z[..., :200].mean() > 0.99 and z[..., 200:].mean() < 0.01  # sigmoid(6) = 0.9975
    torch.testing.assert_close(q.log_prob(z), model.encoder[0](x).log_prob(z))


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_to_torchrun_resumes_exactly(tiny_dataset: str, tmp_path: Path) -> None:
    """torchrun forwards SIGTERM to its ranks, which agree on the step to stop after, and rank 0 checkpoints; the
    run resumed by two ranks ends bit for bit where an uninterrupted two-rank run ends, and resumed by one process
    (a changed world size) within float rounding of it."""
    args = ["--dataset", tiny_dataset, "--eval-k", "0", *TRAIN, "--epochs", "40", "--checkpoint-every", "0"]
    whole = ranks(["train", "--out", str(tmp_path / "whole"), *args])
    stopped = torchrun(["train", "--out", str(tmp_path / "stopped"), *args])
    deadline = time.monotonic() + WAIT_S
    while len(rundir.read_metrics(tmp_path / "stopped")) < 2:
        assert stopped.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.05)
    stopped.send_signal(signal.SIGTERM)
    status, stderr = finish([stopped])[0]
    assert status != 0 and "training stopped by SIGTERM" in stderr and "iwae train --resume" in stderr
    state = checkpoint.load(tmp_path / "stopped")
    assert 2 <= state["epoch"] < 40
    shutil.copytree(tmp_path / "stopped", tmp_path / "alone")
    succeed(whole)
    succeed(ranks(["train", "--resume", str(tmp_path / "stopped")]))
    assert_parameters(tmp_path / "stopped", tmp_path / "whole", exact=True)
    assert [m["epoch"] for m in rundir.read_metrics(tmp_path / "stopped")] == list(range(1, 41))
    lone_run.resume(tmp_path / "alone", progress=False)
    assert_parameters(tmp_path / "alone", tmp_path / "whole", exact=False)


SLOW_STEPS = """
import os, signal, sys, time
from iwae import cli
from iwae.platform import gemm
from iwae.training import loop, step
gemm.choose = lambda workload: gemm.DEFAULT
loop.AGREE_S = 1.0
take, taken = step.TrainStep.__call__, []
def slow(self, x):
    time.sleep(0.2)
    take(self, x)
    taken.append(1)
    if len(taken) == {signal_at} and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
step.TrainStep.__call__ = slow
sys.exit(cli.main())
"""


def test_ranks_with_slow_steps_agree_on_a_signal_within_seconds(tiny_dataset: str, tmp_path: Path) -> None:
    """Where 16 steps take longer than ``loop.AGREE_S`` (here 1 s, steps of 0.2 s), the ranks agree on a signal
    more often: torchrun kills its ranks 30 s after forwarding a SIGTERM, which would lose every step since the
    last checkpoint."""
    args = ["train", "--out", str(tmp_path / "run"), "--dataset", tiny_dataset, "--epochs", "2", "--batch-size", "2",
            "--k", "2", "--eval-k", "0", "--monitor-examples", "8", "--device", "cpu", "--no-compile"]
    results = finish(ranks(args, command=[sys.executable, "-c", SLOW_STEPS.format(signal_at=3)]))
    assert all(status != 0 and "training stopped by SIGTERM" in stderr for status, stderr in results), results
    state = checkpoint.load(tmp_path / "run")
    assert state["epoch"] == 0 and 3 <= state["step"] <= 8  # not at step 16 of 32, the next report without it


GRID = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_reproduce import TABLE, tiny_grid
from iwae.platform import distributed, gemm
from iwae.runs import reproduce
gemm.choose = lambda workload: gemm.DEFAULT
with distributed.session("gloo"):
    options = reproduce.Options(budget=0.001, seeds=1, eval_k=10, device="cpu")
    reproduce.run_table(TABLE, Path({out!r}), options, cells=tiny_grid({data!r}), progress=False)
"""


GRID_OPTIONS = Options(budget=0.001, seeds=1, eval_k=10, device="cpu")
# rank 1 checks the grid's runs only once rank 0 has started its cell (up to 10 s), and rank 0 writes its first
# checkpoint 3 s late: a rank that started training before every rank had checked would leave rank 1 a run without
# its checkpoint
LATE_CHECK = """
import os, time
from iwae.runs import checkpoint
if os.environ["RANK"] == "1":
    check = reproduce.check_existing
    def late(*args, **kwargs):
        started = Path({out!r}) / "mnist-l1-iwae-k50" / "seed-0" / "config.json"
        deadline = time.monotonic() + 10
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return check(*args, **kwargs)
    reproduce.check_existing = late
else:
    save = checkpoint.save
    def slow(*args, **kwargs):
        time.sleep(3)
        checkpoint.save = save
        return save(*args, **kwargs)
    checkpoint.save = slow
"""


@pytest.mark.slow
def test_a_grid_spread_over_two_ranks_writes_the_report_of_one_process(tiny_dataset: str, tmp_path: Path) -> None:
    """Table 2's tiny grid: the base cells on ranks 0 and 1, then the continued cell; the report is the same but for
    the times and rates it measures."""
    script = tmp_path / "grid.py"
    script.write_text(GRID.format(tests=str(Path(__file__).parent), out=str(tmp_path / "two"), data=tiny_dataset))
    results = finish(ranks([], command=[sys.executable, str(script)]))
    assert all(status == 0 for status, _ in results), "\n".join(f"rank {r}: {status}\n{stderr}"
                                                             for r, (status, stderr) in enumerate(results))
    logs = [stderr for _, stderr in results]
    assert "mnist-l1-iwae-k50: trained (1 seed) on rank 0 of 2" in logs[0]
    assert "mnist-l1-vae-k1: trained (1 seed) on rank 1 of 2" in logs[1]
    with one_thread():  # as each rank runs: some CPUs' float sums depend on how many threads share them
        reproduce.run_table(TABLE, tmp_path / "one", GRID_OPTIONS, cells=tiny_grid(tiny_dataset), progress=False,
                            log=lambda line: None)
    measured = ("wall_time_s", "steps_per_s", "command")  # the command names the output directory

    def table(out: Path) -> list[dict[str, str]]:
        with (out / "report.csv").open() as file:
            return [{k: v for k, v in row.items() if k not in measured} for row in csv.DictReader(file)]

    assert table(tmp_path / "two") == table(tmp_path / "one")
    assert [row["status"] for row in table(tmp_path / "two")][:3] == ["done"] * 3
    for cell in tiny_grid(tiny_dataset)[:3]:
        assert_parameters(reproduce.run_dir(tmp_path / "two", cell.name, 0),
                          reproduce.run_dir(tmp_path / "one", cell.name, 0), exact=True)


@pytest.mark.slow
def test_no_rank_of_a_grid_trains_before_every_rank_has_checked_its_runs(tiny_dataset: str, tmp_path: Path) -> None:
    script = tmp_path / "grid.py"
    late = GRID.replace('with distributed.session("gloo"):', LATE_CHECK + 'with distributed.session("gloo"):')
    script.write_text(late.format(tests=str(Path(__file__).parent), out=str(tmp_path / "two"), data=tiny_dataset))
    results = finish(ranks([], command=[sys.executable, str(script)]))
    assert all(status == 0 for status, _ in results), "\n".join(f"rank {r}: {status}\n{stderr}"
                                                             for r, (status, stderr) in enumerate(results))


def one_line_error(status: int, stderr: str) -> str:
    assert status == 2, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("iwae: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_dead_rank_ends_the_other_with_one_line(tiny_dataset: str, tmp_path: Path) -> None:
    """Rank 1 killed mid-run: rank 0's next collective fails when the connection closes (or, at the latest, after
    the timeout: the bound that holds on a machine too loaded to notice the closed connection soon)."""
    processes = ranks(["train", "--out", str(tmp_path / "run"), "--dataset", tiny_dataset, "--eval-k", "0", *TRAIN,
                       "--epochs", "1000"], IWAE_DIST_TIMEOUT="30")
    deadline = time.monotonic() + WAIT_S
    while not rundir.read_metrics(tmp_path / "run"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes)
        time.sleep(0.05)
    processes[1].kill()
    line = one_line_error(*finish(processes)[0])  # within WAIT_S
    assert "rank 0 of 2: a collective failed" in line
    assert line.endswith(f"continue with: iwae train --resume {tmp_path / 'run'}, under torchrun"), line
    assert checkpoint.load(tmp_path / "run")["epoch"] >= 1  # the last checkpoint is kept


@pytest.mark.slow
def test_ranks_that_cannot_meet_end_with_one_line_after_the_timeout(tmp_path: Path) -> None:
    started = time.monotonic()
    line = one_line_error(*finish(ranks(["evaluate", str(tmp_path)], only=[0], IWAE_DIST_TIMEOUT="3"))[0])
    assert time.monotonic() - started < 60
    assert "rank 0 of 2 could not meet the other ranks at 127.0.0.1:" in line and "within 3 s" in line


def test_refusals(tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> None:
    """Without torchrun everything is rank 0 of 1; under it, the commands of one process are refused, and so is a
    global batch the ranks cannot share, before anything is written."""
    assert (distributed.rank(), distributed.world(), distributed.rows(7), distributed.shard(5)) == (0, 1, slice(0, 7),
                                                                                                   range(5))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in (["sample", str(tmp_path)], ["evaluate", str(tmp_path), "--method", "ais"],
                 ["train", "--out", str(tmp_path / "s"), "--seeds", "2", "--dataset", tiny_dataset]):
        assert "runs in one process, not under torchrun" in cli_error(capsys, argv)
    for argv in (["train", "--out", str(tmp_path / "g"), "--device", "cuda:1"], ["evaluate", str(tmp_path),
                                                                                 "--device", "cuda:0"]):
        assert (f"--device {argv[-1]} under torchrun: each rank runs on its own GPU, LOCAL_RANK; give --device cuda"
                in cli_error(capsys, argv))
    monkeypatch.setattr(distributed, "world", lambda: 2)
    with pytest.raises(distributed.DistributedError, match=r"global batch of 7 examples does not divide among 2 ranks; "
                                                           r"run on a number of ranks that divides it \(1, 7\)"):
        lone_run.train(TrainConfig(dataset=tiny_dataset, epochs=1, batch_size=7, device="cpu"), tmp_path / "odd")
    assert not (tmp_path / "odd").exists()
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.assign([3, 1, 2, 5]) == [0, 2]  # costs 5 and 3 to ranks 0 and 1, then 2 to 1, 1 to 0


def take_steps(compile: str | bool, path: Path) -> None:
    """Six Adam steps (IWAE with DReG) on global batches of 8, as this rank; rank 0 saves the result to ``path``."""
    gemm.fastest_fp32_matmul("cpu", gemm.DEFAULT)
    torch.manual_seed(0)
    model, x = burda(1, 12), torch.rand(6, 8, 12).bernoulli()
    adam = make_adam(model, 1e-2, (0.9, 0.999), 1e-4)
    rows = distributed.rows(8)
    step = TrainStep(distributed.sharded_draws(model, rows, 8), adam, Objective("iwae", 4), "dreg", compile=compile,
                     all_reduce=distributed.all_reduce_sum if distributed.world() > 1 else None)
    for batch in x:
        step(batch[rows])
    if distributed.rank() == 0:
        torch.save({"model": model.state_dict(), "compiled": step.compiled, "bound": step.bound_sum}, path)


STEP = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_distributed import take_steps
from iwae.platform import distributed
with distributed.session():
    take_steps("aot_eager", Path({path!r}))
"""


@pytest.mark.slow
def test_the_compiled_step_keeps_the_all_reduce_in_its_graph(tmp_path: Path) -> None:
    """Two ranks running the step compiled as one graph (aot_eager: the graph without inductor's code generation)
    take the steps of one process running that graph on the whole batches (DReG, with latents drawn for all rows).
    (A compiled graph and an eager step differ by float rounding, which six Adam steps at lr 1e-2 amplify to
    about 3e-5; test_step compares the two modes.)"""
    script = tmp_path / "step.py"
    script.write_text(STEP.format(tests=str(Path(__file__).parent), path=str(tmp_path / "two.pt")))
    two = ranks([], command=[sys.executable, str(script)])
    take_steps("aot_eager", tmp_path / "one.pt")
    succeed(two)
    two_ranks, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert two_ranks["compiled"] and one["compiled"]  # neither compiled step fell back to eager
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two_ranks["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    # the bound of steps 2.. is taken at parameters that differ by float rounding
    torch.testing.assert_close(two_ranks["bound"], one["bound"], rtol=1e-5, atol=0)


def test_a_run_in_use_is_refused_by_every_rank_in_one_line(tiny_dataset: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    succeed(ranks(["train", "--out", str(run), "--dataset", tiny_dataset, "--eval-k", "0", *TRAIN]))
    with runlock.locked(run):  # this process trains it, say
        results = finish(ranks(["train", "--resume", str(run)]))
    in_use = f"{run} is in use by process {os.getpid()}"
    assert [status for status, _ in results] == [2, 2], results
    assert in_use in results[0][1] and f"rank 0 failed: {in_use}" in results[1][1], results


def test_torchrun_passes_on_the_groups_of_miwae(tiny_dataset: str, tmp_path: Path) -> None:
    # torchrun takes --m for an ambiguous abbreviation of its own options; --groups is the same setting
    run = tmp_path / "run"
    succeed([torchrun(["train", "--out", str(run), "--dataset", tiny_dataset, "--eval-k", "0", *TRAIN,
                       "--objective", "miwae", "--groups", "2"])])
    assert rundir.read_json(run / rundir.CONFIG)["m"] == 2


def test_an_evaluation_stopped_under_torchrun_says_to_continue_it_under_torchrun(tiny_dataset: str,
                                                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    succeed(ranks(["train", "--out", str(run), "--dataset", tiny_dataset, "--eval-k", "0", *TRAIN]))
    evaluating = ranks(["evaluate", str(run), "--k", "50000", "--batch-size", "1", "--device", "cpu", "--no-compile",
                        "--checkpoint-every", "0"])
    deadline = time.monotonic() + WAIT_S
    while not list(run.glob("*.partial-rank*.pt")):  # a batch finished
        assert all(p.poll() is None for p in evaluating) and time.monotonic() < deadline
        time.sleep(0.05)
    for process in evaluating:
        process.send_signal(signal.SIGTERM)
    stderr = [err for _, err in finish(evaluating)]
    assert "continue with: iwae evaluate" in stderr[0] and "under torchrun with 2 ranks again" in stderr[0], stderr


def test_ranks_that_read_different_checkpoints_refuse_to_evaluate(two_ranks: tuple[Path, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A training run that writes a checkpoint between two ranks' reads would have them evaluate two models."""
    two, _ = two_ranks
    epoch = checkpoint.load(two)["epoch"]
    monkeypatch.setattr(distributed, "gather", lambda value: [value, (value[0] + 4, 3, value[2] + 1.0)])
    with pytest.raises(ValueError, match=re.escape(f"the ranks read different checkpoints of {two} (rank 0: epoch "
                                                   f"{epoch} step 0, rank 1: epoch {epoch + 4} step 3): a new one was "
                                                   "written as they started")):
        evaluation.evaluate_run(two, k=3, device="cpu", examples=4)
    assert not evaluation.eval_path(two, k=3, examples=4).exists()


def test_a_lost_ranks_message_names_the_command_that_continues_the_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Named before the ranks meet (when torchrun's WORLD_SIZE alone says how many there are)."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert cli._again("evaluate", ["evaluate", "runs/a b", "--k", "10"]) == (
        "iwae evaluate 'runs/a b' --k 10, under torchrun with 3 ranks again")
    assert cli._again("reproduce", ["reproduce", "dreg"]) == "iwae reproduce dreg"
    error = distributed._lost(RuntimeError("Connection closed by peer"), "iwae train --resume runs/a, under torchrun")
    assert str(error).endswith("(Connection closed by peer); the job stops; continue with: iwae train --resume runs/a, "
                               "under torchrun")


@pytest.fixture
def job(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict]]:
    """torch.distributed as seen by rank 1 of a job of 2 (without a process group): the helpers read the job through
    it; the barriers they call are recorded in the list, not waited for."""
    calls: list[dict] = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    as_rank(monkeypatch, 1, 2)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append({}))
    monkeypatch.setattr(distributed.dist, "monitored_barrier", lambda **kwargs: calls.append(kwargs))
    yield calls


def as_rank(monkeypatch: pytest.MonkeyPatch, r: int, w: int) -> None:
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: r)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: w)


def test_without_torchrun_every_helper_is_that_of_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """No WORLD_SIZE (or WORLD_SIZE=1): no process group is joined, and every collective is the identity."""
    model = burda(1, 6)
    for size in (None, "1"):
        if size is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", size)
        assert (distributed.launched(), distributed.launched_ranks()) == (False, 1)
        with distributed.session():
            assert not torch.distributed.is_initialized()
            assert (distributed.rank(), distributed.world(), distributed.name()) == (0, 1, "rank 0 of 1")
            assert (distributed.maximum(5), distributed.gather("v"), distributed.broadcast("v")) == (5, ["v"], "v")
            assert distributed.on_rank_zero(lambda: 3) == 3
            distributed.barrier()
            distributed.wait_for_all()
            assert distributed.sharded_draws(model, slice(0, 4), 4) is model
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert (distributed.launched(), distributed.launched_ranks()) == (True, 3)
    for text in ("", "two", "0", "-2", "1.5"):
        monkeypatch.setenv("WORLD_SIZE", text)
        with pytest.raises(distributed.DistributedError, match=re.escape(
                f"WORLD_SIZE={text!r} is not a number of processes (1 or more); torchrun sets it for the processes "
                "it starts: unset it to run one process, or start the command with torchrun")):
            distributed.launched()


def test_the_timeout_is_a_positive_number_of_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_s() == 600.0
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert distributed.timeout_s() == 2.5
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "1e9")
    assert distributed.timeout_s() == 1e9  # 31 years
    monkeypatch.setenv("WORLD_SIZE", "2")
    for text in ("0", "-5", "nan", "ten", "", "inf", "1e10"):  # torch takes at most 9.2e9 s
        monkeypatch.setenv(distributed.TIMEOUT_ENV, text)
        with pytest.raises(distributed.DistributedError, match=re.escape(
                f"IWAE_DIST_TIMEOUT={text!r} is not a positive number of seconds up to 1e9 (31 years); set it to "
                "e.g. 600")):
            distributed.timeout_s()
        with pytest.raises(distributed.DistributedError), distributed.session("gloo"):  # refused before joining
            pass


def test_the_shards_of_the_ranks_cover_the_items_once_in_order(job: list[dict],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The first n % W ranks take one item more; rank r's items follow rank r-1's."""
    assert distributed.shard(5) == range(3, 5) and distributed.rows(8) == slice(4, 8)
    for w in (1, 2, 3, 4):
        for n in range(10):
            shards = []
            for r in range(w):
                as_rank(monkeypatch, r, w)
                shards.append(distributed.shard(n))
            assert [i for s in shards for i in s] == list(range(n)), (n, w)
            assert [len(s) for s in shards] == [n // w + (r < n % w) for r in range(w)], (n, w)
    as_rank(monkeypatch, 2, 4)
    assert distributed.rows(12) == slice(6, 9)
    with pytest.raises(distributed.DistributedError, match=r"global batch of 6 examples does not divide among 4 ranks; "
                                                           r"run on a number of ranks that divides it \(1, 2, 3, 6\), "
                                                           r"or start a new run with a --batch-size that is a multiple "
                                                           r"of 4"):
        distributed.rows(6)


def test_every_item_is_assigned_to_one_rank_the_costliest_first(job: list[dict],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    costs = [4.0, 1.0, 9.0, 4.0, 2.0, 7.0, 1.0]
    # 9 -> 0, 7 -> 1, 4 (item 0) -> 2, 4 (item 3) -> 2 (loads 9, 7, 4), 2 -> 1 (9, 9, 8), 1 -> 2, 1 -> 0 (the first
    # of the least loaded)
    taken = []
    for r in range(3):
        as_rank(monkeypatch, r, 3)
        taken.append(distributed.assign(costs))
    assert taken == [[2, 6], [4, 5], [0, 1, 3]]
    as_rank(monkeypatch, 0, 1)
    assert distributed.assign(costs) == list(range(7))


def test_alone_a_rank_works_as_rank_0_of_1_and_its_name_stays(job: list[dict]) -> None:
    assert (distributed.rank(), distributed.world(), distributed.name()) == (1, 2, "rank 1 of 2")
    with distributed.alone():
        with distributed.alone():
            assert (distributed.rank(), distributed.world()) == (0, 1)
        assert (distributed.rank(), distributed.world(), distributed.name()) == (0, 1, "rank 1 of 2")
        assert distributed.rows(6) == slice(0, 6) and distributed.shard(3) == range(3)
        distributed.barrier()  # a single process's: no barrier
        assert job == []
        distributed.wait_for_all()  # the job's, though
    assert (distributed.rank(), distributed.world()) == (1, 2)
    distributed.barrier()
    assert job == [{"timeout": distributed.GRID_WAIT, "wait_all_ranks": True}, {}]


def test_a_lost_ranks_message_is_one_line_with_the_timeout_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "30")
    error = distributed._lost(RuntimeError("[gloo] Connection closed\n  by peer " + "x" * 400), "iwae evaluate r")
    assert str(error).startswith("rank 0 of 1: a collective failed: another rank ended or did not answer within 30 s "
                                 "([gloo] Connection closed by peer xxx")
    assert "\n" not in str(error) and len(str(error)) < 450
    # each with one of the marks
    for text in ("Timed out waiting 30000ms for send operation", "NCCL error: unhandled system error",
                 "[c10d] The client socket has failed", "Connection closed by peer", "Gloo connectFullMesh failed",
                 "[third_party/gloo/transport/tcp/pair.cc:534] Read error"):
        assert distributed._is_collective_failure(RuntimeError(text)), text
    assert not distributed._is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_a_ranks_latents_are_its_rows_of_the_whole_batchs() -> None:
    """Gaussian and Bernoulli latents drawn for rows 2 and 3 of a batch of 5 are those drawn for the whole batch (up
    to the rounding of the layers' products on 2 rows rather than 5)."""
    torch.manual_seed(0)
    x = torch.rand(5, 6)
    for model in (burda(1, 6), sbn([7], 6)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            whole = model.encoder[0](x).sample((3,))
        sharded = distributed.sharded_draws(model, slice(2, 4), 5)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            rows = sharded.encoder[0](x[2:4]).sample((3,))
        torch.testing.assert_close(rows, whole[:, 2:4], rtol=1e-5, atol=1e-6)


COLLECTIVES = """
import json, sys, time
from pathlib import Path
import torch
from iwae.platform import distributed
out = Path({out!r})
written = []
with distributed.session("gloo"):
    r = distributed.rank()
    if r == 1:  # rank 0 passes each barrier only once rank 1 has written its mark
        time.sleep(0.5)
        (out / "before-barrier").touch()
    distributed.barrier()
    seen = [(out / "before-barrier").exists()]
    with distributed.alone():
        if r == 1:
            time.sleep(0.5)
            (out / "before-wait").touch()
        distributed.wait_for_all()
        seen.append((out / "before-wait").exists())
    mine = [torch.full((2, 3), 1.0 + r, dtype=torch.float64), torch.tensor([10.0 * r], dtype=torch.float64)]
    parts = distributed.all_reduce_sum(mine)
    try:
        distributed.on_rank_zero(lambda: 1 / 0)
    except Exception as error:
        failed = f"{{type(error).__name__}}: {{error}}"
    result = {{"name": distributed.name(), "stdout": sys.stdout is sys.__stdout__,
              "maximum": distributed.maximum(7 - 2 * r),
              "gather": distributed.gather(10 * r + 1), "broadcast": distributed.broadcast(f"rank {{r}}'s"),
              "written": distributed.on_rank_zero(lambda: written.append(r) or "done"), "by": written, "seen": seen,
              "sum": [part.tolist() for part in parts], "dtype": str(parts[0].dtype), "failed": failed}}
    (out / f"rank{{r}}.json").write_text(json.dumps(result))
"""


def test_the_collectives_of_two_ranks(tmp_path: Path) -> None:
    """Two ranks of gloo: the barriers wait for the other rank (wait_for_all also within ``alone``), rank 0 alone
    prints and writes, and the reductions, gathers and broadcasts give every rank the same values."""
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES.format(out=str(tmp_path)))
    succeed(ranks([], command=[sys.executable, str(script)]))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, result in enumerate(results):
        assert result["name"] == f"rank {r} of 2" and result["stdout"] == (r == 0)
        assert (result["maximum"], result["gather"], result["broadcast"]) == (7, [1, 11], "rank 0's")
        assert (result["written"], result["by"]) == (("done", [0]) if r == 0 else (None, []))
        assert result["sum"] == [[[3.0] * 3] * 2, [10.0]] and result["dtype"] == "torch.float64"
        assert result["seen"] == [True, True]
    assert results[0]["failed"] == "ZeroDivisionError: division by zero"
    assert results[1]["failed"] == "DistributedError: rank 1 of 2: rank 0 failed: division by zero"
