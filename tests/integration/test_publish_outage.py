"""The publisher through a long FHIR outage: the real test server behind the fault proxy, the index on SQLite
and PostgreSQL, a fake clock to move through the backoff."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from structlog.testing import capture_logs

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
    probe after the server is back releases it, and the same pass publishes it, well before its backoff ends."""
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
    assert probing.run_once() == {uid("1"): PublishOutcome.PUBLISHED}  # probed, answered: released and sent
    assert backoff_ends is not None and clock() < backoff_ends
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


def studies_due(index: Index, clock: FakeClock, count: int) -> list[str]:
    """``count`` one-instance studies, all due now."""
    for number in range(1, count + 1):
        index.record_instance(record(study=str(number)), received_at=clock())
    clock.advance(QUIET)
    return [uid(str(number)) for number in range(1, count + 1)]


def events(logs: list[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] in names]


def test_an_outage_is_logged_when_it_starts_while_it_lasts_and_when_it_ends_not_per_study_and_attempt(
    index: Index, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock, fresh_fhir_server
):
    """Ten studies through two minutes of 503s and many passes: one warning with the cause when it starts, a
    summary each minute, one line when it ends with the studies that waited; each study's own failed attempts
    only at debug level."""
    proxy.outage(Respond(503, body="down for maintenance"))
    bridge = publisher(index, http, proxy, clock, probe_interval=timedelta(seconds=1))
    studies_due(index, clock, 10)
    with capture_logs() as logs:
        for _ in range(130):  # a pass a second, as the scheduler runs them during an outage
            bridge.run_once()
            clock.advance(timedelta(seconds=1))
        proxy.restore()
        outcomes = bridge.run_once()

    assert set(outcomes.values()) == {PublishOutcome.PUBLISHED} and len(outcomes) == 10
    outage = events(logs, "fhir_outage_started", "fhir_outage_continues", "fhir_outage_ended")
    assert [(entry["event"], entry["log_level"]) for entry in outage] == [
        ("fhir_outage_started", "warning"),
        ("fhir_outage_continues", "warning"),
        ("fhir_outage_continues", "warning"),
        ("fhir_outage_ended", "info"),
    ]
    started, first_summary, _, ended = outage
    assert (started["cause"], started["http_status"]) == ("HTTP 503: down for maintenance", 503)
    assert (first_summary["outage_seconds"], first_summary["studies_waiting"]) == (60, 10)
    assert (ended["studies_waiting"], ended["studies_released"]) == (10, 10)
    retries = events(logs, "publish_retry_scheduled")
    assert retries and {entry["log_level"] for entry in retries} == {"debug"}
    assert not [entry for entry in logs if entry["log_level"] in ("warning", "error") and entry not in outage]


def test_during_an_outage_a_pass_tries_at_most_concurrency_studies(
    index: Index, engine: Engine, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock
):
    """Twelve due studies, connections refused, two at a time: the first pass sends two and gives the other
    ten back untried; later passes of the outage try two each, not the whole backlog."""
    proxy.refuse()
    bridge = publisher(index, http, proxy, clock, concurrency=2, batch_size=64)
    studies_due(index, clock, 12)

    first = bridge.run_once()
    clock.advance(timedelta(milliseconds=100))
    second = bridge.run_once()

    assert list(first.values()).count(PublishOutcome.RETRY_SCHEDULED) <= 2
    assert list(first.values()).count(PublishOutcome.DEFERRED) >= 10
    assert len(second) <= 2, "during the outage a pass claims no more than concurrency studies"
    with Session(engine) as session:
        attempts = sum(session.scalars(select(Study.attempts)))
    assert 1 <= attempts <= 4, "two passes of the outage: two attempts each at most"


def test_when_the_server_answers_again_every_backed_off_study_is_released_at_once(
    index: Index, engine: Engine, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock, fresh_fhir_server
):
    """Studies backed off for 10 s after a 503 with Retry-After: 1 are all published by the pass whose probe
    finds the server back, 2 s later: Retry-After is a floor, not a schedule."""
    bridge = publisher(index, http, proxy, clock, concurrency=8)
    study_uids = studies_due(index, clock, 8)
    proxy.outage(Respond(503, retry_after="1"))

    def rows() -> list[Study]:
        with Session(engine) as session:
            return list(session.scalars(select(Study)))

    for _ in range(8):  # a pass a second until every study has failed once (an outage pass may leave some untried)
        if all(row.attempts for row in rows()):
            break
        bridge.run_once()
        clock.advance(timedelta(seconds=1))
    assert all(row.attempts == 1 and row.next_attempt_at > clock() for row in rows()), "all in a 10 s backoff"

    proxy.restore()
    clock.advance(timedelta(seconds=1))
    outcomes = bridge.run_once()

    assert outcomes == {study_uid: PublishOutcome.PUBLISHED for study_uid in study_uids}
    assert fresh_fhir_server.request_counts()["PUT ImagingStudy"] == 8


def test_a_retry_after_is_a_floor_even_when_the_server_answers_sooner(
    index: Index, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock
):
    """503 with Retry-After: 5, then the server is back at once: no request before the 5 s, then the study is
    published although its exponential backoff (10 s) has not run out."""
    bridge = publisher(index, http, proxy, clock)
    studies_due(index, clock, 1)
    proxy.outage(Respond(503, retry_after="5"))
    assert bridge.run_once() == {uid("1"): PublishOutcome.RETRY_SCHEDULED}
    proxy.restore()
    sent = len(proxy.requests)

    clock.advance(timedelta(seconds=4))
    assert bridge.run_once() == {}
    assert len(proxy.requests) == sent, "nothing asked of the server before its Retry-After"
    clock.advance(timedelta(seconds=1))
    assert bridge.run_once() == {uid("1"): PublishOutcome.PUBLISHED}


def test_the_start_check_logs_an_unreachable_server_and_its_cause(
    index: Index, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock
):
    """At start the bridge asks the server (GET metadata): refused, it says so once, with the URL and cause."""
    proxy.refuse()
    bridge = publisher(index, http, proxy, clock)

    with capture_logs() as logs:
        bridge.check_server()

    (started,) = events(logs, "fhir_outage_started", "fhir_server_reachable")
    assert (started["event"], started["detected_by"]) == ("fhir_outage_started", "startup_check")
    assert started["fhir_base_url"] == f"{proxy.root_url}/fhir"
    assert "Connection refused" in started["cause"]
    assert bridge.fhir_server_problem() is not None and "Connection refused" in bridge.fhir_server_problem()


def test_the_start_check_releases_studies_a_backoff_from_before_the_start_holds(
    index: Index, engine: Engine, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock
):
    """Restarted after the outage ended: the server answers the check, so what waited on it goes now."""
    studies_due(index, clock, 1)
    index.claim_due_studies(clock(), limit=1, lease=timedelta(minutes=5), claimer="before the restart")
    index.mark_retry(uid("1"), error="cannot reach", next_attempt_at=clock() + timedelta(minutes=10))
    bridge = publisher(index, http, proxy, clock)

    with capture_logs() as logs:
        bridge.check_server()

    assert [(entry["event"], entry["studies_released"]) for entry in events(logs, "fhir_server_reachable")] == [
        ("fhir_server_reachable", 1)
    ]
    assert study_row(engine).next_attempt_at == clock()
    assert bridge.fhir_server_problem() is None


def test_after_a_long_outage_studies_a_retry_after_holds_are_published_when_it_ends_not_after_their_backoff(
    index: Index, engine: Engine, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock, fresh_fhir_server
):
    """24 studies through 90 s of 503 with Retry-After: 5, two tried a second (the backoff grows to 40 s and
    more). The server comes back right after a pass whose studies failed: when it answers, the studies that
    failed in the last 5 s are due when their Retry-After ends, not when their backoff does, so the last study
    is published sooner after the recovery than the backoff it would otherwise have waited."""
    retry_after = timedelta(seconds=5)
    bridge = publisher(index, http, proxy, clock, concurrency=2, probe_interval=PROBE)
    study_uids = studies_due(index, clock, 24)
    proxy.outage(Respond(503, retry_after=str(int(retry_after.total_seconds()))))
    failed_last_pass = False
    for second in range(180):  # a pass a second, as the scheduler runs them while studies keep falling due
        clock.advance(timedelta(seconds=1))
        failed_last_pass = PublishOutcome.RETRY_SCHEDULED in bridge.run_once().values()
        if second >= 90 and failed_last_pass:
            break
    assert failed_last_pass, "the outage ends right after studies failed"

    proxy.restore()
    recovery = clock()
    with Session(engine) as session:
        backoff_ends = {row.study_uid: row.next_attempt_at for row in session.scalars(select(Study))}
    assert max(backoff_ends.values()) - recovery > timedelta(seconds=20), "backoffs beyond 20 s"
    published_at: dict[str, Any] = {}
    while len(published_at) < len(study_uids) and clock() - recovery < timedelta(minutes=5):
        clock.advance(timedelta(seconds=1))
        for study_uid, outcome in bridge.run_once().items():
            if outcome is PublishOutcome.PUBLISHED:
                published_at[study_uid] = clock()

    assert sorted(published_at) == sorted(study_uids)
    last = max(published_at, key=published_at.__getitem__)
    assert published_at[last] - recovery < backoff_ends[last] - recovery, "published before its backoff ended"
    assert published_at[last] - recovery <= retry_after + timedelta(seconds=1), "Retry-After is the only wait"
    assert fresh_fhir_server.request_counts()["PUT ImagingStudy"] == 24
