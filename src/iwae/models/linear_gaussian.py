"""A linear-Gaussian latent-variable model with a closed-form marginal and posterior, for exact tests.

    p(z) = N(z; mu, I),    p(x | z) = N(x; W z + b, sigma^2 I),    q(z | x) = N(z; A x + c, L L^T),

    p(x) = N(x; W mu + b, W W^T + sigma^2 I),
    p(z | x) = N(z; S (mu + W^T (x - b) / sigma^2), S),   S = (I + W^T W / sigma^2)^-1.

q is a full-covariance Gaussian whose mean is affine in x, so it can hold the exact posterior.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from iwae.models.latent import DeepLatentModel


def _scale_tril(raw: Tensor) -> Tensor:
    """A lower-triangular matrix with positive diagonal from an unconstrained square matrix."""
    return torch.tril(raw, -1) + torch.diag_embed(torch.diagonal(raw, dim1=-2, dim2=-1).exp())


class AffineGaussianEncoder(nn.Module):
    """q(z | x) = N(A x + c, L L^T)."""

    def __init__(self, x_dim: int, z_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(x_dim, z_dim)
        self.raw_scale_tril = nn.Parameter(torch.zeros(z_dim, z_dim))

    def forward(self, x: Tensor) -> Distribution:
        return MultivariateNormal(self.linear(x), scale_tril=_scale_tril(self.raw_scale_tril), validate_args=False)


class LinearGaussianLikelihood(nn.Module):
    """p(x | z) = N(W z + b, sigma^2 I)."""

    def __init__(self, z_dim: int, x_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(z_dim, x_dim)
        self.log_sigma = nn.Parameter(torch.zeros(()))

    def forward(self, z: Tensor) -> Distribution:
        mean = self.linear(z)
        return Independent(Normal(mean, self.log_sigma.exp().expand_as(mean), validate_args=False), 1)


class GaussianPrior(nn.Module):
    """p(z) = N(mu, I) with a learnable mean."""

    def __init__(self, z_dim: int) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(z_dim))

    def forward(self) -> Distribution:
        return Independent(Normal(self.mu, torch.ones_like(self.mu), validate_args=False), 1)


class LinearGaussian(DeepLatentModel):
    """The linear-Gaussian model above, randomly initialised, with its exact marginal and posterior.

    Args:
      x_dim, z_dim: data and latent dimensions.
      sigma: the observation noise's standard deviation.
      generator: optional random generator for the initial parameters.
    """

    def __init__(self, x_dim: int, z_dim: int, sigma: float = 1.0, generator: torch.Generator | None = None):
        super().__init__([AffineGaussianEncoder(x_dim, z_dim)], [LinearGaussianLikelihood(z_dim, x_dim)],
                         GaussianPrior(z_dim), x_dim=x_dim)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.dim() else 1.0, generator=generator)
            self.likelihood.log_sigma.fill_(math.log(sigma))

    @property
    def likelihood(self) -> LinearGaussianLikelihood:
        return self.decoder[0]

    @property
    def q(self) -> AffineGaussianEncoder:
        return self.encoder[0]

    def _generative(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lin = self.likelihood.linear
        return lin.weight, lin.bias, self.decoder[1].mu, self.likelihood.log_sigma.exp() ** 2

    def log_marginal(self, x: Tensor) -> Tensor:
        """The exact log p(x), shape (B,)."""
        w, b, mu, var = self._generative()
        cov = w @ w.T + var * torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        return MultivariateNormal(w @ mu + b, covariance_matrix=cov).log_prob(x)

    def exact_posterior(self, x: Tensor) -> MultivariateNormal:
        """The exact p(z | x) for a batch x of shape (B, D)."""
        w, b, mu, var = self._generative()
        precision = torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + w.T @ w / var
        cov = torch.linalg.inv(precision)
        mean = (mu + (x - b) @ w / var) @ cov.T
        return MultivariateNormal(mean, covariance_matrix=cov)

    @torch.no_grad()
    def set_exact_posterior(self) -> None:
        """Set q's parameters so that q(z | x) equals p(z | x) for every x."""
        w, b, mu, var = self._generative()
        cov = torch.linalg.inv(torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + w.T @ w / var)
        self.q.linear.weight.copy_(cov @ w.T / var)
        self.q.linear.bias.copy_(cov @ (mu - w.T @ b / var))
        tril = torch.linalg.cholesky(cov)
        self.q.raw_scale_tril.copy_(torch.tril(tril, -1) + torch.diag_embed(torch.diagonal(tril).log()))
