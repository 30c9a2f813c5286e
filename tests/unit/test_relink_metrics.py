"""The relink pass in the metrics (pacs_bridge_relink_*) and publish.relink_seconds in the configuration."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from pacs_bridge.config import parse_config
from pacs_bridge.errors import ConfigError
from pacs_bridge.metrics import BridgeMetrics
from pacs_bridge.study_queue import RelinkCounts, StateCounts

NO_STUDIES = StateCounts(pending=0, published=0, failed=0)
MINIMAL: dict[str, Any] = {"fhir": {"base_url": "https://fhir.example.org/r4"}}


def test_the_relink_queue_and_lookups_are_exported() -> None:
    """Waiting studies by link and the due ones, read at scrape time; lookups counted by link and outcome."""
    queue = RelinkCounts(patient_waiting=3, order_waiting=1, due=2, next_at=datetime(2024, 3, 15, tzinfo=UTC))
    metrics = BridgeMetrics(lambda: NO_STUDIES, relink_counts=lambda: queue)
    metrics.relink_looked_up(link="patient", outcome="no_match")
    metrics.relink_looked_up(link="patient", outcome="no_match")
    metrics.relink_looked_up(link="order", outcome="linked")

    text = metrics.render().decode()

    assert 'pacs_bridge_relink_waiting_studies{link="patient"} 3.0' in text
    assert 'pacs_bridge_relink_waiting_studies{link="order"} 1.0' in text
    assert "pacs_bridge_relink_due_studies 2.0" in text
    assert 'pacs_bridge_relink_lookups_total{link="patient",outcome="no_match"} 2.0' in text
    assert 'pacs_bridge_relink_lookups_total{link="order",outcome="linked"} 1.0' in text


def test_without_relinking_the_queue_is_not_exported() -> None:
    """relink_seconds 0: no queue gauges (a queue nobody works on would look like a backlog)."""
    text = BridgeMetrics(lambda: NO_STUDIES).render().decode()

    assert "pacs_bridge_relink_due_studies" not in text
    assert "pacs_bridge_relink_waiting_studies" not in text


def test_a_scrape_survives_a_database_that_cannot_count() -> None:
    def broken() -> RelinkCounts:
        raise RuntimeError("database down")

    text = BridgeMetrics(lambda: NO_STUDIES, relink_counts=broken).render().decode()

    assert "pacs_bridge_relink_due_studies " not in text


@pytest.mark.parametrize(
    ("publish", "expected"), [({}, 900.0), ({"relink_seconds": 0}, 0.0), ({"relink_seconds": 60}, 60.0)]
)
def test_relink_seconds_defaults_to_a_quarter_hour_and_zero_turns_it_off(
    publish: dict[str, Any], expected: float
) -> None:
    assert parse_config({**MINIMAL, "publish": publish}, path="bridge.yaml").publish.relink_seconds == expected


@pytest.mark.parametrize("value", [-1, 86_401])
def test_relink_seconds_beyond_a_day_or_negative_is_refused_naming_the_key(value: int) -> None:
    """A study is looked up at least daily: a longer first interval would contradict that."""
    with pytest.raises(ConfigError) as refused:
        parse_config({**MINIMAL, "publish": {"relink_seconds": value}}, path="bridge.yaml")

    (problem,) = refused.value.problems
    assert problem.startswith("at 'publish.relink_seconds': Input should be")
