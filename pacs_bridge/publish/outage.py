"""Pure bookkeeping of FHIR server outages: when one starts, how it goes on, when it ends (no clock, no I/O).

The publisher tells the tracker what each request got; the tracker answers with the events to log, so that an
outage is reported once when it starts (with its cause), as a summary every ``summary_interval`` while it
lasts, and once when it ends, instead of once per study and attempt. It also says when to ask the server
again (``probe_due``): every ``probe_interval`` during an outage, never before the ``Retry-After`` the server
gave.

An outage is a failure that says the server as a whole cannot take requests now: no answer (refused, reset,
timed out), 408, 429, 502, 503 or 504. A 500 or a 4xx answers about one request, so it starts none.

A probe that the server answers during an outage does not end it: it releases the studies waiting out a
backoff, and the next publishing request decides (success: ended; another outage failure: it goes on, and no
second "started" is reported). A server that answers ``GET metadata`` but fails every write thus stays one
outage. When a probe finds nothing left to publish, its answer ends the outage.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pacs_bridge.errors import PublishError

# HTTP statuses that mean "the server cannot take requests now", whatever the request.
UNAVAILABLE_STATUSES = frozenset({408, 429, 502, 503, 504})


def is_outage(error: PublishError) -> bool:
    """Whether ``error`` says the server as a whole is unavailable rather than refusing one request."""
    return error.retryable and (error.http_status is None or error.http_status in UNAVAILABLE_STATUSES)


@dataclass(frozen=True, slots=True, kw_only=True)
class OutageStarted:
    cause: str
    http_status: int | None
    at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class OutageGoesOn:
    """The periodic summary of an outage that has not ended."""

    since: datetime
    seconds: float
    failed_requests: int  # since the outage started, probes included
    last_cause: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OutageEnded:
    since: datetime
    seconds: float
    failed_requests: int


@dataclass(slots=True, kw_only=True)
class _Outage:
    since: datetime
    cause: str
    failed_requests: int
    last_summary_at: datetime
    next_probe_at: datetime
    answering: bool = False  # a probe got an answer; the next publishing request decides


class OutageTracker:
    """What the publisher knows about the FHIR server's availability. Not thread-safe: callers hold a lock."""

    def __init__(self, *, probe_interval: timedelta, summary_interval: timedelta = timedelta(minutes=1)) -> None:
        self._probe_interval = probe_interval
        self._summary_interval = summary_interval
        self._outage: _Outage | None = None

    @property
    def in_outage(self) -> bool:
        return self._outage is not None

    @property
    def answering(self) -> bool:
        """A probe was answered during the outage; the next publishing request decides whether it ended."""
        return self._outage is not None and self._outage.answering

    @property
    def cause(self) -> str | None:
        """The outage's latest cause; None when there is no outage."""
        return self._outage.cause if self._outage is not None else None

    @property
    def since(self) -> datetime | None:
        return self._outage.since if self._outage is not None else None

    def failed(self, error: PublishError, now: datetime) -> OutageStarted | None:
        """A request failed with ``error``. Returns the start of an outage when this failure begins one."""
        if not is_outage(error):
            return None
        retry_after = timedelta(seconds=error.retry_after_seconds or 0.0)
        next_probe_at = now + max(self._probe_interval, retry_after)
        outage = self._outage
        if outage is not None:
            outage.cause = str(error)
            outage.failed_requests += 1
            outage.answering = False
            outage.next_probe_at = max(outage.next_probe_at, next_probe_at)
            return None
        self._outage = _Outage(
            since=now, cause=str(error), failed_requests=1, last_summary_at=now, next_probe_at=next_probe_at
        )
        return OutageStarted(cause=str(error), http_status=error.http_status, at=now)

    def answered(self, now: datetime) -> OutageEnded | None:
        """A publishing request got an answer (a success, or a refusal of that request). Ends an outage."""
        outage, self._outage = self._outage, None
        if outage is None:
            return None
        return OutageEnded(
            since=outage.since, seconds=(now - outage.since).total_seconds(), failed_requests=outage.failed_requests
        )

    def probe_answered(self, now: datetime, *, work_left: bool) -> OutageEnded | None:
        """A probe got an answer. With ``work_left`` (studies to publish now) the outage goes on until a
        publishing request gets an answer too; without, it ends here."""
        if not work_left or self._outage is None:
            return self.answered(now)
        self._outage.answering = True
        self._outage.next_probe_at = now + self._probe_interval
        return None

    def probe_due(self, now: datetime) -> bool:
        """Whether to ask the server now: every ``probe_interval`` of an outage (not before its ``Retry-After``)
        until a probe is answered."""
        outage = self._outage
        return outage is not None and not outage.answering and now >= outage.next_probe_at

    def next_probe_at(self) -> datetime | None:
        """When ``probe_due`` will next be true; None when no probe is planned."""
        outage = self._outage
        if outage is None or outage.answering:
            return None
        return outage.next_probe_at

    def summary_due(self, now: datetime) -> OutageGoesOn | None:
        """The periodic summary, once every ``summary_interval`` of an outage."""
        outage = self._outage
        if outage is None or now - outage.last_summary_at < self._summary_interval:
            return None
        outage.last_summary_at = now
        return OutageGoesOn(
            since=outage.since,
            seconds=(now - outage.since).total_seconds(),
            failed_requests=outage.failed_requests,
            last_cause=outage.cause,
        )
