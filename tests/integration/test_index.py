"""The index on real databases: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.errors import ConflictingInstanceError, IndexUnavailableError
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.models import PublishState, Study
from pacs_bridge.index.repository import Index
from pacs_bridge.index.schema import prepare_schema
from pacs_bridge.records import (
    CodedConcept,
    InstanceRecord,
    InstanceSnapshot,
    RecordOutcome,
    RequestedReason,
    SeriesAttributes,
    StudyAttributes,
)
from pacs_bridge.study_queue import Published, Refused, Released, RetryLater
from tests.conftest import MAX_DELAY, QUIET, FakeClock
from tests.support.studies import uid

LEASE = timedelta(minutes=2)


def record(
    study: str = "1", series: str = "1.1", instance: str = "1.1.1", *, number: int | None = 1, **study_fields: str
) -> InstanceRecord:
    return InstanceRecord(
        study=StudyAttributes(study_uid=uid(study), patient_id="PAT-1", **study_fields),
        series=SeriesAttributes(series_uid=uid(series), modality="CT", series_number=int(series.split(".")[-1])),
        sop_instance_uid=uid(instance),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=number,
    )


def study_row(engine: Engine, study: str = "1") -> Study:
    from sqlalchemy.orm import Session

    with Session(engine) as session:
        return session.scalars(select(Study).where(Study.study_uid == uid(study))).one()


def test_new_instance_makes_its_study_due_after_the_quiet_period(index: Index, engine: Engine, clock: FakeClock):
    """A first instance creates the study, pending, due one quiet period after it arrived."""
    assert index.record_instance(record(), received_at=clock()) is RecordOutcome.NEW
    row = study_row(engine)
    assert row.publish_state == PublishState.PENDING
    assert row.due_at == clock() + QUIET
    assert row.change_seq == 1


def test_identical_resend_changes_nothing(index: Index, engine: Engine, clock: FakeClock):
    """Re-sending an indexed instance leaves the study's due time and change counter alone."""
    index.record_instance(record(), received_at=clock())
    clock.advance(timedelta(seconds=20))
    assert index.record_instance(record(), received_at=clock()) is RecordOutcome.UNCHANGED
    row = study_row(engine)
    assert (row.change_seq, row.due_at) == (1, clock() - timedelta(seconds=20) + QUIET)


def test_every_kind_of_column_reads_back_as_recorded_and_an_identical_resend_changes_nothing(
    index: Index, engine: Engine, clock: FakeClock
):
    """The per-instance statements run on the driver's cursor with SQLAlchemy's type processors: tuples, coded
    concepts, non-ASCII names, integers and times are written as the ORM reads them, and compared the same way
    on a re-send (else every re-send would count as a change)."""
    procedure = CodedConcept(code="RPID17", scheme="RADLEX", meaning="CT chest", scheme_version="4.1")
    full = InstanceRecord(
        study=StudyAttributes(
            study_uid=uid("1"),
            patient_id="PAT-1",
            patient_name="Müller^Jürgen",
            reading_physicians=("Ödön^Ada", "Lee^Bo"),
            procedure_codes=(procedure,),
            reasons=(
                RequestedReason(text="cough", codes=(CodedConcept(code="49727002", scheme="SCT", meaning="Cough"),)),
                RequestedReason(text="fever"),
            ),
        ),
        series=SeriesAttributes(
            series_uid=uid("1.1"),
            modality="CT",
            series_number=3,
            performing_physicians=("Ng^Al",),
            operators=("Roe^Jo", "Doe^Jane"),
            sending_ae_title="MODALITY",
        ),
        sop_instance_uid=uid("1.1.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=7,
        image_laterality="L",
        title="Localizer",
    )
    assert index.record_instance(full, received_at=clock()) is RecordOutcome.NEW
    clock.advance(timedelta(seconds=5))
    assert index.record_instance(full, received_at=clock()) is RecordOutcome.UNCHANGED
    snapshot = index.load_snapshot(uid("1"))
    assert snapshot.attributes == full.study
    (series,) = snapshot.series
    assert series.attributes == full.series
    assert series.instances == (
        InstanceSnapshot(
            sop_instance_uid=uid("1.1.1"),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            instance_number=7,
            image_laterality="L",
            title="Localizer",
        ),
    )
    row = study_row(engine)
    assert (row.change_seq, row.first_change_at, row.last_change_at) == (
        1,
        clock() - timedelta(seconds=5),
        row.first_change_at,
    )


def test_changed_attribute_of_a_known_instance_counts_as_a_change(index: Index, engine: Engine, clock: FakeClock):
    """A re-send whose indexed attributes differ updates the index and moves the due time."""
    index.record_instance(record(), received_at=clock())
    clock.advance(timedelta(seconds=10))
    changed = record(study_description="CT chest with contrast")
    assert index.record_instance(changed, received_at=clock()) is RecordOutcome.UPDATED
    row = study_row(engine)
    assert (row.change_seq, row.due_at, row.study_description) == (2, clock() + QUIET, "CT chest with contrast")


def test_interleaved_studies_are_each_compared_with_their_own_row(index: Index, engine: Engine, clock: FakeClock):
    """The study row's JSON-held and time columns are decoded once per distinct value and reused while they
    repeat: instances of two studies arriving in turn are each compared with their own study's values, so
    neither counts as a change until a list really differs."""

    def instance_of(study: str, number: int, reason: str) -> InstanceRecord:
        base = record(study, f"{study}.1", f"{study}.1.{number}", number=number)
        return replace(
            base,
            study=replace(base.study, reasons=(RequestedReason(text=reason),), reading_physicians=(f"Doe^{study}",)),
        )

    for number in (1, 2):
        index.record_instance(instance_of("1", number, "cough"), received_at=clock())
        index.record_instance(instance_of("2", number, "fever"), received_at=clock())
    resent = [
        index.record_instance(instance_of(study, number, reason), received_at=clock())
        for number in (1, 2)
        for study, reason in (("1", "cough"), ("2", "fever"))
    ]
    assert resent == [RecordOutcome.UNCHANGED] * 4
    assert index.record_instance(instance_of("1", 1, "fever"), received_at=clock()) is RecordOutcome.UPDATED
    assert index.record_instance(instance_of("2", 1, "fever"), received_at=clock()) is RecordOutcome.UNCHANGED
    assert (study_row(engine, "1").reasons, study_row(engine, "1").change_seq) == ((RequestedReason(text="fever"),), 3)
    assert (study_row(engine, "2").reasons, study_row(engine, "2").change_seq) == ((RequestedReason(text="fever"),), 2)


def test_instances_of_one_study_in_one_batch_each_see_what_the_one_before_wrote(
    index: Index, engine: Engine, clock: FakeClock
):
    """A batch locks a study once and carries its row along: the second instance's new description, the third
    (a re-send of the first, with the older description) changing it back, each counted, the due time the
    last one's; a failed study's fresh chance applies once."""
    index.record_instance(record(study_description="CT"), received_at=clock())
    clock.advance(QUIET)
    index.claim_due_studies(clock(), limit=1, lease=LEASE, claimer="a")
    index.mark_failed(uid("1"), change_seq=1, error="HTTP 400: no")
    batch = [
        (record(instance="1.1.2", number=2, study_description="CT"), clock()),
        (record(instance="1.1.3", number=3, study_description="CT chest"), clock() + timedelta(seconds=1)),
        (record(instance="1.1.2", number=2, study_description="CT"), clock() + timedelta(seconds=2)),
        (record(instance="1.1.4", number=4, study_description="CT"), clock() + timedelta(seconds=3)),
    ]

    outcomes = index.record_instances(batch, take_late_arrivals=lambda _may_join: [])

    assert outcomes == [RecordOutcome.NEW, RecordOutcome.NEW, RecordOutcome.UPDATED, RecordOutcome.NEW]
    row = study_row(engine)
    assert (row.study_description, row.change_seq, row.publish_state, row.attempts) == ("CT", 5, "pending", 0)
    assert (row.first_change_at, row.due_at) == (clock(), clock() + timedelta(seconds=3) + QUIET)


def test_a_study_that_keeps_changing_is_due_no_later_than_max_delay(index: Index, engine: Engine, clock: FakeClock):
    """Instances every 10 s never let the study go quiet; it is due max_delay after the first one."""
    first = clock()
    for n in range(1, 60):
        index.record_instance(record(instance=f"1.1.{n}", number=n), received_at=clock())
        clock.advance(timedelta(seconds=10))
    assert study_row(engine).due_at == first + MAX_DELAY


def test_instance_uid_reused_under_another_study_is_refused_and_changes_neither(
    index: Index, engine: Engine, clock: FakeClock
):
    """First arrival kept: the conflicting instance raises and the other study is not created."""
    index.record_instance(record(), received_at=clock())
    with pytest.raises(ConflictingInstanceError) as refused:
        index.record_instance(record(study="2", series="2.1", instance="1.1.1"), received_at=clock())
    assert refused.value.keyword == "SOPInstanceUID"
    assert study_row(engine).change_seq == 1
    assert index.count_by_state().pending == 1


def test_series_uid_reused_under_another_study_is_refused(index: Index, clock: FakeClock):
    """The same Series Instance UID under a second study is a conflict, not a move."""
    index.record_instance(record(), received_at=clock())
    with pytest.raises(ConflictingInstanceError) as refused:
        index.record_instance(record(study="2", series="1.1", instance="2.1.1"), received_at=clock())
    assert refused.value.keyword == "SeriesInstanceUID"


def test_snapshot_orders_series_and_instances_by_number_then_uid(index: Index, clock: FakeClock):
    """Arrival order does not matter: the snapshot (and so the resource and its hash) is stable."""
    for series, instance, number in [
        ("1.2", "1.2.2", 2),
        ("1.1", "1.1.3", None),
        ("1.2", "1.2.1", 1),
        ("1.1", "1.1.1", 1),
    ]:
        index.record_instance(record(series=series, instance=instance, number=number), received_at=clock())
    snapshot = index.load_snapshot(uid("1"))
    assert [s.attributes.series_uid for s in snapshot.series] == [uid("1.1"), uid("1.2")]
    assert [[i.sop_instance_uid for i in s.instances] for s in snapshot.series] == [
        [uid("1.1.1"), uid("1.1.3")],
        [uid("1.2.1"), uid("1.2.2")],
    ]
    assert snapshot.number_of_instances == 4


def test_claim_returns_only_due_studies_and_leases_them(index: Index, clock: FakeClock):
    """Not due: nothing. Due: claimed once; leased, it is not claimed again until the lease runs out."""
    index.record_instance(record(), received_at=clock())
    assert index.claim_due_studies(clock(), limit=10, lease=LEASE, claimer="a") == []
    clock.advance(QUIET)
    assert [c.study_uid for c in index.claim_due_studies(clock(), limit=10, lease=LEASE, claimer="a")] == [uid("1")]
    assert index.claim_due_studies(clock(), limit=10, lease=LEASE, claimer="b") == []
    clock.advance(LEASE + timedelta(seconds=1))
    assert [c.study_uid for c in index.claim_due_studies(clock(), limit=10, lease=LEASE, claimer="b")] == [uid("1")]


def test_published_study_is_no_longer_due(index: Index, engine: Engine, clock: FakeClock):
    """mark_published at the current change_seq ends the pending state."""
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)
    index.claim_due_studies(clock(), limit=10, lease=LEASE, claimer="a")
    index.mark_published(uid("1"), change_seq=1, content_hash="h1", now=clock(), sent=True)
    row = study_row(engine)
    assert (row.publish_state, row.due_at, row.published_hash, row.claimed_until) == ("published", None, "h1", None)
    clock.advance(MAX_DELAY)
    assert index.claim_due_studies(clock(), limit=10, lease=LEASE, claimer="a") == []


def test_change_during_publish_keeps_the_study_pending(index: Index, engine: Engine, clock: FakeClock):
    """No lost update: an instance indexed while the older snapshot was being sent is published next."""
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)
    index.claim_due_studies(clock(), limit=10, lease=LEASE, claimer="a")
    snapshot = index.load_snapshot(uid("1"))
    index.record_instance(record(instance="1.1.2", number=2), received_at=clock())
    index.mark_published(uid("1"), change_seq=snapshot.change_seq, content_hash="h1", now=clock(), sent=True)
    row = study_row(engine)
    assert (row.publish_state, row.due_at) == ("pending", clock() + QUIET)
    clock.advance(QUIET)
    assert [c.study_uid for c in index.claim_due_studies(clock(), limit=10, lease=LEASE, claimer="a")] == [uid("1")]


def test_retry_waits_for_next_attempt_at(index: Index, clock: FakeClock):
    """After a retryable failure the study is claimed again only once its backoff has passed."""
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)
    index.claim_due_studies(clock(), limit=10, lease=LEASE, claimer="a")
    assert index.mark_retry(uid("1"), error="HTTP 503", next_attempt_at=clock() + timedelta(seconds=40)) == 1
    assert index.claim_due_studies(clock() + timedelta(seconds=39), limit=10, lease=LEASE, claimer="a") == []
    claimed = index.claim_due_studies(clock() + timedelta(seconds=40), limit=10, lease=LEASE, claimer="a")
    assert [(c.study_uid, c.attempts) for c in claimed] == [(uid("1"), 1)]


def test_failed_study_waits_for_a_change_then_is_due_again(index: Index, engine: Engine, clock: FakeClock):
    """A refused study keeps its reason and is not retried until it changes."""
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)
    index.claim_due_studies(clock(), limit=10, lease=LEASE, claimer="a")
    index.mark_failed(uid("1"), change_seq=1, error="HTTP 400: subject missing")
    row = study_row(engine)
    assert (row.publish_state, row.last_error, row.due_at) == ("failed", "HTTP 400: subject missing", None)
    assert index.count_by_state().failed == 1
    index.record_instance(record(instance="1.1.2", number=2), received_at=clock())
    row = study_row(engine)
    assert (row.publish_state, row.attempts, row.due_at) == ("pending", 0, clock() + QUIET)


def test_a_batch_of_publish_results_is_recorded_in_one_transaction_each_by_its_own_rule(
    index: Index, engine: Engine, clock: FakeClock
):
    """Five claimed studies, five results in one call: published (and one changed meanwhile: still pending),
    a retry, a refusal, a release; every claim is given back, and one transaction wrote them all."""
    for n in range(1, 6):
        index.record_instance(record(study=str(n), series=f"{n}.1", instance=f"{n}.1.1"), received_at=clock())
    clock.advance(QUIET)
    assert len(index.claim_due_studies(clock(), limit=10, lease=LEASE, claimer="a")) == 5
    index.record_instance(record(study="2", series="2.1", instance="2.1.2", number=2), received_at=clock())
    commits: list[object] = []
    count_commit = commits.append  # one bound method, so that event.remove finds the listener
    event.listen(engine, "commit", count_commit)
    try:
        index.record_publish_results(
            [
                Published(study_uid=uid("1"), change_seq=1, content_hash="h1", at=clock(), sent=True, version_id="1"),
                Published(study_uid=uid("2"), change_seq=1, content_hash="h2", at=clock(), sent=True, version_id="1"),
                RetryLater(study_uid=uid("3"), error="HTTP 503", next_attempt_at=clock() + LEASE),
                Refused(study_uid=uid("4"), change_seq=1, error="HTTP 400: no"),
                Released(study_uid=uid("5")),
            ]
        )
    finally:
        event.remove(engine, "commit", count_commit)

    assert len(commits) == 1
    rows = {n: study_row(engine, str(n)) for n in range(1, 6)}
    assert [(rows[n].publish_state, rows[n].attempts, rows[n].claimed_until) for n in range(1, 6)] == [
        ("published", 0, None),
        ("pending", 0, None),  # changed while it was sent: its newer change is published next
        ("pending", 1, None),
        ("failed", 1, None),
        ("pending", 0, None),
    ]
    assert (rows[2].published_seq, rows[3].next_attempt_at, rows[4].last_error) == (1, clock() + LEASE, "HTTP 400: no")
    assert [c.study_uid for c in index.claim_due_studies(clock(), limit=10, lease=LEASE, claimer="b")] == [uid("5")]


def test_concurrent_associations_storing_one_new_study_lose_nothing(index: Index, clock: FakeClock):
    """Four threads store 25 instances each of the same new study at once: all 100 are indexed."""
    errors: list[BaseException] = []

    def send(thread: int) -> None:
        try:
            for n in range(25):
                index.record_instance(
                    record(series=f"1.{thread}", instance=f"1.{thread}.{n + 1}", number=n + 1), received_at=clock()
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(t,)) for t in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    snapshot = index.load_snapshot(uid("1"))
    assert (len(snapshot.series), snapshot.number_of_instances, snapshot.change_seq) == (4, 100, 100)


def test_two_bridges_never_claim_the_same_study(database_url: str, index: Index, clock: FakeClock):
    """Two Index objects on their own engines (as two bridge processes) split the due studies between them."""
    for n in range(1, 21):
        index.record_instance(record(study=str(n), series=f"{n}.1", instance=f"{n}.1.1"), received_at=clock())
    clock.advance(QUIET)
    other_engine = make_engine(database_url)
    other = Index(other_engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
    claims: dict[str, list[str]] = {}

    def claim(name: str, which: Index) -> None:
        found: list[str] = []
        while batch := which.claim_due_studies(clock(), limit=3, lease=LEASE, claimer=name):
            found += [c.study_uid for c in batch]
        claims[name] = found

    threads = [threading.Thread(target=claim, args=("a", index)), threading.Thread(target=claim, args=("b", other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other_engine.dispose()
    assert sorted(claims["a"] + claims["b"]) == sorted(uid(str(n)) for n in range(1, 21))


def test_unreachable_database_raises_index_unavailable(database_url: str, tmp_path, clock: FakeClock):
    """A database that cannot be opened surfaces as IndexUnavailableError (the listener answers 0xA700)."""
    if database_url.startswith("sqlite"):
        broken_url = f"sqlite:///{tmp_path / 'missing-dir' / 'index.db'}"
    else:
        broken_url = "postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2"
    broken = make_engine(broken_url)
    with pytest.raises(IndexUnavailableError, match="database"):
        prepare_schema(broken)
    with pytest.raises(IndexUnavailableError, match=r"database\.url"):
        Index(broken, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY)).record_instance(
            record(), received_at=clock()
        )
    broken.dispose()


def test_endpoint_hashes_are_remembered(index: Index, clock: FakeClock):
    """The hash of each Endpoint PUT is stored, and replaced when the Endpoint changes."""
    index.mark_endpoint_published("pacs-wado-rs", content_hash="a", now=clock())
    index.mark_endpoint_published("pacs-wado-rs", content_hash="b", now=clock())
    assert index.endpoint_hashes() == {"pacs-wado-rs": "b"}


def test_two_bridges_recording_the_same_new_endpoint_at_once_both_succeed(
    database_url: str, index: Index, clock: FakeClock
):
    """Two bridges (their own engines) send the same new Endpoint and record it at the same moment, twenty
    Endpoints over: neither fails on the key (a read then an insert did, the second one)."""
    other_engine = make_engine(database_url)
    other = Index(other_engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
    start = threading.Barrier(2)
    errors: list[Exception] = []

    def record(which: Index, digest: str) -> None:
        for number in range(20):
            start.wait(timeout=10)
            try:
                which.mark_endpoint_published(f"endpoint-{number}", content_hash=digest, now=clock())
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=record, args=(which, "h")) for which in (index, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other_engine.dispose()
    assert errors == []
    assert index.endpoint_hashes() == {f"endpoint-{number}": "h" for number in range(20)}


def test_snapshot_reflects_latest_study_attributes(index: Index, clock: FakeClock):
    """Study-level attributes come from the latest instance that stated them."""
    index.record_instance(record(accession_number="A1"), received_at=clock())
    index.record_instance(replace(record(instance="1.1.2", number=2, accession_number="A2")), received_at=clock())
    assert index.load_snapshot(uid("1")).attributes.accession_number == "A2"


def test_snapshot_of_an_unknown_study_says_so(index: Index):
    """Asking for a study the index does not hold is UnknownStudyError naming it, not a database failure."""
    from pacs_bridge.errors import UnknownStudyError

    with pytest.raises(UnknownStudyError, match=f"study {uid('404')} is not in the index"):
        index.load_snapshot(uid("404"))


def test_ingest_checks_out_one_connection_for_all_its_instances(index: Index, engine: Engine, clock: FakeClock) -> None:
    """Per C-STORE, a pool checkout and checkin (and PostgreSQL's ping and reset round trips) cost more than the
    instance's statements: the index keeps one connection for ingest, alone and in batches."""
    checkouts: list[object] = []
    event.listen(engine, "checkout", lambda *_: checkouts.append(None))
    for number in range(1, 6):
        assert index.record_instance(record(instance=f"1.1.{number}"), received_at=clock()) is RecordOutcome.NEW
    batch = [(record(instance=f"1.1.{number}"), clock()) for number in range(6, 9)]
    assert index.record_instances(batch) == [RecordOutcome.NEW] * 3
    assert len(checkouts) == 1
    assert index.load_snapshot(uid("1")).number_of_instances == 8


class CheckedOutConnections:
    """The PostgreSQL backends of ``engine``'s connections that are checked out of its pool (SQLAlchemy's pool
    events): while nothing else runs, that is the connection the index keeps for ingest."""

    def __init__(self, engine: Engine) -> None:
        self.backend_pids: dict[int, int] = {}
        event.listen(engine, "checkout", self._checked_out)
        event.listen(engine, "checkin", self._checked_in)

    def _checked_out(self, dbapi_connection: Any, pool_record: Any, _proxy: Any) -> None:
        self.backend_pids[id(pool_record)] = dbapi_connection.info.backend_pid

    def _checked_in(self, _dbapi_connection: Any, pool_record: Any) -> None:
        self.backend_pids.pop(id(pool_record), None)


def close_kept_connection_from_the_server(checked_out: CheckedOutConnections, engine: Engine) -> None:
    """Terminate the backend of the index's kept ingest connection, as a PostgreSQL restart or idle timeout does."""
    (kept_pid,) = checked_out.backend_pids.values()
    with engine.connect() as admin:
        assert admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": kept_pid}).scalar()


@pytest.mark.postgresql
def test_a_kept_connection_the_server_closed_is_replaced_and_the_instance_recorded(
    postgres_schema_url: str, clock: FakeClock
) -> None:
    """After a PostgreSQL restart or an idle timeout the kept connection is gone: the instance is recorded on a
    new one, not refused."""
    engine = make_engine(postgres_schema_url)
    prepare_schema(engine)
    index = Index(engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
    checked_out = CheckedOutConnections(engine)
    try:
        assert index.record_instance(record(instance="1.1.1"), received_at=clock()) is RecordOutcome.NEW
        close_kept_connection_from_the_server(checked_out, engine)
        assert index.record_instance(record(instance="1.1.2"), received_at=clock()) is RecordOutcome.NEW
        assert index.load_snapshot(uid("1")).number_of_instances == 2
    finally:
        engine.dispose()


def test_waiting_instances_of_a_study_the_batch_locked_join_its_transaction_on_postgresql(
    index: Index, engine: Engine, clock: FakeClock
) -> None:
    """On PostgreSQL a bridge waiting for a study's row lock gathers nothing meanwhile: once its batch is
    recorded, instances that arrived for a study it has locked join its transaction (one commit); one of another
    study does not (locking it now, out of UID order, could deadlock with another bridge). SQLite's writer turn
    gathers instead, and nobody is asked."""
    offered = [
        [(record(instance="1.1.2", number=2), clock()), (record("2", "2.1", "2.1.1"), clock())],
        [(record(instance="1.1.3", number=3), clock())],
        [],
    ]
    asked: list[list[bool]] = []

    def take_late_arrivals(may_join: Callable[[InstanceRecord], bool]) -> list[tuple[InstanceRecord, datetime]]:
        waiting = offered.pop(0)
        asked.append([may_join(item) for item, _ in waiting])
        return [(item, at) for item, at in waiting if may_join(item)]

    commits: list[object] = []
    event.listen(engine, "commit", lambda *_: commits.append(None))
    outcomes = index.record_instances([(record(instance="1.1.1"), clock())], take_late_arrivals=take_late_arrivals)
    if engine.dialect.name == "postgresql":
        assert asked == [[True, False], [True], []]
        assert outcomes == [RecordOutcome.NEW] * 3
        assert (len(commits), index.load_snapshot(uid("1")).number_of_instances) == (1, 3)
        assert study_row(engine).change_seq == 3
    else:
        assert (asked, outcomes) == ([], [RecordOutcome.NEW])


@pytest.mark.postgresql
def test_instances_that_joined_are_recorded_again_when_the_kept_connection_is_replaced(
    postgres_schema_url: str, clock: FakeClock
) -> None:
    """The server closes the kept connection while an instance joins a batch: the transaction is run again on a
    new connection with that instance too (it waits for this commit, no longer for one of its own)."""
    engine = make_engine(postgres_schema_url)
    prepare_schema(engine)
    index = Index(engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
    checked_out = CheckedOutConnections(engine)
    offered = [[(record(instance="1.1.3", number=3), clock())]]

    def taking_as_the_server_closes_the_connection(_: object) -> list[tuple[InstanceRecord, datetime]]:
        if not offered:
            return []
        close_kept_connection_from_the_server(checked_out, engine)
        return offered.pop()

    try:
        assert index.record_instance(record(instance="1.1.1"), received_at=clock()) is RecordOutcome.NEW
        outcomes = index.record_instances(
            [(record(instance="1.1.2", number=2), clock())],
            take_late_arrivals=taking_as_the_server_closes_the_connection,
        )
        assert outcomes == [RecordOutcome.NEW, RecordOutcome.NEW]
        assert index.load_snapshot(uid("1")).number_of_instances == 3
    finally:
        engine.dispose()


def test_a_new_instance_that_states_its_series_differently_updates_the_series(index: Index, clock: FakeClock) -> None:
    """A new instance whose series attributes differ from the indexed ones is indexed and updates the series (on
    PostgreSQL it takes the full path, not the one-statement insert into an unchanged series); the next one,
    stating the same, is indexed as it is."""

    def instance(number: int, **series_fields: Any) -> InstanceRecord:
        base = record(instance=f"1.1.{number}", number=number)
        return replace(base, series=replace(base.series, **series_fields))

    index.record_instance(instance(1, series_description="Axial"), received_at=clock())
    for number in (2, 3):
        changed = instance(number, series_description="Axial 1 mm", operators=("Roe^Jo",))
        assert index.record_instance(changed, received_at=clock()) is RecordOutcome.NEW
    (series,) = index.load_snapshot(uid("1")).series
    assert (series.attributes.series_description, series.attributes.operators) == ("Axial 1 mm", ("Roe^Jo",))
    assert [item.sop_instance_uid for item in series.instances] == [uid(f"1.1.{number}") for number in (1, 2, 3)]
