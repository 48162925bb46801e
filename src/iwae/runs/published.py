"""Published test NLLs (nats) and active units of the tables ``iwae reproduce`` remakes, with their sources.

Keys are the cell names of ``iwae.runs.reproduce``: ``<data>-l<layers>-<objective>-k<k>`` for Burda et al.'s grids
("vae" is the k-sample ELBO), the objective's name for Rainforth et al.'s, ``<estimator>-k<k>`` for DReG's,
and ``<start>-to-<objective>`` for Burda et al.'s table 2. ``sd`` is the published spread over runs, where
one was given.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    """One published number: test NLL in nats, active units as printed ("16+5" for two layers), its spread
    over runs (None if not given), and where it was published."""

    nll: float
    active_units: str | None
    source: str
    sd: float | None = None


BURDA = "Burda, Grosse & Salakhutdinov 2016 (arXiv 1509.00519 v4)"
_TABLE1 = f"{BURDA}, table 1"
_TABLE2 = f"{BURDA}, table 2"
_TABLE3 = f"{BURDA}, table 3 (appendix D)"
_RAINFORTH = "Rainforth et al. 2018, table 1 (log p(x) by IWAE-5000, mean +- sd over 4 runs)"
_DREG = ("nbip/IWAE on GitHub, an independent TF2 reimplementation of the 1-layer MNIST protocol with the IWAE and "
         "IWAE-DReG estimators (not Tucker et al. 2018's own numbers)")

# (layers, k): (VAE NLL, VAE AU, IWAE NLL, IWAE AU), per dataset
_BURDA_GRID = {
    "mnist": {
        (1, 1): (86.76, "19", 86.76, "19"), (1, 5): (86.47, "20", 85.54, "22"), (1, 50): (86.35, "20", 84.78, "25"),
        (2, 1): (85.33, "16+5", 85.33, "16+5"), (2, 5): (85.01, "17+5", 83.89, "21+5"),
        (2, 50): (84.78, "17+5", 82.90, "26+7"),
    },
    "omniglot": {
        (1, 1): (108.11, "28", 108.11, "28"), (1, 5): (107.62, "28", 106.12, "34"),
        (1, 50): (107.80, "28", 104.67, "41"), (2, 1): (107.58, "28+4", 107.56, "30+5"),
        (2, 5): (106.31, "30+5", 104.79, "38+6"), (2, 50): (106.30, "30+5", 103.38, "44+7"),
    },
    "binarized-mnist": {
        (1, 1): (88.71, "19", 88.71, "19"), (1, 5): (88.83, "19", 87.63, "22"), (1, 50): (89.05, "20", 87.10, "24"),
        (2, 1): (88.08, "16+5", 88.08, "16+5"), (2, 5): (87.63, "17+5", 86.17, "21+5"),
        (2, 50): (87.86, "17+6", 85.32, "24+7"),
    },
}


def burda_cell(dataset: str, layers: int, objective: str, k: int) -> str:
    """The cell name of Burda et al.'s grids: ``<dataset>-l<layers>-<vae|iwae>-k<k>``."""
    return f"{dataset}-l{layers}-{objective}-k{k}"


def _burda(dataset: str, source: str) -> dict[str, Published]:
    cells = {}
    for (layers, k), (vae, vae_au, iwae, iwae_au) in _BURDA_GRID[dataset].items():
        cells[burda_cell(dataset, layers, "vae", k)] = Published(vae, vae_au, source)
        cells[burda_cell(dataset, layers, "iwae", k)] = Published(iwae, iwae_au, source)
    return cells


PUBLISHED: dict[str, dict[str, Published]] = {
    "burda-table1": {**_burda("mnist", _TABLE1), **_burda("omniglot", _TABLE1)},
    "burda-table2": {
        burda_cell("mnist", 1, "vae", 1): Published(86.76, "19", _TABLE2),
        burda_cell("mnist", 1, "iwae", 50): Published(84.78, "25", _TABLE2),
        "vae-k1-to-iwae-k50": Published(84.88, "22", _TABLE2),
        "iwae-k50-to-vae-k1": Published(86.02, "23", _TABLE2),
    },
    "burda-table3": _burda("binarized-mnist", _TABLE3),
    "rainforth-table1": {
        "iwae": Published(84.52, None, _RAINFORTH, 0.02),
        "piwae": Published(84.46, None, _RAINFORTH, 0.06),
        "miwae": Published(84.97, None, _RAINFORTH, 0.10),
        "ciwae": Published(85.24, None, _RAINFORTH, 0.08),
        "vae": Published(86.21, None, _RAINFORTH, 0.19),
    },
    "dreg": {
        "standard-k1": Published(86.35, None, _DREG), "standard-k5": Published(85.18, None, _DREG),
        "standard-k50": Published(84.59, None, _DREG), "dreg-k1": Published(86.08, None, _DREG),
        "dreg-k5": Published(84.90, None, _DREG), "dreg-k50": Published(84.32, None, _DREG),
    },
}
