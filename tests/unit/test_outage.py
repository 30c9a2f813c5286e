"""The outage tracker (pure): what starts an outage, when the server is probed, when it ends, its summaries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pacs_bridge.errors import PublishError
from pacs_bridge.publish.outage import OutageEnded, OutageGoesOn, OutageStarted, OutageTracker, is_outage

T0 = datetime(2024, 3, 15, 9, 0, tzinfo=UTC)
PROBE = timedelta(seconds=1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def refused() -> PublishError:
    return PublishError("cannot reach http://fhir/ImagingStudy/1: ConnectError", retryable=True)


def unavailable(retry_after: float | None = None) -> PublishError:
    return PublishError("down", retryable=True, http_status=503, retry_after_seconds=retry_after)


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (refused(), True),  # no answer: refused, reset, timed out
        (PublishError("timeout", retryable=True, http_status=408), True),  # the server gave up on the request
        (PublishError("slow down", retryable=True, http_status=429), True),  # throttling: every request is held
        (PublishError("bad gateway", retryable=True, http_status=502), True),
        (unavailable(), True),
        (PublishError("gateway timeout", retryable=True, http_status=504), True),
        (PublishError("internal error", retryable=True, http_status=500), False),  # about this request
        (PublishError("invalid", retryable=False, http_status=400), False),  # a refusal is an answer
        (PublishError("not valid FHIR, not sent", retryable=False), False),  # our own validation: no request
    ],
)
def test_what_counts_as_an_outage(error: PublishError, outage: bool) -> None:
    assert is_outage(error) is outage


def test_an_outage_starts_once_with_its_first_cause_however_many_requests_fail() -> None:
    tracker = OutageTracker(probe_interval=PROBE)

    started = tracker.failed(refused(), at(0))
    again = [tracker.failed(unavailable(), at(s)) for s in (0.1, 0.2, 5)]

    assert started == OutageStarted(cause=str(refused()), http_status=None, at=at(0))
    assert again == [None, None, None]
    assert (tracker.in_outage, tracker.since, tracker.cause) == (True, at(0), "HTTP 503: down")


def test_a_failure_about_one_request_starts_no_outage() -> None:
    tracker = OutageTracker(probe_interval=PROBE)

    assert tracker.failed(PublishError("boom", retryable=True, http_status=500), at(0)) is None
    assert not tracker.in_outage and tracker.next_probe_at() is None


def test_probes_come_every_interval_but_never_before_retry_after() -> None:
    tracker = OutageTracker(probe_interval=PROBE)
    tracker.failed(unavailable(retry_after=5), at(0))

    assert [tracker.probe_due(at(s)) for s in (0.5, 1, 4.9, 5)] == [False, False, False, True]
    tracker.failed(refused(), at(5))  # the probe failed: the next one a probe interval later
    assert tracker.next_probe_at() == at(6)


def test_an_answered_request_ends_the_outage_with_its_length_and_failures() -> None:
    tracker = OutageTracker(probe_interval=PROBE)
    tracker.failed(refused(), at(0))
    tracker.failed(refused(), at(1))

    assert tracker.answered(at(30)) == OutageEnded(since=at(0), seconds=30.0, failed_requests=2)
    assert not tracker.in_outage
    assert tracker.answered(at(31)) is None, "no outage, nothing ends"


def test_an_answered_probe_with_studies_to_send_lets_the_next_request_decide() -> None:
    """The server answers GET metadata: studies are released, but only a publishing request ends the outage;
    a write that still fails keeps the same outage (no second start), and probing resumes."""
    tracker = OutageTracker(probe_interval=PROBE)
    tracker.failed(unavailable(), at(0))

    assert tracker.probe_answered(at(1), work_left=True) is None
    assert tracker.answering and tracker.in_outage
    assert not tracker.probe_due(at(10)), "no more probes while the released studies are tried"
    assert tracker.failed(unavailable(), at(2)) is None
    assert not tracker.answering and tracker.probe_due(at(3))
    assert tracker.answered(at(4)) == OutageEnded(since=at(0), seconds=4.0, failed_requests=2)


def test_an_answered_probe_with_nothing_to_send_ends_the_outage() -> None:
    tracker = OutageTracker(probe_interval=PROBE)
    tracker.failed(refused(), at(0))

    assert tracker.probe_answered(at(2), work_left=False) == OutageEnded(since=at(0), seconds=2.0, failed_requests=1)


def test_a_summary_comes_once_per_interval_while_the_outage_lasts() -> None:
    tracker = OutageTracker(probe_interval=PROBE, summary_interval=timedelta(seconds=60))
    assert tracker.summary_due(at(120)) is None, "no outage, no summary"
    tracker.failed(refused(), at(0))
    tracker.failed(unavailable(), at(30))

    summaries = [tracker.summary_due(at(s)) for s in (59, 60, 61, 119, 121)]

    assert summaries == [
        None,
        OutageGoesOn(since=at(0), seconds=60.0, failed_requests=2, last_cause="HTTP 503: down"),
        None,
        None,
        OutageGoesOn(since=at(0), seconds=121.0, failed_requests=2, last_cause="HTTP 503: down"),
    ]
