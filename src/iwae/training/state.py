"""One seed's training state: its model, optimizer, position in the schedule and random streams, as a checkpoint
holds them (``iwae.runs.checkpoint`` writes and reads the file). Seeded, saved and restored here only.

A seed draws from two streams: ``noise``, the latents' draws (``rsample``, and ``sample`` of discrete layers), and
``data``, the epochs' permutations and the binarizations. A run alone draws its noise from torch's global generator
of its device (which, seeded, first initialises the model); a seed of a stack (``iwae.training.stacked``) from a
generator of its own that continues that stream, so that it draws what it would draw alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from iwae.data import Dataset
from iwae.models import DeepLatentModel, build_model
from iwae.training.config import TrainConfig


@dataclass
class SeedStreams:
    """A seed's random streams: ``noise`` for the latents' draws, ``data`` for permutations and binarizations."""

    noise: torch.Generator
    data: torch.Generator

    def state(self, data: Tensor | None = None) -> dict[str, Tensor]:
        """The streams' states as a checkpoint's ``rng``: "cpu" (on a GPU, torch's global CPU generator), "cuda"
        on a GPU (the noise), and "data"; "cpu" is the noise on a CPU. ``data``: the data stream's state to record
        instead of its generator's (that of a position inside a chunk of minibatches drawn ahead)."""
        on_gpu = self.noise.device.type == "cuda"
        state = {"cpu": torch.get_rng_state() if on_gpu else self.noise.get_state(),
                 "data": self.data.get_state() if data is None else data}
        if on_gpu:
            state["cuda"] = self.noise.get_state()
        return state

    @classmethod
    def restore(cls, rng: dict[str, Tensor], device: torch.device, *, own_noise: bool) -> SeedStreams:
        """The streams saved as ``rng`` (see ``state``), continued on ``device``: the noise on torch's global
        generator (a run alone; on a GPU the global CPU generator is restored too), or, with ``own_noise``, on a
        generator of its own (a seed of a stack)."""
        data = torch.Generator(device)
        data.set_state(rng["data"])
        if own_noise:
            noise = torch.Generator(device)
        else:
            noise = global_generator(device)
            if device.type == "cuda":
                torch.set_rng_state(rng["cpu"])
        if device.type in rng:
            noise.set_state(rng[device.type])
        return cls(noise, data)


def global_generator(device: torch.device) -> torch.Generator:
    """torch's global generator of ``device``: the one ``rsample`` and ``sample`` draw from by default."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


@dataclass
class TrainingState:
    """One seed's training state, as its checkpoint holds it (see ``iwae.runs.checkpoint`` for the fields)."""

    config: TrainConfig
    x_dim: int
    model: dict[str, Tensor]
    optimizer: dict[str, Any] | None
    epoch: int
    step: int
    batches: Tensor | None
    bound_sum: float
    epoch_time_s: float
    wall_time_s: float
    rng: dict[str, Tensor]

    def checkpoint(self) -> dict[str, Any]:
        """The state as the dict a checkpoint file holds (without its ``format``)."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {**fields, "config": asdict(self.config)}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], config: TrainConfig) -> TrainingState:
        """The state that a checkpoint ``saved`` holds, continued with ``config`` (the saved configuration, or
        that with new values of the settings a resumed run may change)."""
        fields = {name: saved[name] for name in cls.__dataclass_fields__ if name != "config"}
        return cls(config=config, **{**fields, "bound_sum": float(saved["bound_sum"])})

    def new_model(self) -> DeepLatentModel:
        """The state's model, on the CPU."""
        model = build_model(self.config.model, self.config.layers, self.x_dim)
        model.load_state_dict(self.model)
        return model


def model_and_data_seeds(seed: int) -> tuple[int, int]:
    """Independent seeds for torch's global generator (initialisation, then the noise) and the data generator."""
    model_seq, data_seq = np.random.SeedSequence(seed).spawn(2)
    return int(model_seq.generate_state(1)[0]), int(data_seq.generate_state(1)[0])


def start(config: TrainConfig, dataset: Dataset, parameters: dict[str, Tensor] | None = None
          ) -> tuple[TrainingState, DeepLatentModel]:
    """The state of a new run (at its start) and its model: the model initialised from the run's seed (its
    parameters then replaced by ``parameters`` if given: those of ``init_from``), the data stream seeded, and the
    noise continuing from the initialisation."""
    model_seed, data_seed = model_and_data_seeds(config.seed)
    torch.manual_seed(model_seed)
    x_dim = dataset.train.shape[1]
    model = build_model(config.model, config.layers, x_dim, train_mean=dataset.train.mean(0))
    if parameters is not None:
        model.load_state_dict(parameters)
    device = dataset.train.device
    streams = SeedStreams(global_generator(device), torch.Generator(device).manual_seed(data_seed))
    state = TrainingState(config=config, x_dim=x_dim, model=model.state_dict(), optimizer=None, epoch=0, step=0,
                          batches=None, bound_sum=0.0, epoch_time_s=0.0, wall_time_s=0.0, rng=streams.state())
    return state, model

