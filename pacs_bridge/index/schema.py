"""The index schema's version, with Alembic: create it on first start, refuse to run on an old one, migrate.

A fresh database gets the current tables and is stamped at the newest revision, when the caller may create
one (``run``); the other commands refuse a database without the tables, so that pointing them at the wrong
place never leaves an empty index behind. A database from before migrations existed (the spine's
``create_all`` schema) is recognised as revision 0001. A database behind the newest revision is never changed
implicitly: ``run`` refuses to start and names the command that upgrades it, so the operator can back it up
first.
"""

from __future__ import annotations

from dataclasses import dataclass

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from pacs_bridge.errors import IndexNotFoundError, IndexUnavailableError, PacsBridgeError
from pacs_bridge.index import backfill_progress  # noqa: F401  (its tables belong to Base.metadata)
from pacs_bridge.index.models import Base
from pacs_bridge.redaction import redact_url

# The revision of a database created by create_all before migrations existed.
BASELINE_REVISION = "0001"
# Serialises schema creation between bridges starting at once on one PostgreSQL database.
_SCHEMA_LOCK_KEY = 0x7061_6373  # "pacs"


class SchemaOutdatedError(PacsBridgeError):
    """The index database's schema is older than this pacs-bridge; back it up, then run `pacs-bridge migrate`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SchemaChange:
    created: bool  # the tables did not exist and were created
    from_revision: str | None
    to_revision: str


def _alembic_config(connection: Connection) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", "pacs_bridge.index:migrations")
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    config = AlembicConfig()
    config.set_main_option("script_location", "pacs_bridge.index:migrations")
    head = ScriptDirectory.from_config(config).get_current_head()
    if head is None:  # no revision files: a packaging error
        raise PacsBridgeError("pacs-bridge's schema migrations are missing from the installation; reinstall it")
    return head


def _lock_schema(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})


def prepare_schema(
    engine: Engine, *, upgrade: bool = False, create: bool = True, config_hint: str = "FILE"
) -> SchemaChange:
    """Make sure the schema is current: create it when absent (only when ``create`` is true), upgrade it only
    when ``upgrade`` is true.

    Raises ``SchemaOutdatedError`` for an old schema without ``upgrade``, ``IndexNotFoundError`` for a database
    without the tables when ``create`` is false, ``IndexUnavailableError`` when the database cannot be reached.
    """
    head = head_revision()
    try:
        with engine.begin() as connection:
            _lock_schema(connection)
            config = _alembic_config(connection)
            if not inspect(connection).has_table("studies"):
                if not create:
                    url = redact_url(engine.url.render_as_string(hide_password=False))
                    raise IndexNotFoundError(
                        f"no pacs-bridge index in {url}: the database has no pacs-bridge tables, and this command "
                        f"creates none; check database.url in {config_hint} (pacs-bridge run creates the index at "
                        "its first start)"
                    )
                Base.metadata.create_all(connection)
                command.stamp(config, head)
                return SchemaChange(created=True, from_revision=None, to_revision=head)
            if MigrationContext.configure(connection).get_current_revision() is None:
                command.stamp(config, BASELINE_REVISION)  # committed even if the check below refuses
        with engine.begin() as connection:
            _lock_schema(connection)
            current = MigrationContext.configure(connection).get_current_revision()
            if current == head:
                return SchemaChange(created=False, from_revision=current, to_revision=head)
            if not upgrade:
                raise SchemaOutdatedError(
                    f"the index database schema is at revision {current}, this pacs-bridge needs {head}; "
                    f"back up the database, then run: pacs-bridge migrate --config {config_hint}"
                )
            command.upgrade(_alembic_config(connection), head)
            return SchemaChange(created=False, from_revision=current, to_revision=head)
    except SQLAlchemyError as exc:
        url = redact_url(engine.url.render_as_string(hide_password=False))
        raise IndexUnavailableError(
            f"cannot open the index database {url} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "check `database.url`, that the server runs and that this user may create tables"
        ) from exc
