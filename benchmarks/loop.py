"""``iwae train`` as a user runs it, against the bare step, and on a machine shared with another process.

Both modes run the real command (``python -m iwae.cli train``: its loop with the progress bar, the per-epoch
monitor bound, checkpoints and metrics) in a subprocess on a slice of MNIST's training images (``$IWAE_DATA_DIR``;
random binary images of its shape when absent), 1 stochastic layer, B = 20, ``--matmul default``, no final
evaluation, and read each epoch's examples/s from its ``metrics.jsonl``: ``examples_per_s`` (the epoch's
minibatches) and, from ``wall_time_s``, the epoch with its monitor bound and checkpoint (``with upkeep``).

    python benchmarks/loop.py step [--k 1 50] [--rounds 2]
        ``iwae train --compile`` against the bare compiled step (``TrainStep(compile=True)`` on a fixed minibatch,
        in this process, on the thread count the run printed), in turns within each round; the run's epochs
        after its first (which loads the compiled program) against the step's examples/s of the same round.

    python benchmarks/loop.py shared [--k 1 50] [--policies iwae torch one passive]
        for each thread policy, a run on the quiet machine, one beside a busy thread (``python -c 'while True:
        pass'``), and two identical runs started together; every epoch's examples/s as a fraction of the quiet
        run's median. The policies:
          iwae     the default: one thread per CPU that other processes leave free, measured at start, with
                   OpenMP's passive wait policy (what ``iwae train`` does unless told otherwise)
          torch    torch's own settings: a thread per usable CPU, OpenMP's wait policy unset (spin, then sleep)
          one      --threads 1
          passive  a thread per usable CPU, OMP_WAIT_POLICY=PASSIVE

Run it on a quiet machine; each mode prints its ratios, measured side by side in one run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the bare step waits as iwae's runs do: set before torch loads

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from iwae import data
from iwae.core.objectives import Objective
from iwae.models import burda
from iwae.platform import threads
from iwae.training.step import TrainStep, make_adam

BATCH = 20
# training images per epoch, per k: an epoch of a few seconds on one core
EXAMPLES = {1: 6000, 50: 800}
EPOCHS = 3
# a run still going this many seconds after it started is stopped (SIGTERM: it checkpoints), its epochs kept
TIMEOUT_S = 40.0
BUSY = [sys.executable, "-c", "while True: pass"]


def policies() -> dict[str, tuple[list[str], dict[str, str]]]:
    """Per policy, the options of ``iwae train`` and its environment."""
    usable = str(threads.usable_cpus())
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    return {
        "iwae": ([], env),
        "torch": (["--threads", usable], {**env, "OMP_WAIT_POLICY": ""}),  # empty: libgomp's default policy
        "one": (["--threads", "1"], env),
        "passive": (["--threads", usable], {**env, "OMP_WAIT_POLICY": "PASSIVE"}),
    }


def write_slice(k: int, folder: Path) -> Path:
    """An .npz of EXAMPLES[k] training and 1000 test images of MNIST (or random binary ones of its shape)."""
    try:
        mnist = data.load("mnist", os.environ.get("IWAE_DATA_DIR"))
        train, test = mnist.train[: EXAMPLES[k]].numpy(), mnist.test[:1000].numpy()
    except data.DataError:
        rng = np.random.default_rng(0)
        train, test = ((rng.random((n, 784)) < 0.5).astype(np.float32) for n in (EXAMPLES[k], 1000))
    path = folder / f"mnist-{k}.npz"
    np.savez(path, train=train, test=test)
    return path


def command(dataset: Path, k: int, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "iwae.cli", "train", "--dataset", str(dataset), "--k", str(k), "--batch-size",
            str(BATCH), "--layers", "1", "--epochs", str(EPOCHS), "--eval-k", "0", "--matmul", "default",
            "--out", str(out), *options]


def epochs(out: Path) -> tuple[list[float], list[float]]:
    """Per epoch of the run in ``out``: examples/s of its minibatches, and with its upkeep (monitor, checkpoint)."""
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    walls = [0.0] + [r["wall_time_s"] for r in records]
    examples = [r["examples_per_s"] * r["epoch_time_s"] for r in records]
    upkeep = [n / (b - a) for n, a, b in zip(examples, walls[:-1], walls[1:], strict=True)]
    return [r["examples_per_s"] for r in records], upkeep


def run_together(commands: list[list[str]], env: dict[str, str], busy: bool = False,
                 timeout: float = TIMEOUT_S) -> list[str]:
    """Run ``commands`` at once (beside a busy thread, if ``busy``), stopping them after ``timeout`` seconds;
    return each one's thread line."""
    spinner = subprocess.Popen(BUSY) if busy else None
    try:
        if spinner is not None:
            time.sleep(0.5)  # busy before the runs look at the machine
        processes = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for c in commands]
        deadline = time.monotonic() + timeout
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


def shared(ks: list[int], names: list[str], folder: Path) -> None:
    table = policies()
    print(f"{'k':>3} {'policy':8} {'scenario':12} {'ex/s by epoch':>34} {'min ratio':>9} {'median':>7}  thread line")
    for k in ks:
        dataset = write_slice(k, folder)
        for name in names:
            options, env = table[name]
            runs = {"quiet": [folder / f"{name}-{k}-quiet"], "busy thread": [folder / f"{name}-{k}-busy"],
                    "second run": [folder / f"{name}-{k}-pair{i}" for i in (0, 1)]}
            lines = {}
            for scenario, outs in runs.items():
                lines[scenario] = run_together([command(dataset, k, out, *options) for out in outs], env,
                                               busy=scenario == "busy thread")
            quiet = statistics.median(epochs(runs["quiet"][0])[0] or [EXAMPLES[k] / TIMEOUT_S])
            for scenario, outs in runs.items():
                for out, line in zip(outs, lines[scenario], strict=True):
                    rates = epochs(out)[0]
                    ratios = [rate / quiet for rate in rates] or [EXAMPLES[k] / TIMEOUT_S / quiet]
                    shown = " ".join(f"{rate:6.0f}" for rate in rates) + " -" * (EPOCHS - len(rates))
                    print(f"{k:>3} {name:8} {scenario:12} {shown:>34} {min(ratios):9.2f} "
                          f"{statistics.median(ratios):7.2f}  {line.removeprefix('iwae: ')}", flush=True)


def bare_step(k: int, count: int, seconds: float) -> float:
    """Examples/s of the compiled step on ``count`` threads, timed for ``seconds`` after a warm-up."""
    torch.set_num_threads(count)
    model = burda(layers=1, x_dim=784)
    step = TrainStep(model, make_adam(model, 1e-3, (0.9, 0.999), 1e-4), Objective("iwae", k), "dreg", compile=True)
    x = (torch.rand(BATCH, 784) < 0.5).float()
    for _ in range(20):
        step(x)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(x)
        done += 1
    return done * BATCH / (time.perf_counter() - start)


def loop_against_step(ks: list[int], rounds: int, folder: Path) -> None:
    print(f"{'k':>3} {'round':>5} {'iwae train ex/s':>16} {'with upkeep':>12} {'bare step':>10} {'ratio':>6} "
          f"{'upkeep':>7}  thread line")
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    for k in ks:
        dataset = write_slice(k, folder)
        for r in range(rounds):
            out = folder / f"loop-{k}-{r}"
            line = run_together([command(dataset, k, out, "--compile")], env, timeout=600.0)[0]
            loop, upkeep = (statistics.median(rates[1:]) for rates in epochs(out))
            count = int(line.split("iwae: ")[-1].split()[0]) if "iwae: " in line else torch.get_num_threads()
            step = bare_step(k, count, 3.0)
            print(f"{k:>3} {r:>5} {loop:16.0f} {upkeep:12.0f} {step:10.0f} {loop / step:6.2f} {upkeep / step:7.2f}  "
                  f"{line.removeprefix('iwae: ')}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("step", "shared"))
    parser.add_argument("--k", type=int, nargs="+", default=[1, 50], choices=sorted(EXAMPLES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--policies", nargs="+", default=list(policies()), choices=list(policies()))
    args = parser.parse_args()
    print(f"cpus usable {threads.usable_cpus()}, torch {torch.__version__}, {EPOCHS} epochs of "
          + ", ".join(f"{EXAMPLES[k]} images at k={k}" for k in args.k))
    with tempfile.TemporaryDirectory() as folder:
        if args.mode == "shared":
            shared(args.k, args.policies, Path(folder))
        else:
            loop_against_step(args.k, args.rounds, Path(folder))


if __name__ == "__main__":
    main()
