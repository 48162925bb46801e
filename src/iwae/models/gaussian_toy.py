"""The Gaussian toy model of Rainforth et al. (2018), section 4, for studying gradient estimators.

    p(z) = N(z; mu, I),    p(x | z) = N(x; z, I),    q(z | x) = N(z; A x + b, (2/3) I),    z, x in R^D,

    p(x) = N(x; mu, 2 I),    p(z | x) = N(z; (x + mu) / 2, I / 2).

The generative network is mu (D numbers), the inference network A (D x D) and b (D). q's covariance is
fixed, and not the posterior's: "(2/3) I" is read here as the covariance (variance 2/3 per coordinate), as
the paper writes it; one reimplementation reads 2/3 as the standard deviation, which widens q further. For
a given mu, the best q under every bound considered here has the posterior's mean (both are Gaussian and
symmetric about it), A = I / 2 and b = mu / 2, and the best mu for data x_1..x_N is their mean: together the
optimum. Rainforth et al. measure gradient signal-to-noise ratios there, after perturbing every parameter by
N(0, 0.01^2) noise; ``near_optimum`` does that, seeded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from iwae.models.latent import DeepLatentModel
from iwae.models.linear_gaussian import GaussianPrior

Q_VARIANCE = 2.0 / 3.0
PERTURBATION = 0.01


class _FixedVarianceEncoder(nn.Module):
    """q(z | x) = N(A x + b, variance I)."""

    def __init__(self, dim: int, variance: float) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.std = math.sqrt(variance)

    def forward(self, x: Tensor) -> Distribution:
        loc = self.linear(x)
        return Independent(Normal(loc, torch.full_like(loc, self.std), validate_args=False), 1)


class _UnitNoiseLikelihood(nn.Module):
    """p(x | z) = N(z, I), no parameters."""

    def forward(self, z: Tensor) -> Distribution:
        return Independent(Normal(z, torch.ones_like(z), validate_args=False), 1)


class GaussianToy(DeepLatentModel):
    """The toy above in ``dim`` dimensions (20 in the paper), with its exact marginal and posterior.

    Its parameters start at A = I / 2, b = 0, mu = 0; ``set_optimum(x)`` moves them to the optimum for data
    ``x`` and ``near_optimum`` builds the perturbed model on which the scaling laws are measured.
    """

    def __init__(self, dim: int = 20) -> None:
        if dim < 1:
            raise ValueError(f"dim must be a positive dimension; got {dim}")
        super().__init__([_FixedVarianceEncoder(dim, Q_VARIANCE)], [_UnitNoiseLikelihood()], GaussianPrior(dim),
                         x_dim=dim)
        with torch.no_grad():
            self.q.weight.copy_(torch.eye(dim) / 2)
            self.q.bias.zero_()

    @property
    def q(self) -> nn.Linear:
        """A (``weight``) and b (``bias``) of q's mean A x + b."""
        return self.encoder[0].linear

    @property
    def mu(self) -> nn.Parameter:
        return self.decoder[1].mu

    @staticmethod
    def sample_data(n: int, dim: int = 20, seed: int = 0) -> Tensor:
        """n data points from the toy with a true mean mu* ~ N(0, I): x ~ N(mu*, 2 I); shape (n, dim), float64."""
        generator = torch.Generator().manual_seed(seed)
        mu = torch.randn(dim, generator=generator, dtype=torch.float64)
        return mu + math.sqrt(2.0) * torch.randn(n, dim, generator=generator, dtype=torch.float64)

    @classmethod
    def near_optimum(cls, x: Tensor, perturbation: float = PERTURBATION, seed: int = 0) -> GaussianToy:
        """The toy (in ``x``'s dtype) at the optimum for data ``x`` (B, D), every parameter then shifted by
        independent N(0, perturbation^2) noise from a generator seeded with ``seed`` (torch's global one left as
        it was)."""
        with torch.random.fork_rng(devices=[]):  # the layers' initialisation, which the optimum replaces
            model = cls(x.shape[1]).to(x.dtype)
        model.set_optimum(x)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturbation * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        return model

    @torch.no_grad()
    def set_optimum(self, x: Tensor) -> None:
        """mu = the mean of ``x``, A = I / 2, b = mu / 2."""
        mu = x.mean(0)
        self.mu.copy_(mu)
        self.q.weight.copy_(torch.eye(len(mu), dtype=mu.dtype) / 2)
        self.q.bias.copy_(mu / 2)

    def log_marginal(self, x: Tensor) -> Tensor:
        """The exact log p(x) = log N(x; mu, 2 I), shape (B,)."""
        return Independent(Normal(self.mu, math.sqrt(2.0) * torch.ones_like(self.mu)), 1).log_prob(x)

    def exact_posterior(self, x: Tensor) -> MultivariateNormal:
        """The exact p(z | x) = N((x + mu) / 2, I / 2) for a batch x of shape (B, D)."""
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        return MultivariateNormal((x + self.mu) / 2, covariance_matrix=eye / 2)
