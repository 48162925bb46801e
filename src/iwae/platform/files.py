"""Writing a file so that a kill at any moment leaves a readable copy: the old file or the new one, never half; and a
full disk reported as one line naming the disk and the space needed."""

from __future__ import annotations

import errno
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO

# a write refused for want of space: the disk is full, the user's quota is spent, or the file size limit is reached
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(OSError):
    """A file could not be written for want of space; the message names the disk, the space needed and free."""


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` into ``path.tmp``, fsync it, and rename it over ``path``.

    The content is made in memory first, so its size is known before the disk is touched. A kill mid-write leaves
    ``path`` as it was (and a stale ``path.tmp``, which the next write truncates).

    Raises:
        DiskFullError: if the disk lacks the space (``path`` is left as it was, and ``path.tmp`` removed).
    """
    buffer = io.BytesIO()
    write(buffer)
    content = buffer.getbuffer()
    tmp = path.with_name(path.name + ".tmp")
    if shutil.disk_usage(path.parent).free < len(content):
        raise disk_full(path, len(content), kept=True)
    try:
        with tmp.open("wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno in _NO_SPACE:
            raise disk_full(path, len(content), kept=True, limit=error.errno == errno.EFBIG) from error
        raise
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def append_durably(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` and flush it to disk.

    Raises:
        DiskFullError: if the disk lacks the space (what was appended may end in a part of ``text``).
    """
    try:
        with path.open("a") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        if error.errno in _NO_SPACE:
            raise disk_full(path, len(text.encode()), limit=error.errno == errno.EFBIG) from error
        raise


def disk_full(path: Path, needed: int, *, kept: bool = False, limit: bool = False) -> DiskFullError:
    """The error for ``path``, of ``needed`` bytes, not written: it names the disk (its mount point) and its free
    space, or, if ``limit``, the process's file size limit that refused it; and, if ``kept``, says that ``path`` is
    left as it was."""
    left = f"{path.name} is left as it was; " if kept else ""
    if limit:
        return DiskFullError(f"cannot write {path}: it needs {_size(needed)}, more than this process's file size "
                             f"limit allows; {left}raise the limit (ulimit -f)")
    mount = path.parent.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    free = shutil.disk_usage(path.parent).free
    return DiskFullError(f"no space to write {path}: it needs {_size(needed)} on the disk mounted at {mount}, which "
                         f"has {_size(free)} free; {left}free space there")


def _size(count: int) -> str:
    """``count`` bytes, in the largest unit that keeps it at least 1."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
