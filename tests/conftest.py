"""Fixtures and helpers shared by the trainer, evaluator and command-line tests."""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from iwae.data import datasets
from iwae.runs import rundir
from iwae.training import signals

# tests of the GPU's paths (CUDA graphs, its generators), run wherever a GPU is
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

THREAD_CHOICE = re.compile(r"iwae: \d+ torch threads?: ")


def messages(stderr: str) -> list[str]:
    """The lines of a command's stderr, less the thread choice every command prints at start."""
    return [line for line in stderr.strip().splitlines() if not THREAD_CHOICE.match(line)]


def flip_a_bit_inside(path: Path) -> str:
    """Flip one bit in the middle of the bytes of the largest record of the zip archive ``path`` (a file of
    ``torch.save``'s, the record a tensor's); return the record's name."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    start = record.header_offset + 30 + len(record.orig_filename.encode()) + len(record.extra)  # after its header
    data[start + record.file_size // 2] ^= 0x04
    path.write_bytes(bytes(data))
    return record.filename


def same_matmul_as(run: Path) -> list[str]:
    """The option that makes a new run multiply on the float32 path the run in ``run`` recorded. Each process
    otherwise times the paths itself, and two may choose differently (so round differently) on a busy machine."""
    return ["--matmul", rundir.read_json(run / rundir.CONFIG)["matmul"]]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Stop the session when a signal stops a training run that a test (or fixture) runs in this process and does
    not expect to stop: the run's handler took the SIGTERM of ``timeout`` or the Ctrl-C meant for pytest."""
    yield
    if call.excinfo is not None and call.excinfo.errisinstance(signals.Interrupted):
        item.session.shouldstop = f"{call.excinfo.value.signal.name} received during {item.nodeid}"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The path of a small grey-level dataset (so dynamically binarized): an .npz file with 64 training and
    16 test examples of 16 values in [0, 1]."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, train=rng.random((64, 16), dtype=np.float32), test=rng.random((16, 16), dtype=np.float32))
    return str(path)


@pytest.fixture(autouse=True)
def fresh_data_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a fresh process would: no "reading <dataset> from ..." line printed yet."""
    monkeypatch.setattr(datasets, "_REPORTED", set())


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every matplotlib figure saved while the test runs, drawn (on an Agg canvas) so that its artists' extents
    are those of the saved file."""
    figures: list[Figure] = []
    save = Figure.savefig

    def savefig(fig: Figure, *args: object, **kwargs: object) -> None:
        save(fig, *args, **kwargs)
        FigureCanvasAgg(fig).draw()
        figures.append(fig)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def overlapping(boxes: list[Bbox]) -> list[tuple[Bbox, Bbox]]:
    """The pairs of ``boxes`` that overlap."""
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]


def tick_label_boxes(axis: Axis) -> list[Bbox]:
    """The window extents of ``axis``'s labelled ticks inside the axes' view (major and minor)."""
    low, high = sorted(axis.get_view_interval())
    return [tick.label1.get_window_extent() for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]
            if tick.label1.get_visible() and tick.label1.get_text() and low <= tick.get_loc() <= high]
