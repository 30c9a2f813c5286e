"""``DriverStatement``: a Core statement compiled once and run on the DB-API cursor, the ingest hot path's seam
between SQLAlchemy and the driver.

It reads three attributes of SQLAlchemy's ``SQLCompiler`` (``positiontup``, ``binds``, ``insert_prefetch``) and
the type processors of the statement's binds and columns, and it runs the SQL text on the driver's cursor
inside SQLAlchemy's transaction. tests/integration/test_driver_statement.py runs every statement shape the
ingest uses both ways (``Connection.execute`` and this) on SQLite and PostgreSQL and requires the same rows;
a compiler without those attributes fails at the index's construction with a ``TypeError`` naming them, not
at a C-STORE.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Sequence
from typing import Any

import sqlalchemy

_COMPILER_ATTRIBUTES = ("positiontup", "binds", "insert_prefetch")


class DriverStatement:
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
        compiled = statement.compile(dialect=dialect, **({"column_keys": list(column_keys)} if column_keys else {}))
        missing = [name for name in _COMPILER_ATTRIBUTES if not hasattr(compiled, name)]
        if missing:
            raise TypeError(
                f"SQLAlchemy {sqlalchemy.__version__} compiles {type(statement).__name__} without "
                f"{', '.join(missing)}, which the index's driver statements read; install the SQLAlchemy version "
                "pyproject.toml names, or report this version as unsupported"
            )
        self.sql: str = compiled.string
        self._positional: bool = compiled.positional
        names = list(compiled.positiontup or ()) if compiled.positional else list(compiled.binds)
        defaults = {column.key: column.default for column in compiled.insert_prefetch}
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
