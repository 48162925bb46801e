"""Models: conditional layers, the generic deep latent model, the paper's architectures, sigmoid belief
networks (discrete latents), and a linear-Gaussian model and the Gaussian toy of Rainforth et al. (2018)
with exact answers."""

from iwae.models.burda import burda
from iwae.models.discrete import (
    BernoulliPrior,
    CategoricalLayer,
    OneHotGroups,
    enumerate_values,
    sbn,
    sbn_widths,
    value_count,
)
from iwae.models.factory import build_model
from iwae.models.gaussian_toy import GaussianToy
from iwae.models.latent import DeepLatentModel, LatentSample
from iwae.models.layers import (
    BernoulliLayer,
    FactorisedBernoulli,
    GaussianLayer,
    StandardNormal,
    bernoulli_log_density,
    glorot_init_,
    mlp,
)
from iwae.models.linear_gaussian import LinearGaussian

__all__ = [
    "BernoulliLayer",
    "BernoulliPrior",
    "CategoricalLayer",
    "DeepLatentModel",
    "FactorisedBernoulli",
    "GaussianLayer",
    "GaussianToy",
    "LatentSample",
    "LinearGaussian",
    "OneHotGroups",
    "StandardNormal",
    "bernoulli_log_density",
    "build_model",
    "burda",
    "enumerate_values",
    "glorot_init_",
    "mlp",
    "sbn",
    "sbn_widths",
    "value_count",
]
