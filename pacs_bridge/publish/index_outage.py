"""The index database's outages as the publishing and relink passes meet them: logged once when one starts, as
a summary while it lasts and once when it ends, not once per pass.

Every pass begins by claiming work in the index, so while the database is down (stopped, unreachable, full,
read-only) each pass fails in the same way, every ``debounce.tick_seconds``. The passes tell ``IndexOutageLog``
what each of those operations got: the first failure logs ``index_outage_started`` (which operation, the
error), a failure ``summary_interval`` after the last line logs ``index_outage_continues`` (for how long, how
many operations failed, the last error), and the first success after them ``index_outage_ended``. The
publisher and the relinker of one bridge share one log, so an outage is reported once for both.

``IndexOutageTracker`` is the bookkeeping alone (no clock, no I/O); ``IndexOutageLog`` adds the clock, a lock
(the passes run on APScheduler's threads) and the log lines.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

log = structlog.get_logger("pacs_bridge.publish")

# What the operator does about it, in each line of an outage.
HINT = (
    "the listener answers C-STOREs 0xA7xx (senders retry) and nothing is published until the database is back; "
    "/readyz names the problem; check the database in database.url: running, reachable, writable, not full"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexOutageStarted:
    operation: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexOutageGoesOn:
    since: datetime
    seconds: float
    failed_operations: int  # since the outage started
    last_operation: str
    last_error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexOutageEnded:
    since: datetime
    seconds: float
    failed_operations: int


@dataclass(slots=True, kw_only=True)
class _Outage:
    since: datetime
    failed_operations: int
    last_line_at: datetime


class IndexOutageTracker:
    """What the passes know about the index database's availability. Not thread-safe: callers hold a lock."""

    def __init__(self, *, summary_interval: timedelta = timedelta(minutes=1)) -> None:
        self._summary_interval = summary_interval
        self._outage: _Outage | None = None

    @property
    def in_outage(self) -> bool:
        return self._outage is not None

    def failed(self, operation: str, error: str, now: datetime) -> IndexOutageStarted | IndexOutageGoesOn | None:
        """``operation`` could not use the index. Returns the start of an outage, or its summary when one is
        due, else None (the failure is counted)."""
        outage = self._outage
        if outage is None:
            self._outage = _Outage(since=now, failed_operations=1, last_line_at=now)
            return IndexOutageStarted(operation=operation, error=error)
        outage.failed_operations += 1
        if now - outage.last_line_at < self._summary_interval:
            return None
        outage.last_line_at = now
        return IndexOutageGoesOn(
            since=outage.since,
            seconds=(now - outage.since).total_seconds(),
            failed_operations=outage.failed_operations,
            last_operation=operation,
            last_error=error,
        )

    def succeeded(self, now: datetime) -> IndexOutageEnded | None:
        """An operation used the index. Ends an outage."""
        outage, self._outage = self._outage, None
        if outage is None:
            return None
        return IndexOutageEnded(
            since=outage.since,
            seconds=(now - outage.since).total_seconds(),
            failed_operations=outage.failed_operations,
        )


class IndexOutageLog:
    """Logs the index database's outages for the passes that share it (thread-safe)."""

    def __init__(self, *, clock: Callable[[], datetime], summary_interval: timedelta = timedelta(minutes=1)) -> None:
        self._clock = clock
        self._tracker = IndexOutageTracker(summary_interval=summary_interval)
        self._lock = threading.Lock()

    def failed(self, operation: str, error: Exception) -> None:
        """``operation`` (e.g. ``claim``) failed with ``error`` (an ``IndexUnavailableError``)."""
        now = self._clock()
        with self._lock:
            event = self._tracker.failed(operation, str(error), now)
        if isinstance(event, IndexOutageStarted):
            log.error("index_outage_started", operation=event.operation, error=event.error, hint=HINT)
        elif isinstance(event, IndexOutageGoesOn):
            log.error(
                "index_outage_continues",
                since=event.since.isoformat(timespec="seconds"),
                outage_seconds=round(event.seconds),
                failed_operations=event.failed_operations,
                last_operation=event.last_operation,
                last_error=event.last_error,
                hint=HINT,
            )

    def succeeded(self) -> None:
        """An operation used the index; the first after an outage logs its end."""
        now = self._clock()
        with self._lock:
            ended = self._tracker.succeeded(now)
        if ended is not None:
            log.info(
                "index_outage_ended",
                since=ended.since.isoformat(timespec="seconds"),
                outage_seconds=round(ended.seconds, 1),
                failed_operations=ended.failed_operations,
            )
