"""Where the commands look for the index, and that only `run` ever creates one (SQLite and PostgreSQL)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, inspect

from pacs_bridge.checks import check_database
from pacs_bridge.cli import main
from pacs_bridge.config import load_config
from pacs_bridge.index.engine import normalized_database_url, sqlite_file
from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes
from pacs_bridge.wiring import open_index, utc_now
from tests.support.studies import uid

# Each command that reads or changes an existing index, with the arguments it needs.
INDEX_COMMANDS = [
    ("status",),
    ("status", "--json"),
    ("retry", "--failed"),
    ("republish", "--since", "2024-03-15"),
    ("reconcile",),
    ("migrate",),
]


def write_config(path: Path, **sections: Any) -> Path:
    sections.setdefault("fhir", {"base_url": "http://127.0.0.1:9/fhir"})  # nothing listens there
    path.write_text(yaml.safe_dump(sections), encoding="utf-8")
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def has_index_tables(database_url: str) -> bool:
    engine = create_engine(normalized_database_url(database_url))
    try:
        with engine.connect() as connection:
            names = set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    return bool(names & {"studies", "alembic_version"})


def ct_instance(study: str) -> InstanceRecord:
    return InstanceRecord(
        study=StudyAttributes(study_uid=uid(study)),
        series=SeriesAttributes(series_uid=uid(f"{study}.1"), modality="CT"),
        sop_instance_uid=uid(f"{study}.1.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )


@pytest.mark.parametrize("command", INDEX_COMMANDS, ids=" ".join)
def test_commands_other_than_run_never_create_an_index(
    command: tuple[str, ...], database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """With no index where database.url points (no SQLite file; a PostgreSQL database without the tables), each
    command exits 1 saying where it looked, and leaves nothing behind."""
    config = write_config(tmp_path / "pacs-bridge.yaml", database={"url": database_url})

    code, out, err = run_cli(capsys, *command, "--config", str(config))

    assert code == 1, out + err
    path = sqlite_file(database_url)
    if path is not None:
        assert f"no index database at {path} (database.url in {config}" in err
        assert not Path(path).exists()
        assert list(Path(path).parent.glob("index.db*")) == []
    else:
        assert "the database has no pacs-bridge tables, and this command creates none" in err
        assert not has_index_tables(database_url)


def test_status_from_another_directory_reads_the_index_beside_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """The example's relative `sqlite:///pacs-bridge.db` means the file beside the configuration file, so status
    run elsewhere reports the bridge's own studies (it used to create an empty index in the working directory)."""
    bridge_directory = tmp_path / "bridge"
    bridge_directory.mkdir()
    config_path = write_config(bridge_directory / "pacs-bridge.yaml", database={"url": "sqlite:///pacs-bridge.db"})
    engine, index = open_index(load_config(config_path), create=True)  # as `run` does at its first start
    index.record_instance(ct_instance("1"), received_at=utc_now())
    engine.dispose()
    capsys.readouterr()  # open_index's index_created line
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    code, out, _ = run_cli(capsys, "status", "--config", str(config_path))

    assert code == 0
    assert out.startswith("studies: 1 pending, 0 published, 0 failed")
    assert (bridge_directory / "pacs-bridge.db").exists()
    assert list(elsewhere.iterdir()) == []


def test_migrate_upgrades_an_existing_index_only(database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """After `run` created the index, migrate finds it current; it never creates one itself (above)."""
    config_path = write_config(tmp_path / "pacs-bridge.yaml", database={"url": database_url})
    engine, _ = open_index(load_config(config_path), create=True)
    engine.dispose()
    capsys.readouterr()  # open_index's index_created line

    code, out, err = run_cli(capsys, "migrate", "--config", str(config_path))

    assert code == 0, err
    assert out.startswith("index schema already at revision ")


def test_check_online_looks_where_the_index_will_be_without_creating_it(tmp_path: Path):
    """Before the first start there is no SQLite file: the database check passes when `run` could create it,
    fails naming the directory when it could not, and creates nothing either way."""
    ready = load_config(write_config(tmp_path / "ok.yaml", database={"url": "sqlite:///pacs-bridge.db"}))
    missing_directory = load_config(write_config(tmp_path / "bad.yaml", database={"url": "sqlite:///no/such/x.db"}))

    fine, refused = check_database(ready), check_database(missing_directory)

    assert (fine.ok, fine.detail) == (
        True,
        f"{tmp_path / 'pacs-bridge.db'}: no index yet; run creates it at its first start",
    )
    assert (refused.ok, refused.detail) == (
        False,
        f"{tmp_path / 'no' / 'such' / 'x.db'}: the directory {tmp_path / 'no' / 'such'} does not exist",
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.yaml", "ok.yaml"]


def test_run_names_a_missing_database_directory_and_the_key(tmp_path: Path):
    """`run` creates the index, but not directories: it exits 1 naming the directory and database.url."""
    config = write_config(
        tmp_path / "pacs-bridge.yaml",
        database={"url": "sqlite:///state/pacs-bridge.db"},
        dicom={"bind": "127.0.0.1", "port": 0},
    )

    result = subprocess.run(
        [sys.executable, "-m", "pacs_bridge", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert (
        f"cannot create the index database {tmp_path / 'state' / 'pacs-bridge.db'}: the directory "
        f"{tmp_path / 'state'} does not exist; create it, or set database.url in {config}"
    ) in result.stderr
