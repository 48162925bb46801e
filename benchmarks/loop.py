"""The training loop against its compiled step: ``iwae train`` as a user runs it, beside the bare step, in one run.

For each K, the rounds alternate between

    bare step    the compiled training step alone (``iwae.training.lone.lone_timing_step``: the 1-layer model,
                 IWAE bound, a fixed random binary minibatch of B x 784), in a process of its own, timed over
                 ``--bare-steps`` steps before and after each run of the command
    iwae train   the command itself (``python -m iwae train``) on MNIST (``$IWAE_DATA_DIR``; a synthetic 784-d
                 set of MNIST's sparsity when it is absent), with its progress bar on a pseudo-terminal, its
                 metrics, its per-epoch test bound and checkpoints, as it runs for a user

and prints the medians (over rounds and epochs) of

    loop         the run's training speed from its metrics.jsonl: ``examples_per_s``, its epochs' training steps
                 alone (the gathers, binarizations and steps; the step's compilation left out)
    wall         its epochs' examples over their wall time (``epoch_wall_s``: the test bound and the checkpoint
                 included), from its second epoch on (the first's holds the command's start and the compilation)

and their ratios to the bare step's examples/s; and the fastest epoch's over the fastest timing of the bare step
(on a machine that other work slows by turns, the fastest of each side is the least disturbed). Both sides use the
same number of torch threads (``--threads``, the command's through ``OMP_NUM_THREADS``) and matmul path
(``--matmul``). A scenario (``SCENARIOS``) is a setting
of the command: its extra environment and arguments; ``train_rates`` runs the command once in it.

    python benchmarks/loop.py [--k 1 50] [--batch-size 20] [--epochs 2] [--rounds 3] [--threads 1]
                              [--bare-steps 500] [--estimator standard] [--matmul default] [--examples N]
"""

from __future__ import annotations

import argparse
import fcntl
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from own_process import OwnProcess

from iwae import data
from iwae.training import config as train_config
from iwae.training import lone


@dataclass(frozen=True)
class Scenario:
    """A setting of ``iwae train``: its name, extra environment variables and extra arguments."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()


SCENARIOS = [Scenario("quiet")]


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


def train_rates(scenario: Scenario, train_args: list[str], threads: int, folder: Path) -> list[EpochRate]:
    """Run ``iwae train`` once (``train_args`` and the scenario's) in a new run directory under ``folder``, with
    ``threads`` torch threads; each epoch's examples/s of its training steps and over its wall time, from its
    metrics."""
    run = Path(tempfile.mkdtemp(dir=folder)) / "run"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **scenario.env}
    code, tail = on_terminal([sys.executable, "-m", "iwae", "train", "--out", str(run), *train_args, *scenario.args],
                             env)
    if code:
        raise RuntimeError(f"iwae train exited with {code}:\n{tail}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    examples = [r["examples_per_s"] * r["epoch_time_s"] for r in records]
    return [EpochRate(r["examples_per_s"], n / r["epoch_wall_s"], r["epoch"] == 1)
            for r, n in zip(records, examples, strict=True)]


def bare_step(k: int, batch_size: int, estimator: str) -> dict[str, object]:
    """For a worker process: the runner "bare" of the compiled step, warmed up (compiled)."""
    config = train_config.TrainConfig(layers=1, objective="iwae", k=k, estimator=estimator, epochs=1,
                                      batch_size=batch_size, compile=True)
    step = lone.lone_timing_step(config, 784, torch.device("cpu"))
    for _ in range(3):
        step()

    def run(n: int) -> None:
        for _ in range(n):
            step()

    return {"bare": run}


def measure(k: int, args: argparse.Namespace, data: list[str], folder: Path) -> None:
    """Print, for each scenario, the loop's and the bare step's examples/s at ``k`` and their ratios."""
    train_args = [*data, "--layers", "1", "--objective", "iwae", "--k", str(k), "--estimator", args.estimator,
                  "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--eval-k", "0",
                  "--matmul", args.matmul, "--compile", "--device", "cpu", "--seed", "0"]
    with OwnProcess(bare_step, k, args.batch_size, args.estimator, matmul_path=args.matmul) as worker:
        bare = worker.runner("bare")

        def bare_rate() -> float:
            start = time.perf_counter()
            bare(args.bare_steps)
            return args.bare_steps * args.batch_size / (time.perf_counter() - start)

        for scenario in SCENARIOS:
            bares, epochs = [bare_rate()], []
            for _ in range(args.rounds):
                epochs += train_rates(scenario, train_args, args.threads, folder)
                bares.append(bare_rate())
            step_rate = statistics.median(bares)
            loop_rate = statistics.median(e.steps for e in epochs)
            wall_rate = statistics.median(e.wall for e in epochs if not e.first) if args.epochs > 1 else float("nan")
            best = max(e.steps for e in epochs) / max(bares)
            print(f"K={k:<3} {scenario.name:<8} bare step {step_rate:7.0f}  loop {loop_rate:7.0f}  "
                  f"wall {wall_rate:7.0f} examples/s   loop/step {loop_rate / step_rate:5.3f}  "
                  f"wall/step {wall_rate / step_rate:5.3f}  best loop/best step {best:5.3f}   ({len(epochs)} epochs "
                  f"{min(e.steps for e in epochs):.0f}-{max(e.steps for e in epochs):.0f}, {len(bares)} bare timings "
                  f"{min(bares):.0f}-{max(bares):.0f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each iwae train run")
    parser.add_argument("--rounds", type=int, default=3, help="iwae train runs per K and scenario")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    parser.add_argument("--bare-steps", type=int, default=500, help="steps of each timing of the bare step")
    parser.add_argument("--estimator", default="standard")
    parser.add_argument("--matmul", default="default", help="the float32 matmul path of both sides")
    parser.add_argument("--examples", type=int, default=None,
                        help="train on the first N MNIST images (shorter epochs; a step costs the same)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # the bare step's process takes the main process's
    with tempfile.TemporaryDirectory() as folder:
        data_args = dataset_args(Path(folder), args.examples)
        print(f"iwae train against its bare compiled step: 1-layer model, IWAE bound, {args.estimator} estimator, "
              f"B={args.batch_size}, {Path(data_args[1]).name}, {args.threads} thread(s), {args.matmul} matmul; "
              f"median examples/s over {args.rounds} runs of {args.epochs} epoch(s) and the bare step's timings")
        for k in args.k:
            measure(k, args, data_args, Path(folder))


if __name__ == "__main__":
    main()
