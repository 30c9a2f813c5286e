"""How SQLite transactions begin (index/engine.py): writers take the write lock up front, readers do not, and a
writer that cannot get it gets SQLAlchemy's OperationalError, as every caller expects."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from pacs_bridge.index import engine as engine_module
from pacs_bridge.index.engine import READ_ONLY_OPTION, make_engine


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Engine, Path]]:
    """An SQLite engine whose connections give up on a locked database after 50 ms, and its file."""
    monkeypatch.setattr(engine_module, "SQLITE_BUSY_TIMEOUT_MS", 50)
    path = tmp_path / "index.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (x INTEGER)"))
    yield engine, path
    engine.dispose()


def other_writer(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, timeout=0)


def test_a_writer_holds_the_write_lock_from_its_begin(database: tuple[Engine, Path]) -> None:
    engine, path = database
    other = other_writer(path)
    with engine.begin(), pytest.raises(sqlite3.OperationalError, match="locked"):
        other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")  # and gives it back at commit
    other.rollback()
    other.close()


def test_a_read_only_unit_leaves_the_write_lock_to_writers(database: tuple[Engine, Path]) -> None:
    engine, path = database
    other = other_writer(path)
    with engine.execution_options(**{READ_ONLY_OPTION: True}).begin() as connection:
        connection.execute(text("SELECT count(*) FROM t"))
        other.execute("BEGIN IMMEDIATE")
        other.rollback()
    other.close()


def test_a_writer_that_finds_the_database_locked_gets_sqlalchemys_operational_error(
    database: tuple[Engine, Path],
) -> None:
    engine, path = database
    other = other_writer(path)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(OperationalError, match="locked"), engine.begin():
        pass
    other.rollback()
    other.close()
    with engine.begin() as connection:  # the connection went back to the pool fit for use
        connection.execute(text("INSERT INTO t VALUES (1)"))
