"""The training step: compiled and eager steps agree (losses, gradients, updated parameters) for every objective
and estimator, a failed compilation falls back to eager, and a compiled run resumes bit for bit.

Most cases compile with the ``aot_eager`` backend: the same single graph that dynamo traces (forward,
``torch.autograd.grad`` with DReG's hooks, Adam) run through AOT autograd, without inductor's C++ code
generation, which is exercised on its own cases below.
"""

from __future__ import annotations

import copy
import dataclasses
import signal
import warnings
from pathlib import Path

import pytest
import torch
from conftest import CUDA
from test_train import assert_same_parameters, interrupt_at_call, tiny_config

from iwae.core.objectives import OBJECTIVES, REPARAMETERIZED_ESTIMATORS, Objective
from iwae.models import LinearGaussian, burda, sbn
from iwae.platform import gemm
from iwae.runs import checkpoint, lone_run
from iwae.training import config as train_config
from iwae.training import signals
from iwae.training.step import TrainStep, adam_update, make_adam

PARAMS = {"elbo": {}, "iwae": {}, "miwae": {"m": 2}, "ciwae": {"beta": 0.3}, "piwae": {"m": 2}, "vr": {"alpha": 0.5}}
EVERY = [(o, e) for o in OBJECTIVES for e in REPARAMETERIZED_ESTIMATORS]
# the estimators that rescale path gradients (DReG, PIWAE) and one that does not, on the paper's models
BURDA_CASES = [(1, "iwae", "dreg"), (1, "piwae", "dreg"), (1, "iwae", "stl"), (2, "iwae", "dreg")]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()  # each case compiles anew, never against another case's cache


def run_steps(model: torch.nn.Module, x: torch.Tensor, objective: Objective, estimator: str,
              compile: bool | str, steps: int = 2) -> tuple[torch.nn.Module, TrainStep, list[torch.Tensor]]:
    """``steps`` steps from a copy of ``model`` with fixed seeds; also returns the first step's gradients."""
    model = copy.deepcopy(model)
    step = TrainStep(model, make_adam(model, 1e-3, (0.9, 0.999), 1e-4), objective, estimator, compile=compile)
    grads = []
    for i in range(steps):
        torch.manual_seed(100 + i)
        step(x)
        if i == 0:  # after Adam's first step, exp_avg = (1 - beta1) * gradient
            grads = [step.optimizer.state[p]["exp_avg"] / 0.1 for p in step.params]
    return model, step, grads


def assert_close_in_float32(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal up to float32 rounding accumulated over a few thousand operations: 1e-4 of the tensor's scale."""
    scale = max(a.abs().max().item(), 1e-3)
    assert (a - b).abs().max().item() <= 1e-4 * scale, what


def assert_steps_agree(model: torch.nn.Module, x: torch.Tensor, objective: str, estimator: str, k: int,
                       backend: str, steps: int = 2) -> None:
    spec = Objective(objective, k, **PARAMS[objective])
    eager, eager_step, eager_grads = run_steps(model, x, spec, estimator, compile=False, steps=steps)
    compiled, compiled_step, compiled_grads = run_steps(model, x, spec, estimator, compile=backend, steps=steps)
    assert compiled_step.compiled and compiled_step.compile_seconds is not None
    assert compiled_step.bound_sum.item() == pytest.approx(eager_step.bound_sum.item(), rel=1e-5)
    for name, a, b in zip(dict(model.named_parameters()), eager_grads, compiled_grads, strict=True):
        assert_close_in_float32(a, b, f"gradient of {name}")
    assert_parameters_close(eager, compiled, eager_grads)


def assert_parameters_close(a: torch.nn.Module, b: torch.nn.Module, grads: list[torch.Tensor]) -> None:
    """Parameters after Adam steps from gradients equal up to float32 rounding (1e-4 of their scale): Adam
    amplifies a gradient's rounding by at most lr / eps = 10."""
    tolerance = 1e-6 + 10 * 1e-4 * max(g.abs().max().item() for g in grads)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert (p - q).abs().max().item() <= tolerance, name


@pytest.mark.slow
@pytest.mark.parametrize(("objective", "estimator"), EVERY)
def test_compiled_step_equals_eager_on_linear_gaussian(objective: str, estimator: str) -> None:
    torch.manual_seed(0)
    model = LinearGaussian(6, 3)
    assert_steps_agree(model, torch.randn(5, 6), objective, estimator, k=4, backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_equals_eager_in_float64(backend: str) -> None:
    """In float64 the compiled step takes eager's steps to float64 rounding, its 0-d parameter (the likelihood's
    log sigma) included."""
    torch.manual_seed(0)
    model = LinearGaussian(6, 3).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    spec = Objective("iwae", 4)
    eager, eager_step, _ = run_steps(model, x, spec, "dreg", compile=False, steps=3)
    compiled, compiled_step, _ = run_steps(model, x, spec, "dreg", compile=backend, steps=3)
    assert compiled_step.compiled
    assert compiled_step.bound_sum.item() == pytest.approx(eager_step.bound_sum.item(), rel=1e-12)
    for (name, before), p, q in zip(model.named_parameters(), eager.parameters(), compiled.parameters(),
                                    strict=True):
        assert (p - before).abs().max() > 1e-4, f"{name} did not move"
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-15, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(("layers", "objective", "estimator"), BURDA_CASES)
def test_compiled_step_equals_eager_on_burda_models(layers: int, objective: str, estimator: str) -> None:
    torch.manual_seed(0)
    x = (torch.rand(4, 784) < 0.3).float()
    assert_steps_agree(burda(layers, train_mean=x.mean(0)), x, objective, estimator, k=4, backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["vimco", "rws"])
def test_compiled_step_equals_eager_for_discrete_latents(estimator: str) -> None:
    torch.manual_seed(0)
    x = (torch.rand(4, 20) < 0.3).float()
    assert_steps_agree(sbn([6, 4], 20, train_mean=x.mean(0)), x, "iwae", estimator, k=4, backend="aot_eager")


@pytest.mark.slow
def test_a_compiled_step_given_another_shape_of_minibatch_compiles_anew() -> None:
    # the step checks only its guards on tensors and global state before a call: a minibatch of another shape
    # (or dtype) must fail them, not run the program compiled for the first
    torch.manual_seed(0)
    model = burda(1, 784)
    steps = {mode: TrainStep(m, make_adam(m, 1e-3, (0.9, 0.999), 1e-4), Objective("iwae", 3), "standard",
                             compile=mode) for mode, m in ((False, copy.deepcopy(model)), ("inductor", model))}
    for rows in (4, 6, 4):
        x = (torch.rand(rows, 784) < 0.3).float()
        for step in steps.values():
            torch.manual_seed(rows)
            step.bound_sum.zero_()
            step(x)
        assert steps["inductor"].bound_sum.item() == pytest.approx(steps[False].bound_sum.item(), rel=1e-5)
    assert steps["inductor"].compiled


@pytest.mark.slow
def test_inductor_step_equals_eager() -> None:
    torch.manual_seed(0)
    x = (torch.rand(4, 784) < 0.3).float()
    assert_steps_agree(burda(1, train_mean=x.mean(0)), x, "iwae", "dreg", k=4, backend="inductor")


@CUDA
@pytest.mark.parametrize(("layers", "objective", "estimator"), [(1, "iwae", "standard"), *BURDA_CASES])
def test_cuda_graph_step_equals_eager(layers: int, objective: str, estimator: str) -> None:
    """On a GPU the compiled step runs as a CUDA graph: its first call warms up, the second records the graph and
    later ones replay it, drawing their random numbers (graph-safe) as the eager step does."""
    if estimator == "dreg" and torch.torch_version.TorchVersion(torch.__version__) < "2.13":
        pytest.skip("torch < 2.13 does not compile the steps that rescale path gradients (docs/performance.md)")
    torch.manual_seed(0)
    x = (torch.rand(4, 784, device="cuda") < 0.3).float()
    model = burda(layers, train_mean=x.mean(0)).cuda()
    assert_steps_agree(model, x, objective, estimator, k=4, backend="inductor", steps=5)


@CUDA
def test_cuda_graph_follows_the_learning_rate_schedule() -> None:
    """The learning rate is a device tensor that the graph reads: changing it needs no new graph, and the
    replayed steps take the eager step's updates at each rate."""
    torch.manual_seed(0)
    x = (torch.rand(4, 784, device="cuda") < 0.3).float()
    model = burda(1, train_mean=x.mean(0)).cuda()
    results, grads = [], []
    for compile in (False, True):
        copied = copy.deepcopy(model)
        step = TrainStep(copied, make_adam(copied, 1e-3, (0.9, 0.999), 1e-4), Objective("iwae", 4), "standard",
                         compile=compile)
        for i, lr in enumerate((1e-3, 1e-3, 1e-3, 3e-4, 3e-4, 1e-4)):
            step.set_lr(lr)
            torch.manual_seed(100 + i)
            step(x)
            if i == 0 and not compile:  # after Adam's first step, exp_avg = (1 - beta1) * gradient
                grads = [step.optimizer.state[p]["exp_avg"] / 0.1 for p in step.params]
            if i == 2:
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        assert step.compiled == compile
        results.append(copied)
    assert_parameters_close(results[0], results[1], grads)


@pytest.mark.slow
def test_a_failed_compilation_warns_once_and_trains_eagerly() -> None:
    def broken_backend(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> None:
        raise RuntimeError("no compiler here")

    torch.manual_seed(0)
    model, x, spec = LinearGaussian(4, 2), torch.randn(3, 4), Objective("iwae", 3)
    eager, _, _ = run_steps(model, x, spec, "dreg", compile=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallen, fallen_step, _ = run_steps(model, x, spec, "dreg", compile=broken_backend)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no compiler here" in messages[0] and "eagerly" in messages[0]
    assert not fallen_step.compiled
    for a, b in zip(eager.parameters(), fallen.parameters(), strict=True):
        assert torch.equal(a, b)  # the eager fallback is the eager step itself


@pytest.mark.slow
def test_the_learning_rate_changes_without_recompiling() -> None:
    torch.manual_seed(0)
    model, x = LinearGaussian(4, 2), torch.randn(3, 4)
    step = TrainStep(model, make_adam(model, 1e-3, (0.9, 0.999), 1e-4), Objective("iwae", 3), "dreg",
                     compile="aot_eager")
    step(x)
    counts = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for lr in (5e-4, 1e-4, 3e-5):
        step.set_lr(lr)
        step(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == counts
    assert step.optimizer.param_groups[0]["lr"] == 3e-5 and step.lr.item() == pytest.approx(3e-5)


def test_adam_state_is_torch_adams(tmp_path: Path) -> None:
    """The step's update is torch.optim.Adam's, on the same state: an optimizer can be saved and reloaded."""
    torch.manual_seed(0)
    x = (torch.rand(4, 784) < 0.3).float()
    model = burda(1, train_mean=x.mean(0))
    reference = copy.deepcopy(model)
    ours = TrainStep(model, make_adam(model, 1e-3, (0.9, 0.999), 1e-4), Objective("iwae", 3), "standard")
    adam = torch.optim.Adam(reference.parameters(), lr=1e-3, eps=1e-4, fused=True)
    from iwae.core.objectives import loss

    for i in range(3):
        torch.manual_seed(i)
        ours(x)
        torch.manual_seed(i)
        adam.zero_grad()
        loss(reference, x, Objective("iwae", 3), estimator="standard", reduction="sum").loss.backward()
        adam.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    assert adam.state_dict()["state"].keys() == ours.optimizer.state_dict()["state"].keys()


def test_adam_update_is_torch_adams() -> None:
    """The compiled step's update, run eagerly, takes torch.optim.Adam's steps (as a torch.optim.Adam of its own,
    with its step counts and moments) on parameters of several shapes, at a learning rate that changes."""
    torch.manual_seed(0)
    params = [torch.randn(shape) for shape in ((200, 784), (200,), (50, 200), ())]
    reference = [p.clone().requires_grad_() for p in params]
    adam = torch.optim.Adam(reference, lr=1e-3, betas=(0.8, 0.99), eps=1e-4)
    state = [{"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
             for p in params]
    for lr in (1e-3, 1e-3, 3e-4, 3e-4, 1e-4):
        grads = [torch.randn_like(p) for p in params]
        adam_update(params, grads, [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
                    [s["step"] for s in state], torch.tensor(lr), 0.8, 0.99, 1e-4)
        for p, g in zip(reference, grads, strict=True):
            p.grad = g
        adam.param_groups[0]["lr"] = lr
        adam.step()
    for ours, theirs, moments in zip(params, reference, state, strict=True):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-7)
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(moments[name], adam.state[theirs][name], rtol=1e-6, atol=1e-9)


def test_adam_update_sets_moments_below_the_smallest_normal_float_to_zero() -> None:
    """A weight whose gradient stays zero after one step: torch.optim.Adam's first moment decays into the denormal
    floats; the compiled step's update sets it to zero there, and the parameters are torch's."""
    torch.manual_seed(0)
    param = torch.randn(100)
    reference = param.clone().requires_grad_()
    adam = torch.optim.Adam([reference], lr=1e-3, eps=1e-4)
    state = {"step": torch.tensor(0.0), "exp_avg": torch.zeros(100), "exp_avg_sq": torch.zeros(100)}
    tiny = torch.finfo(torch.float32).tiny
    for i in range(900):  # 0.1 * 0.9^899 of a unit gradient: about 1e-42
        grad = torch.randn(100) if i == 0 else torch.zeros(100)
        adam_update([param], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [state["step"]], torch.tensor(1e-3),
                    0.9, 0.999, 1e-4)
        reference.grad = grad
        adam.step()
    theirs = adam.state[reference]["exp_avg"]
    denormal = (theirs != 0) & (theirs.abs() < tiny)
    assert denormal.sum() > 50  # torch's moments are denormal
    assert torch.equal(state["exp_avg"], torch.where(theirs.abs() < tiny, 0.0, theirs))  # ours are zero there
    torch.testing.assert_close(param, reference.detach(), rtol=1e-6, atol=1e-7)


def test_auto_compile_counts_steps_and_samples() -> None:
    # 30,000 steps of 1,000 samples on 60,000 examples
    config = train_config.TrainConfig(epochs=10, k=50, batch_size=20)
    assert train_config.resolve_compile(config, 60_000).compile is True
    few = dataclasses.replace(config, k=1)  # 600,000 samples: eager, unless many seeds are stacked
    assert train_config.resolve_compile(few, 60_000).compile is False
    assert train_config.resolve_compile(few, 60_000, seeds=16).compile is True
    assert train_config.resolve_compile(dataclasses.replace(few, epochs=40), 60_000).compile is True  # 120,000 steps
    assert train_config.resolve_compile(dataclasses.replace(config, compile=False), 60_000).compile is False


def test_auto_compiles_long_runs_only(tiny_dataset: str, tmp_path: Path) -> None:
    config = tiny_config(tiny_dataset, epochs=1)
    assert config.compile is None and config.steps(64) < train_config.AUTO_COMPILE_STEPS
    lone_run.train(config, tmp_path / "run", progress=False)
    assert checkpoint.load(tmp_path / "run")["config"]["compile"] is False  # resolved and recorded


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_a_compiled_run_resumes_bit_for_bit(tiny_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            device: str) -> None:
    # on a GPU with the standard estimator, which compiles with every torch version (see the README's Performance)
    config = tiny_config(tiny_dataset, compile=True, epochs=2, device=device,
                         estimator="standard" if device == "cuda" else "dreg")
    lone_run.train(config, tmp_path / "reference", progress=False)
    torch._dynamo.reset()  # each run as in a process of its own (on a GPU, with CUDA graphs of its own)
    run, calls, original = tmp_path / "interrupted", 0, TrainStep.__call__

    def interrupted_call(self: TrainStep, x: torch.Tensor) -> None:
        nonlocal calls
        calls += 1
        if calls == 11:  # SIGINT during the 11th step (outside the compiled program, which has no Python in it)
            signal.raise_signal(signal.SIGINT)
        original(self, x)

    with monkeypatch.context() as patch:
        patch.setattr(TrainStep, "__call__", interrupted_call)
        with pytest.raises(signals.Interrupted):
            lone_run.train(config, run, progress=False)
    assert checkpoint.load(run)["step"] == 3  # epoch 2, after its 3rd step
    torch._dynamo.reset()
    lone_run.resume(run, progress=False)
    assert checkpoint.load(run)["config"]["compile"] is True
    assert_same_parameters(tmp_path / "reference", run)


@pytest.mark.slow
def test_capturable_update_equals_the_plain_one() -> None:
    """The GPU's step (a capturable optimizer: step counts as tensors on the device, the learning rate a tensor)
    computes the same update as the CPU's. Capturable Adam refuses to run eagerly on a CPU, but the compiled
    step's update (``adam_update``) on its state runs anywhere, so its arithmetic is checked here."""
    torch.manual_seed(0)
    x = (torch.rand(4, 784) < 0.3).float()
    model = burda(1, train_mean=x.mean(0))
    plain, _, grads = run_steps(model, x, Objective("iwae", 3), "dreg", compile=False, steps=3)
    capturable = copy.deepcopy(model)
    optimizer = torch.optim.Adam(capturable.parameters(), lr=1e-3, eps=1e-4, capturable=True)
    step = TrainStep(capturable, optimizer, Objective("iwae", 3), "dreg", compile="aot_eager")
    for i in range(3):
        torch.manual_seed(100 + i)
        step(x)
    assert step.compiled
    assert_parameters_close(plain, capturable, grads)


@pytest.mark.slow
def test_a_run_resumes_on_its_recorded_matmul_path(tiny_dataset: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed process that would measure another path as the fastest still continues on the run's own."""
    config = tiny_config(tiny_dataset, epochs=2)
    monkeypatch.setattr(gemm, "_chosen", {})
    monkeypatch.setattr(gemm, "choose", lambda workload: gemm.ONEDNN)  # as if oneDNN were measured the faster
    lone_run.train(config, tmp_path / "reference", progress=False)
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, 11, signal.SIGINT)
        with pytest.raises(signals.Interrupted):
            lone_run.train(config, tmp_path / "run", progress=False)
    assert checkpoint.load(tmp_path / "run")["config"]["matmul"] == gemm.ONEDNN
    monkeypatch.setattr(gemm, "choose", lambda workload: gemm.DEFAULT)  # a new process measures the default faster
    lone_run.resume(tmp_path / "run", progress=False)
    assert_same_parameters(tmp_path / "reference", tmp_path / "run")
