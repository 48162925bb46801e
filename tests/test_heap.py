"""``iwae.platform.heap``: malloc keeps freed memory (checked in a fresh process, on glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import ctypes, ctypes.util, time
from iwae.platform import heap
libc = ctypes.CDLL(ctypes.util.find_library("c"))
def faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])  # minflt
def churn():
    for _ in range(10):  # as a training step does: buffers of 4 and 48 MB, written, then freed, again and again
        blocks = [ctypes.create_string_buffer(4 * 2**20) for _ in range(8)] + [ctypes.create_string_buffer(48 * 2**20)]
        del blocks
before = faults(); churn(); default = faults() - before
assert heap.retain_freed_memory() and heap.retain_freed_memory()
churn(); before = faults(); churn(); retained = faults() - before
print(default, retained)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    default, retained = map(int, done.stdout.split())
    # 10 rounds of 8 x 1024 + 12288 pages: by default the large block is mapped afresh and the freed heap top
    # handed back, so both are faulted in again every round; kept, the rounds reuse the first round's pages
    assert default > 10 * (8 * 1024 + 12288) * 0.8 and retained < 1024
