"""S seeds of one configuration trained together as one vectorized model, each as it would train alone.

The stacked model is the paper's model with every ``nn.Linear`` replaced by a ``StackedLinear`` holding the S
seeds' weights (S, out, in), applied as one batched matrix multiply; a minibatch is (S, B, D), latents are
(K, S, B, d), and the loss is the sum over seeds of each seed's summed bound, so its gradient with respect to
seed s's parameters is seed s's own gradient, and Adam (elementwise) takes each seed's own step.

Each seed draws its random numbers as ``iwae train --seed s`` alone does: its initialisation from torch's
global generator seeded with its model seed, its permutations and binarizations from its own data generator,
and its ``rsample`` noise from its own generator that continues the global generator's stream after its
initialisation. So seed s follows the lone run's trajectory: bit for bit when the step is compiled on a CPU, up to
float32 rounding eagerly (torch's eager kernels of the reductions over K and of the batched products round a
stack's tensors differently) and on a GPU. A stack multiplies on the float32 path that is faster for its own step
(``iwae.training.preflight.training_matmul_path``), which it records; a lone run given that path (``--matmul``)
multiplies alike, and one on the other path drifts from it by the rounding of the two paths.

``StackedSeeds`` is the training loop's view of such a stack; its run directories are ``iwae.runs.stacked_run``'s.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from iwae import data
from iwae.eval import likelihood
from iwae.models import DeepLatentModel, build_model
from iwae.models.drawn import with_draws
from iwae.platform import gemm
from iwae.platform.device import seeded
from iwae.training.config import TrainConfig, schedule
from iwae.training.minibatches import EpochMinibatches, draws_ahead
from iwae.training.state import SeedStreams, TrainingState
from iwae.training.step import TrainStep, make_adam


class _BatchedAffine(torch.autograd.Function):
    """out[s] = bias[s] + x[s] @ weight[s]^T for x (S, N, in), weight (S, out, in), bias (S, out), with the
    weight's gradient computed as grad[s]^T @ x[s] in the weight's own (out, in) layout: the gradient autograd
    derives for the transposed view would be strided, and Adam's update of it several times slower."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return torch.bmm(x, weight.transpose(1, 2)) + bias.unsqueeze(1)  # compiled, the bias fuses onward

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, weight = ctx.saved_tensors
        return torch.bmm(grad, weight), torch.bmm(grad.transpose(1, 2), x), grad.sum(1)


class StackedLinear(nn.Module):
    """S linear layers applied to their own slices: input (..., S, N, in) to output (..., S, N, out)."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))

    def forward(self, h: Tensor) -> Tensor:
        s, n, width = h.shape[-3:]
        flat = h.movedim(-3, 0).reshape(s, -1, width)  # one (rows, in) @ (in, out) product per seed
        out = _BatchedAffine.apply(flat, self.weight, self.bias)
        return out.reshape(s, *h.shape[:-3], n, -1).movedim(0, -3)


class SeedNoise:
    """The standard normal draws of a stacked encoder's reparameterized samples, drawn ahead of each step.

    ``draw(k, batch)`` fills, for each seed s from its own generator, layer by layer, the (k, batch, d_l) draws
    that a lone run's ``Normal.rsample`` takes from torch's global generator in one step (in the same order), so
    the step itself draws nothing and can be compiled as one graph. ``noise(layer)`` is layer l's draws as
    (k, S, batch, d_l), filled in place (their storage stays put from step to step).
    """

    def __init__(self, generators: list[torch.Generator]) -> None:
        self.generators = generators
        self.widths: list[int] = []  # d_l of each encoder layer, set by ``stack_models``
        self.buffers: list[Tensor] = []

    def draw(self, k: int, batch: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        """Draw the next step's noise for minibatches of ``batch`` examples per seed and ``k`` samples."""
        shapes = [(len(self.generators), k, batch, width) for width in self.widths]
        if [tuple(b.shape) for b in self.buffers] != shapes or self.buffers[0].dtype != dtype:
            self.buffers = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
        for s, generator in enumerate(self.generators):
            for buffer in self.buffers:
                buffer[s].normal_(generator=generator)

    def __call__(self, layer: int, shape: torch.Size) -> Tensor:
        eps = self.buffers[layer].movedim(0, -3) if self.buffers else None
        if eps is None or eps.shape != shape:
            raise RuntimeError(f"the stacked model needs noise of shape {tuple(shape)} for encoder layer {layer}; "
                               "call SeedNoise.draw(k, batch) before each step")
        return eps


def stack_models(models: list[DeepLatentModel], noise: SeedNoise) -> DeepLatentModel:
    """One model holding the parameters of ``models`` (same architecture), with the same parameter names, whose
    reparameterized samples use ``noise`` (draw it before each step)."""
    stacked = copy.deepcopy(models[0])
    for name, module in list(stacked.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(stacked.get_submodule(parent), attr, StackedLinear([m.get_submodule(name) for m in models]))
    noise.widths = []
    for index, layer in enumerate(stacked.encoder):
        drawn = with_draws(layer, normals=lambda shape, like, index=index: noise(index, shape))
        if drawn is None:
            raise ValueError(f"stacked seeds need Gaussian encoder layers; layer {index} is {type(layer).__name__}")
        stacked.encoder[index] = drawn
        noise.widths.append(layer.mean.weight.shape[1])
    return stacked


def stacked_names(model: DeepLatentModel) -> set[str]:
    """The names of the parameters that carry a leading seed dimension."""
    return {f"{name}.{p}" if name else p for name, module in model.named_modules()
            if isinstance(module, StackedLinear) for p in ("weight", "bias")}


def seed_state(stacked: DeepLatentModel, optimizer: torch.optim.Adam, s: int) -> tuple[dict, dict]:
    """Seed s's model and optimizer state dicts, as its lone run would save them."""
    names = stacked_names(stacked)
    model = {k: (v[s] if k in names else v).clone() for k, v in stacked.state_dict().items()}
    saved = optimizer.state_dict()
    state = {i: {k: (v[s].clone() if k != "step" else v.clone()) for k, v in moments.items()}
             for i, moments in saved["state"].items()}
    return model, {"state": state, "param_groups": saved["param_groups"]}


def _stack_optimizer(states: list[dict]) -> dict:
    first = states[0]
    state = {i: {k: (v if k == "step" else torch.stack([st["state"][i][k] for st in states]))
                 for k, v in moments.items()} for i, moments in first["state"].items()}
    return {"state": state, "param_groups": first["param_groups"]}


def stacked_timing_step(config: TrainConfig, x_dim: int, device: torch.device, seeds: int) -> Callable[[], None]:
    """A training step of ``seeds`` stacked fresh models of ``config`` on a random minibatch: the workload on
    which a stack's float32 matrix-multiply path is timed (``preflight.training_matmul_path``)."""
    noise = SeedNoise([torch.Generator(device) for _ in range(seeds)])
    models = [build_model(config.model, config.layers, x_dim).to(device) for _ in range(seeds)]
    model = stack_models(models, noise)
    optimizer = make_adam(model, schedule(config)[0][1], (config.beta1, config.beta2), config.adam_eps)
    objective = config.objective_spec()
    step = TrainStep(model, optimizer, objective, config.estimator, compile=bool(config.compile),
                     bound_shape=(seeds,), what="a copy of the stacked training step to time")
    x = (torch.rand(seeds, config.batch_size, x_dim, device=device) < 0.5).float()

    def run() -> None:
        noise.draw(objective.k, config.batch_size, x.dtype, device)
        step(x)

    return run


class StackedSeeds:
    """S seeds trained together as one stacked model (``iwae.training.loop.Seeds``), each drawing its noise from its own
    stream and its minibatches from its own data stream, as it would alone."""

    def __init__(self, states: list[TrainingState], models: list[DeepLatentModel], dataset: data.Dataset) -> None:
        config, device = states[0].config, dataset.train.device
        self.configs, self.dataset, self.x_dim = [state.config for state in states], dataset, states[0].x_dim
        self.lone = models[0].to(device)  # a lone model to evaluate each seed's monitor bound on
        self.streams = [SeedStreams.restore(state.rng, device, own_noise=True) for state in states]
        self.noise = SeedNoise([streams.noise for streams in self.streams])
        self.model = stack_models([model.to(device) for model in models], self.noise)
        self.optimizer = make_adam(self.model, schedule(config)[0][1], (config.beta1, config.beta2), config.adam_eps)
        if states[0].optimizer is not None:
            self.optimizer.load_state_dict(_stack_optimizer([state.optimizer for state in states]))
        gemm.run_path(config.matmul, device)  # the run's own path
        self.step = TrainStep(self.model, self.optimizer, config.objective_spec(), config.estimator,
                              compile=bool(config.compile), bound_shape=(len(states),))
        self.batches = None if states[0].batches is None else torch.stack([s.batches for s in states]).to(device)
        self.step.bound_sum.copy_(torch.tensor([state.bound_sum for state in states], dtype=torch.float64))
        self.minibatches: EpochMinibatches | None = None
        self.ahead = draws_ahead(device)

    def epoch_batches(self) -> Tensor:
        return torch.stack([data.epoch_batches(len(self.dataset.train), self.configs[0].batch_size, streams.data)
                            for streams in self.streams])

    def draw_from(self, batches: Tensor, step: int) -> None:
        self.minibatches = EpochMinibatches(self.dataset.train, batches, [streams.data for streams in self.streams],
                                            self.dataset.binarization == "dynamic", step, self.ahead)

    def train_on(self, step: int) -> None:
        x = self.minibatches(step)
        self.noise.draw(self.configs[0].k, self.configs[0].batch_size, x.dtype, x.device)
        self.step(x)

    def monitor(self, x: Tensor) -> list[float]:
        bounds = []
        for s, config in enumerate(self.configs):
            self.lone.load_state_dict(seed_state(self.model, self.optimizer, s)[0])
            with seeded(config.seed, x.device):
                bounds.append(likelihood.objective_bound(self.lone, x, config.objective_spec()).mean().item())
        return bounds

    def states(self, epoch: int, step: int, batches: Tensor | None, epoch_time_s: float, wall_time_s: float
               ) -> list[TrainingState]:
        states = []
        data = (self.minibatches.stream_states(step) if batches is not None and self.minibatches is not None
                else [None] * len(self.streams))  # at an epoch's end, the generators' own
        for s, (config, streams) in enumerate(zip(self.configs, self.streams, strict=True)):
            model, optimizer = seed_state(self.model, self.optimizer, s)
            states.append(TrainingState(
                config=config, x_dim=self.x_dim, model=model, optimizer=optimizer, epoch=epoch, step=step,
                batches=None if batches is None else batches[s], bound_sum=self.step.bound_sum[s].item(),
                epoch_time_s=epoch_time_s, wall_time_s=wall_time_s, rng=streams.state(data[s])))
        return states

    def summary(self, bounds: list[float], test_bounds: list[float], examples_per_s: float) -> str:
        shown = " ".join(f"{bound:.2f}" for bound in bounds)
        return f"train bounds {shown} {len(bounds) * examples_per_s:.0f} examples/s"
