"""The metrics the alerts need: FHIR server answering, the longest wait of a pending study, the configured
max delay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pacs_bridge.metrics import BridgeMetrics
from pacs_bridge.study_queue import StateCounts

NOW = datetime(2024, 3, 15, 9, 0, tzinfo=UTC)
NO_STUDIES = StateCounts(pending=0, published=0, failed=0)


def sample(metrics: BridgeMetrics, name: str) -> str | None:
    """The value text of the unlabelled sample ``name``, or None when it is not exported."""
    for line in metrics.render().decode().splitlines():
        if line.startswith(f"{name} "):
            return line.split(" ", 1)[1]
    return None


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [
        # before any attempt: unknown, so that `== 0` alerts stay quiet
        ([], "NaN"),
        # the server answered (a 201, a 503: it is there)
        ([(201, "published")], "1.0"),
        ([(503, "retry_scheduled")], "1.0"),
        # no HTTP status and a retry: nothing answered
        ([(None, "retry_scheduled")], "0.0"),
        # an answer after an outage ends it
        ([(None, "retry_scheduled"), (200, "published")], "1.0"),
        # a study refused before sending (invalid resource: no status, no retry) says nothing about the server
        ([(None, "retry_scheduled"), (None, "failed")], "0.0"),
        ([(201, "published"), (None, "failed")], "1.0"),
    ],
)
def test_fhir_last_attempt_answered_follows_the_last_attempt_that_reached_for_the_server(
    attempts: list[tuple[int | None, str]], expected: str
) -> None:
    """pacs_bridge_fhir_last_attempt_answered: 1 after an HTTP answer, 0 after none, NaN before any attempt."""
    metrics = BridgeMetrics(lambda: NO_STUDIES)
    for http_status, outcome in attempts:
        metrics.publish_attempted(http_status=http_status, outcome=outcome)

    assert sample(metrics, "pacs_bridge_fhir_last_attempt_answered") == expected


def test_oldest_pending_age_is_read_at_scrape_time() -> None:
    """The age grows with the clock between scrapes, and is 0 with nothing pending."""
    oldest: list[datetime | None] = [NOW - timedelta(minutes=7)]
    clock = [NOW]
    metrics = BridgeMetrics(
        lambda: StateCounts(pending=1, published=0, failed=0),
        oldest_pending_since=lambda: oldest[0],
        clock=lambda: clock[0],
    )

    assert sample(metrics, "pacs_bridge_oldest_pending_study_age_seconds") == "420.0"
    clock[0] += timedelta(minutes=1)
    assert sample(metrics, "pacs_bridge_oldest_pending_study_age_seconds") == "480.0"
    oldest[0] = None
    assert sample(metrics, "pacs_bridge_oldest_pending_study_age_seconds") == "0.0"


def test_configured_max_delay_is_exported_for_the_pending_alert() -> None:
    """debounce.max_delay_seconds is a gauge, so one alert rule fits every configuration."""
    metrics = BridgeMetrics(lambda: NO_STUDIES, max_delay_seconds=300.0)

    assert sample(metrics, "pacs_bridge_debounce_max_delay_seconds") == "300.0"


def test_index_metrics_vanish_while_the_database_is_down() -> None:
    """A scrape still answers when the index cannot be read; study counts and age are absent, not zero."""

    def unreadable() -> StateCounts:
        raise OSError("database is locked")

    metrics = BridgeMetrics(unreadable, oldest_pending_since=lambda: NOW, clock=lambda: NOW)

    assert sample(metrics, "pacs_bridge_oldest_pending_study_age_seconds") is None
    assert 'pacs_bridge_studies{state="pending"}' not in metrics.render().decode()
