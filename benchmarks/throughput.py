"""Training throughput of iwae against Pyro and NumPyro, as a fraction of the machine's fp32 GEMM limit.

Training: for the paper's 1- and 2-stochastic-layer models, each (K, B) cell times one IWAE-bound training
step (forward, backward, Adam with lr 1e-3, betas (0.9, 0.999), eps 1e-4) on a fixed random binary minibatch
of B x 784, in examples/s, for

    iwae compiled std / dreg   iwae.training.step.TrainStep(compile=True), standard and DReG estimators
    iwae eager std             the same step uncompiled
    numpyro                    RenyiELBO(alpha=0, num_particles=K), SVI.update under jax.jit
    pyro                       RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True), SVI.step

The peers run the same network (the iwae model's initial weights, tanh, Gaussian q with an exp std head,
Bernoulli p(x|z), N(0, I) prior, ancestral p and q for 2 layers), written once against the pyro/numpyro API.
Each contender runs in a process of its own (``own_process``: in one process, each runtime slows the
others). Every contender is built and warmed up first (its first call, the compilation where there is one, is
timed and reported, then as many steps as take about ``--round-seconds``, which sets its steps per round unless
``--steps`` is given); then the contenders take turns, one round of steps each, and the median examples/s
over ``--rounds`` rounds is reported, so the machine's load affects them alike. In each cell torch's fp32
matmuls use the path ``iwae train`` would choose for it (the faster on the cell's compiled step, measured at
the start of the cell), for all torch contenders. On a machine busy with other processes, torch's OpenMP threads
spend most of a small step waiting for each other (a 20x200x784 product measured 40-70x slower with 2 threads
than with 1 on 2 loaded cores); ``--torch-threads 1`` shows how much of a gap that is.

The fp32 GEMM limit is the highest FLOP/s (median over interleaved rounds) of a 2048x2048x2048 product and
the decoder's (K*B x 200) @ (200 x 784) products, on torch's default and oneDNN paths and in jax.numpy (each
path in a process of its own). It is printed for the whole run at its start, and measured again in each cell:
there the products take their turns in the contenders' rounds, and the cell's share of the limit is against
the limit of its own rounds (the machine's speed moves from minute to minute). The achieved rate of a step is
its model FLOPs, 3x the GEMM FLOPs of the forward pass (2*m*n*k per linear layer, counted by
torch.utils.flop_counter on ``model.log_weights``), per second.

Evaluation (``--eval``, instead of training): the k=5000 log-likelihood of the MNIST test set
(``$IWAE_DATA_DIR``; random binary data of its shape when absent) with the untrained 1- and 2-layer models,
eager and compiled, each in a fresh process: time, fraction of the GEMM limit, peak memory, and the NLL
difference between the two (same seed, same random numbers).

    python benchmarks/throughput.py [--layers 1 2] [--k 1 5 50] [--batch 20 100] [--rounds 7]
                                    [--steps N | --round-seconds 1] [--torch-threads N] [--json PATH]
    python benchmarks/throughput.py --layers 1 --k 1 5 --batch 20 --rounds 3          # a quick check
    python benchmarks/throughput.py --eval [--layers 1 2] [--eval-examples 10000] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from evaluate_memory import BATCH_SIZE, CHUNK_SIZE, measure_in_subprocess, mnist_test_images
from own_process import OwnProcess, Runner
from torch.utils.flop_counter import FlopCounterMode

from iwae.core.objectives import Objective
from iwae.models import burda
from iwae.platform import gemm, heap
from iwae.training import config as train_config
from iwae.training import preflight
from iwae.training.step import TrainStep, make_adam

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-4
X_DIM = 784
SQUARE = 2048
COLUMNS = ("iwae compiled std", "iwae compiled dreg", "iwae eager std", "numpyro", "pyro")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def interleaved(runners: dict[str, tuple[Runner, int]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each runner in each round: the runners take turns, each making its number of
    calls per round, so that the machine's load affects them alike."""
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, (run, calls) in runners.items():
            start = time.perf_counter()
            run(calls)
            seconds[name].append((time.perf_counter() - start) / calls)
    return seconds


# --- the machine's fp32 GEMM limit ---------------------------------------------------------------------------

def torch_products(a: torch.Tensor, b: torch.Tensor, n: int) -> None:
    for _ in range(n):
        torch.mm(a, b)


def jax_products(matmul: Callable[[Any, Any], Any], a: Any, b: Any, n: int) -> None:
    import jax

    for _ in range(n):
        out = matmul(a, b)
    jax.block_until_ready(out)


def framework_products(framework: str, shapes: list[tuple[int, int, int]]) -> dict[str, Runner]:
    """Runners of float32 products (m x k) @ (k x n) of random matrices, one per shape (named "mxkxn"), in
    ``framework``: "torch" (on the process's matmul path) or "jax"."""
    generator = torch.Generator().manual_seed(0)
    runners = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
        if framework == "jax":
            import jax
            import jax.numpy as jnp

            run = partial(jax_products, jax.jit(jnp.matmul), jnp.asarray(a.numpy()), jnp.asarray(b.numpy()))
        else:
            run = partial(torch_products, a, b)
        runners[f"{m}x{k}x{n}"] = run
    return runners


Products = dict[str, tuple[Runner, int, int]]  # per product runner: the runner, its calls per round, FLOPs per call


def product_runners(stack: ExitStack, shapes: list[tuple[int, int, int]]) -> Products:
    """For each available path that multiplies to float32 rounding here (``gemm.accurate``) and each shape, a
    runner of float32 products (m x k) @ (k x n) named "<path> mxkxn" (warmed up), with its calls per round (about
    0.05-0.1 s of products) and FLOPs per call. Each path's products run in a process of its own, which ``stack``
    ends."""
    onednn = gemm.has_choice("cpu") and gemm.accurate(gemm.ONEDNN)
    paths = {f"torch {path}": ("torch", path) for path in [gemm.DEFAULT, *([gemm.ONEDNN] if onednn else [])]}
    if installed("jax"):
        paths["jax"] = ("jax", gemm.DEFAULT)
    workers = {name: stack.enter_context(OwnProcess(framework_products, framework, shapes, matmul_path=path))
               for name, (framework, path) in paths.items()}
    runners: Products = {}
    for m, k, n in shapes:
        for name, worker in workers.items():
            run = worker.runner(f"{m}x{k}x{n}")
            run(1)  # warm-up: kernels built, jit compiled
            runners[f"{name} {m}x{k}x{n}"] = (run, max(1, math.ceil(1e10 / (m * k * n))), 2 * m * k * n)
    return runners


def gemm_rates(products: Products, seconds: dict[str, list[float]]) -> dict[str, float]:
    """FLOP/s of each product runner from its seconds per call in interleaved rounds (their median)."""
    return {name: flops / statistics.median(seconds[name]) for name, (_, _, flops) in products.items()}


def timed_products(products: Products) -> dict[str, tuple[Runner, int]]:
    """The product runners as ``interleaved`` takes them."""
    return {name: (run, calls) for name, (run, calls, _) in products.items()}


def measure_limit(products: Products, rounds: int) -> float:
    """Time the product runners in ``rounds`` interleaved rounds, print their rates and return the limit, the
    highest of them."""
    rates = gemm_rates(products, interleaved(timed_products(products), rounds))
    limit = max(rates.values())
    print("fp32 GEMM, GFLOP/s (median of interleaved rounds): " +
          ", ".join(f"{name} {rate / 1e9:.0f}" for name, rate in rates.items()))
    print(f"fp32 GEMM limit of this machine: {limit / 1e9:.0f} GFLOP/s ({max(rates, key=rates.get)})")
    return limit


def forward_flops(model: torch.nn.Module, x: torch.Tensor, k: int) -> int:
    """The GEMM FLOPs (2*m*n*k per product) of ``model.log_weights(x, k)``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.log_weights(x, k)
    return counter.get_total_flops()


# --- the contenders ------------------------------------------------------------------------------------------

def iwae_runner(model: torch.nn.Module, x: torch.Tensor, k: int, estimator: str, compile: bool,
                inductor_options: dict[str, object] | None = None) -> Runner:
    step = TrainStep(model, make_adam(model, LR, BETAS, EPS), Objective("iwae", k), estimator, compile=compile,
                     inductor_options=inductor_options)

    def run(n: int) -> None:
        for _ in range(n):
            step(x)
        step.bound_sum.item()  # waits for the device

    return run


@dataclass(frozen=True)
class PPL:
    """What the model and guide need from Pyro or NumPyro: their primitives, distributions and array ops."""

    param: Callable[..., Any]
    sample: Callable[..., Any]
    plate: Callable[..., Any]
    dist: Any
    tanh: Callable[[Any], Any]
    exp: Callable[[Any], Any]
    array: Callable[[np.ndarray], Any]


def ppl_program(ppl: PPL, weights: dict[str, np.ndarray], layers: int) -> tuple[Callable, Callable]:
    """The iwae model ``burda(layers)`` as a Pyro/NumPyro model and guide over x (B, 784), its parameters
    ``ppl.param`` s initialised to ``weights`` (the iwae model's, named alike, weight matrices as (in, out))."""
    init = {name: ppl.array(value) for name, value in weights.items()}
    prior_loc = ppl.array(np.zeros(len(weights[f"encoder.{layers - 1}.mean.bias"]), dtype=np.float32))

    def linear(name: str, h: Any) -> Any:
        return h @ ppl.param(f"{name}.weight", init[f"{name}.weight"]) + ppl.param(f"{name}.bias", init[f"{name}.bias"])

    def body(prefix: str, h: Any) -> Any:
        i = 0
        while f"{prefix}.body.{i}.weight" in init:  # Linear, Tanh, Linear, Tanh, ...
            h, i = ppl.tanh(linear(f"{prefix}.body.{i}", h)), i + 2
        return h

    def gaussian(prefix: str, h: Any) -> Any:
        h = body(prefix, h)
        return ppl.dist.Normal(linear(f"{prefix}.mean", h), ppl.exp(linear(f"{prefix}.log_std", h))).to_event(1)

    def model(x: Any) -> None:
        with ppl.plate("data", x.shape[0]):
            z = ppl.sample(f"z{layers}", ppl.dist.Normal(prior_loc, 1.0).to_event(1))
            for level in reversed(range(1, layers)):
                z = ppl.sample(f"z{level}", gaussian(f"decoder.{level}", z))
            logits = linear("decoder.0.logits", body("decoder.0", z))
            ppl.sample("x", ppl.dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x: Any) -> None:
        with ppl.plate("data", x.shape[0]):
            h = x
            for level in range(layers):
                h = ppl.sample(f"z{level + 1}", gaussian(f"encoder.{level}", h))

    return model, guide


def pyro_runner(weights: dict[str, np.ndarray], layers: int, x: torch.Tensor, k: int) -> Runner:
    import pyro
    import pyro.distributions as dist

    pyro.clear_param_store()
    pyro.enable_validation(False)  # as iwae's distributions (validate_args=False)
    ppl = PPL(pyro.param, pyro.sample, pyro.plate, dist, torch.tanh, torch.exp, torch.from_numpy)
    model, guide = ppl_program(ppl, weights, layers)
    optimizer = pyro.optim.Adam({"lr": LR, "betas": BETAS, "eps": EPS})
    elbo = pyro.infer.RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    svi = pyro.infer.SVI(model, guide, optimizer, loss=elbo)

    def run(n: int) -> None:
        for _ in range(n):
            svi.step(x)

    return run


def numpyro_update(weights: dict[str, np.ndarray], layers: int, x: torch.Tensor, k: int) -> tuple[Any, Any, Any]:
    """NumPyro's jitted ``SVI.update``, its initial state and the data array."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, RenyiELBO

    ppl = PPL(numpyro.param, numpyro.sample, numpyro.plate, dist, jnp.tanh, jnp.exp, jnp.asarray)
    model, guide = ppl_program(ppl, weights, layers)
    optimizer = numpyro.optim.Adam(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS)
    svi = SVI(model, guide, optimizer, RenyiELBO(alpha=0, num_particles=k))
    data = jnp.asarray(x.numpy())
    return jax.jit(svi.update), svi.init(jax.random.PRNGKey(0), data), data


def numpyro_runner(weights: dict[str, np.ndarray], layers: int, x: torch.Tensor, k: int) -> Runner:
    import jax

    update, state, data = numpyro_update(weights, layers, x, k)

    def run(n: int) -> None:
        nonlocal state
        for _ in range(n):
            state, _ = update(state, data)
        jax.block_until_ready(state)

    return run


def initial_model(layers: int, x: torch.Tensor) -> torch.nn.Module:
    """The model every contender of a cell starts from."""
    torch.manual_seed(0)
    return burda(layers, X_DIM, train_mean=x.mean(0))


def choose_matmul(layers: int, batch: int, k: int) -> str:
    """Switch torch's fp32 matmuls to the path ``iwae train`` chooses for this cell (``train.training_matmul_path``: the
    faster on the cell's compiled training step, IWAE bound, standard estimator); return it."""
    config = train_config.TrainConfig(layers=layers, objective="iwae", k=k, estimator="standard", epochs=1,
                               batch_size=batch, compile=True)
    return preflight.training_matmul_path(config, X_DIM, torch.device("cpu"))


def cell_data(batch: int) -> torch.Tensor:
    """The fixed random binary minibatch (batch, 784) of a cell."""
    return (torch.rand(batch, X_DIM, generator=torch.Generator().manual_seed(1)) < 0.13).float()


def contender(name: str, layers: int, k: int, batch: int,
              inductor_options: dict[str, object] | None = None) -> dict[str, Runner]:
    """The runner of contender ``name`` (one of ``COLUMNS``) for a cell, as {name: runner}, from the cell's
    minibatch and initial weights (the same in every process); ``inductor_options`` as for ``TrainStep``."""
    x = cell_data(batch)
    if name.startswith("iwae"):
        estimator = "dreg" if name.endswith("dreg") else "standard"
        return {name: iwae_runner(initial_model(layers, x), x, k, estimator, compile="compiled" in name,
                                  inductor_options=inductor_options)}
    return {name: (numpyro_runner if name == "numpyro" else pyro_runner)(peer_weights(layers, x), layers, x, k)}


def peer_weights(layers: int, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The initial weights of a cell's model, by parameter name, as the peers take them (weight matrices as
    (in, out))."""
    return {name: p.detach().numpy().T.copy() for name, p in initial_model(layers, x).named_parameters()}


# --- training throughput -------------------------------------------------------------------------------------

def calibrate(run: Runner, seconds: float) -> int:
    """Warm ``run`` up, doubling its calls until they take a quarter of ``seconds``; return the number of
    calls that takes about ``seconds``."""
    calls = 1
    while True:
        start = time.perf_counter()
        run(calls)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 4:
            return max(1, round(calls * seconds / elapsed))
        calls *= 2


def time_cell(layers: int, k: int, batch: int, products: Products, args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up and time every contender of one (layers, K, B) cell, each in a process of its own, in
    interleaved rounds with the cell's ``products`` (which measure the GEMM limit beside the contenders)."""
    torch._dynamo.reset()  # a fresh compilation cache per cell: no recompilation limit reached over cells
    path = choose_matmul(layers, batch, k)
    names = [name for name in COLUMNS if name.startswith("iwae") or name in args.peers]
    first_call, steps = {}, {}
    with ExitStack() as stack:
        runners = {name: stack.enter_context(OwnProcess(contender, name, layers, k, batch, matmul_path=path))
                   .runner(name) for name in names}
        for name, run in runners.items():
            start = time.perf_counter()
            run(1)  # compiles, where there is something to compile
            first_call[name] = time.perf_counter() - start
            steps[name] = args.steps or calibrate(run, args.round_seconds)
        seconds = interleaved({**{name: (run, steps[name]) for name, run in runners.items()},
                               **timed_products(products)}, args.rounds)
    x = cell_data(batch)
    flops = forward_flops(initial_model(layers, x), x, k)
    rates = gemm_rates(products, seconds)
    return {
        "layers": layers, "k": k, "batch": batch, "matmul_path": path, "steps": steps, "rounds": args.rounds,
        "forward_gemm_flops": flops, "step_flops": 3 * flops,
        "first_call_s": first_call,
        "examples_per_s": {name: batch / statistics.median(seconds[name]) for name in names},
        "rounds_examples_per_s": {name: [batch / t for t in seconds[name]] for name in names},
        "gemm_flops_per_s": rates, "gemm_limit_flops_per_s": max(rates.values()),
    }


def add_ratios(cell: dict[str, Any]) -> None:
    rate = cell["examples_per_s"]
    std = rate["iwae compiled std"]
    cell["compiled_std_over_numpyro"] = std / rate["numpyro"] if "numpyro" in rate else None
    cell["dreg_over_std"] = rate["iwae compiled dreg"] / std
    cell["achieved_flops_per_s"] = cell["step_flops"] * std / cell["batch"]
    cell["gemm_fraction"] = cell["achieved_flops_per_s"] / cell["gemm_limit_flops_per_s"]


def print_table(layers: int, cells: list[dict[str, Any]], names: list[str]) -> None:
    """The examples/s table of one model, then its first-call (compile) seconds."""
    short = [name.replace("iwae ", "") for name in names]
    widths = [max(9, len(name)) for name in short]
    print(f"\n{layers} stochastic layer(s), IWAE bound: examples/s (median over rounds)")
    header = f"{'K':>3} {'B':>4}  " + "  ".join(f"{n:>{w}}" for n, w in zip(short, widths, strict=True))
    print(header + f"  {'std/numpyro':>11}  {'dreg/std':>8}  {'GEMM frac':>9}  {'of GFLOP/s':>10}  {'matmul':>7}")
    for cell in cells:
        rate, ratio = cell["examples_per_s"], cell["compiled_std_over_numpyro"]
        row = "  ".join(f"{rate.get(n, math.nan):>{w},.0f}" for n, w in zip(names, widths, strict=True))
        numpyro = f"{ratio:11.2f}" if ratio is not None else f"{'-':>11}"
        print(f"{cell['k']:>3} {cell['batch']:>4}  {row}  {numpyro}  {cell['dreg_over_std']:8.3f}  "
              f"{cell['gemm_fraction']:9.1%}  {cell['gemm_limit_flops_per_s'] / 1e9:10.0f}  {cell['matmul_path']:>7}")
    print("first call (compilation) s / steps per round")
    for cell in cells:
        first = "  ".join(f"{cell['first_call_s'].get(n, math.nan):>{w - 6}.1f} /{cell['steps'].get(n, 0):>4}"
                          for n, w in zip(names, widths, strict=True))
        print(f"{cell['k']:>3} {cell['batch']:>4}  {first}")


def train_benchmark(args: argparse.Namespace, result: dict[str, Any]) -> None:
    cells = [(k, b) for k in args.k for b in args.batch]
    result["cells"] = []
    names = [n for n in COLUMNS if n not in ("numpyro", "pyro") or n in args.peers]
    with ExitStack() as stack:
        products = product_runners(stack, [(SQUARE, SQUARE, SQUARE), *sorted({(k * b, 200, X_DIM) for k, b in cells})])
        limit = measure_limit(products, args.rounds)
        result["gemm_limit_flops_per_s"] = limit
        for layers in args.layers:
            timed = []
            for k, batch in cells:
                shapes = (f"{SQUARE}x{SQUARE}x{SQUARE}", f"{k * batch}x200x{X_DIM}")
                cell_products = {name: product for name, product in products.items() if name.endswith(shapes)}
                cell = time_cell(layers, k, batch, cell_products, args)
                add_ratios(cell)
                timed.append(cell)
                result["cells"].append(cell)
                write_json(args.json, result)
                print(f"  timed layers={layers} K={k} B={batch}: compiled std "
                      f"{cell['examples_per_s'][names[0]]:,.0f} examples/s", flush=True)
            print_table(layers, timed, names)


# --- evaluation ----------------------------------------------------------------------------------------------

def eval_flops(layers: int, examples: int, k: int) -> float:
    """GEMM FLOPs of evaluating ``examples`` examples with k samples (passes of BATCH_SIZE x CHUNK_SIZE)."""
    x = torch.zeros(BATCH_SIZE, X_DIM)
    return forward_flops(burda(layers, X_DIM), x, CHUNK_SIZE) * (examples / BATCH_SIZE) * (k / CHUNK_SIZE)


def eval_benchmark(args: argparse.Namespace, result: dict[str, Any]) -> None:
    with ExitStack() as stack:
        products = product_runners(stack, [(SQUARE, SQUARE, SQUARE), (BATCH_SIZE * CHUNK_SIZE, 200, X_DIM)])
        limit = measure_limit(products, 5)
    images, source = mnist_test_images()
    examples = min(args.eval_examples, len(images))
    print(f"\nk={args.k_eval} log-likelihood of {examples} of {len(images)} images ({source}), untrained models, "
          f"passes of {BATCH_SIZE} examples x {min(args.k_eval, CHUNK_SIZE)} samples")
    print(f"{'layers':>6} {'mode':>8} {'first pass s':>12} {'time s':>8} {'GEMM frac':>9} {'peak MiB':>8} "
          f"{'NLL':>10}")
    result.update(gemm_limit_flops_per_s=limit, eval_source=source, eval=[])
    with tempfile.TemporaryDirectory() as tmp:
        test_file = Path(tmp) / "test.pt"
        torch.save(images, test_file)
        for layers in args.layers:
            flops = eval_flops(layers, examples, args.k_eval)
            runs = {}
            for mode in ("eager", "compiled"):
                run = measure_in_subprocess(test_file, layers, args.k_eval, examples, "cpu", mode == "compiled")
                run.update(layers=layers, mode=mode, examples=examples, k=args.k_eval, gemm_flops=flops,
                           gemm_fraction=flops / run["seconds"] / limit)
                runs[mode] = run
                result["eval"].append(run)
                write_json(args.json, result)
                print(f"{layers:>6} {mode:>8} {run['first_pass_seconds']:12.1f} {run['seconds']:8.1f} "
                      f"{run['gemm_fraction']:9.1%} {run['peak'] / 2**20:8.0f} {run['nll']:10.4f}", flush=True)
            difference = runs["compiled"]["nll"] - runs["eager"]["nll"]
            speedup = runs["eager"]["seconds"] / runs["compiled"]["seconds"]
            print(f"{layers:>6} compiled - eager NLL: {difference:+.5f} nats; compiled {speedup:.2f}x eager")


# --- main ----------------------------------------------------------------------------------------------------

def write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", choices=[1, 2], default=[1, 2])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 50], help="samples per example (training)")
    parser.add_argument("--batch", type=int, nargs="+", default=[20, 100], help="minibatch sizes (training)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (training)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per contender per round (default: as many as take --round-seconds)")
    parser.add_argument("--round-seconds", type=float, default=1.0,
                        help="time per contender per round, without --steps (set from its warm-up)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch's threads (default: torch's)")
    parser.add_argument("--eval", action="store_true", help="time the evaluation instead of training")
    parser.add_argument("--eval-examples", type=int, default=10_000, help="test images to evaluate (--eval)")
    parser.add_argument("--k-eval", type=int, default=5000, help="importance samples per image (--eval)")
    parser.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    args = parser.parse_args()
    counts = [*args.k, *args.batch, args.rounds, args.steps or 1, args.torch_threads or 1, args.eval_examples,
              args.k_eval, args.round_seconds]
    if min(counts) <= 0:
        parser.error("--k, --batch, --rounds, --steps, --round-seconds, --torch-threads, --eval-examples and "
                     "--k-eval must be positive")

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    heap.retain_freed_memory()  # as the iwae command does, where the matmul path of a cell is chosen
    args.peers = [name for name, modules in (("numpyro", ("numpyro", "jax")), ("pyro", ("pyro",)))
                  if all(installed(m) for m in modules)]
    for name in {"numpyro", "pyro"} - set(args.peers):
        print(f"{name} is not installed: skipped (pip install -e '.[bench]')")
    versions = {m: importlib.metadata.version(d) for m, d in (("torch", "torch"), ("jax", "jax"),
                ("numpyro", "numpyro"), ("pyro", "pyro-ppl")) if installed(m)}
    print(f"{cpu_name()}, {torch.get_num_threads()} torch threads, "
          + ", ".join(f"{m} {v}" for m, v in versions.items()))
    result: dict[str, Any] = {"machine": platform.platform(), "processor": cpu_name(), "versions": versions,
                              "torch_threads": torch.get_num_threads()}
    if args.eval:
        eval_benchmark(args, result)
    else:
        train_benchmark(args, result)
    write_json(args.json, result)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
