"""IHE IOCM rejection notes in the index, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.errors import UnknownStudyError
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.models import Instance, PublishState, RejectedInstance
from pacs_bridge.index.repository import Index
from pacs_bridge.records import (
    InstanceRecord,
    RecordOutcome,
    RejectedReference,
    RejectionNote,
    RejectionReason,
    SeriesAttributes,
    StudyAttributes,
    StudyWithdrawal,
)
from tests.conftest import MAX_DELAY, QUIET, FakeClock
from tests.integration.test_index import record, study_row
from tests.support.studies import uid

KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def note(
    *instances: str, reason: RejectionReason = RejectionReason.QUALITY, note: str = "9.9.1", study: str = "1"
) -> InstanceRecord:
    """The record of a rejection note (in its own KO series of ``study``) rejecting ``instances``.

    An instance ``"1.2.3"`` is in series ``"1.2"`` of study ``"1"``, as ``record()`` builds them.
    """
    references = tuple(
        RejectedReference(
            study_uid=uid(instance.split(".")[0]),
            series_uid=uid(instance.rsplit(".", 1)[0]),
            sop_instance_uid=uid(instance),
        )
        for instance in instances
    )
    return InstanceRecord(
        study=StudyAttributes(study_uid=uid(study), patient_id="PAT-1"),
        series=SeriesAttributes(series_uid=uid("9.9"), modality="KO", series_number=99),
        sop_instance_uid=uid(note),
        sop_class_uid=KOS,
        rejection_note=RejectionNote(note_uid=uid(note), reason=reason, references=references),
    )


def indexed(index: Index, study: str = "1") -> dict[str, list[str]]:
    """Series UID -> SOP Instance UIDs the study's snapshot lists."""
    snapshot = index.load_snapshot(uid(study))
    return {s.attributes.series_uid: [i.sop_instance_uid for i in s.instances] for s in snapshot.series}


def rejected_rows(engine: Engine) -> list[tuple[str, str, str, str, str, str]]:
    with Session(engine) as session:
        rows = session.execute(
            select(
                RejectedInstance.sop_instance_uid,
                RejectedInstance.study_uid,
                RejectedInstance.series_uid,
                RejectedInstance.modality,
                RejectedInstance.reason_code,
                RejectedInstance.note_uid,
            ).order_by(RejectedInstance.sop_instance_uid)
        ).all()
        return [tuple(row) for row in rows]  # type: ignore[misc]


def store_study(index: Index, clock: FakeClock, *instances: str) -> None:
    for instance in instances:
        index.record_instance(record(series=instance.rsplit(".", 1)[0], instance=instance), received_at=clock())


def publish(index: Index, clock: FakeClock, study: str = "1") -> None:
    snapshot = index.load_snapshot(uid(study))
    index.mark_published(uid(study), change_seq=snapshot.change_seq, content_hash="h", now=clock(), sent=True)


def test_note_removes_its_instances_and_empty_series_and_republishes_the_study(
    index: Index, engine: Engine, clock: FakeClock
) -> None:
    """Rejected instances leave the snapshot, a series left empty goes, the study is due one quiet period later."""
    store_study(index, clock, "1.1.1", "1.1.2", "1.2.1")
    publish(index, clock)
    seq = index.load_snapshot(uid("1")).change_seq
    clock.advance(QUIET * 10)

    outcome = index.record_instance(note("1.1.1", "1.2.1", reason=RejectionReason.PATIENT_SAFETY), received_at=clock())

    assert outcome is RecordOutcome.REJECTION_NOTE
    assert indexed(index) == {uid("1.1"): [uid("1.1.2")]}  # series 1.2 gone; the note is no instance either
    study = study_row(engine)
    assert (study.change_seq, study.publish_state, study.due_at) == (seq + 1, PublishState.PENDING, clock() + QUIET)
    assert rejected_rows(engine) == [
        (uid("1.1.1"), uid("1"), uid("1.1"), "CT", "113037", uid("9.9.1")),
        (uid("1.2.1"), uid("1"), uid("1.2"), "CT", "113037", uid("9.9.1")),
    ]
    assert index.load_snapshot(uid("1")).withdrawal is None


def test_rejected_instance_sent_again_stays_out_and_changes_nothing(
    index: Index, engine: Engine, clock: FakeClock
) -> None:
    """A re-send of a rejected instance, even into a series that is gone, indexes nothing and changes no study."""
    store_study(index, clock, "1.1.1", "1.1.2", "1.2.1")
    index.record_instance(note("1.1.1", "1.2.1"), received_at=clock())
    seq = index.load_snapshot(uid("1")).change_seq
    clock.advance(QUIET)

    outcomes = [
        index.record_instance(record(series=s, instance=i), received_at=clock())
        for s, i in [("1.1", "1.1.1"), ("1.2", "1.2.1")]
    ]

    assert outcomes == [RecordOutcome.REJECTED, RecordOutcome.REJECTED]
    assert indexed(index) == {uid("1.1"): [uid("1.1.2")]}
    assert index.load_snapshot(uid("1")).change_seq == seq


def test_note_sent_again_changes_nothing(index: Index, engine: Engine, clock: FakeClock) -> None:
    """Applying the same note twice: the second finds nothing left to withdraw and leaves the study alone."""
    store_study(index, clock, "1.1.1", "1.1.2")
    index.record_instance(note("1.1.1"), received_at=clock())
    seq = index.load_snapshot(uid("1")).change_seq

    assert index.record_instance(note("1.1.1"), received_at=clock()) is RecordOutcome.REJECTION_NOTE
    assert index.load_snapshot(uid("1")).change_seq == seq
    assert len(rejected_rows(engine)) == 1


def test_every_instance_rejected_leaves_a_withdrawn_study_with_its_reasons(
    index: Index, engine: Engine, clock: FakeClock
) -> None:
    """Two notes reject everything: no series, the study due again, its withdrawal naming reasons and modalities."""
    store_study(index, clock, "1.1.1", "1.1.2", "1.2.1")
    publish(index, clock)
    index.record_instance(note("1.1.1", reason=RejectionReason.QUALITY), received_at=clock())
    index.record_instance(
        note("1.1.2", "1.2.1", reason=RejectionReason.RETENTION_EXPIRED, note="9.9.2"), received_at=clock()
    )

    snapshot = index.load_snapshot(uid("1"))

    assert (snapshot.series, snapshot.number_of_instances) == ((), 0)
    assert snapshot.withdrawal == StudyWithdrawal(
        reasons=(RejectionReason.QUALITY, RejectionReason.RETENTION_EXPIRED), modalities=("CT",)
    )
    assert study_row(engine).publish_state == PublishState.PENDING
    assert snapshot.attributes.patient_id == "PAT-1"  # the study row stays: the last publication needs it


def test_note_for_instances_never_received_is_recorded_and_keeps_them_out(
    index: Index, engine: Engine, clock: FakeClock
) -> None:
    """Unknown references: no study appears, nothing fails; when they arrive later they stay out."""
    outcome = index.record_instance(note("2.1.1", "2.1.2", study="2", note="9.9.3"), received_at=clock())

    assert outcome is RecordOutcome.REJECTION_NOTE
    with pytest.raises(UnknownStudyError):  # the study row the note locked was removed again
        index.load_snapshot(uid("2"))
    assert [row[0] for row in rejected_rows(engine)] == [uid("2.1.1"), uid("2.1.2")]
    assert rejected_rows(engine)[0][1:4] == (uid("2"), uid("2.1"), "")  # as the note states; modality unknown

    late = [index.record_instance(record("2", "2.1", i), received_at=clock()) for i in ("2.1.1", "2.1.3")]

    assert late == [RecordOutcome.REJECTED, RecordOutcome.NEW]
    assert indexed(index, "2") == {uid("2.1"): [uid("2.1.3")]}


@pytest.mark.parametrize("new_studies", [False, True], ids=["known-study", "new-studies"])
def test_note_and_instance_arriving_together_at_two_bridges_never_leave_a_rejected_instance_indexed(
    database_url: str, index: Index, engine: Engine, clock: FakeClock, new_studies: bool
) -> None:
    """Two Index objects on their own engines (two bridges): for each of 60 instances, one stores it while the
    other applies a note rejecting it, started together. Whoever wins, a rejected instance is never indexed.

    With ``new_studies`` each instance is the first of its study, so the note finds no study row to lock.
    """
    other_engine = make_engine(database_url)
    other = Index(other_engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
    index.record_instance(record(series="1.1", instance="1.1.100"), received_at=clock())  # the study exists
    errors: list[BaseException] = []
    numbers = range(1, 61)
    together = threading.Barrier(2, timeout=60)

    def instance(n: int) -> str:
        return f"{n + 10}.1.1" if new_studies else f"1.1.{n}"

    def store() -> None:
        try:
            for n in numbers:
                together.wait()
                study, series, _ = instance(n).split(".")
                index.record_instance(record(study, f"{study}.{series}", instance(n), number=n), received_at=clock())
        except BaseException as exc:
            errors.append(exc)
            together.abort()

    def reject() -> None:
        try:
            for n in numbers:
                together.wait()
                if n % 2:
                    other.record_instance(note(instance(n), note=f"9.9.{n}"), received_at=clock())
        except BaseException as exc:
            errors.append(exc)
            together.abort()

    threads = [threading.Thread(target=store), threading.Thread(target=reject)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other_engine.dispose()

    assert errors == []
    with Session(engine) as session:
        listed = set(session.scalars(select(Instance.sop_instance_uid)))
    assert listed == {uid(instance(n)) for n in numbers if n % 2 == 0} | {uid("1.1.100")}
    assert len(rejected_rows(engine)) == 30
