"""Checks of crosscheck/reference.py against independent formulas (numpy/scipy) and known answers.

Run with ``pytest crosscheck/test_reference.py`` in an environment with jax; skipped without it.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
stats = pytest.importorskip("scipy.stats")
special = pytest.importorskip("scipy.special")

sys.path.insert(0, str(Path(__file__).parent))
import reference as ref  # noqa: E402


def random_params(seed: int = 0) -> ref.Params:
    rng = np.random.default_rng(seed)
    params = ref.init_params(jax.random.PRNGKey(seed), rng.uniform(0, 1, ref.PIXELS))
    # Non-zero biases so that every term of the model is exercised.
    return {n: p + (0.1 * rng.standard_normal(p.shape)).astype(np.float32) for n, p in params.items()}


def test_gaussian_log_pdf_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    z, mean = rng.standard_normal((2, 7, 50))
    std = np.exp(rng.uniform(-2, 1, (7, 50)))
    got = np.asarray(ref.gaussian_log_pdf(jnp.asarray(z), jnp.asarray(mean), jnp.asarray(std)))
    want = stats.norm.logpdf(z, mean, std).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_bernoulli_log_lik_matches_numpy_including_extreme_logits() -> None:
    rng = np.random.default_rng(2)
    x = (rng.uniform(size=(6, 784)) < 0.3).astype(np.float32)
    logits = (rng.standard_normal((6, 784)) * 5).astype(np.float32)
    p = special.expit(logits.astype(np.float64))
    want = (x * np.log(p) + (1 - x) * np.log1p(-p)).sum(-1)
    np.testing.assert_allclose(np.asarray(ref.bernoulli_log_lik(jnp.asarray(x), jnp.asarray(logits))), want, rtol=1e-5)
    extreme = np.asarray(ref.bernoulli_log_lik(jnp.array([[1.0, 0.0]]), jnp.array([[-200.0, 200.0]])))
    np.testing.assert_allclose(extreme, [-400.0], rtol=1e-6)


def numpy_log_weights(params: ref.Params, x: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """log w written out again in float64 numpy with scipy densities."""
    p = {n: np.asarray(a, np.float64) for n, a in params.items()}
    h = np.tanh(np.tanh(x @ p["enc1_w"] + p["enc1_b"]) @ p["enc2_w"] + p["enc2_b"])
    mean, std = h @ p["enc_mu_w"] + p["enc_mu_b"], np.exp(h @ p["enc_logstd_w"] + p["enc_logstd_b"])
    z = mean + std * eps
    g = np.tanh(np.tanh(z @ p["dec1_w"] + p["dec1_b"]) @ p["dec2_w"] + p["dec2_b"])
    logits = g @ p["dec_out_w"] + p["dec_out_b"]
    log_px = (x * special.log_expit(logits) + (1 - x) * special.log_expit(-logits)).sum(-1)
    return log_px + stats.norm.logpdf(z).sum(-1) - stats.norm.logpdf(z, mean, std).sum(-1)


def test_log_weights_match_numpy() -> None:
    rng = np.random.default_rng(3)
    params = random_params(3)
    x = (rng.uniform(size=(4, 784)) < 0.4).astype(np.float32)
    eps = rng.standard_normal((5, 4, 50)).astype(np.float32)
    got = np.asarray(ref.log_weights(params, jnp.asarray(x), jnp.asarray(eps)))
    np.testing.assert_allclose(got, numpy_log_weights(params, x, eps), rtol=1e-4, atol=1e-2)


def test_bounds_iwae_k1_equals_vae_and_jensen() -> None:
    params = random_params(4)
    x = (np.random.default_rng(4).uniform(size=(8, 784)) < 0.4).astype(np.float32)
    key = jax.random.PRNGKey(5)
    np.testing.assert_allclose(ref.bound(params, x, key, "iwae", 1), ref.bound(params, x, key, "vae", 1), rtol=1e-6)
    log_w = ref.log_weights(params, jnp.asarray(x), jax.random.normal(key, (7, 8, ref.LATENT)))
    iwae, vae = ref.bound_from_log_weights(log_w, "iwae"), ref.bound_from_log_weights(log_w, "vae")
    np.testing.assert_allclose(iwae, special.logsumexp(np.asarray(log_w, np.float64), axis=0) - math.log(7), rtol=1e-5)
    np.testing.assert_allclose(vae, np.asarray(log_w).mean(0), rtol=1e-5)
    assert np.all(np.asarray(iwae) >= np.asarray(vae) - 1e-3)


def test_known_answer_decoder_independent_of_z() -> None:
    """With p(x|z) = p(x) (zero decoder weights), E[w] = p(x) exactly and E[log w] = log p(x) - KL(q || N(0, I))."""
    params = random_params(6)
    params["dec_out_w"] = jnp.zeros_like(params["dec_out_w"])
    # q a little wider than the prior (std = e^0.1) and near it: w / p(x) is bounded, its mean converges fast.
    params["enc_logstd_w"] = jnp.zeros_like(params["enc_logstd_w"])
    params["enc_logstd_b"] = jnp.full_like(params["enc_logstd_b"], 0.1)
    params["enc_mu_w"] = params["enc_mu_w"] * 0.1
    x = (np.random.default_rng(6).uniform(size=(3, 784)) < 0.4).astype(np.float32)
    log_px = np.asarray(ref.bernoulli_log_lik(jnp.asarray(x), params["dec_out_b"][None]), np.float64)
    mean, std = (np.asarray(a, np.float64) for a in ref.encode(params, jnp.asarray(x)))
    kl = (0.5 * (mean**2 + std**2 - 1) - np.log(std)).sum(-1)
    log_w = ref.log_weights(params, jnp.asarray(x), jax.random.normal(jax.random.PRNGKey(7), (4000, 3, ref.LATENT)))
    vae = np.asarray(ref.bound_from_log_weights(log_w, "vae"))
    log_ratio = np.asarray(log_w, np.float64) - log_px  # log p(z) - log q(z|x)
    se = log_ratio.std(0) / math.sqrt(4000)
    assert np.all(np.abs(vae - (log_px - kl)) < 4 * se + 1e-3), (vae - log_px, -kl, se)
    ll = np.asarray(ref.make_log_likelihood_fn(20000, 2000)(params, jnp.asarray(x), jax.random.PRNGKey(8)))
    rel_se = np.exp(log_ratio).std(0) / math.sqrt(20000)  # sd of the estimate of E[w] / p(x) = 1
    assert np.all(np.abs(ll - log_px) < 4 * rel_se + 1e-3), (ll - log_px, rel_se)
    assert np.all(ll > vae)


def test_streaming_logsumexp_equals_direct() -> None:
    params = random_params(9)
    x = jnp.asarray((np.random.default_rng(9).uniform(size=(5, 784)) < 0.4).astype(np.float32))
    key = jax.random.PRNGKey(10)
    got = np.asarray(ref.make_log_likelihood_fn(200, 50)(params, x, key))
    eps = jnp.concatenate([jax.random.normal(k, (50, 5, ref.LATENT)) for k in jax.random.split(key, 4)])
    want = special.logsumexp(np.asarray(ref.log_weights(params, x, eps), np.float64), axis=0) - math.log(200)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_adam_matches_hand_computation() -> None:
    p0, g1, g2, lr = np.array([0.5, -1.0]), np.array([0.1, -2.0]), np.array([0.3, 0.5]), 0.01
    state = {"params": {"w": jnp.asarray(p0)}, "m": {"w": jnp.zeros(2)}, "v": {"w": jnp.zeros(2)}, "t": jnp.asarray(0)}
    for g in (g1, g2):
        state = ref.adam_update(state, {"w": jnp.asarray(g)}, jnp.asarray(lr))
    m, v, p = np.zeros(2), np.zeros(2), p0.copy()
    for t, g in enumerate((g1, g2), start=1):
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        p = p - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-4)
    np.testing.assert_allclose(np.asarray(state["params"]["w"]), p, rtol=1e-5)
    assert int(state["t"]) == 2


def test_schedule() -> None:
    lrs = ref.schedule(0.01)
    assert [lrs.count(lr) for lr in sorted(set(lrs), reverse=True)] == [1, 1, 1, 1, 1, 2, 7, 22]
    assert len(ref.schedule(1.0)) == 3280
    assert ref.schedule(1.0)[-1] == pytest.approx(1e-4)


def test_init() -> None:
    mean = np.linspace(0.0, 1.0, ref.PIXELS)
    params = ref.init_params(jax.random.PRNGKey(0), mean)
    p = np.clip(mean, 0.001, 0.999)
    np.testing.assert_allclose(np.asarray(params["dec_out_b"]), np.log(p / (1 - p)), rtol=1e-5)
    assert np.abs(np.asarray(params["enc1_w"])).max() <= math.sqrt(6 / (784 + 200))
    assert np.abs(np.asarray(params["enc1_w"])).max() > 0.95 * math.sqrt(6 / (784 + 200))
    assert all(not np.any(np.asarray(params[n])) for n in params if n.endswith("_b") and n != "dec_out_b")


def write_idx(path: Path, images: np.ndarray) -> None:
    header = np.array([0x00000803, images.shape[0], 28, 28], dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + images.astype(np.uint8).tobytes())


def test_end_to_end_on_synthetic_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    train = rng.integers(0, 256, (400, 784))
    write_idx(mnist / "train-images-idx3-ubyte.gz", train)
    write_idx(mnist / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (1000, 784)))
    np.testing.assert_array_equal(ref.read_idx_images(mnist / "train-images-idx3-ubyte.gz"), train)
    argv = ["--objective", "iwae", "--k", "3", "--budget", "0.001", "--seeds", "0", "--data-dir", str(tmp_path)]
    argv += ["--out", str(tmp_path / "out"), "--steps-per-epoch", "2", "--eval-examples", "60", "--eval-k", "20"]
    ref.main(argv)
    out = tmp_path / "out" / "seed-0"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, 10))
    result = json.loads((out / "eval.json").read_text())
    assert result["examples"] == 60 and result["k"] == 20 and np.isfinite(result["nll"])
    ref.main(argv)  # finished: skipped, eval.json untouched
    assert json.loads((out / "eval.json").read_text()) == result
