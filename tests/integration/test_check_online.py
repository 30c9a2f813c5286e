"""check-config --online against a real database and the real FHIR test server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pacs_bridge.cli import main
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.schema import head_revision, prepare_schema
from tests.support.fault_proxy import HttpFaultProxy, Pass, Respond
from tests.support.fhir_server import FhirTestServer
from tests.support.schema import alembic_upgrade, current_revision

pytestmark = pytest.mark.fhir_server


def check_online(tmp_path: Path, capsys: pytest.CaptureFixture[str], **sections: Any) -> tuple[int, str]:
    config = tmp_path / "pacs-bridge.yaml"
    config.write_text(yaml.safe_dump(sections), encoding="utf-8")
    try:
        main(["check-config", "--online", "--config", str(config)])
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return code, capsys.readouterr().out


def test_everything_reachable_passes_and_says_what_it_checked(
    database_url: str, fhir_server: FhirTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A current schema and an answering R4 server: two ok lines naming what was tried, exit 0."""
    engine = make_engine(database_url)
    prepare_schema(engine)
    engine.dispose()
    code, out = check_online(tmp_path, capsys, database={"url": database_url}, fhir={"base_url": fhir_server.base_url})
    assert code == 0, out
    assert "ok   database: " in out and f"schema at revision {head_revision()}" in out
    assert f"ok   fhir: GET {fhir_server.base_url}/metadata: CapabilityStatement, FHIR 4.0.1" in out


def test_unreachable_fhir_server_and_wrong_release_fail_with_the_reason(
    database_url: str, fhir_server: FhirTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Nothing listening: FAIL with the connection error; an R4 server for fhir.version R5: FAIL naming both."""
    code, out = check_online(
        tmp_path, capsys, database={"url": database_url}, fhir={"base_url": "http://127.0.0.1:9/fhir"}
    )
    assert code == 1
    assert "FAIL fhir: GET http://127.0.0.1:9/fhir/metadata: ConnectError" in out
    code, out = check_online(
        tmp_path,
        capsys,
        database={"url": database_url},
        fhir={"base_url": fhir_server.base_url, "version": "R5"},
    )
    assert code == 1
    assert "the server speaks FHIR 4.0.1, but fhir.version is R5" in out


def test_outdated_schema_fails_naming_migrate(
    database_url: str, fhir_server: FhirTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A database at an old revision is reported, with the command that upgrades it; nothing is changed."""
    engine = make_engine(database_url)
    alembic_upgrade(engine, "0001")
    code, out = check_online(tmp_path, capsys, database={"url": database_url}, fhir={"base_url": fhir_server.base_url})
    assert code == 1
    assert f"schema at revision 0001, this pacs-bridge needs {head_revision()}" in out
    assert "pacs-bridge migrate" in out
    assert current_revision(engine) == "0001"
    engine.dispose()


def test_patient_lookup_checks_that_patients_can_be_searched(
    database_url: str, fhir_server: FhirTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """patient.mode lookup: a Patient search by identifier, as the bridge makes it, must answer."""
    code, out = check_online(
        tmp_path,
        capsys,
        database={"url": database_url},
        fhir={"base_url": fhir_server.base_url},
        patient={"mode": "lookup", "identifier_system": "urn:oid:1.2.3.4"},
    )
    assert code == 0, out
    assert f"ok   patient: POST {fhir_server.base_url}/Patient/_search by identifier: answered (0 matches" in out


def test_a_client_refused_patient_search_fails_with_what_the_mode_needs(
    database_url: str, fhir_server: FhirTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """The server answers metadata but refuses the Patient search (403): FAIL naming what create needs."""
    with HttpFaultProxy(upstream_port=fhir_server.port) as proxy:
        proxy.program(Pass(), Respond(403, body="not allowed to read Patient"))
        code, out = check_online(
            tmp_path,
            capsys,
            database={"url": database_url},
            fhir={"base_url": f"{proxy.root_url}/fhir"},
            patient={"mode": "create", "identifier_system": "urn:oid:1.2.3.4"},
        )
    assert code == 1
    assert "ok   fhir: " in out
    assert "FAIL patient: POST " in out and "HTTP 403" in out
    assert "patient.mode create needs the client to be allowed to search Patients" in out


def test_identifier_mode_makes_no_patient_request(
    database_url: str, fhir_server: FhirTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    code, out = check_online(tmp_path, capsys, database={"url": database_url}, fhir={"base_url": fhir_server.base_url})
    assert code == 0, out
    assert "patient:" not in out


def test_order_lookup_checks_that_service_requests_can_be_searched(
    database_url: str, fhir_server: FhirTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """accession.mode lookup: a ServiceRequest search by identifier, as the bridge makes it, must answer."""
    code, out = check_online(
        tmp_path,
        capsys,
        database={"url": database_url},
        fhir={"base_url": fhir_server.base_url},
        accession={"mode": "lookup", "identifier_system": "http://hospital.example.org/accession"},
    )
    assert code == 0, out
    assert f"ok   order: POST {fhir_server.base_url}/ServiceRequest/_search by identifier: answered (0 matches" in out


def test_a_client_refused_order_search_fails_naming_what_lookup_needs(
    database_url: str, fhir_server: FhirTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """The server answers metadata but refuses the ServiceRequest search (403): FAIL naming what lookup needs."""
    with HttpFaultProxy(upstream_port=fhir_server.port) as proxy:
        proxy.program(Pass(), Respond(403, body="not allowed to read ServiceRequest"))
        code, out = check_online(
            tmp_path,
            capsys,
            database={"url": database_url},
            fhir={"base_url": f"{proxy.root_url}/fhir"},
            accession={"mode": "lookup", "identifier_system": "http://hospital.example.org/accession"},
        )
    assert code == 1
    assert "FAIL order: POST " in out and "HTTP 403" in out
    assert "accession.mode lookup needs the client to be allowed to search ServiceRequests" in out
