"""The child processes a benchmark starts: run on a given number of torch threads, and, when one fails, stopped
with its own last words instead of a bare exit status."""

from __future__ import annotations

import os
import subprocess

ERROR_LINES = 8  # of a failed child's stderr, shown


def run_child(command: list[str], threads: int) -> str:
    """Run ``command`` with ``OMP_NUM_THREADS=threads`` (torch's intra-op threads, as it starts) and return its
    stdout; exit naming the command and the end of its stderr when it fails."""
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        said = "\n".join(done.stderr.strip().splitlines()[-ERROR_LINES:])
        raise SystemExit(f"{' '.join(command)} failed (exit status {done.returncode}):\n{said}")
    return done.stdout
