"""Checkpoints written before a change resume after it to bit-for-bit the same parameters.

The fixtures in ``tests/fixtures/resume`` were written by the code of commit 8bf3911 (before the training loop and
the package layout were rebuilt): for each run, the run directory as it stood after a checkpoint in the middle of
its second epoch (step 16 of 32, ``--checkpoint-every 0``), and the model state dict that the same run reached
when it trained all three epochs without stopping. The runs:

    iwae train --dataset tiny.npz --epochs 3 --batch-size 2 --no-compile --matmul default --eval-k 0
        --checkpoint-every 0 --monitor-examples 8 --seed 3 --device cpu
        lone-burda: --model burda --layers 1 --objective iwae --k 3 --estimator dreg
        lone-sbn:   --model sbn-8-4 --objective iwae --k 3 --estimator vimco

``tiny.npz`` holds 64 training and 16 test examples of 16 grey levels (conftest's ``tiny_dataset``); the runs
name it by a relative path, so they resume in a directory that holds it. They ran on one torch thread, and resume on
one: a float sum split over another number of threads rounds differently, so bit-for-bit equality holds at the
thread count (and matrix-multiply path) a run trained with, and on the kind of CPU it trained on (the fixtures were
written on an AMD CPU with AVX-512, where torch runs its AVX-512 kernels). On another CPU, or with kernels of another
instruction set (an AMD CPU without AVX-512 runs torch's AVX2 ones), which round otherwise, the parameters agree to
float rounding (within 1e-6; on an Intel Xeon with AVX-512 they differ by 1.2e-7 at most): a changed draw, order or
update moves them by orders of magnitude more.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from iwae.cli import main
from iwae.runs import checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "resume"
WRITTEN_ON = ("AuthenticAMD", "AVX512")  # the vendor of the CPU that wrote the fixtures, and torch's kernels on it
ROUNDING = 1e-6  # the parameters' largest difference elsewhere


def cpu_kind() -> tuple[str | None, str]:
    """This CPU's vendor (``vendor_id`` of /proc/cpuinfo, None where that is not known) and the instruction set of
    the kernels torch runs on it (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, ...)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    vendor = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), None)
    return vendor, torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("run", ["lone-burda", "lone-sbn"])
def test_checkpoint_from_before_the_change_resumes_to_the_same_parameters(
    run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(FIXTURES / run, tmp_path / run)
    shutil.copy(FIXTURES / "tiny.npz", tmp_path / "tiny.npz")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    saved = checkpoint.load(Path(run))
    assert (saved["epoch"], saved["step"]) == (1, 16)  # the fixture stops in the middle of an epoch

    try:
        assert main(["train", "--resume", run, "--threads", "1"]) == 0  # as the fixtures were written
    finally:
        torch.set_num_threads(threads)

    resumed = checkpoint.load(Path(run))
    expected = torch.load(FIXTURES / f"{run}.final.pt", weights_only=True)
    assert resumed["epoch"] == 3
    assert resumed["model"].keys() == expected.keys()
    for name, tensor in expected.items():
        if cpu_kind() == WRITTEN_ON:
            assert torch.equal(resumed["model"][name], tensor), name
        else:
            torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=ROUNDING, msg=name)
