"""The ingest: received instances indexed durably, each committed before its C-STORE is answered.

This is the per-C-STORE hot path, so it runs on a Core connection with statements built once
(``index/statements.py``), executed on the driver's cursor (``index/driver_statement.py``). Each public method
is one transaction; database errors become ``IndexUnavailableError`` or ``UnstorableValueError``
(``index/database.py``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.errors import ConflictingInstanceError, IndexUnavailableError
from pacs_bridge.index.changes import change_noted, changed
from pacs_bridge.index.database import IndexDatabase
from pacs_bridge.index.engine import writer_queue
from pacs_bridge.index.rejection_notes import RejectionNotes
from pacs_bridge.index.statements import (
    INSTANCE_FIELDS,
    INSTANCES,
    SERIES,
    SERIES_FIELDS,
    STUDIES,
    STUDY_FIELDS,
    DriverIngest,
    IngestStatements,
)
from pacs_bridge.records import InstanceRecord, RecordOutcome

log = structlog.get_logger("pacs_bridge.index")
_Result = TypeVar("_Result")
ReceivedInstance = tuple[InstanceRecord, datetime]  # an instance and when it was received
# Given to a batch's transaction: takes the waiting instances it accepts (those of studies the transaction has
# locked) out of the queue, to join it before its commit (see InstanceIngest.record_instances).
TakeLateArrivals = Callable[[Callable[[InstanceRecord], bool]], Sequence[ReceivedInstance]]


class _RejectedInstanceError(Exception):
    """Internal: the instance being recorded was rejected by an IOCM note; its transaction is rolled back."""


def _close_for_good(connection: Connection) -> None:
    """Close ``connection`` and its driver connection, not only give it back to the pool: by the time an index is
    collected its engine may have been disposed, and a connection given back to a disposed pool is never
    closed."""
    if not connection.closed:  # a connection a failed transaction gave back is closed already
        connection.invalidate()
        connection.close()


class InstanceIngest:
    """Indexes received instances (``Index.record_instance``, ``Index.record_instances``)."""

    def __init__(self, db: IndexDatabase, debounce: DebounceSettings) -> None:
        self._db = db
        self._debounce = debounce
        postgres = db.postgres
        self._statements = IngestStatements(postgresql.insert if postgres else sqlite.insert, postgres=postgres)
        self._driver = DriverIngest(self._statements, db.engine.dialect)
        self._rejection_notes = RejectionNotes(db, self._statements, debounce)
        self._writers = writer_queue(db.engine)
        self._kept_connection: Connection | None = None  # see _ingest_connection
        self._locked_studies: dict[str, Any] = {}  # the running ingest transaction's, see _locking_studies
        self._keeps_connection = self._writers is not None or postgres
        # Ingest transactions' turns where there is no writer queue; reentrant like the queue's (see writer_turn).
        self._ingest_lock = threading.RLock()
        self._driver_error = db.driver_error

    def writer_turn(self) -> AbstractContextManager[Any]:
        """The turn of ingest transactions, for a caller that gathers what to record while it waits for it.

        Group commit takes it before it takes its batch: on an SQLite file shared by listener processes the
        turn is often held by another process, and whatever arrives meanwhile joins the batch instead of
        waiting for the next commit. The thread holding it may record (``record_instances``), which asks for
        the turn again and has it at once.
        """
        if not self._keeps_connection:
            return nullcontext()
        return self._writers.turn() if self._writers is not None else self._ingest_lock

    @contextmanager
    def _ingest_transaction(self) -> Iterator[Connection]:
        """The transaction of the per-instance path, on the connection this index keeps for ingest (see
        ``_ingest_connection``). On an SQLite file it first waits its turn among writers."""
        with self._db.translated_errors():
            if not self._keeps_connection:
                with self._db.engine.begin() as connection, self._locking_studies():
                    yield connection
                return
            with self.writer_turn():
                connection = self._ingest_connection()
                try:
                    with connection.begin(), self._locking_studies():
                        yield connection
                except (SQLAlchemyError, self._driver_error):
                    # The database failed, not the instance: the next transaction starts on a new connection.
                    self._kept_connection = None
                    connection.close()
                    raise

    @contextmanager
    def _locking_studies(self) -> Iterator[None]:
        """The studies an ingest transaction locks, by UID, as it last wrote them (``_record``): the study row
        another instance of the same study reads in that transaction. Ingest transactions take turns, so there is
        one set at a time; it is dropped with the transaction, committed or not."""
        self._locked_studies = {}
        try:
            yield
        finally:
            self._locked_studies = {}

    def _ingest_connection(self) -> Connection:
        """The connection every ingest transaction runs on, checked out once (SQLite files and PostgreSQL).

        Checking a connection out of the pool and back in for every C-STORE cost more CPU under the GIL than
        the four statements of the instance, and on PostgreSQL two more round trips (the pool's ping before,
        its rollback after). One connection is enough: ingest transactions take turns (the writer queue on
        SQLite, a lock on PostgreSQL; group commit in front of the index already leads one at a time). It goes
        back to the pool when a transaction on it fails in the database, and is closed when this index is
        collected.
        """
        connection = self._kept_connection
        if connection is None:
            connection = self._kept_connection = self._db.engine.connect()
            weakref.finalize(self, _close_for_good, connection)
        return connection

    def _in_ingest_transaction(self, work: Callable[[Connection], _Result]) -> _Result:
        """``work`` done in one ingest transaction. On PostgreSQL, when the kept connection fails (the server
        restarted, or closed it after an idle timeout, while the pool's ping would have noticed), the whole
        transaction was rolled back and ``work`` is done once more on a new connection."""
        retry = self._db.dialect == "postgresql" and self._kept_connection is not None
        try:
            with self._ingest_transaction() as connection:
                return work(connection)
        except IndexUnavailableError as exc:
            if not retry:
                raise
            log.info("ingest_connection_replaced", error=str(exc.__cause__ or exc))
        with self._ingest_transaction() as connection:
            return work(connection)

    def record_instance(self, record: InstanceRecord, *, received_at: datetime) -> RecordOutcome:
        """Index one received instance, durably (committed when this returns).

        Sets the study's due time when anything it holds changed; a re-send of an identical instance
        changes nothing. Raises ``ConflictingInstanceError`` when the instance's UIDs contradict the index,
        ``IndexUnavailableError`` when the database cannot be written.

        This is the per-C-STORE hot path, so it runs on a Core connection with statements built once: in the
        usual case (a new instance of a known study and series) it costs four statements and one commit on
        SQLite; on PostgreSQL two (the study's lock, then the instance and the study's new state in one), and an
        instance of a study its transaction has locked already one.

        An IHE IOCM rejection note (``record.rejection_note``) is applied instead of indexed: see
        ``RejectionNotes.apply``. An instance a note rejected is not indexed again (``RecordOutcome.REJECTED``).
        """
        if record.rejection_note is not None:
            return self._rejection_notes.apply(record.rejection_note, received_at)
        try:
            return self._in_ingest_transaction(lambda connection: self._record(connection, record, received_at))
        except _RejectedInstanceError:
            log.info(
                "rejected_instance_received",
                study_uid=record.study.study_uid,
                sop_instance_uid=record.sop_instance_uid,
            )
            return RecordOutcome.REJECTED

    def record_instances(
        self, batch: Sequence[ReceivedInstance], *, take_late_arrivals: TakeLateArrivals | None = None
    ) -> list[RecordOutcome | Exception]:
        """Index several instances in one transaction: one commit (one fsync) for all, for group commit across
        associations (``index/group_commit.py``). Each gets its outcome, or the exception ``record_instance``
        would have raised for it: if any of them fails, the transaction is rolled back and each is recorded
        on its own, so one bad instance never fails the others; when the database itself fails, all get its
        ``IndexUnavailableError`` at once. Rejection notes are always applied alone.

        ``take_late_arrivals`` (PostgreSQL): once the batch is recorded, and until it returns nothing, it is asked
        for instances that arrived meanwhile and join this transaction before its commit; it takes only those its
        argument accepts: instances of a study the transaction has locked already (locking another now, out of
        UID order, could deadlock with another bridge). While a bridge waits for a study another holds, what
        arrives for it then shares its commit. The outcomes are those of ``batch``, then those of the instances
        that joined, in the order they joined. An SQLite file needs none of it: the leader of a batch gathers
        what arrives while it waits for the writer turn (``writer_turn``), and joining later only made the
        turn longer (4 % fewer instances a second with two listener processes).
        """
        if self._db.dialect != "postgresql":
            take_late_arrivals = None
        received = list(batch)  # grows with the instances that join
        alone = len(batch) < 2 and take_late_arrivals is None
        if alone or any(record.rejection_note is not None for record, _ in batch):
            return self._record_each_alone(received)

        def record_all(connection: Connection) -> list[RecordOutcome | Exception]:
            # Run again from the start when a kept PostgreSQL connection is replaced: those that joined the
            # first attempt are recorded again with the others (they are no longer waiting to join).
            recorded: dict[int, RecordOutcome | Exception] = {}
            locked: set[str] = set()
            # Studies are locked in UID order, whatever order the instances came in: two listener processes
            # committing batches that share studies then wait for each other instead of deadlocking.
            todo = sorted(range(len(received)), key=lambda position: received[position][0].study.study_uid)
            while todo:
                for position in todo:
                    record, received_at = received[position]
                    recorded[position] = self._record(connection, record, received_at)
                    locked.add(record.study.study_uid)
                if take_late_arrivals is None:
                    break
                joined = take_late_arrivals(self._may_join(locked))
                todo = list(range(len(received), len(received) + len(joined)))
                received.extend(joined)
            return [recorded[position] for position in range(len(received))]

        try:
            return self._in_ingest_transaction(record_all)
        except IndexUnavailableError as exc:
            # The database failed (down, locked past the busy timeout, full), not an instance: all get the
            # error now rather than wait for it again one by one.
            return [exc] * len(received)
        except Exception:  # each one again, alone, reports its own error
            return self._record_each_alone(received)

    @staticmethod
    def _may_join(locked: set[str]) -> Callable[[InstanceRecord], bool]:
        """Which waiting instances may join a transaction that has locked the studies ``locked``."""
        return lambda record: record.rejection_note is None and record.study.study_uid in locked

    def _record_each_alone(self, received: Sequence[ReceivedInstance]) -> list[RecordOutcome | Exception]:
        outcomes: list[RecordOutcome | Exception] = []
        for record, received_at in received:
            try:
                outcomes.append(self.record_instance(record, received_at=received_at))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def _record(self, connection: Connection, record: InstanceRecord, received_at: datetime) -> RecordOutcome:
        driver = self._driver
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        study_uid = record.study.study_uid
        # A study this transaction has locked already is as the transaction left it: no statement to read it again.
        study = self._locked_studies.get(study_uid)
        if study is None:
            study = driver.lock_study.first(cursor, {"uid": study_uid})
            if study is None:
                driver.insert_study.execute(cursor, {"study_uid": study_uid})
                study = driver.lock_study.first(cursor, {"uid": study_uid})
            self._locked_studies[study_uid] = study
        study_changes = changed(study, record.study, STUDY_FIELDS)

        series_uid = record.series.series_uid
        if driver.records_into_known_series:
            # The usual C-STORE on PostgreSQL: the instance and its study's new state in one statement.
            study_values = self._study_values(study, study_changes, received_at)
            known_series = {
                "series_uid": series_uid,
                "study_id": study.id,
                "received_at": received_at,
                **{f"series_{name}": getattr(record.series, name) for name in SERIES_FIELDS},
                **{name: getattr(record, name) for name in INSTANCE_FIELDS},
                **study_values,
            }
            if driver.record_into_known_series(study_values).first(cursor, known_series) is not None:
                self._study_written(study, study_values)
                return RecordOutcome.NEW

        series_keys = {"uid": series_uid, "sop_uid": record.sop_instance_uid}
        series = driver.select_series.first(cursor, series_keys)
        series_changes: dict[str, Any] = {}
        if series is None:
            values = {name: getattr(record.series, name) for name in SERIES_FIELDS}
            driver.insert_series.execute(cursor, {"study_id": study.id, "series_uid": series_uid, **values})
            series = driver.select_series.first(cursor, series_keys)
        if series.rejected_id is not None:
            raise _RejectedInstanceError  # rolls back whatever this instance created or changed
        if series.study_id != study.id:
            other = connection.execute(select(STUDIES.c.study_uid).where(STUDIES.c.id == series.study_id)).scalar()
            raise ConflictingInstanceError(
                "SeriesInstanceUID",
                "(0020,000E)",
                f"already indexed in another study: {series_uid} belongs to study {other}",
            )
        series_changes = changed(series, record.series, SERIES_FIELDS)
        if series_changes:
            connection.execute(update(SERIES).where(SERIES.c.id == series.id).values(**series_changes))

        outcome = self._record_instance_row(connection, cursor, record, series.id, received_at)
        if outcome is RecordOutcome.UNCHANGED and (study_changes or series_changes):
            outcome = RecordOutcome.UPDATED
        if outcome is not RecordOutcome.UNCHANGED:
            self._update_changed_study(cursor, study, study_changes, received_at)
        return outcome

    def _update_changed_study(
        self, cursor: Any, study: Any, study_changes: dict[str, Any], changed_at: datetime
    ) -> None:
        """Write the study's changed attributes and one more indexed change at ``changed_at``."""
        values = self._study_values(study, study_changes, changed_at)
        self._driver.update_study(values).execute(cursor, values)
        self._study_written(study, values)

    def _study_values(self, study: Any, study_changes: dict[str, Any], changed_at: datetime) -> dict[str, Any]:
        """The study update's values: its changed attributes and one more indexed change at ``changed_at``; its
        ``_id`` names the row."""
        return {"_id": study.id, **study_changes, **change_noted(study, changed_at, self._debounce)}

    def _study_written(self, study: Any, values: dict[str, Any]) -> None:
        """The locked study's row as the update with ``values`` left it, for this transaction's next instance."""
        self._locked_studies[study.study_uid] = study._replace(
            **{k: v for k, v in values.items() if k in study._fields}
        )

    def _record_instance_row(
        self, connection: Connection, cursor: Any, record: InstanceRecord, series_id: int, received_at: datetime
    ) -> RecordOutcome:
        driver = self._driver
        values = {name: getattr(record, name) for name in INSTANCE_FIELDS}
        inserted = driver.insert_instance.first(cursor, {"series_id": series_id, "received_at": received_at, **values})
        if inserted is not None:
            return RecordOutcome.NEW
        instance = driver.select_instance.first(cursor, {"uid": record.sop_instance_uid})
        if instance.series_id != series_id:
            owner = connection.execute(
                select(SERIES.c.series_uid, STUDIES.c.study_uid)
                .join(STUDIES, STUDIES.c.id == SERIES.c.study_id)
                .where(SERIES.c.id == instance.series_id)
            ).one()
            raise ConflictingInstanceError(
                "SOPInstanceUID",
                "(0008,0018)",
                f"already indexed in another series: {record.sop_instance_uid} is in series "
                f"{owner.series_uid} of study {owner.study_uid}",
            )
        changes = changed(instance, record, INSTANCE_FIELDS)
        if not changes:
            return RecordOutcome.UNCHANGED
        connection.execute(update(INSTANCES).where(INSTANCES.c.id == instance.id).values(**changes))
        return RecordOutcome.UPDATED
