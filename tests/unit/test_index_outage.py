"""The index outage tracker (pure): one start, a summary a minute while failures go on, one end."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pacs_bridge.publish.index_outage import IndexOutageEnded, IndexOutageGoesOn, IndexOutageStarted, IndexOutageTracker

T0 = datetime(2024, 3, 15, 9, 0, tzinfo=UTC)
DOWN = "the index database failed (OperationalError: connection refused)"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_the_first_failure_starts_an_outage_and_the_next_ones_are_counted_until_a_minute_has_passed():
    tracker = IndexOutageTracker()

    assert tracker.failed("claim", DOWN, at(0)) == IndexOutageStarted(operation="claim", error=DOWN)
    assert [tracker.failed("relink_claim", DOWN, at(second)) for second in range(1, 60)] == [None] * 59
    assert tracker.failed("claim", "still down", at(60)) == IndexOutageGoesOn(
        since=at(0), seconds=60.0, failed_operations=61, last_operation="claim", last_error="still down"
    )
    assert tracker.failed("claim", DOWN, at(61)) is None, "the next summary a minute after this one"


def test_a_success_ends_the_outage_once_and_a_later_failure_starts_a_new_one():
    tracker = IndexOutageTracker()
    assert tracker.succeeded(at(0)) is None, "no outage: nothing to end"
    tracker.failed("claim", DOWN, at(1))
    tracker.failed("claim", DOWN, at(2))

    assert tracker.succeeded(at(4)) == IndexOutageEnded(since=at(1), seconds=3.0, failed_operations=2)
    assert tracker.succeeded(at(5)) is None
    assert tracker.failed("claim", DOWN, at(6)) == IndexOutageStarted(operation="claim", error=DOWN)
