"""How often the backfill may ask the PACS: one request at a time, at most ``max_requests_per_second``, and
waits (for the rate, a ``Retry-After``, a backoff) that a stop request cuts short."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pacs_bridge.errors import BackfillStoppedError

# Waits after a 429 or 503 without Retry-After, by attempt: 1, 2, 4 ... seconds, at most this.
MAX_BACKOFF_SECONDS = 60.0


def backoff_seconds(attempt: int) -> float:
    """The wait before attempt ``attempt + 1`` when the PACS said "busy" without saying how long (attempt >= 1)."""
    return float(min(2 ** max(attempt - 1, 0), MAX_BACKOFF_SECONDS))


class Pacer:
    """Spaces the requests of one backfill so that they start at most ``max_requests_per_second`` a second
    (0: no limit beyond one at a time), and raises ``BackfillStoppedError`` once ``stopping`` is set."""

    def __init__(
        self,
        max_requests_per_second: float,
        stopping: threading.Event,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = 1.0 / max_requests_per_second if max_requests_per_second > 0 else 0.0
        self._stopping = stopping
        self._monotonic = monotonic
        self._next_at: float | None = None

    @property
    def stopping(self) -> threading.Event:
        return self._stopping

    def check(self) -> None:
        """``BackfillStoppedError`` when a stop was requested."""
        if self._stopping.is_set():
            raise BackfillStoppedError

    def wait_turn(self) -> None:
        """Return when the next request may start."""
        self.check()
        now = self._monotonic()
        if self._next_at is not None and now < self._next_at:
            self.pause(self._next_at - now)
            now = self._monotonic()
        self._next_at = now + self._interval

    def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less when a stop is requested meanwhile (then ``BackfillStoppedError``)."""
        if seconds > 0 and self._stopping.wait(seconds):
            raise BackfillStoppedError
        self.check()
