"""End to end, one test per patient.mode: DCMTK storescu -> `pacs-bridge run` (subprocess) -> the FHIR test server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pacs_bridge.fhir.patient import PatientMode
from tests.support.bridge_process import BridgeProcess, wait_for
from tests.support.dcmtk import storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.patients import SYSTEM, patients_with, seed_patient
from tests.support.studies import SeriesSpec, new_study_uid, study_datasets, write_file

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk]

PATIENT_ID = "PAT-E2E-0001"


@pytest.fixture
def start_bridge(tmp_path: Path, fresh_fhir_server: FhirTestServer) -> Iterator[Any]:
    """Starts the bridge (SQLite, quiet period 1 s, BridgeProcess's identifier system) in a patient.mode."""
    started: list[BridgeProcess] = []

    def start(mode: PatientMode) -> BridgeProcess:
        bridge = BridgeProcess(
            tmp_path,
            database_url=f"sqlite:///{tmp_path / 'bridge.db'}",
            fhir_base_url=fresh_fhir_server.base_url,
            extra={"patient": {"mode": mode}},
        )
        started.append(bridge)
        return bridge.start()

    yield start
    for bridge in started:
        bridge.close()


def send_study(bridge: BridgeProcess, directory: Path, **patient: str) -> str:
    """storescu one two-instance CT study of PATIENT_ID, with these patient attributes; returns its UID."""
    study_uid = new_study_uid()
    for ds in study_datasets(study_uid, [SeriesSpec("CT", 2)], patient_id=PATIENT_ID):
        for keyword, value in patient.items():
            setattr(ds, keyword, value)
        write_file(ds, directory / study_uid / f"{ds.SOPInstanceUID}.dcm")
    sent = storescu(bridge.port, directory / study_uid)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    return study_uid


def published_study(bridge: BridgeProcess, server: FhirTestServer, study_uid: str) -> dict[str, Any]:
    """The ImagingStudy once the bridge has recorded it published."""
    wait_for(
        lambda: (bridge.study_row(study_uid) or {}).get("publish_state") == "published",
        timeout=30,
        what=f"study {study_uid} to be published",
    )
    study = server.read("ImagingStudy", study_uid)
    assert study is not None, bridge.log()
    return study


def test_identifier_mode_references_the_patient_by_identifier_and_asks_the_server_nothing(
    start_bridge: Any, fresh_fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    """The default: subject is a logical reference by identifier; no Patient is written."""
    bridge = start_bridge("identifier")

    study = published_study(bridge, fresh_fhir_server, send_study(bridge, tmp_path))

    assert study["subject"] == {"type": "Patient", "identifier": {"system": SYSTEM, "value": PATIENT_ID}}
    assert fresh_fhir_server.request_counts() == {"PUT Endpoint": 1, "PUT ImagingStudy": 1}


def test_lookup_mode_references_the_patient_the_ehr_holds(
    start_bridge: Any, fresh_fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    """A Patient seeded as an EHR would: subject references it (and keeps the identifier); it is not changed."""
    patient_id = seed_patient(fresh_fhir_server, PATIENT_ID, name=[{"family": "Doe", "given": ["Jane"]}])
    bridge = start_bridge("lookup")

    study = published_study(bridge, fresh_fhir_server, send_study(bridge, tmp_path))

    assert study["subject"] == {
        "reference": f"Patient/{patient_id}",
        "type": "Patient",
        "identifier": {"system": SYSTEM, "value": PATIENT_ID},
    }
    assert fresh_fhir_server.versions("Patient", patient_id) == 1
    assert fresh_fhir_server.request_counts() == {"POST Patient": 1, "PUT Endpoint": 1, "PUT ImagingStudy": 1}


def test_create_mode_creates_the_patient_once_and_references_it_from_each_study(
    start_bridge: Any, fresh_fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    """The first study creates the Patient from its name, birth date and sex (UTF-8 name decoded); a second
    study of the same patient, with other demographics, references the same Patient and changes nothing."""
    bridge = start_bridge("create")

    first = published_study(
        bridge,
        fresh_fhir_server,
        send_study(bridge, tmp_path, PatientName="Müller^Jürgen", PatientBirthDate="19600229", PatientSex="M"),
    )
    (patient,) = patients_with(fresh_fhir_server, PATIENT_ID)
    assert first["subject"]["reference"] == f"Patient/{patient['id']}"
    assert (patient["name"], patient["gender"], patient["birthDate"]) == (
        [{"text": "Jürgen Müller", "family": "Müller", "given": ["Jürgen"]}],
        "male",
        "1960-02-29",
    )

    second = published_study(
        bridge,
        fresh_fhir_server,
        send_study(bridge, tmp_path, PatientName="Mueller^Juergen", PatientBirthDate="19600301", PatientSex="O"),
    )

    assert second["subject"] == first["subject"]
    assert [found["id"] for found in patients_with(fresh_fhir_server, PATIENT_ID)] == [patient["id"]]
    assert fresh_fhir_server.versions("Patient", patient["id"]) == 1
    unchanged = fresh_fhir_server.read("Patient", patient["id"])
    assert unchanged is not None and unchanged["name"] == patient["name"]
    # Two conditional creates sent, one Patient written; one Endpoint, one ImagingStudy per study.
    assert fresh_fhir_server.request_counts() == {"POST Patient": 2, "PUT Endpoint": 1, "PUT ImagingStudy": 2}
    log = bridge.log()
    assert '"event": "patient_created"' in log
    assert PATIENT_ID not in log and "Müller" not in log and "Mueller" not in log, "patient data in the log"
