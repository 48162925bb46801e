"""Annealed importance sampling (AIS) and bidirectional Monte Carlo (BDMC) estimates of log p(x).

AIS (Neal 2001) anneals from a normalized start density p_0(z) to the unnormalized posterior p(x, z) along
the geometric path

    f_t(z) = p_0(z)^(1 - beta_t) p(x, z)^beta_t,    0 = beta_0 < beta_1 < ... < beta_T = 1,

over all latents z = (z_1..z_L) jointly. A chain draws z ~ p_0, then for t = 1..T adds

    log w += log f_t(z) - log f_{t-1}(z) = (beta_t - beta_{t-1}) (log p(x, z) - log p_0(z))

and moves z by a Hamiltonian Monte Carlo transition that leaves f_t invariant. E[w] = p(x), so with C chains
log (1/C) sum_c w_c is a stochastic lower bound of log p(x) (below it in expectation, by Jensen's inequality)
that converges to it as T or C grows, whatever q is. The start p_0 is the prior, drawn ancestrally,
p(z_L) prod_{l<L} p(z_l | z_{l+1}) (``start="prior"``), or q(z | x) (``start="encoder"``, closer to the
posterior, so fewer steps reach the same accuracy).

The schedule is sigmoidal (Grosse, Maddison & Salakhutdinov 2013; Wu et al. 2017):
beta_t = (s(r (2t/T - 1)) - s(-r)) / (s(r) - s(-r)) with s the logistic function and r = 4, which spends more
steps near beta = 0 and beta = 1, where the densities change fastest.

HMC (Neal 2011) uses an identity mass matrix, ``leapfrog`` leapfrog steps and one step size per example and
chain, adapted towards an acceptance rate of 0.65 by log eps += ADAPT_RATE (a - 0.65) after each transition,
with a its acceptance probability. A step size that adapts to a chain's own past makes the transitions depend
on the chain's states, and the weights are then no longer unbiased (on the linear-Gaussian model, such
chains overestimate log p(x) by several standard errors). So the adaptation runs in a pilot: an AIS run of
min(T, PILOT_STEPS) steps from independent draws of p_0, whose weights are discarded, records each chain's
step size as a function of beta; the estimating run then uses, at each beta_t, chain c's pilot step size
interpolated (linearly in log eps) at beta_t. Its transitions are fixed in advance, so E[w] = p(x) exactly.
The pilot costs min(T, PILOT_STEPS) further steps.

BDMC (Grosse, Ghahramani & Adams 2015): on data simulated from the model, (z, x) ~ p(z) p(x | z), the z
drawn is an exact sample of p(z | x). AIS run backward from it, beta from 1 to 0, gives weights with
E[w] = 1 / p(x), so -log (1/C) sum_c w_c is a stochastic upper bound of log p(x). The gap between the
forward (lower) and backward (upper) bounds bounds the forward estimator's error on data like the model's.

Every chain and example runs batched, as one (C, B, D) tensor of latents; only the current state is kept,
so memory does not grow with the number of steps.

References:
  Neal (2001), Annealed Importance Sampling, Statistics and Computing.
  Neal (2011), MCMC Using Hamiltonian Dynamics, Handbook of Markov Chain Monte Carlo.
  Grosse, Ghahramani, Adams (2015), Sandwiching the Marginal Likelihood Using Bidirectional Monte Carlo.
  Wu, Burda, Salakhutdinov, Grosse (2017), On the Quantitative Analysis of Decoder-Based Generative Models.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints
from tqdm import tqdm

from iwae.models import DeepLatentModel
from iwae.platform import duration
from iwae.platform.device import batch_seed, seeded
from iwae.settings import SettingError, check_examples, check_integer, check_seed

Start = Literal["prior", "encoder"]
STARTS = ("prior", "encoder")
SIGMOID_RADIUS = 4.0
TARGET_ACCEPTANCE = 0.65
ADAPT_RATE = 0.5
INITIAL_STEP_SIZE = 0.05
PILOT_STEPS = 100
TIMED_LEAPFROG = 10  # the most leapfrog steps a timed HMC transition takes (seconds_per_step)


class AISResult(NamedTuple):
    """AIS over C chains for B examples.

    ``log_likelihood`` (B,): log (1/C) sum_c w_c. ``acceptance`` (C, B): each chain's mean HMC acceptance
    probability over its transitions. ``ess`` (B,): the effective sample size of the chains' weights,
    (sum_c w_c)^2 / sum_c w_c^2, between 1 and C. ``log_weights`` (C, B): log w_c. ``step_size`` (C, B):
    each chain's mean HMC step size.
    """

    log_likelihood: Tensor
    acceptance: Tensor
    ess: Tensor
    log_weights: Tensor
    step_size: Tensor


class BDMCResult(NamedTuple):
    """BDMC on B examples simulated from the model: ``x`` (B, D), ``forward`` (AIS from the start
    distribution, whose ``log_likelihood`` is a stochastic lower bound of log p(x)) and ``backward`` (AIS
    from the exact posterior sample, whose ``log_likelihood`` is the stochastic upper bound
    -log (1/C) sum_c w_c)."""

    x: Tensor
    forward: AISResult
    backward: AISResult

    @property
    def gap(self) -> Tensor:
        """Upper minus lower bound per example, shape (B,)."""
        return self.backward.log_likelihood - self.forward.log_likelihood


def sigmoid_schedule(steps: int, radius: float = SIGMOID_RADIUS) -> Tensor:
    """The sigmoidal schedule beta_0 = 0 < ... < beta_T = 1 with T = ``steps``, in float64: shape (T + 1,)."""
    s = torch.sigmoid(radius * torch.linspace(-1.0, 1.0, steps + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


def _base_support(support: constraints.Constraint) -> constraints.Constraint:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support


def _continuous(distribution: Distribution, name: str) -> Distribution:
    """``distribution`` if its support is all of R^d (HMC moves in an unconstrained continuous space), else
    a ValueError naming the layer."""
    support = _base_support(distribution.support)
    if not isinstance(support, type(constraints.real)):
        kind = type(getattr(distribution, "base_dist", distribution)).__name__
        raise ValueError(
            f"AIS needs continuous latents on all of R^d, but {name} is a {kind} with support "
            f"{type(support).__name__.strip('_').lower()}; use a model with Gaussian latent layers, or the "
            "importance-sampled estimate (--method is)"
        )
    return distribution


class Path:
    """The geometric path from p_0 to p(x, z) for one batch x (B, D), on latents z flattened into one
    (C, B, sum_l d_l) tensor."""

    def __init__(self, model: DeepLatentModel, x: Tensor, start: Start, dims: list[int]) -> None:
        self.model, self.x, self.start, self.dims = model, x, start, dims

    def split(self, z: Tensor) -> list[Tensor]:
        return list(z.split(self.dims, -1))

    def log_prior(self, z: list[Tensor]) -> Tensor:
        """log p(z_L) + sum_{l<L} log p(z_l | z_{l+1}): the prior's density over all latents."""
        log_p = _continuous(self.model.prior(), "the prior p(z_L)").log_prob(z[-1])
        for level in range(1, len(z)):
            layer = _continuous(self.model.conditionals[level](z[level]), f"p(z_{level} | z_{level + 1})")
            log_p = log_p + layer.log_prob(z[level - 1])
        return log_p

    def log_encoder(self, z: list[Tensor]) -> Tensor:
        """log q(z_1..z_L | x) at given latents."""
        log_q, given = 0.0, self.x
        for level, (layer, value) in enumerate(zip(self.model.encoder, z, strict=True)):
            log_q = log_q + _continuous(layer(given), f"q(z_{level + 1} | ...)").log_prob(value)
            given = value
        return log_q

    def terms(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """log p_0(z) and log p(x, z) - log p_0(z), each (C, B); for the prior start the second is log p(x | z_1)."""
        latents = self.split(z)
        if self.start == "prior":
            return self.log_prior(latents), self.model.decoder[0](latents[0]).log_prob(self.x)
        log_q = self.log_encoder(latents)
        return log_q, self.model.log_joint(self.x, latents) - log_q

    def sample_start(self, chains: int) -> Tensor:
        """z ~ p_0, shape (C, B, sum_l d_l)."""
        if self.start == "encoder":
            return torch.cat(self.model.sample_posterior(self.x, chains).z, -1)
        return torch.cat(sample_prior(self.model, (chains, len(self.x))), -1)


def sample_prior(model: DeepLatentModel, shape: tuple[int, ...]) -> list[Tensor]:
    """Ancestral draws z_L ~ p(z_L), z_l ~ p(z_l | z_{l+1}), returned bottom-up [z_1..z_L], each (*shape, d_l)."""
    conditionals = model.conditionals
    z = [_continuous(model.prior(), "the prior p(z_L)").sample(shape)]
    for level in range(len(conditionals) - 1, 0, -1):
        z.insert(0, _continuous(conditionals[level](z[0]), f"p(z_{level} | z_{level + 1})").sample())
    return z


class _State(NamedTuple):
    """A chain's position with the two terms of log f_beta = log_start + beta log_ratio and their gradients."""

    z: Tensor
    log_start: Tensor
    log_ratio: Tensor
    grad_start: Tensor
    grad_ratio: Tensor

    def log_f(self, beta: float) -> Tensor:
        return self.log_start + beta * self.log_ratio

    def grad(self, beta: float) -> Tensor:
        return self.grad_start + beta * self.grad_ratio


def _evaluate(path: Path, z: Tensor) -> _State:
    """The path's two terms at ``z`` and their gradients with respect to ``z``, detached (no graph is kept)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        log_start, log_ratio = path.terms(z)
        (grad_start,) = torch.autograd.grad(log_start.sum(), z, retain_graph=True)
        (grad_ratio,) = torch.autograd.grad(log_ratio.sum(), z)
    return _State(z.detach(), log_start.detach(), log_ratio.detach(), grad_start, grad_ratio)


def hmc_transition(path: Path, state: _State, beta: float, step_size: Tensor, leapfrog: int) -> tuple[_State, Tensor]:
    """One HMC transition leaving f_beta invariant, for every chain and example at once.

    Momentum p ~ N(0, I); ``leapfrog`` leapfrog steps of size ``step_size`` (C, B, 1) through the potential
    -log f_beta; accept with probability min(1, exp(H(z, p) - H(z', p'))), H = -log f_beta + |p|^2 / 2 (a
    proposal whose energy is not finite is rejected).

    Returns:
      The new state and the acceptance probabilities, shape (C, B).
    """
    momentum = torch.randn_like(state.z)
    p = momentum + 0.5 * step_size * state.grad(beta)
    proposal = state
    for i in range(leapfrog):
        proposal = _evaluate(path, proposal.z + step_size * p)
        p = p + (step_size if i < leapfrog - 1 else 0.5 * step_size) * proposal.grad(beta)
    log_accept = (proposal.log_f(beta) - 0.5 * p.square().sum(-1)) - (
        state.log_f(beta) - 0.5 * momentum.square().sum(-1)
    )
    accept_prob = torch.nan_to_num(log_accept.clamp(max=0.0), nan=-math.inf).exp()
    accepted = torch.rand_like(accept_prob) < accept_prob
    chosen = [torch.where(accepted.view(*accepted.shape, *[1] * (new.dim() - 2)), new, old)
              for new, old in zip(proposal, state, strict=True)]
    return _State(*chosen), accept_prob


class StepSizes(NamedTuple):
    """Each chain's HMC step size as a function of beta: ``log_step[i]`` (C, B) at ``betas[i]`` (increasing)."""

    betas: Tensor
    log_step: Tensor

    def at(self, beta: float) -> Tensor:
        """The step sizes at ``beta``, shape (C, B, 1): log eps interpolated linearly in beta, held constant
        beyond the ends."""
        i = int(torch.searchsorted(self.betas, beta))
        if i == 0 or i == len(self.betas):
            log_step = self.log_step[min(i, len(self.betas) - 1)]
        else:
            weight = (beta - self.betas[i - 1].item()) / (self.betas[i] - self.betas[i - 1]).item()
            log_step = torch.lerp(self.log_step[i - 1], self.log_step[i], weight)
        return log_step.exp()[..., None]


def anneal(
    path: Path, z: Tensor, betas: Tensor, leapfrog: int, step_sizes: StepSizes | None, bar: tqdm | None = None
) -> tuple[Tensor, Tensor, StepSizes]:
    """Run AIS chains from ``z`` (C, B, D), a sample of f_{betas[0]}, through the schedule ``betas``.

    For t = 1..T: log w += log f_t(z) - log f_{t-1}(z), then (except after the last) an HMC transition
    leaving f_t invariant. ``betas`` may decrease (backward AIS, from beta = 1 to 0).

    With ``step_sizes``, transition t uses ``step_sizes.at(beta_t)``. Without, the run is a pilot: each
    chain's step size starts at INITIAL_STEP_SIZE and adapts after every transition, which biases the
    weights, and the step sizes reached are returned (at increasing ``betas``) for a later run to use.

    Returns:
      log w (C, B) in float64, the mean acceptance probability per chain (C, B; NaN for a schedule of one step,
      which makes no transition), and the step sizes used.
    """
    state = _evaluate(path, z)
    log_w = torch.zeros(state.log_ratio.shape, dtype=torch.float64, device=z.device)
    acceptance = torch.zeros_like(log_w) if len(betas) > 2 else torch.full_like(log_w, math.nan)
    step_size = torch.full((*log_w.shape, 1), INITIAL_STEP_SIZE, dtype=z.dtype, device=z.device)
    used = []
    for t in range(1, len(betas)):
        log_w += (betas[t] - betas[t - 1]) * state.log_ratio.double()
        if t < len(betas) - 1:
            beta = betas[t].item()
            if step_sizes is not None:
                step_size = step_sizes.at(beta).to(z.dtype)
            state, accept_prob = hmc_transition(path, state, beta, step_size, leapfrog)
            if step_sizes is None:
                step_size = step_size * torch.exp(ADAPT_RATE * (accept_prob - TARGET_ACCEPTANCE))[..., None]
            used.append(step_size[..., 0].log())
            acceptance += accept_prob.double() / (len(betas) - 2)
        if bar is not None:
            bar.update(1)
    if not used:
        used.append(step_size[..., 0].log())
    trace = StepSizes(betas[1:len(used) + 1].to(z.device), torch.stack(used))
    if len(betas) > 1 and betas[-1] < betas[0]:
        trace = StepSizes(trace.betas.flip(0), trace.log_step.flip(0))
    return log_w, acceptance, trace


def check_settings(steps: int, chains: int, leapfrog: int, start: str, *, batch_size: int,
                   seed: int | None = None) -> tuple[int, int, int, int]:
    """``steps``, ``chains``, ``leapfrog`` and ``batch_size`` as ints (NumPy's integers taken), after raising
    SettingError naming the first setting that AIS cannot run with (``seed``, if given, among them)."""
    if seed is not None:
        check_seed(seed)
    steps, chains, leapfrog, batch_size = (
        check_integer(value, name, 1, "{0} must be a positive integer; got {value!r}")
        for name, value in (("steps", steps), ("chains", chains), ("leapfrog", leapfrog), ("batch_size", batch_size)))
    if start not in STARTS:
        raise SettingError("{0} must be one of {known}; got {value!r}", ("start",), known=", ".join(STARTS),
                           value=start)
    return steps, chains, leapfrog, batch_size


def check_simulated(n: int, name: str = "n") -> int:
    """``n``, a number of examples to simulate, as an int if it is a positive integer (NumPy's too); else
    SettingError naming the setting ``name``."""
    return check_integer(n, name, 1,
                         "the number of simulated examples, {0}, must be a positive integer; got {value!r}")


def combine(runs: list[tuple[Tensor, Tensor, StepSizes]], sign: float = 1.0) -> AISResult:
    """Join the per-batch outputs of ``anneal`` along the example dimension into an ``AISResult``; ``sign``
    -1 for backward runs, whose weights estimate 1 / p(x)."""
    log_w = torch.cat([run[0] for run in runs], 1)
    acceptance = torch.cat([run[1] for run in runs], 1)
    step_size = torch.cat([run[2].log_step.exp().mean(0) for run in runs], 1)
    lse = torch.logsumexp(log_w, 0)
    ess = (2 * lse - torch.logsumexp(2 * log_w, 0)).exp()
    return AISResult(sign * (lse - math.log(len(log_w))), acceptance, ess, log_w, step_size)


def check_model(model: DeepLatentModel, x: Tensor, start: Start) -> None:
    """Raise ValueError if AIS cannot run on ``model`` from ``start`` (a latent layer that is not continuous),
    by evaluating the path once at a draw from the start for the first example of ``x``."""
    with torch.no_grad():
        path = Path(model, x[:1], start, _latent_dims(model))
        path.terms(path.sample_start(1))


def _latent_dims(model: DeepLatentModel) -> list[int]:
    return [z.shape[-1] for z in sample_prior(model, (1,))]


def seconds_per_step(model: DeepLatentModel, x: Tensor, *, chains: int, leapfrog: int, start: Start) -> float:
    """The wall time of one annealing step (an HMC transition of ``leapfrog`` leapfrog steps for ``chains`` chains
    of every example of ``x``), timed on runs of two steps of at most ``TIMED_LEAPFROG`` leapfrog steps and scaled
    to ``leapfrog`` (so that timing a step never takes as long as the step); torch's generator is left as it was."""
    timed = min(leapfrog, TIMED_LEAPFROG)
    with torch.no_grad(), seeded(0, x.device):
        path = Path(model, x, start, _latent_dims(model))
        seconds = duration.seconds_per_call(lambda: anneal(path, path.sample_start(chains), sigmoid_schedule(2),
                                                           timed, None))
    return seconds * leapfrog / timed


def _pilot(path: Path, chains: int, steps: int, leapfrog: int, bar: tqdm) -> StepSizes:
    """The step sizes of an adaptive pilot run of min(steps, PILOT_STEPS) steps from fresh draws of p_0."""
    return anneal(path, path.sample_start(chains), sigmoid_schedule(min(steps, PILOT_STEPS)), leapfrog, None, bar)[2]


@torch.no_grad()
def ais_log_likelihood(
    model: DeepLatentModel,
    x: Tensor,
    *,
    steps: int,
    chains: int,
    leapfrog: int,
    start: Start = "prior",
    seed: int | None = 0,
    batch_size: int = 100,
    progress: bool = False,
) -> AISResult:
    """The AIS estimate of log p(x) per example of ``x`` (B, D; as ``DeepLatentModel.as_batch`` takes it), with its
    diagnostics (see ``AISResult``).

    Approximates: log p(x) = log integral p(x, z) dz.
    With: log (1/C) sum_c w_c over C = ``chains`` independent AIS chains of T = ``steps`` intermediate
    distributions on the sigmoidal geometric path from ``start`` ("prior" or "encoder", q(z | x)), each
    transition one HMC move of ``leapfrog`` leapfrog steps, after a pilot run that sets the step sizes.
    Requires: every latent layer of the model (and of q, for the encoder start) continuous on R^d.

    Examples run ``batch_size`` at a time, all chains together (``ais_batches``); peak memory is that of a forward
    and a backward pass on C x ``batch_size`` rows, plus the pilot's step sizes (at most PILOT_STEPS x C x
    ``batch_size``), whatever ``steps`` and ``leapfrog``. With ``seed``, the draws come from generators seeded
    with it and each batch's index, and torch's global generator is left as it was.
    """
    steps, chains, leapfrog, batch_size = check_settings(steps, chains, leapfrog, start, batch_size=batch_size,
                                                         seed=seed)
    x = model.as_batch(x)
    check_examples(x)
    with ais_bar(steps, chains, len(x.split(batch_size)), progress) as bar:
        return combine(list(ais_batches(model, x, steps=steps, chains=chains, leapfrog=leapfrog, start=start,
                                        seed=seed, batch_size=batch_size, bar=bar)))


def ais_bar(steps: int, chains: int, batches: int, progress: bool, directions: int = 1) -> tqdm:
    """A bar of the annealing steps of AIS runs (``directions`` 2: BDMC's forward and backward) over ``batches``
    batches, pilots included, with the time left; shown on a terminal when ``progress``."""
    return tqdm(total=(directions * steps + min(steps, PILOT_STEPS)) * batches,
                desc=f"{'AIS' if directions == 1 else 'BDMC'} {steps} steps x {chains} chains", unit="step",
                disable=None if progress else True)


Run = tuple[Tensor, Tensor, StepSizes]  # one batch's ``anneal`` outputs: log w, acceptance, step sizes


def _seeded_batches(seed: int | None, device: torch.device, first_batch: int, batches: int) -> Iterator[int]:
    """The indices ``first_batch``, ... of ``batches`` batches, torch's generator seeded for each with ``seed``
    and its index (then restored); with ``seed`` None, the generator is left to run on."""
    with seeded(seed, device) if seed is not None else nullcontext():
        for index in range(first_batch, first_batch + batches):
            if seed is not None:
                torch.manual_seed(batch_seed(seed, index))
            yield index


@torch.no_grad()
def ais_batches(model: DeepLatentModel, x: Tensor, *, steps: int, chains: int, leapfrog: int, start: Start = "prior",
                seed: int | None = 0, batch_size: int = 100, first_batch: int = 0,
                bar: tqdm | None = None) -> Iterator[Run]:
    """``ais_log_likelihood``'s AIS runs of one batch of ``x`` after another (``combine`` joins them): with
    ``seed``, batch j (counted from ``first_batch``) draws from the generator seeded with ``batch_seed(seed,
    j)``, so that a batch's run depends on the seed, its index and its examples alone. ``x`` as
    ``DeepLatentModel.as_batch`` takes it."""
    steps, chains, leapfrog, batch_size = check_settings(steps, chains, leapfrog, start, batch_size=batch_size,
                                                         seed=seed)
    x = model.as_batch(x)
    betas = sigmoid_schedule(steps)
    batches = x.split(batch_size)
    for batch, _ in zip(batches, _seeded_batches(seed, x.device, first_batch, len(batches)), strict=True):
        path = Path(model, batch, start, _latent_dims(model))
        step_sizes = _pilot(path, chains, steps, leapfrog, bar)
        yield anneal(path, path.sample_start(chains), betas, leapfrog, step_sizes, bar)


@torch.no_grad()
def bdmc(
    model: DeepLatentModel,
    n: int,
    *,
    steps: int,
    chains: int,
    leapfrog: int,
    start: Start = "prior",
    seed: int | None = 0,
    batch_size: int = 100,
    progress: bool = False,
) -> BDMCResult:
    """Bidirectional Monte Carlo on ``n`` examples simulated from the model (Grosse et al. 2015).

    Draws (z, x) ~ p(z) p(x | z), then runs ``ais_log_likelihood``'s chains forward from ``start`` (a
    stochastic lower bound of log p(x)) and backward from z, an exact posterior sample, with the schedule
    reversed (a stochastic upper bound). Both use the step sizes of one forward pilot run, which is independent
    of z given x, as the backward run's unbiasedness requires. Arguments as for ``ais_log_likelihood``; the
    batches are those of ``bdmc_batches``.
    """
    steps, chains, leapfrog, batch_size = check_settings(steps, chains, leapfrog, start, batch_size=batch_size,
                                                         seed=seed)
    n = check_simulated(n)
    with ais_bar(steps, chains, math.ceil(n / batch_size), progress, directions=2) as bar:
        return combine_bdmc(list(bdmc_batches(model, n, steps=steps, chains=chains, leapfrog=leapfrog, start=start,
                                              seed=seed, batch_size=batch_size, bar=bar)))


@torch.no_grad()
def bdmc_batches(model: DeepLatentModel, n: int, *, steps: int, chains: int, leapfrog: int, start: Start = "prior",
                 seed: int | None = 0, batch_size: int = 100, first_batch: int = 0,
                 bar: tqdm | None = None) -> Iterator[tuple[Tensor, Run, Run]]:
    """``bdmc``'s batches of at most ``batch_size`` of the ``n`` simulated examples, one after another: each its
    simulated examples and its forward and backward runs, seeded as ``ais_batches``' are."""
    steps, chains, leapfrog, batch_size = check_settings(steps, chains, leapfrog, start, batch_size=batch_size,
                                                         seed=seed)
    betas = sigmoid_schedule(steps)
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    device = next(model.parameters()).device
    for index in _seeded_batches(seed, device, first_batch, len(sizes) - first_batch):
        size = sizes[index]
        z = sample_prior(model, (size,))
        x = model.decoder[0](z[0]).sample()
        path = Path(model, x, start, [v.shape[-1] for v in z])
        step_sizes = _pilot(path, chains, steps, leapfrog, bar)
        forward = anneal(path, path.sample_start(chains), betas, leapfrog, step_sizes, bar)
        exact = torch.cat(z, -1).expand(chains, size, -1).clone()
        yield x, forward, anneal(path, exact, betas.flip(0), leapfrog, step_sizes, bar)


def combine_bdmc(batches: list[tuple[Tensor, Run, Run]]) -> BDMCResult:
    """The ``BDMCResult`` of ``bdmc_batches``' batches."""
    return BDMCResult(torch.cat([x for x, _, _ in batches]), combine([f for _, f, _ in batches]),
                      combine([b for _, _, b in batches], sign=-1.0))
