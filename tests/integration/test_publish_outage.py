"""The publisher through a long FHIR outage: the real test server behind the fault proxy, the index on SQLite
and PostgreSQL, a fake clock to move through the backoff."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.index.models import Study
from pacs_bridge.index.repository import Index
from pacs_bridge.publish.publisher import Publisher, PublishOutcome
from tests.conftest import QUIET, FakeClock
from tests.integration.test_publisher import MAPPING, RETRY, record
from tests.support.fault_proxy import HttpFaultProxy, Respond
from tests.support.studies import uid

pytestmark = pytest.mark.fhir_server


def publisher(index: Index, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock, **kwargs) -> Publisher:
    """A publisher writing through the fault proxy; ``kwargs`` override its settings (``mapping`` included)."""
    options = {"mapping": MAPPING, "retry": RETRY, **kwargs}
    return Publisher(
        index=index,
        fhir=FhirClient(http, base_url=f"{proxy.root_url}/fhir"),
        clock=clock,
        claimer="test",
        random_fraction=lambda: 0.5,
        **options,
    )


def study_row(engine: Engine) -> Study:
    with Session(engine) as session:
        return session.scalars(select(Study)).one()


def test_max_attempts_exhausted_marks_the_study_failed_with_the_reason_until_it_changes(
    index: Index, engine: Engine, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock, fresh_fhir_server
):
    """Three 503s with max_attempts 3: failed, with the last error; not retried by time; a new instance makes
    it pending with a fresh budget, and it publishes once the server is back."""
    proxy.outage(Respond(503, body="down for maintenance"))
    bounded = publisher(index, http, proxy, clock, max_attempts=3)
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)
    outcomes = []
    for _ in range(3):
        outcomes.append(bounded.run_once()[uid("1")])
        clock.advance(RETRY.cap)
    assert outcomes == [PublishOutcome.RETRY_SCHEDULED, PublishOutcome.RETRY_SCHEDULED, PublishOutcome.FAILED]
    row = study_row(engine)
    assert (row.publish_state, row.attempts, row.next_attempt_at) == ("failed", 3, None)
    assert row.last_error == "gave up after 3 attempts; the last: HTTP 503: down for maintenance"
    clock.advance(timedelta(days=1))
    assert bounded.run_once() == {}, "a failed study is not retried by time"

    proxy.restore()
    index.record_instance(record(instance=2), received_at=clock())
    row = study_row(engine)
    assert (row.publish_state, row.attempts) == ("pending", 0)
    clock.advance(QUIET)
    assert bounded.run_once() == {uid("1"): PublishOutcome.PUBLISHED}
    published = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert published is not None and (published["numberOfInstances"], published["meta"]["versionId"]) == (2, "1")
    assert study_row(engine).last_error is None


def test_without_max_attempts_a_study_stays_pending_through_any_number_of_failures(
    index: Index, engine: Engine, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock, fresh_fhir_server
):
    """The default (0) never gives up: 12 failed attempts over a simulated hour, then one PUT when it is back."""
    proxy.outage(Respond(502))
    unbounded = publisher(index, http, proxy, clock)
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)
    for _ in range(12):
        assert unbounded.run_once() == {uid("1"): PublishOutcome.RETRY_SCHEDULED}
        clock.advance(RETRY.cap)
    row = study_row(engine)
    assert (row.publish_state, row.attempts, row.last_error) == ("pending", 12, "HTTP 502: Injected")
    proxy.restore()
    assert unbounded.run_once() == {uid("1"): PublishOutcome.PUBLISHED}
    assert fresh_fhir_server.request_counts() == {"PUT Endpoint": 1, "PUT ImagingStudy": 1}


PROBE = timedelta(seconds=1)


def test_once_the_server_answers_a_probe_backed_off_studies_are_retried_at_once(
    index: Index, engine: Engine, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock, fresh_fhir_server
):
    """Refused connections put the study in a 10 s backoff; a probe while refused changes nothing; the first
    probe after the server is back makes it due at once, well before its backoff ends."""
    proxy.refuse()
    probing = publisher(index, http, proxy, clock, probe_interval=PROBE)
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)
    assert probing.run_once() == {uid("1"): PublishOutcome.RETRY_SCHEDULED}
    backoff_ends = study_row(engine).next_attempt_at

    clock.advance(PROBE)
    assert probing.run_once() == {}  # probed, refused: still waiting
    assert study_row(engine).next_attempt_at == backoff_ends

    proxy.restore()
    clock.advance(PROBE)
    assert probing.run_once() == {}  # probed, answered: due now
    assert study_row(engine).next_attempt_at == clock()
    assert probing.run_once() == {uid("1"): PublishOutcome.PUBLISHED}
    assert clock() < backoff_ends
    assert fresh_fhir_server.request_counts() == {"PUT Endpoint": 1, "PUT ImagingStudy": 1}


@pytest.mark.parametrize(
    "fault",
    [Respond(503, retry_after="120"), Respond(429)],
    ids=["503-retry-after", "429-without-retry-after"],
)
def test_a_probe_never_brings_forward_a_retry_the_server_asked_to_delay(
    index: Index, engine: Engine, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock, fault: Respond
):
    """Retry-After, or a 429 (throttling), is the server's own request: a probe that finds it answering
    leaves the study's next attempt where it was."""
    proxy.outage(fault)
    probing = publisher(index, http, proxy, clock, probe_interval=PROBE)
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)
    assert probing.run_once() == {uid("1"): PublishOutcome.RETRY_SCHEDULED}
    next_attempt = study_row(engine).next_attempt_at

    proxy.restore()
    clock.advance(PROBE)
    assert probing.run_once() == {}

    assert study_row(engine).next_attempt_at == next_attempt
    assert next_attempt is not None and next_attempt > clock()


def test_the_next_due_time_is_the_quiet_period_then_the_backoff(
    index: Index, engine: Engine, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock
):
    """What the scheduler waits for between ticks: nothing; the end of the quiet period; then, after a failed
    attempt, the end of the backoff; then nothing once published."""
    probing = publisher(index, http, proxy, clock)
    assert probing.seconds_until_next_due() is None

    index.record_instance(record(), received_at=clock())
    assert probing.seconds_until_next_due() == QUIET.total_seconds()

    proxy.refuse()
    clock.advance(QUIET)
    assert probing.run_once() == {uid("1"): PublishOutcome.RETRY_SCHEDULED}
    backoff_ends = study_row(engine).next_attempt_at
    assert backoff_ends is not None
    assert probing.seconds_until_next_due() == (backoff_ends - clock()).total_seconds() > 0

    proxy.restore()
    clock.advance(backoff_ends - clock())
    assert probing.seconds_until_next_due() == 0.0
    assert probing.run_once() == {uid("1"): PublishOutcome.PUBLISHED}
    assert probing.seconds_until_next_due() is None


def test_a_study_another_pass_has_claimed_falls_due_when_its_lease_ends(
    index: Index, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock
):
    """Claimed by another bridge (or a pass that crashed), a due study cannot be claimed before the lease
    ends: the scheduler is not told to run an extra pass for it now."""
    probing = publisher(index, http, proxy, clock)
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)
    lease = timedelta(minutes=5)
    assert [c.study_uid for c in index.claim_due_studies(clock(), limit=1, lease=lease, claimer="other")] == [uid("1")]

    assert probing.seconds_until_next_due() == lease.total_seconds()
