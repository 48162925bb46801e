"""Gradient diagnostics: the signal-to-noise ratio of each estimator's gradient against the number of samples.

For a network's gradient estimate g (a random vector: the gradient of the surrogate loss of
``objectives.loss`` on a fixed batch, for fresh samples z ~ q), with mean mu and covariance Sigma,

    per parameter j:   SNR_j = |mu_j| / sqrt(Sigma_jj),
    aggregated:        SNR   = |E[g . u]| / std(g . u),   u = mu / |mu|,  the SNR of g's projection on its mean,

estimated from independent draws of g; the inference network is ``model.encoder``, the generative network
``model.decoder``. Rainforth et al. (2018, "Tighter variational bounds are not necessarily better") show for
the standard IWAE gradient that the generative network's SNR grows as sqrt(K) while the inference
network's decays as 1/sqrt(K) (the mean vanishes as 1/K, the noise as 1/sqrt(K)); Tucker et al. (2018) show
that DReG's inference-network SNR grows as sqrt(K) instead. The fitted slope of log SNR against log K shows
which law a model follows.

Estimation. Moments are streamed in float64 (Welford / Pebay updates), so memory does not grow with the
number of draws. For each setting, ``draws`` gradients fix the direction u (their mean), then ``draws``
fresh gradients are projected on it: u is independent of the projected draws, so the mean |mu_hat| of the
draws themselves does not inflate the aggregated SNR (it would by tr(Sigma) / draws). Per-parameter
moments use all 2 x ``draws`` gradients; a per-parameter SNR below about sqrt(2 / (pi n)), n = 2 x draws,
is at the noise floor of the estimate and cannot be told from zero. The standard error of the aggregated
SNR r = m / s of n draws with skewness g1 and kurtosis g2 is the delta method's
sqrt((1 - r g1 + r^2 (g2 - 1) / 4) / n). The slope of log SNR against log K is fitted by weighted least
squares with weights (SNR / se)^2, and its standard error is sqrt(1 / sum_i w_i (log K_i - mean_w)^2).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from iwae.core.objectives import (
    ESTIMATORS,
    OBJECTIVES,
    REPARAMETERIZED_ESTIMATORS,
    SETTING_READERS,
    Objective,
    check_given,
    loss,
)
from iwae.platform import duration, memory
from iwae.platform.device import seeded
from iwae.settings import SettingError

NETWORKS = ("inference", "generative")
GRADIENT_OBJECTIVES = ("iwae", "miwae", "ciwae", "piwae")
CSV_COLUMNS = ("objective", "estimator", "network", "k", "m", "snr", "snr_se", "mean_norm", "std_norm")


class _Moments:
    """Streaming mean and sum of squared deviations of a vector, per coordinate, in float64 (Welford)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.n = 0
        self.mean = torch.zeros(size, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)

    def add(self, value: Tensor) -> None:
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)

    @property
    def std(self) -> Tensor:
        return (self.m2 / (self.n - 1)).sqrt()


class _ScalarMoments:
    """Streaming mean and central moments 2..4 of a scalar (Pebay 2008, one value at a time)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2, self.m3, self.m4 = 0, 0.0, 0.0, 0.0, 0.0

    def add(self, value: float) -> None:
        n1, self.n = self.n, self.n + 1
        n = self.n
        delta = value - self.mean
        delta_n = delta / n
        term = delta * delta_n * n1
        self.mean += delta_n
        self.m4 += term * delta_n**2 * (n * n - 3 * n + 3) + 6 * delta_n**2 * self.m2 - 4 * delta_n * self.m3
        self.m3 += term * delta_n * (n - 2) - 3 * delta_n * self.m2
        self.m2 += term

    def snr(self) -> tuple[float, float]:
        """|mean| / std (sample std) and its delta-method standard error; (nan, nan) without spread."""
        if self.n < 2 or self.m2 <= 0:
            return math.nan, math.nan
        r = self.mean / math.sqrt(self.m2 / (self.n - 1))
        skew = math.sqrt(self.n) * self.m3 / self.m2**1.5
        kurt = self.n * self.m4 / self.m2**2
        return abs(r), math.sqrt(max(1.0 - r * skew + r * r * (kurt - 1.0) / 4.0, 0.0) / self.n)


@dataclass(frozen=True)
class SNRPoint:
    """The gradient statistics of one network under one objective, estimator, K (total samples) and M.

    ``snr`` and ``snr_se``: the SNR of the projection on the mean gradient, with its standard error.
    ``mean_norm``: |mu|, estimated without bias in its square as sqrt(|mu_hat|^2 - tr(Sigma_hat) / n)
    (0 where that is negative); ``std_norm``: sqrt(tr(Sigma_hat)). ``mean_parameter_snr``: the mean of
    the per-parameter SNRs, ``parameter_snr`` (flattened in ``named_parameters`` order).
    """

    objective: str
    estimator: str
    network: str
    k: int
    m: int
    snr: float
    snr_se: float
    mean_norm: float
    std_norm: float
    mean_parameter_snr: float
    parameter_snr: Tensor = field(repr=False)

    def row(self) -> dict[str, str | int | float]:
        """The point as a row of ``CSV_COLUMNS``."""
        return {name: getattr(self, name) for name in CSV_COLUMNS}


@dataclass(frozen=True)
class Slope:
    """The fitted slope of log SNR against log K, with its standard error, over the points with a finite SNR."""

    slope: float
    se: float
    points: int


@dataclass(frozen=True)
class SNRResult:
    """``points`` for every estimator, network and K, and ``slopes[estimator][network]``, for one objective
    and one M (groups, for miwae and piwae; 1 otherwise)."""

    objective: str
    draws: int
    points: list[SNRPoint]
    slopes: dict[str, dict[str, Slope]]
    m: int = 1


def labels(results: Sequence[SNRResult]) -> list[str]:
    """Each result's name: its objective, with its M ("piwae-m8") where the objective comes with several M."""
    names = [r.objective for r in results]
    return [r.objective if names.count(r.objective) == 1 else f"{r.objective}-m{r.m}" for r in results]


def fit_slope(ks: Sequence[float], snr: Sequence[float], se: Sequence[float]) -> Slope:
    """Weighted least squares of log SNR on log K, weights (SNR / se)^2 (the inverse variance of log SNR).

    Points whose SNR or standard error is not finite and positive are left out; fewer than two give nan.
    """
    kept = [(math.log(k), math.log(s), (s / e) ** 2) for k, s, e in zip(ks, snr, se, strict=True)
            if math.isfinite(s) and math.isfinite(e) and s > 0 and e > 0]
    if len({x for x, _, _ in kept}) < 2:
        return Slope(math.nan, math.nan, len(kept))
    total = sum(w for _, _, w in kept)
    x_mean = sum(w * x for x, _, w in kept) / total
    y_mean = sum(w * y for _, y, w in kept) / total
    sxx = sum(w * (x - x_mean) ** 2 for x, _, w in kept)
    sxy = sum(w * (x - x_mean) * (y - y_mean) for x, y, w in kept)
    return Slope(sxy / sxx, 1.0 / math.sqrt(sxx), len(kept))


def check_settings(objective: str | Objective, estimators: Sequence[str], ks: Sequence[int], draws: int, *,
                   m: int = 1, beta: float = 0.5) -> Objective:
    """The objective (K to be replaced by each of ``ks``), after checking every argument of ``gradient_snr``;
    SettingError naming the first problem and its fix."""
    if not ks or any(not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1 for k in ks):
        raise SettingError("{0} (the grid of K) must be positive integers; got {value}", ("ks",), value=list(ks))
    name = objective.name if isinstance(objective, Objective) else objective
    if name not in GRADIENT_OBJECTIVES:
        what = ("is not diagnosed (its gradient is the ELBO's or has no SNR law)" if name in OBJECTIVES
                else "is unknown")
        raise SettingError("{0} {name!r} {what}; choose one of {known}", ("objective",), name=name, what=what,
                           known=", ".join(GRADIENT_OBJECTIVES))
    if not isinstance(objective, Objective):
        if name in SETTING_READERS["m"] and (not isinstance(m, numbers.Integral) or isinstance(m, bool) or m < 1):
            raise SettingError("{0} must be a positive integer number of groups for {name}; got {0}={m!r}", ("m",),
                               name=name, m=m)
        objective = _objective(name, m, m, beta)
    if isinstance(estimators, str):
        raise SettingError("{0} must be a list of names; got the string {value!r}: give [{value!r}]",
                           ("estimators",), value=estimators)
    if not estimators:
        raise SettingError("no {0} given; choose from {known}", ("estimators",),
                           known=", ".join(REPARAMETERIZED_ESTIMATORS))
    for estimator in estimators:
        if estimator not in REPARAMETERIZED_ESTIMATORS:
            what = ("is a score-function estimator, and the diagnosis measures the reparameterized ones"
                    if estimator in ESTIMATORS else "is unknown")
            raise SettingError("{0} {name!r} {what}; choose from {known}", ("estimators",), name=estimator,
                               what=what, known=", ".join(REPARAMETERIZED_ESTIMATORS))
        objective.check_estimator(estimator)
    if objective.name in SETTING_READERS["m"]:
        bad = [k for k in ks if k % objective.m]
        if bad:
            raise SettingError("{0}={m} must divide every K of {1} for {name}; it does not divide {bad}; use "
                               "multiples of {m} in {1}", ("m", "ks"), m=objective.m, name=objective.name,
                               bad=", ".join(map(str, bad)))
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise SettingError("{0} must be an integer of at least 2 (a standard deviation needs two); got {value!r}",
                           ("draws",), value=draws)
    return objective


def check_snr_memory(model: nn.Module, x_dim: int, examples: int, ks: Sequence[int], device: torch.device) -> None:
    """Refuse (SettingError) a diagnosis whose data (``examples`` rows of ``x_dim`` float64 values) and gradient
    passes (the largest K of ``ks`` samples for each example) would not fit in ``device``'s memory."""
    k = max(ks)
    needed = memory.pass_bytes(model, x_dim, k * examples, training=True) + 8 * examples * x_dim
    memory.check_fits(needed, device, "diagnosing with {0} {k} and {1} {examples}", ("k", "examples"), k=k,
                      examples=examples)


def _objective(name: str, k: int, m: int, beta: float) -> Objective:
    """The objective ``name`` of ``k`` samples with those of the diagnosis's ``m`` and ``beta`` that it reads (one
    diagnosis runs several objectives on one ``m`` and ``beta``)."""
    return Objective(name, k, **read_by(name, m=m, beta=beta))


def read_by(objective: str, **settings: float) -> dict[str, float]:
    """Those of ``settings`` (m, beta) that ``objective`` reads: a diagnosis of several objectives shares one m and
    beta, which each objective takes if it reads them."""
    return {name: value for name, value in settings.items() if objective in SETTING_READERS[name]}


def check_snr_time(model: nn.Module, x: Tensor, settings: Sequence[tuple[str, int]], estimators: Sequence[str],
                   ks: Sequence[int], draws: int, *, beta: float, limit_s: float | None) -> None:
    """Refuse (SettingError) ``gradient_snr`` runs, one per (objective, m) of ``settings``, if a timed gradient
    draw at the largest K says they would take more than ``limit_s`` seconds (each K is counted as the largest)."""
    objective, m = settings[0]
    obj = _objective(objective, max(ks), m, beta)

    def one_draw() -> None:
        loss(model, x, obj, estimator=estimators[0]).loss.backward()
        model.zero_grad(set_to_none=True)

    with seeded(0, x.device):
        seconds = duration.seconds_per_call(one_draw)
    per_draw = 2 * len(settings) * len(estimators) * len(ks) * seconds  # 2 x draws gradients per setting and K
    duration.check_duration(per_draw * draws, limit_s, "the gradient SNR with {0} {draws}", "draws",
                            int(limit_s / per_draw) if limit_s is not None else draws, "time_limit_s", draws=draws)


def _flat_grad(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]).double()


def gradient_snr(
    model: nn.Module,
    x: Tensor,
    objective: str | Objective = "iwae",
    estimators: Iterable[str] = REPARAMETERIZED_ESTIMATORS,
    ks: Iterable[int] = (1, 10, 100, 1000),
    draws: int = 100,
    *,
    m: int | None = None,
    beta: float | None = None,
    reduction: str = "sum",
    seed: int = 0,
    progress: bool = False,
) -> SNRResult:
    """The SNR of each estimator's inference- and generative-network gradients on the batch ``x``, against K.

    Args:
      model: a ``DeepLatentModel`` (inference network ``model.encoder``, generative ``model.decoder``).
      x: the fixed batch, shape (B, D).
      objective: "iwae", "miwae", "ciwae" or "piwae" (the bounds whose gradients differ from the ELBO's), or
        an ``Objective`` of one of them (its k is replaced by each K of the grid).
      estimators: any of "standard", "stl", "dreg".
      ks: the grid of K, total samples per example (for miwae and piwae, m groups of K / m).
      draws: gradients per pass; each setting takes 2 x draws backward passes (see the module docstring).
      m, beta: the objective's groups (miwae, piwae; default 1) and ELBO weight (ciwae; default 0.5), for an
        objective given by name that reads them (refused otherwise, as ``loss`` refuses them);
      reduction: the gradient of the "sum" (as in training) or the "mean" of the batch's bounds.
      seed, progress: seeds the samples (torch's global generator is restored afterwards); show a progress bar.

    Returns:
      ``SNRResult`` with one ``SNRPoint`` per estimator, network and K, and the slopes against K.
    """
    check_given(objective, m=m, beta=beta)
    base = check_settings(objective, estimators, ks := sorted(set(ks)), draws, m=1 if m is None else m,
                          beta=0.5 if beta is None else beta)
    estimators, ks, x = list(estimators), [int(k) for k in ks], model.as_input(x)  # x checked before its device is read
    params = {"inference": list(model.encoder.parameters()), "generative": list(model.decoder.parameters())}
    points: list[SNRPoint] = []
    settings = [(estimator, k) for estimator in estimators for k in ks]
    with seeded(seed, x.device), tqdm(total=2 * draws * len(settings), desc=f"gradient SNR ({base.name})",
                                      unit="draw", unit_scale=True, disable=None if progress else True) as bar:
        for estimator, k in settings:
            obj = Objective(base.name, k, base.m, base.beta, base.alpha)

            def draw(obj: Objective = obj, estimator: str = estimator) -> dict[str, Tensor]:
                model.zero_grad(set_to_none=True)
                loss(model, x, obj, estimator=estimator, reduction=reduction).loss.backward()
                bar.update(1)
                return {network: _flat_grad(ps) for network, ps in params.items()}

            groups = base.m if base.name in SETTING_READERS["m"] else 1
            points += [_point(base.name, estimator, network, k, groups, moments, projected)
                       for network, (moments, projected) in _gradient_moments(draw, params, draws, x.device).items()]
    model.zero_grad(set_to_none=True)
    return SNRResult(base.name, draws, points, _slopes(points, estimators, list(params)),
                     base.m if base.name in SETTING_READERS["m"] else 1)


def _slopes(points: list[SNRPoint], estimators: list[str], networks: list[str]) -> dict[str, dict[str, Slope]]:
    """The fitted slope of log SNR against log K of each estimator's gradient of each network."""
    return {estimator: {network: fit_slope(*zip(*[(p.k, p.snr, p.snr_se) for p in points
                                                  if p.estimator == estimator and p.network == network], strict=True))
                        for network in networks}
            for estimator in estimators}


def _gradient_moments(draw: Callable[[], dict[str, Tensor]], params: dict[str, list[nn.Parameter]], draws: int,
                      device: torch.device) -> dict[str, tuple[_Moments, _ScalarMoments]]:
    """Per network, the moments of its gradients over 2 x ``draws`` draws, and of their projections on the
    direction of the mean of the first ``draws`` (see the module docstring)."""
    per_parameter = {network: _Moments(sum(p.numel() for p in ps), device) for network, ps in params.items()}
    for _ in range(draws):
        for network, g in draw().items():
            per_parameter[network].add(g)
    direction = {network: moments.mean / moments.mean.norm() for network, moments in per_parameter.items()}
    projected = {network: _ScalarMoments() for network in params}
    for _ in range(draws):
        for network, g in draw().items():
            per_parameter[network].add(g)
            projected[network].add(float(g @ direction[network]))
    return {network: (per_parameter[network], projected[network]) for network in params}


def _point(objective: str, estimator: str, network: str, k: int, groups: int, moments: _Moments,
           projected: _ScalarMoments) -> SNRPoint:
    """The SNR point of one estimator, network and K from its gradients' moments."""
    snr, snr_se = projected.snr()
    parameter_snr = (moments.mean.abs() / moments.std).cpu()
    total_variance = moments.m2.sum().item() / (moments.n - 1)
    mean_norm = math.sqrt(max(moments.mean.square().sum().item() - total_variance / moments.n, 0.0))
    return SNRPoint(objective, estimator, network, k, groups, snr, snr_se, mean_norm, math.sqrt(total_variance),
                    parameter_snr.nanmean().item(), parameter_snr)


def slopes_json(results: Sequence[SNRResult]) -> tuple[dict, dict]:
    """({objective: {estimator: {network: slope}}}, the same with the slopes' standard errors); an objective
    given with several M appears once per M, as "objective-mM" (see ``labels``)."""
    named = list(zip(labels(results), results, strict=True))
    slopes = {name: {e: {n: s.slope for n, s in d.items()} for e, d in r.slopes.items()} for name, r in named}
    ses = {name: {e: {n: s.se for n, s in d.items()} for e, d in r.slopes.items()} for name, r in named}
    return slopes, ses


def format_snr_table(results: Sequence[SNRResult]) -> str:
    """The points and slopes as a text table."""
    lines = [f"{'objective':<9} {'estimator':<9} {'network':<10} {'k':>5} {'m':>3} {'snr':>10} {'+-se':>8} "
             f"{'mean param snr':>14} {'|mean|':>10} {'std':>10}"]
    for result in results:
        lines += [f"{p.objective:<9} {p.estimator:<9} {p.network:<10} {p.k:>5} {p.m:>3} {p.snr:>10.4g} "
                  f"{p.snr_se:>8.2g} {p.mean_parameter_snr:>14.4g} {p.mean_norm:>10.4g} {p.std_norm:>10.4g}"
                  for p in result.points]
    lines.append(f"slope of log SNR against log K (+- standard error; {results[0].draws} draws per pass):")
    lines += [f"  {name:<9} {e:<9} {n:<10} {s.slope:+.3f} +- {s.se:.3f}"
              for name, r in zip(labels(results), results, strict=True) for e, d in r.slopes.items()
              for n, s in d.items()]
    return "\n".join(lines)
