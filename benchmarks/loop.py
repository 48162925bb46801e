"""``iwae train`` as a user runs it: against its bare compiled step, and on a machine shared with other work.

Both modes run the command itself (``python -m iwae train``: its loop, progress bar, per-epoch test bound,
checkpoints and metrics) in subprocesses, 1 stochastic layer, IWAE bound, ``--eval-k 0``, on MNIST
(``$IWAE_DATA_DIR``; a synthetic 784-d set of MNIST's sparsity when it is absent), and read each epoch's
examples/s from the run's ``metrics.jsonl``: ``examples_per_s`` (its training steps: gathers, binarizations and
steps, the step's compilation left out) and over ``epoch_wall_s`` (test bound and checkpoint included).

    python benchmarks/loop.py step [--k 1 50] [--batch-size 20] [--epochs 2] [--rounds 3] [--threads 1]
                                   [--bare-steps 500] [--estimator standard] [--matmul default] [--examples N]
                                   [--device cpu]
        The command with ``--compile``, its progress bar on a pseudo-terminal, by turns with the bare compiled step
        (``iwae.training.lone.lone_timing_step`` on a fixed random binary minibatch of B x 784, timed over
        ``--bare-steps`` steps after as many untimed, before and after each run, each time in a new process, as each run
        of the command is one; on a GPU, the step's CUDA graph replayed, timed until the GPU has finished them). Prints
        the medians (over rounds and epochs) of ``loop`` (examples_per_s) and ``wall`` (over epoch_wall_s, from the
        second epoch on: the first holds the command's start) and their ratios to the bare step's; and the fastest epoch
        over the fastest bare timing (on a machine that other work slows by turns, the least disturbed of each). Both
        sides run ``--threads`` torch threads (the command's through ``OMP_NUM_THREADS``) on the ``--matmul`` path. A
        second bare step, timed by turns with the first, trains the model as the command starts it on ``--bare-steps``
        distinct minibatches of the command's data, binarized beforehand (a new one every step, as in the loop): the
        step on the data the loop gives it, whose cost beyond the fixed minibatch's is the data's, not the loop's; its
        line gives the loop's ratios to it.

    python benchmarks/loop.py shared [--k 1 50] [--policies iwae torch one passive spin1000] [--epochs 3]
        For each thread policy, with the command's defaults (DReG; compiled or not as it chooses), B = 20,
        ``--matmul default``, on a slice of the training images (``SHARED_EXAMPLES``): a run on the quiet
        machine, one beside a busy thread (``python -c 'while True: pass'``), and two identical runs started
        together; every epoch's examples/s as a fraction of the quiet run's median. A run still going after
        ``SHARED_TIMEOUT_S`` is stopped (SIGTERM: it checkpoints) and its finished epochs kept. The policies:
          iwae     the default: one thread per CPU that other processes leave free, measured at start, with
                   OpenMP's short spin (``iwae.platform.threads.OPENMP_WAIT``: what ``iwae train`` does unless
                   told otherwise)
          torch    torch's own settings: a thread per usable CPU, OpenMP's wait left to OpenMP (spin long, then
                   sleep)
          one      --threads 1
          passive  a thread per usable CPU, OMP_WAIT_POLICY=PASSIVE
          spin1000 a thread per usable CPU, libgomp's threads spinning 1,000 times before they sleep

Run it on a quiet machine; each mode prints its ratios, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import pty
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from own_process import OwnProcess

from iwae import data
from iwae.platform import threads
from iwae.training import config as train_config
from iwae.training import lone, state
from iwae.training.step import TrainStep, make_adam

# training images per epoch of the shared mode, per k: an epoch of a few seconds on one core
SHARED_EXAMPLES = {1: 6000, 50: 800}
# a run of the shared mode still going this many seconds after it started is stopped
SHARED_TIMEOUT_S = 40.0
BUSY = [sys.executable, "-c", "while True: pass"]


@dataclass(frozen=True)
class EpochRate:
    """One epoch of an ``iwae train`` run: examples/s of its training steps, and over its wall time."""

    steps: float
    wall: float
    first: bool


def dataset_args(folder: Path, examples: int | None) -> list[str]:
    """The command's data arguments: MNIST where ``$IWAE_DATA_DIR`` holds it (its first ``examples`` training
    images, if given, and 1,000 test images, written to ``folder``), else a synthetic set written there (``examples``
    or 12,000 examples and 1,000 test examples of 784 pixels, 81 % of them 0, the rest uniform grey levels)."""
    data_dir = os.environ.get("IWAE_DATA_DIR")
    mnist = bool(data_dir) and (Path(data_dir) / "mnist").is_dir()
    if mnist and examples is None:
        return ["--dataset", "mnist", "--data-dir", data_dir]
    if mnist:
        dataset = data.load("mnist", data_dir, download=False)
        train, test = dataset.train[:examples].numpy(), dataset.test[:1000].numpy()
    else:
        rng = np.random.default_rng(0)
        n = examples or 12_000
        images = rng.random((n + 1000, 784), dtype=np.float32) * (rng.random((n + 1000, 784)) < 0.19)
        train, test = images[:n], images[n:]
    path = folder / f"{'mnist' if mnist else 'synthetic'}-{len(train)}.npz"
    np.savez(path, train=train, test=test)
    return ["--dataset", str(path)]


def train_command(run: Path, *args: str, device: str = "cpu") -> list[str]:
    return [sys.executable, "-m", "iwae", "train", "--out", str(run), "--layers", "1", "--objective", "iwae",
            "--eval-k", "0", "--device", device, "--seed", "0", *args]


def epoch_rates(run: Path) -> list[EpochRate]:
    """Each finished epoch of the run in ``run``, from its metrics."""
    metrics = run / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return [EpochRate(r["examples_per_s"], r["examples_per_s"] * r["epoch_time_s"] / r["epoch_wall_s"],
                      r["epoch"] == 1) for r in records]


def on_terminal(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``command`` with its stdout and stderr on a pseudo-terminal of 120 columns (as a user's terminal, where the
    progress bar draws itself); its exit code and the last 4,000 characters it wrote."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    tail = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed with the process
                return
            if not chunk:
                return
            tail.extend(chunk)
            del tail[:-4000]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    code = process.wait()
    reader.join(timeout=5)
    os.close(leader)
    return code, tail.decode(errors="replace")


def bare_step(k: int, batch_size: int, estimator: str, device: str, data_args: list[str], minibatches: int
              ) -> dict[str, object]:
    """For a worker process: the runners of the compiled step on ``device``, warmed up (compiled; on a GPU, its CUDA
    graph recorded): "bare" on a fixed random binary minibatch (``lone.lone_timing_step``, a fresh model), "real" on
    ``minibatches`` minibatches of the command's data drawn beforehand, in turn, with the model as ``iwae train``
    starts it (seed 0)."""
    config = train_config.TrainConfig(layers=1, objective="iwae", k=k, estimator=estimator, epochs=1,
                                      batch_size=batch_size, compile=True)
    steps = {"bare": lone.lone_timing_step(config, 784, torch.device(device))}
    data_dir = data_args[data_args.index("--data-dir") + 1] if "--data-dir" in data_args else None
    dataset = data.load(data_args[1], data_dir, download=False).to(device)
    _, model = state.start(config, dataset)
    real_step = TrainStep(model, make_adam(model, 1e-3, (config.beta1, config.beta2), config.adam_eps),
                          config.objective_spec(), estimator, compile=True)
    generator = torch.Generator(device).manual_seed(0)
    batches: list[torch.Tensor] = []
    while len(batches) < minibatches:  # epoch after epoch, as the loop draws them
        batches += data.epoch_batches(len(dataset.train), batch_size, generator)
    xs = [dataset.minibatch(idx, generator) for idx in batches[:minibatches]]
    turn = itertools.cycle(xs)
    steps["real"] = lambda: real_step(next(turn))

    def runner(step: Callable[[], None]) -> Callable[[int], None]:
        for _ in range(3):
            step()

        def run(n: int) -> None:
            for _ in range(n):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    return {name: runner(step) for name, step in steps.items()}


def loop_against_step(k: int, args: argparse.Namespace, data_args: list[str], folder: Path) -> None:
    """Print the loop's and the bare step's examples/s at ``k`` and their ratios."""
    train_args = [*data_args, "--k", str(k), "--estimator", args.estimator, "--batch-size", str(args.batch_size),
                  "--epochs", str(args.epochs), "--matmul", args.matmul, "--compile"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    timings: dict[str, list[float]] = {"bare": [], "real": []}  # examples/s of each bare step, a timing per process
    epochs: list[EpochRate] = []

    def bare_rates() -> None:
        """Time the bare steps in a process of their own, as each of the command's runs has its own: a process's
        speed differs from another's by a few percent, so that neither side rests on one process's."""
        with OwnProcess(bare_step, k, args.batch_size, args.estimator, args.device, data_args, args.bare_steps,
                        matmul_path=args.matmul) as worker:
            for name in timings:
                run = worker.runner(name)
                run(args.bare_steps)
                start = time.perf_counter()
                run(args.bare_steps)
                timings[name].append(args.bare_steps * args.batch_size / (time.perf_counter() - start))

    bare_rates()
    for _ in range(args.rounds):
        run = Path(tempfile.mkdtemp(dir=folder)) / "run"
        code, tail = on_terminal(train_command(run, *train_args, device=args.device), env)
        if code:
            raise RuntimeError(f"iwae train exited with {code}:\n{tail}")
        epochs += epoch_rates(run)
        bare_rates()
    bares, reals = timings["bare"], timings["real"]
    step_rate, real_rate = statistics.median(bares), statistics.median(reals)
    loop_rate = statistics.median(e.steps for e in epochs)
    wall_rate = statistics.median(e.wall for e in epochs if not e.first) if args.epochs > 1 else float("nan")
    best = max(e.steps for e in epochs) / max(bares)
    print(f"K={k:<3} bare step {step_rate:7.0f}  loop {loop_rate:7.0f}  wall {wall_rate:7.0f} examples/s   "
          f"loop/step {loop_rate / step_rate:5.3f}  wall/step {wall_rate / step_rate:5.3f}  best loop/best step "
          f"{best:5.3f}   ({len(epochs)} epochs {min(e.steps for e in epochs):.0f}-"
          f"{max(e.steps for e in epochs):.0f}, {len(bares)} bare timings {min(bares):.0f}-{max(bares):.0f})",
          flush=True)
    print(f"      on real minibatches: bare step {real_rate:7.0f}   loop/step {loop_rate / real_rate:5.3f}  best "
          f"loop/best step {max(e.steps for e in epochs) / max(reals):5.3f}   ({min(reals):.0f}-{max(reals):.0f})",
          flush=True)


def policies() -> dict[str, tuple[list[str], dict[str, str]]]:
    """Per thread policy, the options of ``iwae train`` and its environment."""
    usable = str(threads.usable_cpus())
    chosen = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", *threads.OPENMP_WAIT)  # what this process's import of iwae set
    env = {key: value for key, value in os.environ.items() if key not in chosen}
    return {
        "iwae": ([], env),
        "torch": (["--threads", usable], {**env, "OMP_WAIT_POLICY": ""}),  # empty: libgomp's default policy
        "one": (["--threads", "1"], env),
        "passive": (["--threads", usable], {**env, "OMP_WAIT_POLICY": "PASSIVE"}),
        "spin1000": (["--threads", usable], {**env, "GOMP_SPINCOUNT": "1000"}),
    }


def run_together(commands: list[list[str]], env: dict[str, str], busy: bool) -> list[str]:
    """Run ``commands`` at once (beside a busy thread, if ``busy``), stopping them after ``SHARED_TIMEOUT_S``;
    return each one's thread line."""
    spinner = subprocess.Popen(BUSY) if busy else None
    try:
        if spinner is not None:
            time.sleep(0.5)  # busy before the runs look at the machine
        processes = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for c in commands]
        deadline = time.monotonic() + SHARED_TIMEOUT_S
        errors = [_finish(p, deadline) for p in processes]
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    for process, error in zip(processes, errors, strict=True):
        if process.returncode not in (0, 128 + 15, -15):  # stopped by SIGTERM, in the loop or after it
            raise RuntimeError(f"iwae train failed:\n{error}")
    return [next((line for line in e.splitlines() if "torch thread" in line), "?") for e in errors]


def _finish(process: subprocess.Popen, deadline: float) -> str:
    """The stderr of ``process``, stopped with SIGTERM if it runs past ``deadline``."""
    try:
        return process.communicate(timeout=max(0.0, deadline - time.monotonic()))[1]
    except subprocess.TimeoutExpired:
        process.terminate()
        return process.communicate()[1]


def shared(k: int, args: argparse.Namespace, folder: Path) -> None:
    """Print, per policy and scenario, each epoch's examples/s at ``k`` and its ratio to the quiet run's."""
    data_args = dataset_args(folder, SHARED_EXAMPLES[k])
    train_args = [*data_args, "--k", str(k), "--batch-size", "20", "--epochs", str(args.epochs), "--matmul",
                  "default"]
    table = policies()
    for name in args.policies:
        options, env = table[name]
        runs = {"quiet": [folder / f"{name}-{k}-quiet"], "busy thread": [folder / f"{name}-{k}-busy"],
                "second run": [folder / f"{name}-{k}-pair{i}" for i in (0, 1)]}
        lines = {scenario: run_together([train_command(run, *train_args, *options) for run in runs_], env,
                                        busy=scenario == "busy thread") for scenario, runs_ in runs.items()}
        floor = SHARED_EXAMPLES[k] / SHARED_TIMEOUT_S  # a run that finished no epoch ran slower than this
        quiet = statistics.median([e.steps for e in epoch_rates(runs["quiet"][0])] or [floor])
        for scenario, runs_ in runs.items():
            for run, line in zip(runs_, lines[scenario], strict=True):
                rates = [e.steps for e in epoch_rates(run)]
                ratios = [rate / quiet for rate in rates] or [floor / quiet]
                shown = " ".join(f"{rate:6.0f}" for rate in rates) + " -" * (args.epochs - len(rates))
                print(f"{k:>3} {name:8} {scenario:12} {shown:>34} {min(ratios):9.2f} "
                      f"{statistics.median(ratios):7.2f}  {line.removeprefix('iwae: ')}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("step", "shared"))
    parser.add_argument("--k", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--batch-size", type=int, default=20, help="step mode")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of each run (default: step 2, shared 3)")
    parser.add_argument("--rounds", type=int, default=3, help="step mode: iwae train runs per K")
    parser.add_argument("--threads", type=int, default=1, help="step mode: torch threads of both sides")
    parser.add_argument("--bare-steps", type=int, default=500, help="step mode: steps of each bare timing")
    parser.add_argument("--estimator", default="standard", help="step mode")
    parser.add_argument("--matmul", default="default", help="step mode: the float32 matmul path of both sides")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="step mode: where both sides run")
    parser.add_argument("--examples", type=int, default=None,
                        help="step mode: train on the first N MNIST images (shorter epochs; a step costs the same)")
    parser.add_argument("--policies", nargs="+", default=list(policies()), choices=list(policies()),
                        help="shared mode")
    args = parser.parse_args()
    if args.mode == "shared" and any(k not in SHARED_EXAMPLES for k in args.k):
        parser.error(f"the shared mode runs --k in {sorted(SHARED_EXAMPLES)}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: give at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here; use --device cpu")
    args.epochs = (2 if args.mode == "step" else 3) if args.epochs is None else args.epochs
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        if args.mode == "step":
            torch.set_num_threads(args.threads)  # the bare step's process takes the main process's
            data_args = dataset_args(folder, args.examples)
            print(f"iwae train against its bare compiled step on {args.device}: B={args.batch_size}, "
                  f"{Path(data_args[1]).name}, {args.estimator} estimator, {args.threads} thread(s), {args.matmul} "
                  "matmul; median examples/s "
                  f"over {args.rounds} runs of {args.epochs} epoch(s) and the bare step's timings")
            for k in args.k:
                loop_against_step(k, args, data_args, folder)
        else:
            print(f"cpus usable {threads.usable_cpus()}, torch {torch.__version__}, {args.epochs} epochs of "
                  + ", ".join(f"{SHARED_EXAMPLES[k]} images at k={k}" for k in args.k))
            print(f"{'k':>3} {'policy':8} {'scenario':12} {'ex/s by epoch':>34} {'min ratio':>9} {'median':>7}  "
                  "thread line")
            for k in args.k:
                shared(k, args, folder)


if __name__ == "__main__":
    main()
