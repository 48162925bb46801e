"""Models: conditional layers, the generic deep latent model, the paper's architectures, and a
linear-Gaussian model and the Gaussian toy of Rainforth et al. (2018) with exact answers."""

from iwae.models.burda import burda
from iwae.models.gaussian_toy import GaussianToy
from iwae.models.latent import DeepLatentModel, LatentSample
from iwae.models.layers import BernoulliLayer, GaussianLayer, StandardNormal, glorot_init_, mlp
from iwae.models.linear_gaussian import LinearGaussian

__all__ = [
    "BernoulliLayer",
    "DeepLatentModel",
    "GaussianLayer",
    "GaussianToy",
    "LatentSample",
    "LinearGaussian",
    "StandardNormal",
    "burda",
    "glorot_init_",
    "mlp",
]
