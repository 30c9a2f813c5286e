"""Put a test database at a given schema revision, and read its revision, through Alembic."""

from __future__ import annotations

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from sqlalchemy import Engine


def alembic_upgrade(engine: Engine, revision: str) -> None:
    """Run the migrations from the current revision up to ``revision``."""
    with engine.begin() as connection:
        config = AlembicConfig()
        config.set_main_option("script_location", "pacs_bridge.index:migrations")
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def alembic_downgrade(engine: Engine, revision: str) -> None:
    """Run the migrations down from the current revision to ``revision``."""
    with engine.begin() as connection:
        config = AlembicConfig()
        config.set_main_option("script_location", "pacs_bridge.index:migrations")
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
