"""One index database as the index's parts share it: its engine and read-only engine, its sessions, and the
translation of database errors into the bridge's.

SQLAlchemy and driver errors are wrapped in ``IndexUnavailableError`` where they enter our code, so the DICOM
listener answers "out of resources" (retry later) rather than success; a data error (a value the database
refuses, which no retry can store) in ``UnstorableValueError`` instead (0xC000).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DataError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs_bridge.errors import IndexUnavailableError, UnstorableValueError
from pacs_bridge.index.engine import READ_ONLY_OPTION

# UIDs per IN (...) list: well under SQLite's and PostgreSQL's bound-parameter limits.
UID_CHUNK = 500


class IndexDatabase:
    """The engines, sessions and error translation of one index database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.read_engine = engine.execution_options(**{READ_ONLY_OPTION: True})
        self._write_sessions = sessionmaker(engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.read_engine, expire_on_commit=False)
        self.driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._driver_data_error: type[Exception] = engine.dialect.loaded_dbapi.DataError

    @property
    def postgres(self) -> bool:
        return self.dialect == "postgresql"

    @contextmanager
    def translated_errors(self) -> Iterator[None]:
        try:
            yield
        except (SQLAlchemyError, self.driver_error) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            if isinstance(exc, (DataError, self._driver_data_error)):  # the value, not the database: no retry helps
                raise UnstorableValueError(
                    f"the index database cannot hold a value of this instance ({type(exc).__name__}: {first_line})"
                ) from exc
            raise IndexUnavailableError(
                f"the index database failed ({type(exc).__name__}: {first_line}); "
                "check that the database in `database.url` is running, writable and not full"
            ) from exc

    @contextmanager
    def unit_of_work(self, *, read_only: bool = False) -> Iterator[Session]:
        factory = self._read_sessions if read_only else self._write_sessions
        with self.translated_errors(), factory.begin() as session:
            yield session


def chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), UID_CHUNK):
        yield values[start : start + UID_CHUNK]
