"""No password given in a URL is printed: check-config (offline and --online) and status, against real servers.

A database URL and a FHIR base URL may carry credentials (``postgresql://user:password@host/db``,
``http://user:password@host/fhir``, ``postgresql://user@host/db?password=…``); whatever the commands print shows
them as ``***@host`` and ``password=***``, whether the URL is valid or not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pacs_bridge.cli import main
from pacs_bridge.index.repository import Index
from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes
from tests.conftest import QUIET, FakeClock
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import uid

DATABASE_SECRET = "dbS3cret"
FHIR_SECRET = "fhirS3cret"


def with_password(url: str) -> str:
    """The test's PostgreSQL URL with a password (trust authentication ignores it, so it still connects)."""
    return url.replace("://postgres@", f"://postgres:{DATABASE_SECRET}@", 1)


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str, **sections: object) -> tuple[int, str, str]:
    """The exit code, stdout and stderr of the command with a configuration of ``sections``."""
    config = tmp_path / "pacs-bridge.yaml"
    config.write_text(yaml.safe_dump(sections), encoding="utf-8")
    try:
        main([*argv, "--config", str(config)])
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.postgresql
@pytest.mark.fhir_server
def test_check_config_online_names_both_servers_without_their_passwords(
    postgres_schema_url: str, fhir_server: FhirTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both checks pass with credentials in the URLs, and each line shows its server as ***@host."""
    fhir_url = fhir_server.base_url.replace("://", f"://bridge:{FHIR_SECRET}@", 1)

    code, out, err = run(
        tmp_path,
        capsys,
        "check-config",
        "--online",
        database={"url": with_password(postgres_schema_url)},
        fhir={"base_url": fhir_url},
    )
    out += err

    assert code == 0, out
    assert "ok   database: postgresql+psycopg://***@127.0.0.1:5432/test" in out
    assert f"ok   fhir: GET http://***@127.0.0.1:{fhir_server.port}/fhir/metadata" in out
    assert DATABASE_SECRET not in out and FHIR_SECRET not in out


@pytest.mark.postgresql
def test_check_config_online_failures_quote_the_urls_without_their_passwords(
    postgres_schema_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database nobody listens for and a FHIR server that is not there: both FAIL, naming ***@host."""
    code, out, err = run(
        tmp_path,
        capsys,
        "check-config",
        "--online",
        database={"url": f"postgresql+psycopg://postgres:{DATABASE_SECRET}@127.0.0.1:1/test?connect_timeout=2"},
        fhir={"base_url": f"http://bridge:{FHIR_SECRET}@127.0.0.1:9/fhir"},
    )
    out += err

    assert code == 1
    assert "FAIL database: postgresql+psycopg://***@127.0.0.1:1/test" in out
    assert "FAIL fhir: GET http://***@127.0.0.1:9/fhir/metadata: ConnectError" in out
    assert DATABASE_SECRET not in out and FHIR_SECRET not in out


def test_status_quotes_a_failure_reason_without_the_password_of_its_url(
    index: Index, clock: FakeClock, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed study whose stored reason quotes a URL with a password (as a library's error text may): status and
    status --json print the reason with ***@host."""
    record = InstanceRecord(
        study=StudyAttributes(study_uid=uid("1")),
        series=SeriesAttributes(series_uid=uid("1.1"), modality="CT"),
        sop_instance_uid=uid("1.1.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )
    index.record_instance(record, received_at=clock())
    clock.advance(QUIET)
    index.claim_due_studies(clock(), limit=1, lease=QUIET, claimer="test")
    index.mark_failed(uid("1"), change_seq=1, error=f"cannot reach http://bridge:{FHIR_SECRET}@fhir.example.org/fhir")
    sections = {"database": {"url": database_url}, "fhir": {"base_url": "http://127.0.0.1:9/fhir"}}

    code, text, text_err = run(tmp_path, capsys, "status", **sections)
    json_code, document, json_err = run(tmp_path, capsys, "status", "--json", **sections)

    assert (code, json_code) == (0, 0)
    assert "cannot reach http://***@fhir.example.org/fhir" in text
    assert json.loads(document)["failed"][0]["last_error"] == "cannot reach http://***@fhir.example.org/fhir"
    assert FHIR_SECRET not in text + text_err + document + json_err


# Two words, so that a password shown in part (up to its space) is caught as well as one shown whole.
SPACED_SECRET = ("dbHalfOne", "dbHalfTwo")


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} printed in:\n{text}"


@pytest.mark.parametrize(
    ("key", "url", "secrets"),
    [
        ("database", "postgresql+psycopg:bridge:dbS3cret@db/pacs", (DATABASE_SECRET,)),  # '//' forgotten
        ("database", "bridge:dbS3cret@db/pacs", (DATABASE_SECRET,)),  # no scheme at all
        ("database", "postgresql+nosuchdriver://bridge:dbS3cret@db/pacs", (DATABASE_SECRET,)),  # driver unknown
        ("database", f"postgresql+psycopg:bridge:{' '.join(SPACED_SECRET)}@db/pacs", SPACED_SECRET),
        ("fhir", "https:bridge:fhirS3cret@fhir.example.org/r4", (FHIR_SECRET,)),  # not an http(s) URL
        ("fhir", "bridge:fhirS3cret@fhir.example.org/r4", (FHIR_SECRET,)),
    ],
    ids=[
        "database no slashes",
        "database no scheme",
        "database unknown driver",
        "database spaced password",
        "fhir no slashes",
        "fhir no scheme",
    ],
)
def test_check_config_names_an_invalid_url_without_its_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, url: str, secrets: tuple[str, ...]
) -> None:
    """An invalid database.url or fhir.base_url is reported at its key, with the host it names and no password."""
    sections: dict[str, object] = {
        "database": {"url": f"sqlite:///{tmp_path / 'index.db'}"},
        "fhir": {"base_url": "http://127.0.0.1:9/fhir"},
    }
    sections[key] = {"base_url" if key == "fhir" else "url": url}

    code, out, err = run(tmp_path, capsys, "check-config", **sections)

    assert code == 2, out + err
    assert f"at '{key}." in err
    assert "***@" in err
    assert_no_secret(out + err, *secrets)


@pytest.mark.postgresql
@pytest.mark.fhir_server
def test_check_config_online_hides_passwords_with_spaces_and_in_query_parameters(
    postgres_schema_url: str, fhir_server: FhirTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The database password as a ?password= parameter (with a space in it), the FHIR password with a space in
    the userinfo: both checks pass (trust authentication ignores the one, the test server the other), and no
    part of either password is printed."""
    spaced = " ".join(SPACED_SECRET)
    separator = "&" if "?" in postgres_schema_url else "?"
    database_url = f"{postgres_schema_url}{separator}password={spaced}"
    fhir_url = fhir_server.base_url.replace("://", f"://bridge:fhir {FHIR_SECRET}@", 1)

    code, out, err = run(
        tmp_path, capsys, "check-config", "--online", database={"url": database_url}, fhir={"base_url": fhir_url}
    )

    assert code == 0, out + err
    assert "ok   database: postgresql+psycopg://***@127.0.0.1:5432/test" in out
    assert "password=***" in out
    assert f"ok   fhir: GET http://***@127.0.0.1:{fhir_server.port}/fhir/metadata" in out
    assert_no_secret(out + err, *SPACED_SECRET, FHIR_SECRET)


@pytest.mark.postgresql
def test_check_config_online_failure_hides_a_query_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A database nobody listens on, its password a query parameter: FAIL, naming the host, not the password."""
    code, out, err = run(
        tmp_path,
        capsys,
        "check-config",
        "--online",
        database={
            "url": f"postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2&password={DATABASE_SECRET}"
        },
        fhir={"base_url": "http://127.0.0.1:9/fhir"},
    )

    assert code == 1
    assert "FAIL database: postgresql+psycopg://***@127.0.0.1:1/test" in out
    assert_no_secret(out + err, DATABASE_SECRET)
