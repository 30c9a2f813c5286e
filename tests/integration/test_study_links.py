"""The study_links table on SQLite and PostgreSQL: the links a publish recorded, and the relink queue's claims."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, select

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.models import Study, StudyLink
from pacs_bridge.index.repository import Index
from pacs_bridge.index.schema import prepare_schema
from pacs_bridge.publish.linking import search_key
from pacs_bridge.records import InstanceRecord, Link, SeriesAttributes, StudyAttributes, StudyLinks
from pacs_bridge.study_queue import RelinkCounts
from tests.conftest import MAX_DELAY, QUIET, FakeClock
from tests.support.studies import uid

WAITING = Link(key=search_key("urn:oid:1.2.3|PAT-1"))
LINKED = Link(key=search_key("urn:oid:1.2.3|PAT-1"), reference="Patient/p1")
ORDER_WAITING = Link(key=search_key("urn:acc|ACC-1"))
LEASE = timedelta(minutes=2)


def add_study(index: Index, clock: FakeClock, study: str, *, published: bool = True) -> str:
    """Index one instance of study ``study`` and, when ``published``, record it published now."""
    study_uid = uid(study)
    index.record_instance(
        InstanceRecord(
            study=StudyAttributes(study_uid=study_uid, patient_id="PAT-1", accession_number="ACC-1"),
            series=SeriesAttributes(series_uid=uid(f"{study}.1"), modality="CT"),
            sop_instance_uid=uid(f"{study}.1.1"),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        ),
        received_at=clock(),
    )
    if published:
        change_seq = index.load_snapshot(study_uid).change_seq
        index.mark_published(study_uid, change_seq=change_seq, content_hash="h", now=clock(), sent=True)
    return study_uid


def test_the_links_a_publish_recorded_are_read_back_and_replaced(index: Index, clock: FakeClock) -> None:
    """None before the first record; then what was recorded, replaced whole by the next record."""
    study_uid = add_study(index, clock, "1")
    assert index.links.load(study_uid) is None

    first = StudyLinks(patient=WAITING, order=ORDER_WAITING, relink_at=clock() + QUIET, relink_attempts=2)
    index.links.record(study_uid, first)
    assert index.links.load(study_uid) == first

    second = StudyLinks(patient=LINKED, order=ORDER_WAITING, relink_at=None)
    index.links.record(study_uid, second)
    assert index.links.load(study_uid) == second


def test_only_due_published_studies_are_claimed_the_longest_due_first_and_leased(
    index: Index, clock: FakeClock
) -> None:
    """Due and published: claimed, oldest relink_at first, with the attributes a lookup needs; not yet due, or
    pending (it is resolved afresh when it publishes): not claimed. A claim holds until its lease runs out."""
    now = clock()
    later_due = add_study(index, clock, "1")
    earlier_due = add_study(index, clock, "2")
    not_due = add_study(index, clock, "3")
    pending = add_study(index, clock, "4", published=False)
    for study_uid, relink_at in (
        (later_due, now - timedelta(seconds=1)),
        (earlier_due, now - timedelta(seconds=2)),
        (not_due, now + timedelta(seconds=1)),
        (pending, now - timedelta(seconds=3)),
    ):
        index.links.record(study_uid, StudyLinks(patient=WAITING, relink_at=relink_at))

    claimed = index.links.claim_due(now, limit=10, lease=LEASE, claimer="bridge-a")

    assert [candidate.study.study_uid for candidate in claimed] == [earlier_due, later_due]
    assert (claimed[0].study.patient_id, claimed[0].study.accession_number) == ("PAT-1", "ACC-1")
    assert claimed[0].links == StudyLinks(patient=WAITING, relink_at=now - timedelta(seconds=2))
    assert index.links.claim_due(now, limit=10, lease=LEASE, claimer="bridge-b") == []
    assert len(index.links.claim_due(now + LEASE + QUIET, limit=1, lease=LEASE, claimer="bridge-b")) == 1


def test_a_relink_that_found_a_reference_makes_the_published_study_due_and_releases_it(
    index: Index, engine: Engine, clock: FakeClock
) -> None:
    """record_relink stores what was found, drops the claim and (republish_at) makes the study pending and due
    then, so that the publisher sends it through its normal path; without republish_at the state stays."""
    found = add_study(index, clock, "1")
    not_found = add_study(index, clock, "2")
    for study_uid in (found, not_found):
        index.links.record(study_uid, StudyLinks(patient=WAITING, relink_at=clock()))
    index.links.claim_due(clock(), limit=10, lease=LEASE, claimer="bridge-a")

    clock.advance(QUIET)
    index.links.record_relink(found, StudyLinks(patient=LINKED), republish_at=clock())
    later = StudyLinks(patient=WAITING, relink_at=clock() + QUIET, relink_attempts=1)
    index.links.record_relink(not_found, later, republish_at=None)

    assert index.links.load(found) == StudyLinks(patient=LINKED)
    assert index.links.load(not_found) == later
    with engine.connect() as connection:
        rows = connection.execute(
            select(Study.study_uid, Study.publish_state, Study.due_at).order_by(Study.study_uid)
        ).all()
        claims = connection.execute(select(StudyLink.relink_claimed_by)).scalars().all()
    assert [tuple(row) for row in rows] == [(found, "pending", clock()), (not_found, "published", None)]
    assert claims == [None, None]
    assert [
        claimed.study.study_uid for claimed in index.links.claim_due(clock(), limit=1, lease=LEASE, claimer="b")
    ] == []


def test_released_claims_are_due_again_at_once(index: Index, clock: FakeClock) -> None:
    """When the server stops answering mid-batch the untouched studies go back: another pass may take them now."""
    study_uid = add_study(index, clock, "1")
    index.links.record(study_uid, StudyLinks(patient=WAITING, relink_at=clock()))
    assert len(index.links.claim_due(clock(), limit=10, lease=LEASE, claimer="bridge-a")) == 1

    index.links.release([study_uid])

    assert len(index.links.claim_due(clock(), limit=10, lease=LEASE, claimer="bridge-b")) == 1


def test_counts_say_what_waits_and_what_is_due(index: Index, clock: FakeClock) -> None:
    now = clock()
    assert index.links.counts(now) == RelinkCounts(patient_waiting=0, order_waiting=0, due=0, next_at=None)
    both = add_study(index, clock, "1")
    order_only = add_study(index, clock, "2")
    linked = add_study(index, clock, "3")
    index.links.record(both, StudyLinks(patient=WAITING, order=ORDER_WAITING, relink_at=now))
    index.links.record(order_only, StudyLinks(patient=LINKED, order=ORDER_WAITING, relink_at=now + QUIET))
    index.links.record(linked, StudyLinks(patient=LINKED))

    assert index.links.counts(now) == RelinkCounts(patient_waiting=1, order_waiting=2, due=1, next_at=now)


@pytest.mark.postgresql
def test_a_study_another_bridge_is_claiming_is_skipped_not_waited_for(
    postgres_schema_url: str, clock: FakeClock
) -> None:
    """PostgreSQL: a row locked by another bridge's claim transaction is passed over (SKIP LOCKED), so two
    bridges sharing the database take different studies instead of queueing on the same one."""

    # Without SKIP LOCKED the claim would wait for the lock: make it fail after 5 s instead of hanging the test.
    engine = make_engine(f"{postgres_schema_url}%20-clock_timeout%3D5000")
    try:
        prepare_schema(engine)
        index = Index(engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
        first, second = add_study(index, clock, "1"), add_study(index, clock, "2")
        for study_uid in (first, second):
            index.links.record(study_uid, StudyLinks(patient=WAITING, relink_at=clock()))
        with engine.connect() as other_bridge, other_bridge.begin():
            other_bridge.execute(
                select(StudyLink.study_id)
                .join(Study, Study.id == StudyLink.study_id)
                .where(Study.study_uid == first)
                .with_for_update()
            ).one()

            claimed = index.links.claim_due(clock(), limit=10, lease=LEASE, claimer="bridge-b")

        assert [candidate.study.study_uid for candidate in claimed] == [second]
    finally:
        engine.dispose()
