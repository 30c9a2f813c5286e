"""Engine construction: one per process, with the SQLite settings that make a success status mean durable."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option read by the SQLite "begin" hook: read-only units of work start a deferred transaction,
# so a long snapshot read never holds the write lock.
READ_ONLY_OPTION = "pacs_bridge_read_only"


def normalized_database_url(url: str) -> str:
    """``postgresql://`` means the psycopg 3 driver we ship, not SQLAlchemy's psycopg2 default."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def sqlite_file(url: str) -> str | None:
    """The absolute path of the SQLite file ``url`` names; None for PostgreSQL and in-memory databases."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:") or parsed.query.get("mode") == "memory":
        return None
    return os.path.abspath(database)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below issue BEGIN itself (pysqlite's own BEGIN is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cursor.execute("PRAGMA synchronous=FULL")  # fsync at every commit: success means on disk
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Writers take the write lock up front (BEGIN IMMEDIATE): a deferred transaction that reads and then
        # writes can fail with SQLITE_BUSY at once when another writer got in between, busy_timeout or not.
        statement = "BEGIN" if connection.get_execution_options().get(READ_ONLY_OPTION) else "BEGIN IMMEDIATE"
        # Straight on the driver: through exec_driver_sql, SQLAlchemy's statement and result bookkeeping cost
        # more CPU than the BEGIN itself, once per indexed instance. Its errors still reach callers as
        # SQLAlchemy's (a locked database past busy_timeout: OperationalError).
        dbapi = engine.dialect.loaded_dbapi
        try:
            connection.connection.driver_connection.execute(statement)  # type: ignore[union-attr]
        except dbapi.Error as exc:
            raise DBAPIError.instance(statement, None, exc, dbapi.Error) from exc


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``database.url``; SQLite in WAL mode with synchronous=FULL.

    Statement parameters hold patient names and IDs: the engine never shows them, neither in its log lines
    (``logging.level: debug``) nor in the text of its errors (``hide_parameters``)."""
    url = normalized_database_url(url)
    backend = make_url(url).get_backend_name()
    kwargs.setdefault("hide_parameters", True)
    if backend == "sqlite":
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine)
    else:
        engine = create_engine(url, pool_pre_ping=True, **kwargs)
    return engine


class WriterQueue:
    """Lets writers of one SQLite file take turns in the kernel instead of in SQLite's busy handler.

    A writer that finds the database locked sleeps in SQLite's busy handler, 1 ms, then 2, 5, 10 ms and more
    between tries; with several listener processes writing at once (``dicom.listener_processes``) those sleeps,
    not the work, bounded the rate. A writer that holds this queue's turn (a ``threading.Lock`` in the process,
    then ``flock`` on ``<database>-writers`` across processes) is woken by the kernel the moment the previous
    one is done. Writers that skip the queue still work: they wait for the database lock as before.

    The thread holding the turn may ask for it again (group commit takes the turn before it takes its batch,
    then records the batch in a transaction that asks for it too): it has it at once, and the turn is given
    back when the outermost ``turn`` ends.
    """

    def __init__(self, path: str) -> None:
        self._path = f"{path}-writers"
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread holding the turn
        self._fd = -1

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        if self._holder == threading.get_ident():
            yield
            return
        with self._lock:
            self._holder = threading.get_ident()
            try:
                with self._turn_across_processes():
                    yield
            finally:
                self._holder = None

    @contextlib.contextmanager
    def _turn_across_processes(self) -> Iterator[None]:
        """The ``flock`` on ``<database>-writers`` (called with the in-process lock held)."""
        if self._fd < 0:
            with contextlib.suppress(OSError):
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self._fd < 0:
            # No file beside the database (its directory is missing or read-only): SQLite's own lock still
            # keeps writers apart, and opening the database reports what is wrong.
            yield
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


def writer_queue(engine: Engine) -> WriterQueue | None:
    """The writer queue of ``engine``'s database: an SQLite file only (PostgreSQL queues writers itself)."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    if url.database.startswith("file:") or url.query.get("mode") == "memory":
        return None
    return WriterQueue(os.path.abspath(url.database))
