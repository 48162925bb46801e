"""Figures drawn from values (a model, tensors, a run's records), as PNG files; ``iwae.runs.figures`` draws a
run's figures into RUN/figures/:

    samples.png          x ~ p(x | z_1) means for z drawn from the prior, top layer down
    reconstructions.png  test examples beside the means of p(x | z_1) at z_1 = E_q[z_1 | x]
    training.png         train and test bounds, and the learning rate, per epoch (from metrics.jsonl)
    bound_vs_k.png       the bounds L_k against k from the run's own evaluation (RUN/eval.json)
    ais_vs_steps.png     the AIS estimate against the number of steps, and IS against k (``iwae.runs.evaluate_ais``)

and ``plot_snr``, the gradient signal-to-noise ratios of ``iwae diagnose snr``.

Drawn with matplotlib's object-oriented API, which renders to PNG without a display or pyplot state.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from torch import Tensor

from iwae.models import DeepLatentModel
from iwae.platform.files import write_atomic


@torch.no_grad()
def prior_samples(model: DeepLatentModel, n: int) -> Tensor:
    """The means of p(x | z_1) for n ancestral draws z_L ~ p(z_L), ..., z_1 ~ p(z_1 | z_2): shape (n, D)."""
    conditionals = model.conditionals
    z = model.prior().sample((n,))
    for layer in reversed(conditionals[1:]):
        z = layer(z).sample()
    return conditionals[0](z).mean


@torch.no_grad()
def reconstructions(model: DeepLatentModel, x: Tensor) -> Tensor:
    """The means of p(x | z_1) at q's mean z_1 = E_q[z_1 | x], for a batch x (B, D): shape (B, D)."""
    return model.decoder[0](model.encoder[0](x).mean).mean


def image_shape(dim: int, shape: tuple[int, int] | None) -> tuple[int, int]:
    """The (height, width) to draw a D-vector as: ``shape`` if known, a square if D is one, else one row."""
    if shape is not None:
        return shape
    side = math.isqrt(dim)
    return (side, side) if side * side == dim else (1, dim)


def image_grid(images: Tensor, shape: tuple[int, int], columns: int) -> np.ndarray:
    """Images (N, D) tiled into one array, ``columns`` per row, separated by 1-pixel lines of value 0.5
    (rows of height 1, vectors drawn as strips, are stacked without separators, as a heat map)."""
    height, width = shape
    pad = 1 if height > 1 else 0
    columns = min(columns, len(images))  # fewer images than columns: no empty tiles
    rows = math.ceil(len(images) / columns)
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad), 0.5, dtype=np.float32)
    for i, image in enumerate(images.detach().cpu().float().numpy()):
        r, c = divmod(i, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[top:top + height, left:left + width] = image.reshape(height, width)
    return grid


def _save(fig: Figure, path: Path) -> Path:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    write_atomic(path, lambda file: fig.savefig(file, format="png", dpi=120))
    return path


def plot_images(path: Path, panels: dict[str, np.ndarray]) -> Path:
    """One or more image grids side by side, titled by the keys of ``panels``, each pixel square: the figure is
    sized to the grids, drawn at one scale (4 in high, or 12 in wide in all if they are wider than 3:1, and never
    under ``MIN_PIXEL_IN`` a pixel, so that a small grid stays legible), each panel at least ``TITLE_MIN_CHARS``
    characters of its title wide (the title wrapped to the panel's width)."""
    rows = max(grid.shape[0] for grid in panels.values())
    cols = sum(grid.shape[1] for grid in panels.values())
    scale = max(MIN_PIXEL_IN, min(4.0 / rows, 12.0 / cols))
    widths = [max(grid.shape[1] * scale, TITLE_MIN_CHARS * TITLE_CHAR_IN) for grid in panels.values()]
    titles = [textwrap.wrap(title, int(width / TITLE_CHAR_IN), break_long_words=False)
              for title, width in zip(panels, widths, strict=True)]
    title_in = 0.6 + TITLE_LINE_IN * max(len(lines) for lines in titles)
    fig = Figure(figsize=(sum(widths) + 0.2 * len(panels), max(1.0, rows * scale) + title_in), layout="constrained")
    for i, (grid, lines) in enumerate(zip(panels.values(), titles, strict=True)):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
        ax.set_title("\n".join(lines))
        ax.set_axis_off()
    return _save(fig, path)


TITLE_CHAR_IN = 0.09  # inches a character of a title takes, about, at matplotlib's default size
TITLE_LINE_IN = 0.2  # inches a line of a title takes
TITLE_MIN_CHARS = 15  # a panel is at least this many characters of its title wide (wrapped to lines this long)
MIN_PIXEL_IN = 0.02  # inches drawn per pixel of an image grid, at least: 2.4 pixels of the PNG, at 120 dpi


def plot_training(path: Path, metrics: list[dict[str, Any]]) -> Path:
    """Train and test bounds per epoch, and the learning rate, from a run's metrics."""
    epochs = [record["epoch"] for record in metrics]
    marker = "o" if len(epochs) == 1 else None  # a line through one point draws nothing
    fig = Figure(figsize=(9, 3.6))
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(epochs, [record["train_bound"] for record in metrics], marker=marker, label="train (minibatches)")
    ax.plot(epochs, [record["test_bound"] for record in metrics], marker=marker, label="test (fixed subset)")
    ax.set(xlabel="epoch", ylabel="bound (nats)", title="training objective")
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    ax.plot(epochs, [record["lr"] for record in metrics], marker=marker, drawstyle="steps-post")
    ax.set(xlabel="epoch", ylabel="learning rate", yscale="log", title="schedule")
    return _save(fig, path)


def plot_bound_vs_k(path: Path, result: dict[str, Any]) -> Path:
    """The bounds L_k (mean over examples, with standard errors) against k from an evaluation result."""
    ks = sorted(result["bounds"], key=int)
    errors = [result["bounds_se"][k] for k in ks]
    bars = None if None in errors else errors  # one example has no standard error
    fig = Figure(figsize=(5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.errorbar([int(k) for k in ks], [result["bounds"][k] for k in ks], yerr=bars, marker="o", capsize=3,
                label=f"mean over {result['examples']} examples"
                + ("\nerror bars: ±1 standard error" if bars is not None else ""))
    ax.set(xscale="log", xlabel="k", ylabel="L_k (nats)")
    ax.set_title(_wrapped(f"{_data_name(result['dataset'])} {result['split']}: NLL {result['nll']:.2f} at "
                          f"k={result['k']}", 3.8))  # the axes' width
    _label_ticks(ax, [int(k) for k in ks])
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def _data_name(dataset: str) -> str:
    """A dataset as a figure names it: a catalogue name, or a user's file by its name (a run records its path)."""
    return Path(dataset).name


def _wrapped(title: str, width_in: float) -> str:
    """``title`` wrapped to lines that fit ``width_in`` inches."""
    return "\n".join(textwrap.wrap(title, int(width_in / TITLE_CHAR_IN), break_long_words=False))


def _label_ticks(ax: Any, values: Sequence[float]) -> None:
    """Label a log x axis at ``values`` and no other ticks (the minor ticks' labels of a narrow range overlap)."""
    values = sorted(set(values))
    ax.set_xticks(values, [f"{value:g}" for value in values])
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_ais_vs_steps(path: Path, result: dict[str, Any]) -> Path:
    """The AIS estimate of log p(x) against the number of steps, beside the importance-sampled bounds L_k
    against k, on the same examples (means with standard errors, from an ``eval_ais.json`` result)."""
    fig = Figure(figsize=(9, 3.6))
    ais_ax = fig.add_subplot(1, 2, 1)
    sweep = result["sweep"]
    ais_ax.errorbar([s["steps"] for s in sweep], [-s["nll"] for s in sweep], yerr=[s["nll_se"] for s in sweep],
                    marker="o", capsize=3, label=f"AIS, {result['chains']} chains")
    ais_ax.set(xscale="log", xlabel="AIS steps", ylabel="log p(x) estimate (nats)",
               title=f"AIS ({result['start']} start, {result['leapfrog']} leapfrog)")
    _label_ticks(ais_ax, [s["steps"] for s in sweep])
    is_ax = fig.add_subplot(1, 2, 2, sharey=ais_ax)
    ks = sorted(result["is_bounds"], key=int)
    is_ax.errorbar([int(k) for k in ks], [result["is_bounds"][k] for k in ks],
                   yerr=[result["is_bounds_se"][k] for k in ks], marker="s", capsize=3, color="C1", label="IS, L_k")
    is_ax.set(xscale="log", xlabel="importance samples k", title="importance sampling")
    _label_ticks(is_ax, [int(k) for k in ks])
    for ax in (ais_ax, is_ax):
        ax.axhline(-result["nll"], color="C0", linestyle="--", linewidth=1,
                   label=f"AIS, {result['steps']} steps: {-result['nll']:.2f}")
        ax.legend(fontsize="small")
    fig.suptitle(_wrapped(f"{_data_name(result['dataset'])} {result['split']}, {result['examples']} examples", 9.0))
    return _save(fig, path)


def plot_snr(path: Path, results: Sequence[Any], title: str, names: Sequence[str]) -> Path:
    """Gradient SNR against K on log-log axes (``iwae.eval.snr_diagnostics.SNRResult`` s, titled ``names``): one panel
    per result, one line per estimator and network, with standard-error bars and the fitted slopes in the legend."""
    fig = Figure(figsize=(5.2 * len(results), 5.4), layout="constrained")
    for i, (name, result) in enumerate(zip(names, results, strict=True)):
        ax = fig.add_subplot(1, len(results), i + 1)
        for estimator, by_network in result.slopes.items():
            for network, slope in by_network.items():
                points = [p for p in result.points if p.estimator == estimator and p.network == network]
                ax.errorbar([p.k for p in points], [p.snr for p in points], yerr=[p.snr_se for p in points],
                            marker="o" if network == "inference" else "s", capsize=3,
                            linestyle="-" if network == "inference" else "--",
                            label=f"{estimator}, {network} ({_slope_text(slope)})")
        ax.set(xscale="log", yscale="log", xlabel="K (samples per example)", ylabel="gradient SNR",
               title=f"{title}: {name}")
        _label_ticks(ax, [p.k for p in result.points])  # the grid's own K labelled, and no other
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2)  # below, off the data
    return _save(fig, path)


def _slope_text(slope: Any) -> str:
    """A fitted slope of log SNR against log K with its standard error, or that none was fitted (one K)."""
    if not math.isfinite(slope.slope):
        return "no slope fitted"
    return f"slope {slope.slope:+.2f} ± {slope.se:.2f}"
