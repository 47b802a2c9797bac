"""Stopping a run early without losing work: preemption signals and non-finite steps.

Cluster schedulers send SIGTERM some time before they kill a job, and Ctrl+C sends SIGINT:
:class:`StopSignals` turns either into a request that the loop honours at the next optimizer
step's boundary, after writing a checkpoint. A second Ctrl+C stops at once.
:class:`NonFiniteSteps` counts optimizer steps whose loss or gradients were not finite; the
loop skips them, and too many in a row end the run with a checkpoint and a message naming the
files of the last batch.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While open, SIGTERM and SIGINT set :attr:`requested` instead of ending the process."""

    def __init__(self, enabled: bool) -> None:
        self.requested: str | None = None
        self._previous = {}
        # Handlers can only be installed from the main thread (not, say, inside a test runner's
        # worker thread); there the process keeps the default behaviour.
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            self.close()
            raise KeyboardInterrupt  # a second Ctrl+C: stop now
        self.requested = name
        logger.warning(
            "%s received: saving a checkpoint at the end of this step, then stopping "
            "(press Ctrl+C again to stop at once)",
            name,
        )

    def close(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class _Stop(BaseException):
    """Raised by :func:`exit_with_message_on_signal`'s handler; not an error to catch."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def exit_with_message_on_signal(message: Callable[[], str]) -> Iterator[None]:
    """Inside the block, SIGTERM or Ctrl+C end the process with ``message()`` logged and exit
    status 128 + the signal's number, instead of a silent kill (where a step boundary to
    checkpoint at does not exist yet: while the latent cache fills)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame) -> None:
        raise _Stop(signum)

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield
    except _Stop as stop:
        logger.warning("%s received: %s", signal.Signals(stop.signum).name, message())
        raise SystemExit(128 + stop.signum) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class NonFiniteSteps:
    """Consecutive optimizer steps with a non-finite loss or gradient."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def record(self, finite: bool) -> bool:
        """Count one step; True when the limit of steps in a row is reached."""
        self.in_a_row = 0 if finite else self.in_a_row + 1
        self.total += not finite
        return self.in_a_row >= self.limit


def describe_items(dataset, indices) -> str:
    """The files behind dataset items, for messages: ``dataset.describe(i)`` where a dataset
    knows them, else the item numbers."""
    describe = getattr(dataset, "describe", None)
    return "; ".join(describe(int(i)) if describe else f"item {int(i)}" for i in indices)
