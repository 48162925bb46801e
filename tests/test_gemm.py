"""The float32 matrix-multiply paths: both accurate to float32 rounding, the faster accurate one chosen on the
caller's workload, and a training step's gradients the same on either path."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from iwae.core.objectives import loss
from iwae.models import burda
from iwae.platform import gemm
from iwae.settings import SettingError
from iwae.training import config as train_config
from iwae.training import preflight


def test_the_default_path_is_float32_accurate_and_onednns_is_used_only_where_it_is_too() -> None:
    errors = gemm.relative_errors(rows=200, inner=100, cols=300)
    assert set(errors) == {gemm.DEFAULT, gemm.ONEDNN}
    assert 0 < errors[gemm.DEFAULT] < 1e-5
    # on CPUs whose oneDNN multiplies in one bfloat16 part (1e-3), the path is not taken
    assert errors[gemm.ONEDNN] < 1e-5 or not gemm.accurate(gemm.ONEDNN)


def test_an_inaccurate_onednn_path_given_is_refused_and_a_runs_own_is_replaced(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(gemm, "_errors", {gemm.DEFAULT: 3e-7, gemm.ONEDNN: 2e-3})
    monkeypatch.setattr(gemm, "has_choice", lambda device: True)
    with gemm.using_matmul_path(gemm.DEFAULT):
        with pytest.raises(ValueError, match=re.escape(
                "oneDNN's float32 path is not accurate to float32 on this CPU (a relative error of 2.0e-03, the "
                "default path's 3.0e-07); give --matmul default")):
            gemm.fastest_fp32_matmul("cpu", gemm.ONEDNN)
        assert gemm.run_path(gemm.ONEDNN, "cpu") == gemm.DEFAULT and gemm._current_path() == gemm.DEFAULT
    assert "the run continues on the default path" in capsys.readouterr().err


def slower_on(slow_path: str, calls: list[str]) -> Callable[[], None]:
    """A workload that takes 2 ms longer on ``slow_path`` (and records the path of each call)."""
    def run() -> None:
        calls.append(gemm._current_path())
        torch.rand(3)  # draws from the global generator, which the measurement must leave as it was
        time.sleep(0.003 if calls[-1] == slow_path else 0.001)
    return run


@pytest.mark.parametrize("slow_path", [gemm.DEFAULT, gemm.ONEDNN])
def test_the_choice_is_the_faster_path_on_the_workload(slow_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm, "_errors", {gemm.DEFAULT: 3e-7, gemm.ONEDNN: 3e-7})
    before, rng = torch.backends.mkldnn.matmul.fp32_precision, torch.get_rng_state()
    calls: list[str] = []
    faster = gemm.ONEDNN if slow_path == gemm.DEFAULT else gemm.DEFAULT
    try:
        with gemm.using_matmul_path(slow_path):
            assert gemm.fastest_fp32_matmul("cpu", None, slower_on(slow_path, calls)) == faster
            assert gemm._current_path() == faster  # the switch is made
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
    assert calls.count(gemm.DEFAULT) == calls.count(gemm.ONEDNN) >= 10  # warm-up and nine interleaved rounds
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.slow
def test_a_keyed_choice_is_made_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm, "_errors", {gemm.DEFAULT: 3e-7, gemm.ONEDNN: 3e-7})
    monkeypatch.setattr(gemm, "_chosen", {})
    calls: list[str] = []
    with gemm.using_matmul_path(gemm.DEFAULT):
        assert gemm.fastest_fp32_matmul("cpu", None, slower_on(gemm.DEFAULT, calls), key="shape a") == gemm.ONEDNN
        timed = len(calls)
        # the same key: the same path, timed no more (even where the workload would now say otherwise)
        assert gemm.fastest_fp32_matmul("cpu", None, slower_on(gemm.ONEDNN, calls), key="shape a") == gemm.ONEDNN
        assert len(calls) == timed
        assert gemm.fastest_fp32_matmul("cpu", None, slower_on(gemm.ONEDNN, calls), key="shape b") == gemm.DEFAULT
        assert len(calls) > timed


def test_an_inaccurate_onednn_path_is_never_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm, "_errors", {})
    monkeypatch.setattr(gemm, "relative_errors", lambda: {gemm.DEFAULT: 3e-7, gemm.ONEDNN: 1e-3})
    calls: list[str] = []
    with gemm.using_matmul_path(gemm.DEFAULT):
        assert gemm.fastest_fp32_matmul("cpu", None, slower_on(gemm.DEFAULT, calls)) == gemm.DEFAULT
    assert calls == []  # nothing to time


def test_a_run_chooses_on_its_own_training_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm, "_chosen", {})
    config = train_config.TrainConfig(k=5, estimator="dreg", epochs=1, lr=1e-3, compile=False, batch_size=8)
    timed: list[int] = []
    measure = gemm.measure
    monkeypatch.setattr(gemm, "measure", lambda workload: timed.append(1) or measure(workload, rounds=1))
    rng = torch.get_rng_state()
    with gemm.using_matmul_path(gemm.DEFAULT):
        assert preflight.training_matmul_path(config, 784, torch.device("cpu")) in (gemm.DEFAULT, gemm.ONEDNN)
        assert timed == [1] or not gemm.accurate(gemm.ONEDNN)
        onednn = replace(config, matmul=gemm.ONEDNN)
        monkeypatch.setattr(gemm, "_errors", {gemm.DEFAULT: 3e-7, gemm.ONEDNN: 3e-7})  # accurate on this CPU
        assert preflight.training_matmul_path(onednn, 784, torch.device("cpu")) == gemm.ONEDNN
        assert len(timed) <= 1  # a path given is used as it is
        # no faster path elsewhere
        assert preflight.training_matmul_path(config, 784, torch.device("meta")) == gemm.DEFAULT
        with pytest.raises(ValueError, match="needs a workload to time, or a path"):
            gemm.fastest_fp32_matmul("cpu")
    assert torch.equal(torch.get_rng_state(), rng)  # the throwaway model and its steps drew on a forked generator


@pytest.mark.parametrize("has_choice", [False, True])
def test_a_compiled_step_is_built_to_time_threads_only_where_its_path_is_timed_too(
        monkeypatch: pytest.MonkeyPatch, has_choice: bool) -> None:
    monkeypatch.setattr(gemm, "has_choice", lambda device: has_choice)
    monkeypatch.setattr(preflight.threads, "fastest", lambda workload: workload() or 1)
    monkeypatch.setattr(gemm, "_chosen", {})
    monkeypatch.setattr(gemm, "choose", lambda workload: workload() or gemm.DEFAULT)
    built: list[int] = []

    def workload(config: train_config.TrainConfig, x_dim: int, device: torch.device) -> Callable[[], None]:
        built.append(1)
        return lambda: None

    config = train_config.TrainConfig(k=5, epochs=1000, compile=True, batch_size=20)
    with gemm.using_matmul_path(gemm.DEFAULT):
        count, path = preflight.training_threads_and_path(config, 784, torch.device("cpu"), 60_000,
                                                          workload=workload)
    assert built == ([1] if has_choice else [])  # built once, for both timings, or not at all
    assert path == gemm.DEFAULT and count == (1 if has_choice else torch.get_num_threads())


@pytest.mark.skipif(not gemm.accurate(gemm.ONEDNN), reason="oneDNN's float32 path is not accurate on this CPU")
@pytest.mark.parametrize("layers", [1, 2])
def test_gradients_agree_on_both_paths(layers: int) -> None:
    torch.manual_seed(0)
    x = (torch.rand(8, 784) < 0.3).float()
    model = burda(layers, train_mean=x.mean(0))
    grads = {}
    for path in (gemm.DEFAULT, gemm.ONEDNN):
        with gemm.using_matmul_path(path):
            torch.manual_seed(1)
            out = loss(model, x, "iwae", k=5, estimator="dreg", reduction="sum")
            grads[path] = torch.autograd.grad(out.loss, list(model.parameters()))
    for a, b in zip(grads[gemm.DEFAULT], grads[gemm.ONEDNN], strict=True):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max().clamp_min(1e-3)


def test_a_named_path_is_used_and_an_unknown_one_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm, "_errors", {gemm.DEFAULT: 3e-7, gemm.ONEDNN: 3e-7})  # both accurate
    before = torch.backends.mkldnn.matmul.fp32_precision
    try:
        assert gemm.fastest_fp32_matmul("cpu", gemm.DEFAULT) == gemm.DEFAULT
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert gemm.fastest_fp32_matmul("cpu", gemm.ONEDNN) == gemm.ONEDNN
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        with pytest.raises(ValueError, match="unknown matrix-multiply path 'mkl'"):
            gemm.fastest_fp32_matmul("cpu", "mkl")
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


def test_onednn_asked_for_a_gpu_is_refused_rather_than_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():  # a recorded GPU run's settings are read on a machine without one
        train_config.TrainConfig(epochs=1, matmul="default", device="cuda")
    monkeypatch.setattr(gemm, "resolve_device", lambda name: torch.device("cpu" if name == "cpu" else "cuda"))
    with pytest.raises(SettingError, match=re.escape("matmul onednn applies to a CPU's float32 products, not to "
                                                     "cuda's; drop matmul")):
        gemm.check_path("onednn", "cuda")
    gemm.check_path("default", "cuda")  # a GPU's own path
    gemm.check_path("onednn", "cpu")
    for device in ("cuda", "auto"):  # on a machine with a GPU
        with pytest.raises(SettingError, match="matmul onednn applies to a CPU's"):
            train_config.TrainConfig(epochs=1, matmul="onednn", device=device)
