"""A claimed batch's snapshots read together (``Index.load_snapshots``), on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, event

from pacs_bridge.index.database import IndexDatabase
from pacs_bridge.index.repository import Index
from pacs_bridge.index.snapshot import SnapshotReader
from pacs_bridge.records import RejectionReason
from tests.conftest import FakeClock
from tests.integration.test_index import record
from tests.integration.test_index_rejection import note
from tests.support.studies import uid


@contextmanager
def counted(engine: Engine) -> Iterator[dict[str, int]]:
    """Pool checkouts and transactions begun on ``engine`` while the block runs."""
    counts = {"checkouts": 0, "transactions": 0}

    def on_checkout(*_args: object) -> None:
        counts["checkouts"] += 1

    def on_begin(*_args: object) -> None:
        counts["transactions"] += 1

    event.listen(engine, "checkout", on_checkout)
    event.listen(engine, "begin", on_begin)
    try:
        yield counts
    finally:
        event.remove(engine, "checkout", on_checkout)
        event.remove(engine, "begin", on_begin)


def store(index: Index, clock: FakeClock, study: str, *instances: str) -> None:
    for instance in instances:
        index.record_instance(record(study, instance.rsplit(".", 1)[0], instance), received_at=clock())


def test_a_batch_read_gives_each_study_what_load_snapshot_gives_in_one_transaction(
    index: Index, engine: Engine, clock: FakeClock
) -> None:
    """Three studies (two series each out of order, one withdrawn by a rejection note) and an unknown UID: one
    checkout, one transaction; each snapshot equals its own ``load_snapshot``; the unknown study is left out."""
    store(index, clock, "1", "1.2.2", "1.2.1", "1.1.1")
    store(index, clock, "2", "2.1.1")
    store(index, clock, "3", "3.3.1", "3.1.1", "3.1.2")
    index.record_instance(note("2.1.1", reason=RejectionReason.QUALITY, study="2"), received_at=clock())
    study_uids = [uid("3"), uid("404"), uid("1"), uid("2")]

    with counted(engine) as counts:
        snapshots = index.load_snapshots(study_uids)

    assert counts == {"checkouts": 1, "transactions": 1}
    assert list(snapshots) == [uid("3"), uid("1"), uid("2")]
    assert snapshots == {study_uid: index.load_snapshot(study_uid) for study_uid in snapshots}
    assert [s.attributes.series_uid for s in snapshots[uid("1")].series] == [uid("1.1"), uid("1.2")]
    assert snapshots[uid("2")].withdrawal is not None and snapshots[uid("2")].number_of_instances == 0


def test_a_batch_read_leaves_out_the_studies_past_its_instance_budget(
    index: Index, engine: Engine, clock: FakeClock
) -> None:
    """Budget 4: the first study is taken whatever its size (5), then only those that still fit; the ones left
    out are for ``load_snapshot``."""
    store(index, clock, "1", *(f"1.1.{n}" for n in range(1, 6)))
    store(index, clock, "2", "2.1.1", "2.1.2", "2.1.3", "2.1.4")
    store(index, clock, "3", "3.1.1", "3.1.2")
    store(index, clock, "4", "4.1.1", "4.1.2")
    reader = SnapshotReader(IndexDatabase(engine))

    first_large = reader.load_snapshots([uid("1"), uid("2")], instance_budget=4)
    small_first = reader.load_snapshots([uid("3"), uid("1"), uid("4"), uid("2")], instance_budget=4)

    assert {k: v.number_of_instances for k, v in first_large.items()} == {uid("1"): 5}
    assert {k: v.number_of_instances for k, v in small_first.items()} == {uid("3"): 2, uid("4"): 2}


def test_a_batch_read_of_nothing_opens_no_transaction(index: Index, engine: Engine) -> None:
    """No UIDs: no checkout, no transaction."""
    with counted(engine) as counts:
        assert index.load_snapshots([]) == {}
    assert counts == {"checkouts": 0, "transactions": 0}
