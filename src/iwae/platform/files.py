"""Writing a file so that a kill at any moment leaves a readable copy: the old file or the new one, never half."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` into ``path.tmp``, fsync it, and rename it over ``path``.

    A kill mid-write leaves ``path`` as it was (and a stale ``path.tmp``, which the next write truncates).
    """
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
