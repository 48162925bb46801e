"""The memory estimate against measured peaks, and the one-line refusal of what cannot fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iwae.models import burda
from iwae.platform import distributed, memory
from iwae.settings import SettingError
from iwae.training import config as train_config
from iwae.training import preflight

# Run in a fresh process whose allocator returns every large block to the kernel when it is freed, so that the
# peak resident memory of one step, measured from a reset of the high-water mark (Linux's clear_refs), is the
# memory the step allocated.
_MEASURE = """
import json, sys, torch
from pathlib import Path
from iwae.eval.likelihood import importance_statistics
from iwae.models import burda
from iwae.core.objectives import loss

def status(key):
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
    return int(line.split()[1]) * 1024

peaks = []
for layers, d, k, b, estimator in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    model, x = burda(layers, d), (torch.rand(b, d) < 0.5).float()
    optimizer = torch.optim.Adam(model.parameters())
    def step():
        if estimator is None:
            importance_statistics(model, x, k, chunk_size=k, batch_size=b)
        else:
            out = loss(model, x, "iwae", k, estimator, reduction="sum")
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
    step()
    Path("/proc/self/clear_refs").write_text("5")
    base = status("VmRSS:")
    step()
    peaks.append(status("VmHWM:") - base)
print(json.dumps(peaks))
"""

CASES = [(1, 64, 250, 20, "dreg"), (2, 64, 250, 20, "standard"), (2, 784, 50, 20, "stl"), (1, 784, 125, 32, None)]


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_the_estimate_bounds_the_measured_peak_within_a_factor_of_four() -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(CASES)], capture_output=True, text=True,
                          env=env, timeout=120, check=True)
    for (layers, d, k, b, estimator), peak in zip(CASES, json.loads(done.stdout), strict=True):
        estimate = memory.pass_bytes(burda(layers, d), d, k * b, training=estimator is not None)
        assert peak <= estimate <= 4 * peak, (layers, d, k, b, estimator, peak, estimate)


def test_the_estimate_needs_no_memory_and_grows_with_the_rows() -> None:
    with torch.device("meta"):
        model = burda(2, 784)
    steps = [memory.pass_bytes(model, 784, rows, training=True) for rows in (0, 1000, 2000)]
    assert steps[0] > 0 and steps[2] - steps[1] == steps[1] - steps[0] > 0  # parameters, then linear in the rows
    assert memory.pass_bytes(model, 784, 1000, training=False) < steps[1]


def test_what_does_not_fit_is_refused_naming_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2_000_000_000)
    memory.check_fits(1_999_000_000, torch.device("cpu"), "a step with {0} {k}", ("k",), k=5)
    with pytest.raises(SettingError) as error:
        memory.check_fits(5_300_000_000, torch.device("cpu"), "a step with {0} {k}", ("k",), k=5)
    assert str(error.value) == ("a step with k 5 needs about 5.3 GB of memory, but 2 GB is available on cpu; use a "
                                "smaller k")
    assert error.value.message(lambda name: f"--{name}").endswith("use a smaller --k")


def test_the_memory_available_here_is_known() -> None:
    available = memory.available_bytes(torch.device("cpu"))
    assert available is not None
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:")) if Path("/proc/meminfo").exists() else None
    assert 0 < available <= (total or available)


def test_a_ranks_training_memory_is_that_of_its_rows_of_the_global_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    needed = []
    def check_fits(bytes_: int, device: torch.device, what: str, names: tuple[str, ...], **values: object) -> None:
        if "k" in names:  # the check of the passes (not that of the parameters alone)
            needed.append(bytes_)

    monkeypatch.setattr(memory, "check_fits", check_fits)
    config = train_config.TrainConfig(k=50, batch_size=4000, epochs=1)  # the training pass dominates the evaluation's
    preflight.check_training_memory(config, 784, torch.device("cpu"))
    monkeypatch.setattr(distributed, "world", lambda: 4)  # 4 ranks, 1000 rows each
    preflight.check_training_memory(config, 784, torch.device("cpu"))
    with torch.device("meta"):
        model = burda(1, 784)
    assert needed == [memory.pass_bytes(model, 784, 50 * rows, training=True) for rows in (4000, 1000)]
