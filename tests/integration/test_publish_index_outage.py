"""The publishing and relink passes while the index database is down: a PostgreSQL cluster of the test's own
(tests/support/private_postgres.py) really stopped and started again, the real FHIR test server, a fake clock
to move through the passes."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from structlog.testing import capture_logs

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.repository import Index
from pacs_bridge.index.schema import prepare_schema
from pacs_bridge.publish.index_outage import IndexOutageLog
from pacs_bridge.publish.publisher import Publisher, PublishOutcome
from pacs_bridge.publish.relink import Relinker
from tests.conftest import MAX_DELAY, QUIET, FakeClock
from tests.integration.test_publisher import MAPPING, RETRY, record
from tests.support.fhir_server import FhirTestServer
from tests.support.private_postgres import PrivatePostgres
from tests.support.studies import uid

pytestmark = [pytest.mark.postgresql, pytest.mark.fhir_server]

OUTAGE_EVENTS = ("index_outage_started", "index_outage_continues", "index_outage_ended")


def test_a_stopped_database_is_logged_when_it_starts_each_minute_and_when_it_ends_not_per_pass(
    private_postgres: PrivatePostgres, http: httpx.Client, clock: FakeClock, fresh_fhir_server: FhirTestServer
):
    """PostgreSQL stopped for 130 passes of the publisher and of the relinker, a second apart: one error when the
    outage starts (the operation, the error, what to do), a summary each minute, one line when it ends; no line
    per pass. Started again, the same passes publish the study that waited."""
    engine = make_engine(private_postgres.url)
    prepare_schema(engine)
    index = Index(engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
    fhir = FhirClient(http, base_url=fresh_fhir_server.base_url)
    outage_log = IndexOutageLog(clock=clock)
    publisher = Publisher(
        index=index, fhir=fhir, mapping=MAPPING, retry=RETRY, clock=clock, claimer="test", index_outage=outage_log
    )
    relinker = Relinker(
        links=index.links,
        fhir=fhir,
        mapping=MAPPING,
        interval=timedelta(hours=1),
        clock=clock,
        claimer="test",
        index_outage=outage_log,
    )
    try:
        index.record_instance(record(), received_at=clock())
        private_postgres.stop(mode="fast")
        with capture_logs() as logs:
            for _ in range(130):
                clock.advance(timedelta(seconds=1))
                assert publisher.run_once() == {}
                assert relinker.run_once() == {}
            private_postgres.start()
            clock.advance(timedelta(seconds=1))
            outcomes = publisher.run_once()
            relinker.run_once()
    finally:
        engine.dispose()

    assert outcomes == {uid("1"): PublishOutcome.PUBLISHED}
    outage = [entry for entry in logs if entry["event"] in OUTAGE_EVENTS]
    assert [(entry["event"], entry["log_level"]) for entry in outage] == [
        ("index_outage_started", "error"),
        ("index_outage_continues", "error"),
        ("index_outage_continues", "error"),
        ("index_outage_ended", "info"),
    ]
    started, first_summary, second_summary, ended = outage
    assert started["operation"] == "claim"
    assert "check that the database in `database.url` is running" in started["error"]
    assert "database.url" in started["hint"]
    # two claims a second (the publisher's and the relinker's); each summary counts the one that logs it
    assert (first_summary["outage_seconds"], first_summary["failed_operations"]) == (60, 121)
    assert "OperationalError" in first_summary["last_error"]
    assert (second_summary["outage_seconds"], second_summary["failed_operations"]) == (120, 241)
    assert (ended["outage_seconds"], ended["failed_operations"]) == (130.0, 260)
    others = [entry for entry in logs if entry["log_level"] in ("warning", "error") and entry not in outage]
    assert others == [], "nothing else logged as a warning or an error during the outage"
