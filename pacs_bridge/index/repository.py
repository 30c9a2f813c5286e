"""The index: durable studies / series / instances and each study's publish state, over SQLAlchemy.

Each public method is one transaction. SQLAlchemy errors are wrapped in ``IndexUnavailableError`` where they
enter our code, so the DICOM listener answers "out of resources" (retry later) rather than success; a data error
(a value the database refuses, which no retry can store) in ``UnstorableValueError`` instead (0xC000).
Snapshots are read with plain column queries and assembled and sorted in Python: no per-instance ORM
objects, and the same order (hence the same content hash) on SQLite and PostgreSQL whatever their collation.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import defaultdict, namedtuple
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import structlog
from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Table,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs_bridge.debounce import DebounceSettings, due_at
from pacs_bridge.errors import ConflictingInstanceError, IndexUnavailableError, UnknownStudyError, UnstorableValueError
from pacs_bridge.index.engine import READ_ONLY_OPTION, writer_queue
from pacs_bridge.index.links import LinkIndex
from pacs_bridge.index.models import EndpointPublication, Instance, PublishState, RejectedInstance, Series, Study
from pacs_bridge.index.publish_results import apply_publish_result
from pacs_bridge.records import (
    InstanceRecord,
    InstanceSnapshot,
    RecordOutcome,
    RejectionNote,
    RejectionReason,
    SeriesAttributes,
    SeriesSnapshot,
    StudyAttributes,
    StudySnapshot,
    StudyWithdrawal,
)
from pacs_bridge.study_queue import ClaimedStudy, Published, PublishResult, Refused, Released, RetryLater, StateCounts

log = structlog.get_logger("pacs_bridge.index")
_Result = TypeVar("_Result")
_Received = tuple[InstanceRecord, datetime]  # an instance and when it was received
# Asked by a batch's transaction for waiting instances that may join it (see Index.record_instances).
Joining = Callable[[Callable[[InstanceRecord], bool]], Sequence[_Received]]


_STUDY_FIELDS = tuple(f.name for f in fields(StudyAttributes) if f.name != "study_uid")
_SERIES_FIELDS = tuple(f.name for f in fields(SeriesAttributes) if f.name != "series_uid")


_INSTANCE_FIELDS = tuple(f.name for f in fields(InstanceRecord) if f.name not in ("study", "series", "rejection_note"))

_studies = cast(Table, Study.__table__)
_series = cast(Table, Series.__table__)
_instances = cast(Table, Instance.__table__)
_rejected = cast(Table, RejectedInstance.__table__)
# UIDs per IN (...) list: well under SQLite's and PostgreSQL's bound-parameter limits.
_UID_CHUNK = 500


class _RejectedInstanceError(Exception):
    """Internal: the instance being recorded was rejected by an IOCM note; its transaction is rolled back."""


# Study attributes an instance may simply not carry: a presentation state or dose report made later, by
# another system, often lacks the order's codes and the physicians' names. An instance that leaves one of
# these empty does not erase what earlier instances stated; a different non-empty value still replaces it.
_KEPT_WHEN_ABSENT = frozenset(
    {
        "referring_physician",
        "reading_physicians",
        "procedure_codes",
        "reasons",
        "patient_name",
        "patient_birth_date",
        "patient_sex",
    }
)


# Attributes whose first recorded value stays: the AE that first sent a series keeps it, so a later re-send
# by another AE (a PACS forwarding what the modality sent) neither moves its endpoint nor republishes it.
_FIRST_VALUE_KEPT = frozenset({"sending_ae_title"})


# The issuer of an identifier, kept from an earlier instance while the identifier stays the same: a presentation
# state made later without IssuerOfPatientID must not turn another hospital's PatientID into one of ours (an
# identifier without issuer takes the configured system). A new PatientID or accession number takes its own
# instance's issuer, stated or not.
_ISSUER_OF = {
    "issuer_of_patient_id": "patient_id",
    "accession_issuer_local_id": "accession_number",
    "accession_issuer_universal_id": "accession_number",
}


def _kept_issuer(row: Any, attributes: object, name: str) -> bool:
    identifier = _ISSUER_OF.get(name)
    return identifier is not None and getattr(attributes, identifier) == getattr(row, identifier)


def _changed(row: Any, attributes: object, names: Sequence[str]) -> dict[str, Any]:
    """The attributes whose value differs from the row's, as ``{column: new value}``."""
    return {
        name: value
        for name in names
        if (value := getattr(attributes, name)) != (recorded := getattr(row, name))
        and (value or (name not in _KEPT_WHEN_ABSENT and not _kept_issuer(row, attributes, name)))
        and not (recorded and name in _FIRST_VALUE_KEPT)
    }


class _DriverStatement:
    """A Core statement compiled once for the engine's dialect and run on the driver's cursor.

    Each C-STORE runs four statements; through ``Connection.execute`` each pays tens of microseconds of
    SQLAlchemy bookkeeping (execution context, cache lookup, result object) under the GIL, more than SQLite
    takes to run it. Here the SQL text, the order of the parameters and their type processors (the ones
    SQLAlchemy would apply: ``UtcDateTime``, ``TextTuple``...) are worked out once, and an execution is one
    ``cursor.execute``. The transaction stays SQLAlchemy's: the cursor belongs to the connection of an open
    ``engine.begin()`` (BEGIN IMMEDIATE on SQLite, commit, rollback, pool). Insert columns left out of
    ``column_keys`` get their column's scalar default, as SQLAlchemy would give them.

    Result columns with a type processor are decoded once per distinct value: the instances of a study read the
    same JSON lists and the same ``first_change_at`` from its row again and again, so the raw values of those
    columns are compared with the last row's and, when equal, its decoded values are reused (the processors are
    pure and their values immutable: tuples, frozen dataclasses, datetimes).
    """

    __slots__ = ("_decoded", "_parameters", "_positional", "_processed", "_row", "sql")

    def __init__(self, statement: Any, dialect: Any, column_keys: Sequence[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(column_keys) if column_keys else None)
        self.sql: str = compiled.string
        self._positional: bool = compiled.positional
        names = list(compiled.positiontup or ()) if compiled.positional else list(compiled.binds)
        defaults = {column.key: column.default for column in getattr(compiled, "insert_prefetch", ())}
        self._parameters: list[tuple[str, Any, Any]] = []  # (name, value when not given, type processor)
        for name in names:
            bind = compiled.binds[name]
            fallback = _REQUIRED
            if name in defaults:
                default = defaults[name]
                if default is None or not default.is_scalar:
                    raise TypeError(f"column {name} has no scalar default for the driver path")
                fallback = default.arg
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            self._parameters.append((name, fallback, processor))
        columns = list(statement.exported_columns) if statement.exported_columns else []
        self._row: Any = namedtuple("_DriverRow", [column.key for column in columns]) if columns else None
        processors = [column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns]
        # (position, processor) of the columns to decode; the last raw values of those and their decoded values
        self._processed = [(position, processor) for position, processor in enumerate(processors) if processor]
        self._decoded: tuple[tuple[Any, ...], list[Any]] | None = None

    def _bound(self, values: dict[str, Any]) -> Any:
        bound: list[Any] = []
        for name, fallback, processor in self._parameters:
            value = values[name] if fallback is _REQUIRED or name in values else fallback
            bound.append(value if processor is None else processor(value))
        if self._positional:
            return bound
        return {name: value for (name, _, _), value in zip(self._parameters, bound, strict=True)}

    def execute(self, cursor: Any, values: dict[str, Any]) -> None:
        cursor.execute(self.sql, self._bound(values))

    def first(self, cursor: Any, values: dict[str, Any]) -> Any:
        """The first row the statement returns, with its columns as attributes, or None."""
        cursor.execute(self.sql, self._bound(values))
        row = cursor.fetchone()
        if row is None or self._row is None:
            return None
        if not self._processed:
            return self._row._make(row)
        raw = tuple([row[position] for position, _ in self._processed])
        decoded = self._decoded
        if decoded is None or decoded[0] != raw:
            decoded = (raw, [processor(row[position]) for position, processor in self._processed])
            self._decoded = decoded  # one assignment: a concurrent reader sees the old pair or the new
        columns = list(row)
        for (position, _), value in zip(self._processed, decoded[1], strict=True):
            columns[position] = value
        return self._row._make(columns)


_REQUIRED = object()


class _IngestStatements:
    """The hot path's statements, built once (SQLAlchemy caches their compiled form)."""

    def __init__(self, insert: Any, *, postgres: bool) -> None:
        study_columns = (
            _studies.c.id,
            _studies.c.study_uid,
            _studies.c.change_seq,
            _studies.c.publish_state,
            _studies.c.first_change_at,
            *(_studies.c[name] for name in _STUDY_FIELDS),
        )
        self.lock_study = select(*study_columns).where(_studies.c.study_uid == bindparam("uid")).with_for_update()
        self.lock_studies_by_id = (
            select(*study_columns)
            .where(_studies.c.id.in_(bindparam("ids", expanding=True)))
            .order_by(_studies.c.study_uid)
            .with_for_update()
        )
        # The rejected-instance check rides on this statement (no extra round trip per instance); it runs after
        # the study lock is held, so on PostgreSQL it sees a rejection note committed while we waited for it.
        self.select_series = select(
            _series.c.id,
            _series.c.study_id,
            *(_series.c[name] for name in _SERIES_FIELDS),
            select(_rejected.c.id)
            .where(_rejected.c.sop_instance_uid == bindparam("sop_uid"))
            .scalar_subquery()
            .label("rejected_id"),
        ).where(_series.c.series_uid == bindparam("uid"))
        self.select_instance = select(
            _instances.c.id, _instances.c.series_id, *(_instances.c[name] for name in _INSTANCE_FIELDS)
        ).where(_instances.c.sop_instance_uid == bindparam("uid"))
        # INSERT ... ON CONFLICT DO NOTHING: a concurrent association may have inserted the same key.
        self.insert_study = insert(_studies).on_conflict_do_nothing()
        self.create_study = insert(_studies).on_conflict_do_nothing().returning(_studies.c.id)
        self.insert_rejected = insert(_rejected).on_conflict_do_nothing()
        self.insert_series = insert(_series).on_conflict_do_nothing()
        # RETURNING tells a new row from a conflict on both backends (rowcount does not, on psycopg).
        self.insert_instance = insert(_instances).on_conflict_do_nothing().returning(_instances.c.id)
        # On SQLite a statement is a call into the library, and this one's many bound values cost more than the
        # statement it saves (callgrind: 602k -> 660k instructions per instance); on PostgreSQL it saves a round trip.
        self.insert_into_known_series = self._insert_into_known_series(insert) if postgres else None
        self.update_study = update(_studies).where(_studies.c.id == bindparam("_id"))
        # PostgreSQL: that insert and the study's update in one statement; the study row changes only when the
        # instance was inserted (a data-modifying CTE runs once, whether read or not).
        self.record_into_known_series = None
        if self.insert_into_known_series is not None:
            inserted = self.insert_into_known_series.cte("inserted_instance")
            self.record_into_known_series = (
                self.update_study.where(exists(select(inserted.c.id))).add_cte(inserted).returning(_studies.c.id)
            )

    @staticmethod
    def _insert_into_known_series(insert: Any) -> Any:
        """The usual C-STORE in one statement (PostgreSQL) instead of two round trips: insert the instance into
        its series when that series exists in this study, states exactly the record's series attributes, and the
        instance was not rejected. It returns the new row's id; nothing when any of that does not hold (or the
        instance is indexed already), and the instance then takes the full path (read the series, compare,
        insert). It runs after the study's lock is held, so it sees a rejection note committed meanwhile.

        PostgreSQL types a bound value in a select list on its own (a NULL as text, which it will not assign to
        an integer column), so the inserted values are cast to their columns' types.
        """

        def value(name: str, type_: Any) -> Any:
            return sql_cast(bindparam(name, type_=type_), type_)

        inserted = select(
            _series.c.id,
            value("received_at", _instances.c.received_at.type),
            *(value(name, _instances.c[name].type) for name in _INSTANCE_FIELDS),
        ).where(
            _series.c.series_uid == bindparam("series_uid"),
            _series.c.study_id == bindparam("study_id"),
            *(
                _series.c[name].is_not_distinct_from(bindparam(f"series_{name}", type_=_series.c[name].type))
                for name in _SERIES_FIELDS
            ),
            ~exists().where(_rejected.c.sop_instance_uid == bindparam("sop_instance_uid")),
        )
        return (
            insert(_instances)
            .from_select(["series_id", "received_at", *_INSTANCE_FIELDS], inserted)
            .on_conflict_do_nothing()
            .returning(_instances.c.id)
        )


class _SnapshotStatements:
    """The queries of ``Index.load_snapshot``, built once."""

    def __init__(self) -> None:
        self.study = select(
            _studies.c.id,
            _studies.c.study_uid,
            _studies.c.change_seq,
            _studies.c.published_hash,
            *(_studies.c[name] for name in _STUDY_FIELDS),
        ).where(_studies.c.study_uid == bindparam("uid"))
        self.series = select(_series.c.id, _series.c.series_uid, *(_series.c[name] for name in _SERIES_FIELDS)).where(
            _series.c.study_id == bindparam("study_id")
        )
        self.instances = (
            select(
                _instances.c.series_id,
                _instances.c.sop_instance_uid,
                _instances.c.sop_class_uid,
                _instances.c.instance_number,
                _instances.c.image_laterality,
                _instances.c.title,
            )
            .join(_series, _series.c.id == _instances.c.series_id)
            .where(_series.c.study_id == bindparam("study_id"))
        )


class _DriverIngest:
    """The hot path's statements as ``_DriverStatement``s for one dialect."""

    def __init__(self, statements: _IngestStatements, dialect: Any) -> None:
        self._dialect = dialect
        self._update_study_statement = statements.update_study
        self.lock_study = _DriverStatement(statements.lock_study, dialect)
        self.insert_study = _DriverStatement(statements.insert_study, dialect, ["study_uid"])
        self.select_series = _DriverStatement(statements.select_series, dialect)
        self.insert_series = _DriverStatement(
            statements.insert_series, dialect, ["study_id", "series_uid", *_SERIES_FIELDS]
        )
        self.insert_instance = _DriverStatement(
            statements.insert_instance, dialect, ["series_id", "received_at", *_INSTANCE_FIELDS]
        )
        self.select_instance = _DriverStatement(statements.select_instance, dialect)
        self._record_into_known_series_statement = statements.record_into_known_series
        self._study_updates: dict[frozenset[str], _DriverStatement] = {}
        self._records_into_known_series: dict[frozenset[str], _DriverStatement] = {}

    @property
    def records_into_known_series(self) -> bool:
        """Whether ``record_into_known_series`` is there (PostgreSQL)."""
        return self._record_into_known_series_statement is not None

    def update_study(self, values: dict[str, Any]) -> _DriverStatement:
        """The study update setting the columns of ``values`` (its ``_id`` names the row); one per set of
        columns, compiled on first use."""
        return self._by_columns(self._study_updates, self._update_study_statement, values)

    def record_into_known_series(self, study_values: dict[str, Any]) -> _DriverStatement:
        """The instance insert into its known series with the study update setting the columns of
        ``study_values`` (``_IngestStatements.record_into_known_series``); PostgreSQL only."""
        return self._by_columns(self._records_into_known_series, self._record_into_known_series_statement, study_values)

    def _by_columns(
        self, cache: dict[frozenset[str], _DriverStatement], statement: Any, values: dict[str, Any]
    ) -> _DriverStatement:
        columns = frozenset(values)
        compiled = cache.get(columns)
        if compiled is None:
            compiled = _DriverStatement(statement, self._dialect, sorted(columns))
            cache[columns] = compiled
        return compiled


_locks_guard = threading.Lock()
_named_locks: dict[str, tuple[threading.Lock, int]] = {}  # name -> (its lock, how many hold or wait for it)


@contextmanager
def _process_lock(name: str) -> Iterator[None]:
    """The in-process lock called ``name``, forgotten once nobody holds or waits for it (names hold PatientIDs:
    they are not kept)."""
    with _locks_guard:
        lock, users = _named_locks.get(name, (threading.Lock(), 0))
        _named_locks[name] = (lock, users + 1)
    try:
        with lock:
            yield
    finally:
        with _locks_guard:
            lock, users = _named_locks[name]
            if users == 1:
                del _named_locks[name]
            else:
                _named_locks[name] = (lock, users - 1)


def _close_for_good(connection: Connection) -> None:
    """Close ``connection`` and its driver connection, not only give it back to the pool: by the time an index is
    collected its engine may have been disposed, and a connection given back to a disposed pool is never
    closed."""
    if not connection.closed:  # a connection a failed transaction gave back is closed already
        connection.invalidate()
        connection.close()


class Index:
    """Durable index of received instances and the publish state of their studies."""

    def __init__(self, engine: Engine, debounce: DebounceSettings) -> None:
        self._engine = engine
        self._debounce = debounce
        self._write_sessions = sessionmaker(engine, expire_on_commit=False)
        self._read_engine = engine.execution_options(**{READ_ONLY_OPTION: True})
        self._read_sessions = sessionmaker(self._read_engine, expire_on_commit=False)
        self._snapshot_statements = _SnapshotStatements()
        self._dialect = engine.dialect.name
        postgres = self._dialect == "postgresql"
        self._statements = _IngestStatements(postgresql.insert if postgres else sqlite.insert, postgres=postgres)
        self._driver = _DriverIngest(self._statements, engine.dialect)
        self._writers = writer_queue(engine)
        self._kept_connection: Connection | None = None  # see _ingest_connection
        self._locked_studies: dict[str, Any] = {}  # the running ingest transaction's, see _locking_studies
        self._keeps_connection = self._writers is not None or self._dialect == "postgresql"
        # Ingest transactions' turns where there is no writer queue; reentrant like the queue's (see writer_turn).
        self._ingest_lock = threading.RLock()
        self._driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._driver_data_error: type[Exception] = engine.dialect.loaded_dbapi.DataError
        self.links = LinkIndex(engine)  # what published studies' subject and basedOn reference; the relink queue

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except (SQLAlchemyError, self._driver_error) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            if isinstance(exc, (DataError, self._driver_data_error)):  # the value, not the database: no retry helps
                raise UnstorableValueError(
                    f"the index database cannot hold a value of this instance ({type(exc).__name__}: {first_line})"
                ) from exc
            raise IndexUnavailableError(
                f"the index database failed ({type(exc).__name__}: {first_line}); "
                "check that the database in `database.url` is running, writable and not full"
            ) from exc

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
        with self._translated_errors():
            if not self._keeps_connection:
                with self._engine.begin() as connection, self._locking_studies():
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
            connection = self._kept_connection = self._engine.connect()
            weakref.finalize(self, _close_for_good, connection)
        return connection

    def _in_ingest_transaction(self, work: Callable[[Connection], _Result]) -> _Result:
        """``work`` done in one ingest transaction. On PostgreSQL, when the kept connection fails (the server
        restarted, or closed it after an idle timeout, while the pool's ping would have noticed), the whole
        transaction was rolled back and ``work`` is done once more on a new connection."""
        retry = self._dialect == "postgresql" and self._kept_connection is not None
        try:
            with self._ingest_transaction() as connection:
                return work(connection)
        except IndexUnavailableError as exc:
            if not retry:
                raise
            log.info("ingest_connection_replaced", error=str(exc.__cause__ or exc))
        with self._ingest_transaction() as connection:
            return work(connection)

    @contextmanager
    def _unit_of_work(self, *, read_only: bool = False) -> Iterator[Session]:
        factory = self._read_sessions if read_only else self._write_sessions
        with self._translated_errors(), factory.begin() as session:
            yield session

    # ---- ingest -------------------------------------------------------------------------------------------

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
        ``_apply_rejection_note``. An instance a note rejected is not indexed again (``RecordOutcome.REJECTED``).
        """
        if record.rejection_note is not None:
            return self._apply_rejection_note(record.rejection_note, received_at)
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
        self, batch: Sequence[_Received], *, joining: Joining | None = None
    ) -> list[RecordOutcome | Exception]:
        """Index several instances in one transaction: one commit (one fsync) for all, for group commit across
        associations (``index/group_commit.py``). Each gets its outcome, or the exception ``record_instance``
        would have raised for it: if any of them fails, the transaction is rolled back and each is recorded
        on its own, so one bad instance never fails the others; when the database itself fails, all get its
        ``IndexUnavailableError`` at once. Rejection notes are always applied alone.

        ``joining`` (PostgreSQL): once the batch is recorded, and until it returns nothing, it is asked for
        instances that arrived meanwhile and join this transaction before its commit; it takes only those its
        argument accepts: instances of a study the transaction has locked already (locking another now, out of
        UID order, could deadlock with another bridge). While a bridge waits for a study another holds, what
        arrives for it then shares its commit. The outcomes are those of ``batch``, then those of the instances
        that joined, in the order they joined. An SQLite file needs none of it: the leader of a batch gathers
        what arrives while it waits for the writer turn (``writer_turn``), and joining later only made the
        turn longer (4 % fewer instances a second with two listener processes).
        """
        if self._dialect != "postgresql":
            joining = None
        received = list(batch)  # grows with the instances that join
        if any(record.rejection_note is not None for record, _ in batch) or (len(batch) < 2 and joining is None):
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
                if joining is None:
                    break
                joined = joining(self._may_join(locked))
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

    def preview_study(self, records: Sequence[InstanceRecord]) -> list[RecordOutcome] | None:
        """What ``record_instances`` would answer for ``records``, instances of one study, read only (for
        ``pacs-bridge backfill --dry-run``); None when the index has no such study (each would be new).

        The same comparison as recording's (``_changed``), each instance seeing what those before it would have
        changed. Not foreseen: an instance or series that another study holds (recording refuses it) and
        instances an IOCM rejection note withdrew (recording keeps them out); rejection notes are not previewed.
        """
        if not records:
            return []
        try:
            snapshot = self.load_snapshot(records[0].study.study_uid)
        except UnknownStudyError:
            return None
        study = snapshot.attributes
        series = {item.attributes.series_uid: item.attributes for item in snapshot.series}
        instances = {instance.sop_instance_uid: instance for item in snapshot.series for instance in item.instances}
        outcomes = []
        for record in records:
            study_changes = _changed(study, record.study, _STUDY_FIELDS)
            study = replace(study, **study_changes)
            known_series = series.get(record.series.series_uid)
            series_changes = _changed(known_series, record.series, _SERIES_FIELDS) if known_series else {}
            series[record.series.series_uid] = (
                replace(known_series, **series_changes) if known_series else record.series
            )
            instance = instances.get(record.sop_instance_uid)
            instance_changes = _changed(instance, record, _INSTANCE_FIELDS) if instance else {}
            instances[record.sop_instance_uid] = InstanceSnapshot(
                **{name: getattr(record, name) for name in _INSTANCE_FIELDS}
            )
            if instance is None:
                outcomes.append(RecordOutcome.NEW)
            elif study_changes or series_changes or instance_changes:
                outcomes.append(RecordOutcome.UPDATED)
            else:
                outcomes.append(RecordOutcome.UNCHANGED)
        return outcomes

    @staticmethod
    def _may_join(locked: set[str]) -> Callable[[InstanceRecord], bool]:
        """Which waiting instances may join a transaction that has locked the studies ``locked``."""
        return lambda record: record.rejection_note is None and record.study.study_uid in locked

    def _record_each_alone(self, received: Sequence[_Received]) -> list[RecordOutcome | Exception]:
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
        study_changes = _changed(study, record.study, _STUDY_FIELDS)

        series_uid = record.series.series_uid
        if driver.records_into_known_series:
            # The usual C-STORE on PostgreSQL: the instance and its study's new state in one statement.
            study_values = self._study_values(study, study_changes, received_at)
            known_series = {
                "series_uid": series_uid,
                "study_id": study.id,
                "received_at": received_at,
                **{f"series_{name}": getattr(record.series, name) for name in _SERIES_FIELDS},
                **{name: getattr(record, name) for name in _INSTANCE_FIELDS},
                **study_values,
            }
            if driver.record_into_known_series(study_values).first(cursor, known_series) is not None:
                self._study_written(study, study_values)
                return RecordOutcome.NEW

        series_keys = {"uid": series_uid, "sop_uid": record.sop_instance_uid}
        series = driver.select_series.first(cursor, series_keys)
        series_changes: dict[str, Any] = {}
        if series is None:
            values = {name: getattr(record.series, name) for name in _SERIES_FIELDS}
            driver.insert_series.execute(cursor, {"study_id": study.id, "series_uid": series_uid, **values})
            series = driver.select_series.first(cursor, series_keys)
        if series.rejected_id is not None:
            raise _RejectedInstanceError  # rolls back whatever this instance created or changed
        if series.study_id != study.id:
            other = connection.execute(select(_studies.c.study_uid).where(_studies.c.id == series.study_id)).scalar()
            raise ConflictingInstanceError(
                "SeriesInstanceUID",
                "(0020,000E)",
                f"already indexed in another study: {series_uid} belongs to study {other}",
            )
        series_changes = _changed(series, record.series, _SERIES_FIELDS)
        if series_changes:
            connection.execute(update(_series).where(_series.c.id == series.id).values(**series_changes))

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
        return {"_id": study.id, **study_changes, **self._change_noted(study, changed_at)}

    def _study_written(self, study: Any, values: dict[str, Any]) -> None:
        """The locked study's row as the update with ``values`` left it, for this transaction's next instance."""
        self._locked_studies[study.study_uid] = study._replace(
            **{k: v for k, v in values.items() if k in study._fields}
        )

    def _record_instance_row(
        self, connection: Connection, cursor: Any, record: InstanceRecord, series_id: int, received_at: datetime
    ) -> RecordOutcome:
        driver = self._driver
        values = {name: getattr(record, name) for name in _INSTANCE_FIELDS}
        inserted = driver.insert_instance.first(cursor, {"series_id": series_id, "received_at": received_at, **values})
        if inserted is not None:
            return RecordOutcome.NEW
        instance = driver.select_instance.first(cursor, {"uid": record.sop_instance_uid})
        if instance.series_id != series_id:
            owner = connection.execute(
                select(_series.c.series_uid, _studies.c.study_uid)
                .join(_studies, _studies.c.id == _series.c.study_id)
                .where(_series.c.id == instance.series_id)
            ).one()
            raise ConflictingInstanceError(
                "SOPInstanceUID",
                "(0008,0018)",
                f"already indexed in another series: {record.sop_instance_uid} is in series "
                f"{owner.series_uid} of study {owner.study_uid}",
            )
        changes = _changed(instance, record, _INSTANCE_FIELDS)
        if not changes:
            return RecordOutcome.UNCHANGED
        connection.execute(update(_instances).where(_instances.c.id == instance.id).values(**changes))
        return RecordOutcome.UPDATED

    def _change_noted(self, study: Row[Any], changed_at: datetime) -> dict[str, Any]:
        """The study columns that record one more indexed change at ``changed_at`` and its new due time."""
        first_change_at = study.first_change_at
        if study.publish_state != PublishState.PENDING.value or first_change_at is None:
            first_change_at = changed_at
        values: dict[str, Any] = {
            "change_seq": study.change_seq + 1,
            "first_change_at": first_change_at,
            "last_change_at": changed_at,
            "publish_state": PublishState.PENDING.value,
            "due_at": due_at(first_change_at=first_change_at, last_change_at=changed_at, settings=self._debounce),
        }
        if study.publish_state == PublishState.FAILED.value:
            # A refused study gets a fresh chance when it changes.
            values.update(attempts=0, next_attempt_at=None)
        return values

    # ---- IHE IOCM rejection notes ---------------------------------------------------------------------------

    def _apply_rejection_note(self, note: RejectionNote, received_at: datetime) -> RecordOutcome:
        """Withdraw what an IOCM rejection note references, in one transaction; the note itself is not indexed.

        Every referenced SOP Instance UID is recorded as rejected (so a later arrival stays out), even one
        never received; indexed ones are deleted, then series left empty, and each study that lost instances
        is changed (``change_seq`` + 1, new due time) so the publisher sends it again. A note sent again, or
        one naming only unknown instances, changes no study.

        Concurrency: each referenced study's row is locked first (created if absent, and removed again if it
        stays empty), and ``record_instance`` locks the same row before its rejected check. So a note and an
        instance of one study arriving together at two bridges sharing PostgreSQL are serialised: either the
        instance is indexed first and the note deletes it, or the note commits first and the instance sees
        the rejection. Studies are locked in Study Instance UID order, so two notes cannot deadlock.
        """
        with self._translated_errors(), self._engine.begin() as connection:
            statements = self._statements
            locked: dict[int, Row[Any]] = {}
            created: set[int] = set()
            for study_uid in sorted({reference.study_uid for reference in note.references}):
                inserted = connection.execute(statements.create_study, {"study_uid": study_uid}).first()
                study = connection.execute(statements.lock_study, {"uid": study_uid}).one()
                locked[study.id] = study
                if inserted is not None:
                    created.add(study.id)
            indexed = self._indexed_instances(connection, [ref.sop_instance_uid for ref in note.references])
            others = sorted({row.study_id for row in indexed.values()} - locked.keys())
            if others:  # instances indexed under another study than the note says: withdrawn all the same
                for study in connection.execute(statements.lock_studies_by_id, {"ids": others}):
                    locked[study.id] = study
            connection.execute(
                statements.insert_rejected,
                [
                    {
                        "sop_instance_uid": reference.sop_instance_uid,
                        "study_uid": row.study_uid if row is not None else reference.study_uid,
                        "series_uid": row.series_uid if row is not None else reference.series_uid,
                        "modality": row.modality if row is not None else "",
                        "reason_code": note.reason.value,
                        "note_uid": note.note_uid,
                        "rejected_at": received_at,
                    }
                    for reference in note.references
                    for row in [indexed.get(reference.sop_instance_uid)]
                ],
            )
            instance_ids = [row.id for row in indexed.values()]
            for chunk in _chunks(instance_ids):
                connection.execute(delete(_instances).where(_instances.c.id.in_(chunk)))
            for chunk in _chunks(sorted({row.series_id for row in indexed.values()})):
                connection.execute(
                    delete(_series)
                    .where(_series.c.id.in_(chunk))
                    .where(~exists().where(_instances.c.series_id == _series.c.id))
                )
            changed = sorted({row.study_id for row in indexed.values()})
            for study_id in changed:
                connection.execute(
                    statements.update_study, {"_id": study_id, **self._change_noted(locked[study_id], received_at)}
                )
            for chunk in _chunks(sorted(created)):
                connection.execute(delete(_studies).where(_studies.c.id.in_(chunk)))
        log.info(
            "rejection_note_applied",
            note_uid=note.note_uid,
            reason=note.reason.value,
            referenced=len(note.references),
            removed=len(instance_ids),
            changed_studies=[locked[study_id].study_uid for study_id in changed],
        )
        return RecordOutcome.REJECTION_NOTE

    @staticmethod
    def _indexed_instances(connection: Connection, sop_instance_uids: list[str]) -> dict[str, Any]:
        """Where each of these SOP Instance UIDs is indexed (instance, series and study rows), by UID."""
        found: dict[str, Any] = {}
        for chunk in _chunks(sop_instance_uids):
            rows = connection.execute(
                select(
                    _instances.c.id,
                    _instances.c.sop_instance_uid,
                    _instances.c.series_id,
                    _series.c.series_uid,
                    _series.c.modality,
                    _series.c.study_id,
                    _studies.c.study_uid,
                )
                .join(_series, _series.c.id == _instances.c.series_id)
                .join(_studies, _studies.c.id == _series.c.study_id)
                .where(_instances.c.sop_instance_uid.in_(chunk))
            )
            found.update((row.sop_instance_uid, row) for row in rows)
        return found

    # ---- publishing -----------------------------------------------------------------------------------------

    def claim_due_studies(self, now: datetime, *, limit: int, lease: timedelta, claimer: str) -> list[ClaimedStudy]:
        """Lease up to ``limit`` due studies for publishing, most overdue first.

        On PostgreSQL the rows are selected ``FOR UPDATE SKIP LOCKED``, so bridges sharing the database never
        claim the same study; the lease (``claimed_until``) keeps it theirs while they publish outside the
        transaction, and expires if that bridge dies.
        """
        with self._unit_of_work() as session:
            rows = session.execute(
                select(Study.id, Study.study_uid, Study.attempts, Study.last_change_at, Study.published_version)
                .where(Study.due_at <= now)
                .where(or_(Study.next_attempt_at.is_(None), Study.next_attempt_at <= now))
                .where(or_(Study.claimed_until.is_(None), Study.claimed_until < now))
                .order_by(Study.due_at, Study.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            if rows:
                session.execute(
                    update(Study)
                    .where(Study.id.in_([row.id for row in rows]))
                    .values(claimed_until=now + lease, claimed_by=claimer)
                )
            return [
                ClaimedStudy(
                    study_uid=row.study_uid,
                    attempts=row.attempts,
                    last_change_at=row.last_change_at,
                    published_version=row.published_version,
                    claimed_until=now + lease,
                )
                for row in rows
            ]

    def load_snapshot(self, study_uid: str) -> StudySnapshot:
        """Everything indexed for one study, series ordered by number then UID, instances likewise.

        Read with statements built once, on a connection rather than a session: the publisher loads one snapshot
        per study, and for a small study the ORM's bookkeeping cost more than the three queries.
        """
        statements = self._snapshot_statements
        with self._translated_errors(), self._read_engine.begin() as connection:
            study = connection.execute(statements.study, {"uid": study_uid}).first()
            if study is None:
                raise UnknownStudyError(f"study {study_uid} is not in the index")
            attributes = StudyAttributes(
                study_uid=study.study_uid, **{name: getattr(study, name) for name in _STUDY_FIELDS}
            )
            series_rows = connection.execute(statements.series, {"study_id": study.id}).all()
            instances_by_series: dict[int, list[InstanceSnapshot]] = defaultdict(list)
            instance_rows = connection.execute(statements.instances, {"study_id": study.id})
            for series_id, sop_instance_uid, sop_class_uid, instance_number, laterality, title in instance_rows:
                instances_by_series[series_id].append(
                    InstanceSnapshot(
                        sop_instance_uid=sop_instance_uid,
                        sop_class_uid=sop_class_uid,
                        instance_number=instance_number,
                        image_laterality=laterality,
                        title=title,
                    )
                )
            series_snapshots = [
                SeriesSnapshot(
                    attributes=SeriesAttributes(
                        series_uid=row.series_uid, **{name: getattr(row, name) for name in _SERIES_FIELDS}
                    ),
                    instances=tuple(sorted(instances_by_series[row.id], key=_instance_order)),
                )
                for row in series_rows
            ]
            series_snapshots.sort(key=_series_order)
            withdrawal = None
            if not instances_by_series:  # only rejection notes leave a study row without instances
                withdrawal = self._withdrawal(connection, study_uid)
            return StudySnapshot(
                attributes=attributes,
                series=tuple(series_snapshots),
                change_seq=study.change_seq,
                published_hash=study.published_hash,
                withdrawal=withdrawal,
            )

    @staticmethod
    def _withdrawal(connection: Connection, study_uid: str) -> StudyWithdrawal | None:
        rows = connection.execute(
            select(RejectedInstance.reason_code, RejectedInstance.modality)
            .where(RejectedInstance.study_uid == study_uid)
            .distinct()
        ).all()
        if not rows:
            return None
        return StudyWithdrawal(
            reasons=tuple(sorted({RejectionReason(row.reason_code) for row in rows})),
            modalities=tuple(sorted({row.modality for row in rows if row.modality})),
        )

    def mark_published(
        self,
        study_uid: str,
        *,
        change_seq: int,
        content_hash: str,
        now: datetime,
        sent: bool,
        version_id: str | None = None,
    ) -> None:
        """Record that the snapshot at ``change_seq`` is on the FHIR server (``sent``: we PUT it just now, and
        the server called it ``version_id``).

        If the study changed while it was being published, it stays pending: its newer due time stands.
        """
        published = Published(
            study_uid=study_uid,
            change_seq=change_seq,
            content_hash=content_hash,
            at=now,
            sent=sent,
            version_id=version_id,
        )
        self.record_publish_results([published])

    def mark_retry(
        self, study_uid: str, *, error: str, next_attempt_at: datetime, not_before: datetime | None = None
    ) -> int:
        """Record a failed attempt that may pass by itself; the study stays pending. Returns the attempt count.

        ``not_before``: the server asked for no retry before then (Retry-After): ``wake_backed_off`` keeps it, a floor.
        """
        with self._unit_of_work() as session:
            study = self._locked_study(session, study_uid)
            retry = RetryLater(study_uid=study_uid, error=error, next_attempt_at=next_attempt_at, not_before=not_before)
            apply_publish_result(study, retry)
            return study.attempts

    def record_publish_results(self, results: Sequence[PublishResult]) -> None:
        """Record what a batch of publishing attempts came to, in one transaction (``index/publish_results.py``
        says what each result writes). The rows are locked in Study Instance UID order, so two bridges recording
        at once wait for each other rather than deadlock. A study no longer in the index is skipped."""
        if not results:
            return
        by_uid = {result.study_uid: result for result in results}
        with self._unit_of_work() as session:
            for chunk in _chunks(sorted(by_uid)):
                locked = session.scalars(
                    select(Study).where(Study.study_uid.in_(chunk)).order_by(Study.study_uid).with_for_update()
                )
                for study in locked:
                    apply_publish_result(study, by_uid[study.study_uid])

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Hold the lock called ``name`` while the block runs, against every bridge sharing this database, for
        work outside the database that must not run twice at once (creating a study's Patient).

        PostgreSQL: a transaction-scoped advisory lock on a 64-bit hash of ``name``, released by the commit
        that ends the block (or when the connection drops). SQLite: a lock in this process, the one that
        publishes from a SQLite index.
        """
        if self._dialect != "postgresql":
            with _process_lock(name):
                yield
            return
        key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big", signed=True)
        with self._translated_errors(), self._engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield

    def next_due_at(self) -> datetime | None:
        """When the earliest study with something to publish can be claimed: the latest of its debounce
        ``due_at``, its backoff ``next_attempt_at`` and another pass's lease ``claimed_until`` (the conditions of
        ``claim_due_studies``). None when nothing waits to be published."""

        def later(first: Any, second: Any) -> Any:
            return case((second > first, second), else_=first)

        claimable_at = later(later(Study.due_at, Study.next_attempt_at), Study.claimed_until)
        with self._unit_of_work(read_only=True) as session:
            earliest = session.execute(select(func.min(claimable_at)).where(Study.due_at.is_not(None))).scalar()
        return cast("datetime | None", earliest)  # UtcDateTime's result processing: aware UTC

    @staticmethod
    def _wakeable(now: datetime) -> Any:
        """Pending studies waiting out a backoff that ``wake_backed_off`` brings forward: to now, or to the
        server's own ``retry_not_before`` (Retry-After, a 429's backoff) when that comes before the backoff ends."""
        return and_(
            Study.publish_state == PublishState.PENDING.value,
            Study.next_attempt_at > now,
            or_(Study.retry_not_before.is_(None), Study.retry_not_before < Study.next_attempt_at),
        )

    def wakeable_count(self, now: datetime) -> int:
        """How many studies ``wake_backed_off`` would bring forward now."""
        with self._unit_of_work(read_only=True) as session:
            return int(session.execute(select(func.count()).select_from(Study).where(self._wakeable(now))).scalar_one())

    def wake_backed_off(self, now: datetime) -> int:
        """For when the FHIR server answers again: every study waiting out a backoff is due now, except that
        where the server asked for a later retry (``retry_not_before``: Retry-After, 429) it is due at that time,
        not at the end of its exponential backoff. Returns how many studies were brought forward."""
        at_now = literal(now, type_=Study.next_attempt_at.type)
        due = case((Study.retry_not_before > at_now, Study.retry_not_before), else_=at_now)
        with self._unit_of_work() as session:
            result = session.execute(update(Study).where(self._wakeable(now)).values(next_attempt_at=due))
            return int(getattr(result, "rowcount", 0) or 0)

    def mark_failed(self, study_uid: str, *, change_seq: int, error: str) -> None:
        """Record a refusal that will not pass by itself. A change newer than ``change_seq`` keeps it pending."""
        self.record_publish_results([Refused(study_uid=study_uid, change_seq=change_seq, error=error)])

    def release_claim(self, study_uid: str) -> None:
        """Give a claimed study back without recording anything (e.g. on shutdown)."""
        self.record_publish_results([Released(study_uid=study_uid)])

    @staticmethod
    def _locked_study(session: Session, study_uid: str) -> Study:
        return session.scalars(select(Study).where(Study.study_uid == study_uid).with_for_update()).one()

    # ---- endpoints and overview ------------------------------------------------------------------------

    def endpoint_hashes(self) -> dict[str, str]:
        """Content hash of every Endpoint last PUT, by endpoint id."""
        with self._unit_of_work(read_only=True) as session:
            rows = session.execute(select(EndpointPublication.endpoint_id, EndpointPublication.content_hash))
            return {endpoint_id: digest for endpoint_id, digest in rows}

    def mark_endpoint_published(self, endpoint_id: str, *, content_hash: str, now: datetime) -> None:
        """Record the Endpoint's content as sent. One statement that inserts or updates: two bridges sending the
        same new Endpoint at once both record it (a read, then an insert, failed the second on the key)."""
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        table = cast(Table, EndpointPublication.__table__)
        values = {"content_hash": content_hash, "published_at": now}
        statement = (
            insert(table)
            .values(endpoint_id=endpoint_id, **values)
            .on_conflict_do_update(index_elements=[table.c.endpoint_id], set_=values)
        )
        with self._unit_of_work() as session:
            session.execute(statement)

    def count_by_state(self) -> StateCounts:
        with self._unit_of_work(read_only=True) as session:
            rows = session.execute(select(Study.publish_state, func.count()).group_by(Study.publish_state))
            counts: dict[str, int] = {state: count for state, count in rows}
        return StateCounts(
            pending=counts.get(PublishState.PENDING.value, 0),
            published=counts.get(PublishState.PUBLISHED.value, 0),
            failed=counts.get(PublishState.FAILED.value, 0),
        )

    def check_writable(self) -> str | None:
        """None when a write transaction can be opened now, else why not (for /readyz)."""
        try:
            with self._unit_of_work() as session:
                if (
                    self._dialect == "postgresql"
                    and session.execute(text("SHOW transaction_read_only")).scalar() == "on"
                ):
                    return "the PostgreSQL database is read-only (a standby?)"
                session.execute(text("SELECT 1"))
        except IndexUnavailableError as exc:
            return str(exc)
        return None

    # ---- operator requests ------------------------------------------------------------------------------

    def studies_in_state(self, state: PublishState, *, limit: int = 100) -> list[StudyStatus]:
        """Studies in ``state``, the longest-waiting first (by their first unpublished change)."""
        with self._unit_of_work(read_only=True) as session:
            rows = session.scalars(
                select(Study)
                .where(Study.publish_state == state.value)
                .order_by(Study.first_change_at, Study.last_change_at, Study.id)
                .limit(limit)
            ).all()
            return [_study_status(row) for row in rows]

    def study_status(self, study_uid: str) -> StudyStatus | None:
        with self._unit_of_work(read_only=True) as session:
            row = session.scalars(select(Study).where(Study.study_uid == study_uid)).one_or_none()
            return None if row is None else _study_status(row)

    def retry_failed(self, now: datetime, *, study_uid: str | None = None) -> list[str]:
        """Make failed studies (all, or the one named) due now, with a fresh attempt count."""
        with self._unit_of_work() as session:
            query = select(Study).where(Study.publish_state == PublishState.FAILED.value).with_for_update()
            if study_uid is not None:
                query = query.where(Study.study_uid == study_uid)
            studies = session.scalars(query).all()
            for study in studies:
                self._make_due_now(study, now)
            return [study.study_uid for study in studies]

    def republish(
        self, now: datetime, *, study_uid: str | None = None, changed_since: datetime | None = None
    ) -> list[str]:
        """Make studies due now and forget their published hash, so they are rebuilt and sent even if unchanged.

        Names one study, or every study whose last change is at or after ``changed_since``.
        """
        if (study_uid is None) == (changed_since is None):
            raise ValueError("republish takes exactly one of study_uid and changed_since")
        with self._unit_of_work() as session:
            query = select(Study).with_for_update()
            if study_uid is not None:
                query = query.where(Study.study_uid == study_uid)
            else:
                query = query.where(Study.last_change_at >= changed_since)
            studies = session.scalars(query).all()
            for study in studies:
                study.published_hash = None
                self._make_due_now(study, now)
            return [study.study_uid for study in studies]

    @staticmethod
    def _make_due_now(study: Study, now: datetime) -> None:
        study.publish_state = PublishState.PENDING.value
        study.due_at = now
        if study.first_change_at is None:
            study.first_change_at = now
        study.attempts = 0
        study.next_attempt_at = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyStatus:
    """One study's publish state, as the operator sees it."""

    study_uid: str
    publish_state: str
    first_change_at: datetime | None
    last_change_at: datetime | None
    due_at: datetime | None
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    published_at: datetime | None


def _study_status(study: Study) -> StudyStatus:
    return StudyStatus(
        study_uid=study.study_uid,
        publish_state=study.publish_state,
        first_change_at=study.first_change_at,
        last_change_at=study.last_change_at,
        due_at=study.due_at,
        attempts=study.attempts,
        next_attempt_at=study.next_attempt_at,
        last_error=study.last_error,
        published_at=study.published_at,
    )


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _UID_CHUNK):
        yield values[start : start + _UID_CHUNK]


def _series_order(series: SeriesSnapshot) -> tuple[bool, int, str]:
    number = series.attributes.series_number
    return (number is None, number or 0, series.attributes.series_uid)


def _instance_order(instance: InstanceSnapshot) -> tuple[bool, int, str]:
    number = instance.instance_number
    return (number is None, number or 0, instance.sop_instance_uid)
