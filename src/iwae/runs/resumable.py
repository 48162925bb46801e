"""The finished pieces of a long evaluation, kept in a file beside its result, so that an evaluation killed at any
moment continues where it stopped (stopped by Ctrl-C or a signal, it first writes what it finished).

    RUN/<result>.partial.pt    the setting the pieces belong to and the pieces finished so far

A piece's random draws depend only on the evaluation's seed and the piece's index, so an evaluation continued
from its pieces gives the numbers of one that was never stopped. The file is written atomically and names its
setting (method, k, split, examples, seed, pass sizes, the checkpoint's digest, ...): a file of another setting is
never reused, nor is one whose bytes no longer match their checksums (``iwae.runs.archives``); the finished result
replaces it.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from iwae.platform.files import write_atomic
from iwae.runs import archives

SUFFIX = ".partial.pt"
SAVE_EVERY_S = 30.0  # the default interval between writes of the pieces: at most this much work is lost to a kill


def partial_path(result: Path) -> Path:
    """The file of the finished pieces of the evaluation whose result goes to ``result``."""
    return result.with_name(result.stem + SUFFIX)


class Pieces:
    """The pieces of an evaluation with ``setting``, finished before (read from ``path``) and since; written back
    every ``every_s`` seconds (0: after every piece; None: never). ``chosen`` holds what the evaluation chose as
    it started (a matrix-multiply path, say), which a continued evaluation keeps, so that it computes alike."""

    def __init__(self, path: Path, setting: dict[str, Any], every_s: float | None = SAVE_EVERY_S) -> None:
        self.path, self.setting, self.every_s = path, setting, every_s
        saved = self._read() if every_s is not None else {}
        self.done: list[Any] = list(saved.get("pieces", []))
        self.chosen: dict[str, Any] = dict(saved.get("chosen", {}))
        self.saved_at, self.written = time.monotonic(), len(self.done)  # when, and how many pieces the file holds
        if self.done:
            print(f"iwae: continuing from {path} ({len(self.done)} pieces done)", file=sys.stderr)

    def _read(self) -> dict[str, Any]:
        """What ``path`` holds if it holds this setting's pieces, else nothing (a missing, damaged or other file)."""
        if not self.path.is_file():
            return {}
        try:
            saved = archives.load(self.path)
        except Exception:  # a damaged file (cut short, a changed record, unreadable) is started afresh, never fatal
            return {}
        if not isinstance(saved, dict) or saved.get("setting") != self.setting:
            return {}
        return saved

    def add(self, piece: Any) -> None:
        """Record a finished piece, and write the pieces if ``every_s`` has passed since they were last written."""
        self.done.append(piece)
        if self.every_s is not None and time.monotonic() - self.saved_at >= self.every_s:
            self.save()

    def save(self) -> None:
        """Write the setting and the pieces so far, atomically."""
        buffer = io.BytesIO()
        archives.save({"setting": self.setting, "chosen": self.chosen, "pieces": self.done}, buffer)
        write_atomic(self.path, lambda file: file.write(buffer.getvalue()))
        self.saved_at, self.written = time.monotonic(), len(self.done)

    @contextmanager
    def kept_on_stop(self) -> Iterator[None]:
        """Within the block, an exception (a stop by Ctrl-C or a signal, an error) first writes the pieces finished
        since they were last written, so that none of them is lost."""
        try:
            yield
        except BaseException:
            if self.every_s is not None and len(self.done) > self.written:
                self.save()
            raise

    def remove(self) -> None:
        """Delete the file, once the result it led to is written."""
        self.path.unlink(missing_ok=True)
