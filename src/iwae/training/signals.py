"""Stopping work cleanly on SIGINT or SIGTERM, with a message that says how to continue: a training run finishes
its step, checkpoints and raises ``Interrupted`` (``StopOnSignal``); work that keeps its own progress (an
evaluation's finished batches) raises it where it stands (``raising_on_signal``)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from iwae.platform import distributed


class Interrupted(BaseException):
    """Training stopped on ``sig`` after writing a checkpoint: ``what`` happened, and the message adds the
    ``command`` that continues it (``verb``: "continue with", or "finish with").

    A ``BaseException``, as ``KeyboardInterrupt`` is: raised from a signal handler, it can surface inside any code
    (torch.compile's, a reader's), and no ``except Exception`` there may take it for a failure of its own."""

    def __init__(self, what: str, sig: signal.Signals, command: str, verb: str = "continue with") -> None:
        super().__init__(f"{what}; {verb}: {command}")
        self.what, self.signal, self.verb = what, sig, verb

    def continued_by(self, command: str) -> Interrupted:
        """The same stop, continued by another ``command`` (that of a grid of runs, say)."""
        return Interrupted(self.what, self.signal, command, self.verb)


class StopOnSignal:
    """Within the block, the first SIGINT or SIGTERM only records itself, so the loop can finish its step
    and write a checkpoint; a second one acts as it would have (KeyboardInterrupt, or termination)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> StopOnSignal:
        self.received: signal.Signals | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        _restore(self._previous)

    def __exit__(self, *exc: object) -> None:
        _restore(self._previous)

    def here(self) -> bool:
        """Whether to act on a signal after this step: if one came, and this process trains alone (ranks
        training together act on one at the next report, where they agree on it)."""
        return self.received is not None and distributed.world() == 1

    def agreed(self) -> signal.Signals | None:
        """The signal received by this process or, training with several ranks, by any of them."""
        number = distributed.maximum(0 if self.received is None else int(self.received))
        return signal.Signals(number) if number else None


@contextmanager
def raising_on_signal(what: str, command: str, verb: str = "continue with") -> Iterator[None]:
    """Within the block, SIGINT or SIGTERM raises ``Interrupted`` at once ("``what`` stopped by SIGTERM; ``verb``:
    ``command``"), as SIGINT alone would raise KeyboardInterrupt, where SIGTERM would end the process without a
    word. For work with no step to finish first, which keeps what it has done as it stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        raise Interrupted(f"{what} stopped by {sig.name}", sig, command, verb)

    previous = {sig: signal.signal(sig, stop) for sig in StopOnSignal.SIGNALS}
    try:
        yield
    finally:
        _restore(previous)


def _restore(previous: dict[int, Any]) -> None:
    """Put back the handlers that ``previous`` maps each signal to."""
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
