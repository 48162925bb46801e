"""One seed trained alone, as the training loop sees it (``iwae.training.loop.Seeds``).

Under torchrun the seed is trained data parallel (``iwae.platform.distributed``): each rank trains on its rows of
every global batch, the step sums the ranks' gradients, and rank 0 alone writes; the trajectory is that of one
process up to float rounding (the ranks' gradients are summed in another order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from iwae import data
from iwae.eval import likelihood
from iwae.models import DeepLatentModel, build_model
from iwae.platform import distributed, gemm
from iwae.platform.device import seeded
from iwae.training.config import TrainConfig, schedule
from iwae.training.minibatches import EpochMinibatches, draws_ahead
from iwae.training.state import SeedStreams, TrainingState
from iwae.training.step import TrainStep, make_adam


class LoneSeed:
    """One seed trained alone (``iwae.training.loop.Seeds``): its model as it is, its noise from torch's global
    generator.

    With several ranks (``iwae.platform.distributed``), each trains on its rows of every global batch, drawing the
    random numbers of the whole batch, and the step all-reduces the gradients.
    """

    def __init__(self, state: TrainingState, model: DeepLatentModel, dataset: data.Dataset) -> None:
        config, device = state.config, dataset.train.device
        self.configs, self.dataset = [config], dataset
        self.model = model.to(device)
        self.optimizer = make_adam(self.model, schedule(config)[0][1], (config.beta1, config.beta2), config.adam_eps)
        if state.optimizer is not None:
            self.optimizer.load_state_dict(state.optimizer)
        # the run's own path, so that it resumes bit for bit (runs that predate the setting used the default)
        gemm.run_path(config.matmul, device)
        self.rows = distributed.rows(config.batch_size)
        self.step = TrainStep(distributed.sharded_draws(self.model, self.rows, config.batch_size), self.optimizer,
                              config.objective_spec(), config.estimator, compile=bool(config.compile),
                              all_reduce=distributed.all_reduce_sum if distributed.world() > 1 else None)
        self.streams = SeedStreams.restore(state.rng, device, own_noise=False)
        self.batches = None if state.batches is None else state.batches.to(device)
        self.step.bound_sum.fill_(state.bound_sum)
        self.x_dim = state.x_dim
        self.minibatches: EpochMinibatches | None = None
        self.ahead = draws_ahead(device)

    def epoch_batches(self) -> Tensor:
        return data.epoch_batches(len(self.dataset.train), self.configs[0].batch_size, self.streams.data)

    def draw_from(self, batches: Tensor, step: int) -> None:
        self.minibatches = EpochMinibatches(self.dataset.train, batches.unsqueeze(0), [self.streams.data],
                                            self.dataset.binarization == "dynamic", step, self.ahead, self.rows)

    def train_on(self, step: int) -> None:
        self.step(self.minibatches(step))

    def monitor(self, x: Tensor) -> list[float]:
        config = self.configs[0]
        with seeded(config.seed, x.device):
            return [likelihood.objective_bound(self.model, x, config.objective_spec()).mean().item()]

    def states(self, epoch: int, step: int, batches: Tensor | None, epoch_time_s: float, wall_time_s: float
               ) -> list[TrainingState]:
        return [TrainingState(config=self.configs[0], x_dim=self.x_dim, model=self.model.state_dict(),
                              optimizer=self.optimizer.state_dict(), epoch=epoch, step=step, batches=batches,
                              bound_sum=self.step.bound_sum.item(), epoch_time_s=epoch_time_s,
                              wall_time_s=wall_time_s, rng=self.streams.state(self._data_state(step, batches)))]

    def _data_state(self, step: int, batches: Tensor | None) -> Tensor | None:
        """The data stream's state at minibatch ``step`` of ``batches`` (None: at an epoch's end, its own)."""
        return None if batches is None or self.minibatches is None else self.minibatches.stream_states(step)[0]

    def summary(self, bounds: list[float], test_bounds: list[float], examples_per_s: float) -> str:
        return f"train bound {bounds[0]:.2f} test bound {test_bounds[0]:.2f} {examples_per_s:.0f} examples/s"


def lone_timing_step(config: TrainConfig, x_dim: int, device: torch.device) -> Callable[[], None]:
    """A training step of ``config`` (objective, estimator, compiled or not) on a fresh model and a random
    minibatch: the workload that ``iwae.training.preflight`` times (thread count, matmul path) and benchmarks time."""
    model = build_model(config.model, config.layers, x_dim).to(device)
    x = (torch.rand(config.batch_size, x_dim, device=device) < 0.5).float()
    optimizer = make_adam(model, schedule(config)[0][1], (config.beta1, config.beta2), config.adam_eps)
    step = TrainStep(model, optimizer, config.objective_spec(), config.estimator, compile=bool(config.compile),
                     what="a copy of the training step to time")
    return lambda: step(x)
