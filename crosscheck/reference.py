"""An independent JAX reference of the IWAE paper's 1-stochastic-layer MNIST protocol.

Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders" (ICLR 2016). Written from the paper's
protocol only; it shares no code with the ``iwae`` package (not even data loading), so that the two can be
trained on the same cells and their test NLLs compared.

Usage::

    python crosscheck/reference.py --objective iwae --k 50 --budget 0.01 --seeds 0 1 2 3 \
        --data-dir /work/shared/data --out runs/ref-iwae-k50

Each seed trains into OUT/seed-<s>/ (config.json, metrics.jsonl, checkpoint.npz, eval.json). Rerunning the
same command resumes from the last finished epoch; a seed whose eval.json exists is skipped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# One thread unless the caller says otherwise (must be set before jax is imported). NPROC sizes XLA's CPU thread
# pool (without it XLA splits the work over every core, whatever XLA_FLAGS says).
os.environ.setdefault("NPROC", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, jax.Array]
State = dict[str, Any]  # {"params", "m", "v", "t"}

BATCH = 20
HIDDEN = 200
LATENT = 50
PIXELS = 784
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-4
TEST_BINARIZATION_SEED = 12345
TEST_BOUND_EXAMPLES = 1000
LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------- data
def subset_indices(n: int, examples: int) -> np.ndarray:
    """The test images of a subset (each epoch's test bound; an evaluation shrunk by --eval-examples): the first
    ``examples`` of a permutation of ``n`` drawn by torch's generator seeded with 0, in file order. That is how
    `iwae` documents its subsets, so both sides' curves are on the same images (a random subset: the first images
    of the file are not representative of the rest)."""
    import torch  # only for its permutation, to pick the same images

    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return np.sort(permutation[:examples].numpy())


def read_idx_images(path: Path) -> np.ndarray:
    """Read a gzip IDX3 image file into a uint8 array of shape (n, rows * cols)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">i4")
    if magic != 0x00000803:
        raise ValueError(f"{path}: bad IDX magic {magic:#010x}")
    pixels = np.frombuffer(raw[16:], dtype=np.uint8)
    if pixels.size != n * rows * cols:
        raise ValueError(f"{path}: expected {n * rows * cols} pixels, found {pixels.size}")
    return pixels.reshape(n, rows * cols)


def load_mnist(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Training intensities in [0, 1] (60000, 784) and the test set binarized once with a fixed seed."""
    mnist = data_dir / "mnist" if (data_dir / "mnist").is_dir() else data_dir
    train = read_idx_images(mnist / "train-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    test = read_idx_images(mnist / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    rng = np.random.default_rng(TEST_BINARIZATION_SEED)
    test_bin = (rng.random(test.shape) < test).astype(np.float32)
    return train, test_bin


# ---------------------------------------------------------------------------------------------- model
def glorot(key: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, (fan_in, fan_out), jnp.float32, -limit, limit)


def init_params(key: jax.Array, train_mean: np.ndarray) -> Params:
    """Glorot-uniform weights, zero biases; decoder output bias = logit of the clipped training mean."""
    shapes = {
        "enc1": (PIXELS, HIDDEN),
        "enc2": (HIDDEN, HIDDEN),
        "enc_mu": (HIDDEN, LATENT),
        "enc_logstd": (HIDDEN, LATENT),
        "dec1": (LATENT, HIDDEN),
        "dec2": (HIDDEN, HIDDEN),
        "dec_out": (HIDDEN, PIXELS),
    }
    params: Params = {}
    for sub, (name, (fan_in, fan_out)) in zip(jax.random.split(key, len(shapes)), shapes.items(), strict=True):
        params[f"{name}_w"] = glorot(sub, fan_in, fan_out)
        params[f"{name}_b"] = jnp.zeros((fan_out,), jnp.float32)
    p = np.clip(train_mean.astype(np.float64), 0.001, 0.999)
    params["dec_out_b"] = jnp.asarray(np.log(p) - np.log1p(-p), jnp.float32)
    return params


def dense(params: Params, name: str, h: jax.Array) -> jax.Array:
    return h @ params[f"{name}_w"] + params[f"{name}_b"]


def encode(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q(z|x): mean and standard deviation (exp of a linear head)."""
    h = jnp.tanh(dense(params, "enc2", jnp.tanh(dense(params, "enc1", x))))
    return dense(params, "enc_mu", h), jnp.exp(dense(params, "enc_logstd", h))


def decode(params: Params, z: jax.Array) -> jax.Array:
    """p(x|z): Bernoulli logits."""
    return dense(params, "dec_out", jnp.tanh(dense(params, "dec2", jnp.tanh(dense(params, "dec1", z)))))


def gaussian_log_pdf(z: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """log N(z; mean, diag(std^2)) summed over the last axis."""
    u = (z - mean) / std
    return jnp.sum(-0.5 * u * u - jnp.log(std) - 0.5 * LOG_2PI, axis=-1)


def bernoulli_log_lik(x: jax.Array, logits: jax.Array) -> jax.Array:
    """log Bernoulli(x; sigmoid(logits)) summed over the last axis: x*l - log(1 + e^l)."""
    return jnp.sum(x * logits - jnp.logaddexp(0.0, logits), axis=-1)


def log_weights(params: Params, x: jax.Array, eps: jax.Array) -> jax.Array:
    """log w = log p(x|z) + log p(z) - log q(z|x) with z = mean + std * eps; x (B, 784), eps (k, B, 50) -> (k, B)."""
    mean, std = encode(params, x)
    z = mean + std * eps
    log_q = gaussian_log_pdf(z, mean, std)
    log_prior = gaussian_log_pdf(z, jnp.zeros_like(z), jnp.ones_like(z))
    return bernoulli_log_lik(x, decode(params, z)) + log_prior - log_q


def bound_from_log_weights(log_w: jax.Array, objective: str) -> jax.Array:
    """Per-example bound from (k, B) log weights: VAE = mean_i log w_i; IWAE = log (1/k) sum_i w_i."""
    if objective == "vae":
        return jnp.mean(log_w, axis=0)
    if objective == "iwae":
        return jax.nn.logsumexp(log_w, axis=0) - math.log(log_w.shape[0])
    raise ValueError(f"unknown objective {objective!r}")


def bound(params: Params, x: jax.Array, key: jax.Array, objective: str, k: int) -> jax.Array:
    eps = jax.random.normal(key, (k, x.shape[0], LATENT), jnp.float32)
    return bound_from_log_weights(log_weights(params, x, eps), objective)


# ------------------------------------------------------------------------------------------- training
def adam_update(state: State, grads: Params, lr: jax.Array) -> State:
    """Kingma & Ba's Adam with bias correction: p -= lr * m_hat / (sqrt(v_hat) + eps)."""
    t = state["t"] + 1
    m = jax.tree.map(lambda m, g: ADAM_B1 * m + (1.0 - ADAM_B1) * g, state["m"], grads)
    v = jax.tree.map(lambda v, g: ADAM_B2 * v + (1.0 - ADAM_B2) * g * g, state["v"], grads)
    c1 = 1.0 - ADAM_B1 ** t.astype(jnp.float32)
    c2 = 1.0 - ADAM_B2 ** t.astype(jnp.float32)
    params = jax.tree.map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + ADAM_EPS), state["params"], m, v)
    return {"params": params, "m": m, "v": v, "t": t}


def make_epoch_fn(objective: str, k: int, steps: int) -> Callable[..., tuple[State, jax.Array]]:
    """One jitted epoch: a fresh permutation, `steps` minibatches of 20, each binarized afresh, in a lax.scan."""

    def loss(params: Params, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        per_example = bound(params, x, key, objective, k)
        return -jnp.sum(per_example), jnp.sum(per_example)

    grad_fn = jax.grad(loss, has_aux=True)

    def step(
        state: State, inp: tuple[jax.Array, jax.Array], train: jax.Array, lr: jax.Array
    ) -> tuple[State, jax.Array]:
        idx, key = inp
        k_bin, k_eps = jax.random.split(key)
        probs = train[idx]
        x = (jax.random.uniform(k_bin, probs.shape) < probs).astype(jnp.float32)
        grads, bound_sum = grad_fn(state["params"], x, k_eps)
        return adam_update(state, grads, lr), bound_sum

    @jax.jit
    def epoch(state: State, train: jax.Array, key: jax.Array, lr: jax.Array) -> tuple[State, jax.Array]:
        k_perm, k_steps = jax.random.split(key)
        perm = jax.random.permutation(k_perm, train.shape[0])[: steps * BATCH].reshape(steps, BATCH)
        state, sums = jax.lax.scan(lambda s, i: step(s, i, train, lr), state, (perm, jax.random.split(k_steps, steps)))
        return state, jnp.sum(sums) / (steps * BATCH)

    return epoch


def make_test_bound_fn(objective: str, k: int, chunk: int = 100) -> Callable[[Params, jax.Array, jax.Array], jax.Array]:
    """The training objective's own bound (one draw, same k) averaged over the given test examples."""

    @jax.jit
    def test_bound(params: Params, x: jax.Array, key: jax.Array) -> jax.Array:
        xs = x.reshape(-1, chunk, PIXELS)
        keys = jax.random.split(key, xs.shape[0])
        return jnp.mean(jax.lax.map(lambda a: bound(params, a[0], a[1], objective, k), (xs, keys)))

    return test_bound


def make_log_likelihood_fn(eval_k: int, sample_chunk: int) -> Callable[[Params, jax.Array, jax.Array], jax.Array]:
    """log (1/K) sum_i w_i per example, K = eval_k samples streamed in chunks with a running logsumexp."""
    n_chunks = eval_k // sample_chunk

    @jax.jit
    def log_likelihood(params: Params, x: jax.Array, key: jax.Array) -> jax.Array:
        def body(carry: tuple[jax.Array, jax.Array], key: jax.Array) -> tuple[tuple[jax.Array, jax.Array], None]:
            run_max, run_sum = carry  # log sum_i w_i = run_max + log(run_sum)
            log_w = log_weights(params, x, jax.random.normal(key, (sample_chunk, x.shape[0], LATENT), jnp.float32))
            new_max = jnp.maximum(run_max, jnp.max(log_w, axis=0))
            run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.sum(jnp.exp(log_w - new_max), axis=0)
            return (new_max, run_sum), None

        init = (jnp.full((x.shape[0],), -jnp.inf, jnp.float32), jnp.zeros((x.shape[0],), jnp.float32))
        (run_max, run_sum), _ = jax.lax.scan(body, init, jax.random.split(key, n_chunks))
        return run_max + jnp.log(run_sum) - math.log(eval_k)

    return log_likelihood


# ------------------------------------------------------------------------------------------- plumbing
def schedule(budget: float) -> list[float]:
    """Learning rate of each epoch: stage i = 0..7 has max(1, round(3**i * budget)) epochs at 1e-3 * 10**(-i/7)."""
    return [1e-3 * 10 ** (-i / 7) for i in range(8) for _ in range(max(1, round(3**i * budget)))]


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: State, key: jax.Array, epoch: int, metrics: list[dict]) -> None:
    arrays = {f"{group}/{name}": np.asarray(a) for group in ("params", "m", "v") for name, a in state[group].items()}
    arrays |= {"t": np.asarray(state["t"]), "key": np.asarray(key), "epoch": np.asarray(epoch)}
    arrays["metrics"] = np.asarray(json.dumps(metrics))
    atomic_write(path, lambda f: np.savez(f, **arrays), mode="wb")


def load_checkpoint(path: Path) -> tuple[State, jax.Array, int, list[dict]]:
    with np.load(path) as z:
        state: State = {g: {} for g in ("params", "m", "v")}
        for name in z.files:
            if "/" in name:
                group, leaf = name.split("/", 1)
                state[group][leaf] = jnp.asarray(z[name])
        state["t"] = jnp.asarray(z["t"])
        return state, jnp.asarray(z["key"]), int(z["epoch"]), json.loads(str(z["metrics"]))


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"))


def run_seed(args: argparse.Namespace, seed: int, train: np.ndarray, test_bin: np.ndarray) -> None:
    out = args.out / f"seed-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    if (out / "eval.json").exists():
        print(f"[seed {seed}] eval.json present, skipping", file=sys.stderr)
        return
    lrs = schedule(args.budget)
    steps = args.steps_per_epoch or train.shape[0] // BATCH
    config = {
        "objective": args.objective,
        "k": args.k,
        "budget": args.budget,
        "seed": seed,
        "epochs": len(lrs),
        "steps_per_epoch": steps,
        "batch": BATCH,
        "adam": [ADAM_B1, ADAM_B2, ADAM_EPS],
        "eval_k": args.eval_k,
        "eval_examples": args.eval_examples,
        "test_binarization_seed": TEST_BINARIZATION_SEED,
        "jax": jax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "nproc": os.environ.get("NPROC", ""),
    }
    ckpt = out / "checkpoint.npz"
    if ckpt.exists():
        old = json.loads((out / "config.json").read_text())
        ignore = {"jax", "numpy", "backend", "xla_flags", "nproc", "eval_k", "eval_examples"}
        if {a: b for a, b in old.items() if a not in ignore} != {a: b for a, b in config.items() if a not in ignore}:
            raise SystemExit(f"{out}: checkpoint was written with another config: {old}")
        state, key, done, metrics = load_checkpoint(ckpt)
        print(f"[seed {seed}] resuming after epoch {done}", file=sys.stderr)
    else:
        init_key, key = jax.random.split(jax.random.PRNGKey(seed))
        params = init_params(init_key, train.mean(axis=0, dtype=np.float64))
        zeros = jax.tree.map(jnp.zeros_like, params)
        state, done, metrics = {"params": params, "m": zeros, "v": zeros, "t": jnp.asarray(0, jnp.int32)}, 0, []
    write_json(out / "config.json", config)

    train_dev, test_dev = jnp.asarray(train), jnp.asarray(test_bin)
    monitor_x = test_dev[subset_indices(len(test_bin), TEST_BOUND_EXAMPLES)]
    lr_dtype = jax.ShapeDtypeStruct((), jnp.float32)  # compiled ahead, so that epoch times exclude compilation
    epoch_fn = make_epoch_fn(args.objective, args.k, steps).lower(state, train_dev, key, lr_dtype).compile()
    test_bound_fn = make_test_bound_fn(args.objective, args.k)
    for epoch in range(done + 1, len(lrs) + 1):
        lr = lrs[epoch - 1]
        key, k_epoch, k_test = jax.random.split(key, 3)
        t0 = time.perf_counter()
        state, train_bound = epoch_fn(state, train_dev, k_epoch, jnp.asarray(lr, jnp.float32))
        train_bound = float(train_bound)
        elapsed = time.perf_counter() - t0
        test_bound = float(test_bound_fn(state["params"], monitor_x, k_test))
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_bound": train_bound,
            "test_bound": test_bound,
            "examples_per_s": steps * BATCH / elapsed,
            "epoch_time_s": elapsed,
        }
        metrics.append(row)
        save_checkpoint(ckpt, state, key, epoch, metrics)
        atomic_write(out / "metrics.jsonl", lambda f: f.writelines(json.dumps(r) + "\n" for r in metrics))
        print(
            f"[seed {seed}] epoch {epoch}/{len(lrs)} lr {lr:.2e} train {train_bound:.3f} test {test_bound:.3f} "
            f"{row['examples_per_s']:.0f} ex/s {elapsed:.1f} s",
            file=sys.stderr,
        )

    t0 = time.perf_counter()
    ll_fn = make_log_likelihood_fn(args.eval_k, min(args.eval_sample_chunk, args.eval_k))
    eval_x = test_dev[subset_indices(len(test_bin), args.eval_examples)]
    n, chunk = len(eval_x), args.eval_example_chunk
    eval_key = jax.random.fold_in(jax.random.PRNGKey(seed), 2**31 - 1)
    lls = [
        ll_fn(state["params"], eval_x[i : min(i + chunk, n)], jax.random.fold_in(eval_key, i))
        for i in range(0, n, chunk)
    ]
    ll = np.concatenate([np.asarray(a, np.float64) for a in lls])
    result = {
        "nll": float(-ll.mean()),
        "nll_se": float(ll.std(ddof=1) / math.sqrt(ll.size)) if ll.size > 1 else 0.0,
        "k": args.eval_k,
        "examples": int(ll.size),
        "epoch": len(lrs),
        "time_s": time.perf_counter() - t0,
    }
    write_json(out / "eval.json", result)
    print(
        f"[seed {seed}] test NLL {result['nll']:.3f} +- {result['nll_se']:.3f} ({result['time_s']:.0f} s)",
        file=sys.stderr,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", choices=["vae", "iwae"], required=True)
    p.add_argument("--k", type=int, required=True, help="samples per example in the training objective")
    p.add_argument("--budget", type=float, default=1.0, help="scales the 3**i epochs of stage i (1 = the paper)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--data-dir", type=Path, required=True, help="folder holding mnist/*-idx3-ubyte.gz")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--eval-k", type=int, default=5000)
    p.add_argument("--eval-examples", type=int, default=10000)
    p.add_argument("--eval-sample-chunk", type=int, default=500, help=argparse.SUPPRESS)
    p.add_argument("--eval-example-chunk", type=int, default=50, help=argparse.SUPPRESS)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="truncate epochs (smoke tests only)")
    args = p.parse_args(argv)
    if args.eval_k % min(args.eval_sample_chunk, args.eval_k):
        p.error("--eval-k must be a multiple of --eval-sample-chunk")
    if not 1 <= args.eval_examples <= 10000:
        p.error("--eval-examples must be in 1..10000")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    train, test_bin = load_mnist(args.data_dir)
    for seed in args.seeds:
        run_seed(args, seed, train, test_bin)


if __name__ == "__main__":
    main()
