"""Schema versions on SQLite and PostgreSQL: created on first start, refused when old, upgraded by migrate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.models import Base
from pacs_bridge.index.schema import SchemaOutdatedError, head_revision, prepare_schema
from tests.support.schema import alembic_upgrade, current_revision


@pytest.fixture
def empty_engine(database_url: str) -> Engine:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def test_migrations_build_exactly_the_schema_of_the_models(empty_engine: Engine):
    """Upgrading an empty database through every revision gives what the models declare: no drift."""
    alembic_upgrade(empty_engine, "head")
    with empty_engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_first_start_creates_the_schema_at_the_newest_revision(empty_engine: Engine):
    """An empty database gets every table and is stamped at head."""
    change = prepare_schema(empty_engine)
    assert (change.created, change.to_revision) == (True, head_revision())
    assert current_revision(empty_engine) == head_revision()
    assert {"studies", "series", "instances", "endpoint_publications"} <= set(inspect(empty_engine).get_table_names())


def test_database_from_before_migrations_is_recognised_as_the_baseline(empty_engine: Engine):
    """Tables without alembic_version are the spine's schema: stamped 0001, then refused as outdated."""
    alembic_upgrade(empty_engine, "0001")
    with empty_engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))
    with pytest.raises(SchemaOutdatedError, match="pacs-bridge migrate --config"):
        prepare_schema(empty_engine)
    assert current_revision(empty_engine) == "0001"


def test_old_schema_is_refused_then_upgraded_keeping_its_rows(empty_engine: Engine):
    """At 0001 with a study in it: refused without upgrade; migrate brings it to head, the study intact."""
    alembic_upgrade(empty_engine, "0001")
    with empty_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO studies (study_uid, patient_id, issuer_of_patient_id, accession_number, study_date, "
                "study_time, timezone_offset, study_description, change_seq, publish_state, attempts) "
                "VALUES ('1.2.3', 'P', '', 'A', '20240315', '', '', 'CT', 1, 'failed', 3)"
            )
        )
    with pytest.raises(SchemaOutdatedError) as refused:
        prepare_schema(empty_engine, config_hint="/etc/pacs-bridge/config.yaml")
    assert f"is at revision 0001, this pacs-bridge needs {head_revision()}" in str(refused.value)
    assert "pacs-bridge migrate --config /etc/pacs-bridge/config.yaml" in str(refused.value)
    change = prepare_schema(empty_engine, upgrade=True)
    assert (change.from_revision, change.to_revision) == ("0001", head_revision())
    with empty_engine.connect() as connection:
        assert connection.execute(text("SELECT publish_state, attempts FROM studies")).one() == ("failed", 3)


def test_run_refuses_an_old_schema_and_migrate_fixes_it(database_url: str, empty_engine: Engine, tmp_path: Path):
    """The console commands: run exits 1 naming migrate, migrate upgrades, status then works."""
    alembic_upgrade(empty_engine, "0001")
    config = tmp_path / "pacs-bridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dicom": {"bind": "127.0.0.1", "port": 0},
                "database": {"url": database_url},
                "fhir": {"base_url": "http://127.0.0.1:9/fhir"},
            }
        ),
        encoding="utf-8",
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pacs_bridge", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    refused = cli("run")
    assert refused.returncode == 1
    assert f"pacs-bridge migrate --config {config}" in refused.stderr
    migrated = cli("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert f"upgraded from revision 0001 to {head_revision()}" in migrated.stdout
    assert cli("migrate").stdout.startswith(f"index schema already at revision {head_revision()}")
    assert cli("status").returncode == 0
