"""Writers of one SQLite file take turns in the kernel (index/engine.py WriterQueue), as listener processes do."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import event

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.errors import IndexUnavailableError
from pacs_bridge.index import engine as engine_module
from pacs_bridge.index.engine import make_engine, writer_queue
from pacs_bridge.index.repository import Index
from pacs_bridge.index.schema import prepare_schema
from pacs_bridge.records import InstanceRecord, RecordOutcome, SeriesAttributes, StudyAttributes
from tests.conftest import MAX_DELAY, QUIET
from tests.support.studies import uid


def record(instance: str) -> InstanceRecord:
    return InstanceRecord(
        study=StudyAttributes(study_uid=uid("1")),
        series=SeriesAttributes(series_uid=uid("1.1"), modality="CT"),
        sop_instance_uid=uid(instance),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )


def test_a_writer_waits_for_the_turn_another_holds_then_records(tmp_path: Path) -> None:
    """Two indexes on two engines (two listener processes, as far as the lock is concerned) share one file: an
    instance arriving while the other holds the turn is recorded as soon as the turn is given back."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    debounce = DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY)
    first_engine, second_engine = make_engine(url), make_engine(url)
    prepare_schema(first_engine, upgrade=True)
    first, second = Index(first_engine, debounce), Index(second_engine, debounce)
    queue = writer_queue(first_engine)
    assert queue is not None
    outcomes: list[RecordOutcome] = []
    done = threading.Event()

    def record_second() -> None:
        outcomes.append(second.record_instance(record("1.1.2"), received_at=datetime.now(UTC)))
        done.set()

    try:
        with queue.turn():
            writer = threading.Thread(target=record_second)
            writer.start()
            assert not done.wait(0.3)  # it waits for the turn, not in SQLite's busy handler
        assert done.wait(10)
        writer.join()
        assert first.record_instance(record("1.1.1"), received_at=datetime.now(UTC)) is RecordOutcome.NEW
        assert outcomes == [RecordOutcome.NEW]
        assert first.load_snapshot(uid("1")).number_of_instances == 2
        assert (tmp_path / "index.db-writers").exists()
    finally:
        first_engine.dispose()
        second_engine.dispose()


def test_only_an_sqlite_file_has_a_writer_queue(tmp_path: Path) -> None:
    assert writer_queue(make_engine("sqlite://")) is None
    assert writer_queue(make_engine("postgresql://postgres@127.0.0.1:5432/test")) is None
    assert writer_queue(make_engine(f"sqlite:///{tmp_path / 'index.db'}")) is not None


def test_after_the_database_failed_ingest_goes_on_with_a_new_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction that failed in the database gives its connection back: the next instance is recorded on a
    fresh one, once the database can be written again."""
    monkeypatch.setattr(engine_module, "SQLITE_BUSY_TIMEOUT_MS", 50)
    path = tmp_path / "index.db"
    engine = make_engine(f"sqlite:///{path}")
    prepare_schema(engine, upgrade=True)
    index = Index(engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
    checkouts: list[object] = []
    event.listen(engine, "checkout", lambda *_: checkouts.append(None))
    other_writer = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        assert index.record_instance(record("1.1.1"), received_at=datetime.now(UTC)) is RecordOutcome.NEW
        other_writer.execute("BEGIN IMMEDIATE")  # a writer outside the queue holds the lock past the busy timeout
        with pytest.raises(IndexUnavailableError, match="database is locked"):
            index.record_instance(record("1.1.2"), received_at=datetime.now(UTC))
        other_writer.execute("ROLLBACK")
        assert index.record_instance(record("1.1.2"), received_at=datetime.now(UTC)) is RecordOutcome.NEW
        assert len(checkouts) == 2
        assert index.load_snapshot(uid("1")).number_of_instances == 2
    finally:
        other_writer.close()
        engine.dispose()


def test_the_thread_holding_the_turn_has_it_again_and_keeps_it_until_the_outer_turn_ends(tmp_path: Path) -> None:
    """Group commit takes the turn, then records in a transaction that asks for it again: that thread has it at
    once, and another process's writer waits until the outer turn is given back, not the inner one."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    this_queue, other_queue = writer_queue(make_engine(url)), writer_queue(make_engine(url))
    assert this_queue is not None and other_queue is not None
    other_had_it = threading.Event()

    def other_writer() -> None:
        with other_queue.turn():
            other_had_it.set()

    with this_queue.turn():
        with this_queue.turn():
            pass
        other = threading.Thread(target=other_writer)
        other.start()
        assert not other_had_it.wait(0.3)
    assert other_had_it.wait(10)
    other.join()
