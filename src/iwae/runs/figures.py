"""A run's figures (RUN/figures/*.png): samples, reconstructions, training curves, and the bound against k."""

from __future__ import annotations

from pathlib import Path

import torch

from iwae import data, plots
from iwae.platform import memory
from iwae.platform.device import resolve_device, seeded
from iwae.runs import checkpoint, evaluation, rundir
from iwae.settings import check_integer, check_seed


def missing(run_dir: Path) -> bool:
    """Whether a figure that ``make_figures`` draws for the run in ``run_dir`` is not there (a run stopped, or
    killed, while it drew them)."""
    names = ["samples.png", "reconstructions.png"]
    names += ["training.png"] if rundir.read_metrics(run_dir) else []
    names += [evaluation.BOUND_VS_K] if evaluation.eval_path(run_dir).is_file() else []
    return any(not (run_dir / rundir.FIGURES / name).is_file() for name in names)


def make_figures(run_dir: Path, *, device: torch.device | str = "cpu", seed: int = 0, n: int = 100,
                 loaded: data.Dataset | None = None) -> list[Path]:
    """Draw a run's figures from its checkpoint, metrics and evaluation (``n`` model samples, ``n // 2``
    reconstructions, of the run's data: ``loaded`` if given, else loaded here); return the files written."""
    n, seed = check_integer(n, "n", 2), check_seed(seed)
    torch_device = resolve_device(str(device))
    state, model = checkpoint.load_model(run_dir, torch_device)
    memory.check_fits(memory.pass_bytes(model, state["x_dim"], n, training=False), torch_device,
                      "drawing {0} {n} samples", ("n",), n=n)
    config = state["config"]
    dataset = loaded or data.load(config["dataset"], config["data_dir"], split=config["data_split"],
                                  sha256=config.get("dataset_sha256"))
    shape = plots.image_shape(dataset.test.shape[1], dataset.image_shape)
    columns = 10 if shape[0] > 1 else 1
    out = run_dir / rundir.FIGURES
    out.mkdir(exist_ok=True)
    with seeded(seed, torch_device):
        samples = plots.prior_samples(model, n)
    x = dataset.test[:n // 2].to(torch_device)
    written = [
        plots.plot_images(out / "samples.png",
                          {"samples (Bernoulli means)": plots.image_grid(samples, shape, columns)}),
        plots.plot_images(out / "reconstructions.png", {
            "test data": plots.image_grid(x, shape, columns // 2 or 1),
            "reconstruction": plots.image_grid(plots.reconstructions(model, x), shape, columns // 2 or 1),
        }),
    ]
    metrics = rundir.read_metrics(run_dir)
    if metrics:
        written.append(plots.plot_training(out / "training.png", metrics))
    own_evaluation = evaluation.eval_path(run_dir)
    if own_evaluation.is_file():
        written.append(plots.plot_bound_vs_k(out / evaluation.BOUND_VS_K, evaluation.read_evaluation(own_evaluation)))
    return written
