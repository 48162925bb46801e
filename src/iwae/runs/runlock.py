"""One process at a time in a run directory: ``locked(RUN)`` holds an exclusive ``flock`` on ``RUN/.lock`` for as long
as the process trains, evaluates and draws there, and refuses a second process, naming the first.

The file names its holder (pid and command line), for the message; the lock itself is the kernel's, so it ends with
its process however that ends (a kill included): a lock file left behind by a killed process blocks nothing. A
holder that ends normally removes the file, while still holding the lock; a process that opened the file before that
finds, once it holds the lock, that the path no longer names the file it locked, and starts again.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

LOCK = ".lock"


class RunInUseError(ValueError):
    """Another process holds the run directory; the message names it (pid, command) and what to do."""


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s lock for the body of the ``with``.

    Raises:
        RunInUseError: if another process holds it.
    """
    path = directory / LOCK
    fd = _acquire(path, directory)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n".encode())
        yield
    finally:
        with suppress(OSError):  # a directory turned read-only: the error that stopped the body is the one to tell
            path.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


@contextmanager
def all_locked(directories: list[Path]) -> Iterator[None]:
    """Hold the locks of all ``directories`` (those of a stack's seeds) for the body of the ``with``.

    Raises:
        RunInUseError: if another process holds one of them (those taken before it are released).
    """
    with ExitStack() as held:
        for directory in directories:
            held.enter_context(locked(directory))
        yield


def _acquire(path: Path, directory: Path) -> int:
    """A descriptor of ``path`` holding its exclusive lock, the path still naming the file locked."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:  # a read-only or immutable run directory, or file system
            if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise PermissionError(f"cannot lock {directory} (writing {path}: {error.strerror}); copy the run "
                                  "directory somewhere writable (cp -r RUN COPY) and use the copy") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise RunInUseError(_in_use(directory, holder)) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass  # removed by the holder that just ended
        os.close(fd)


def _in_use(directory: Path, holder: str) -> str:
    """The message for ``directory`` held by the process that ``holder`` (its lock file's "pid command") names."""
    pid, _, command = holder.partition(" ")
    if not pid.isdigit():
        return (f"{directory} is in use by another process (it holds {directory / LOCK}); wait for it to end, "
                "then run this command again")
    return (f"{directory} is in use by process {pid} ({command}); wait for it to end, or stop it (kill {pid}), "
            "then run this command again")
