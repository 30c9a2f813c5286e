"""No patient data in the bridge's output at any log level, third-party loggers included.

A bridge at ``logging.level: debug`` (patient.mode create, so the publisher searches and creates the Patient on
the FHIR server) receives a study through DCMTK's storescu whose patient attributes carry markers, plus a
refused instance of the same patient; once the study is published, its whole output (stdout and stderr, every
logger) is searched for each marker, in the spellings a log line could hold it in.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bridge_process import BridgeProcess, wait_for
from tests.support.dcmtk import storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.patients import patients_with
from tests.support.studies import SeriesSpec, new_study_uid, study_datasets, write_file

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk]

PATIENT_NAME = "Zebra^Quokka"
PATIENT_ID = "PHI-MARK-7731"
BIRTH_DATE = "19370512"
ACCESSION = "ACC-MARK-5521"
# Each marker as any log line could spell it: raw, FHIR (family/given, ISO date), URL-encoded, JSON-escaped.
MARKERS = ("zebra", "quokka", "phi-mark-7731", "phi%2dmark", "1937-05-12", "19370512", "acc-mark-5521")


@pytest.fixture
def bridge(tmp_path: Path, database_url: str, fresh_fhir_server: FhirTestServer) -> Iterator[BridgeProcess]:
    """A bridge at debug level on the test's database (SQLite, then PostgreSQL), creating Patients."""
    running = BridgeProcess(
        tmp_path,
        database_url=database_url,
        fhir_base_url=fresh_fhir_server.base_url,
        extra={"logging": {"level": "debug"}, "patient": {"mode": "create"}},
    )
    try:
        yield running.start()
    finally:
        running.close()


def marked_study(directory: Path) -> tuple[str, Path]:
    """A two-instance CT study of the marked patient, written to ``directory``, and a third instance of the same
    patient that the bridge refuses (a NUL inside its PatientID)."""
    study_uid = new_study_uid()
    for ds in study_datasets(study_uid, [SeriesSpec("CT", 2)], patient_id=PATIENT_ID, accession=ACCESSION):
        ds.PatientName = PATIENT_NAME
        ds.PatientBirthDate = BIRTH_DATE
        ds.PatientSex = "F"
        write_file(ds, directory / "study" / f"{ds.SOPInstanceUID}.dcm")
    (refused,) = study_datasets(study_uid, [SeriesSpec("CT", 1)], patient_id=f"{PATIENT_ID}\x00X", accession=ACCESSION)
    refused.PatientName = PATIENT_NAME
    refused.SOPInstanceUID = f"{study_uid}.99.1"
    return study_uid, write_file(refused, directory / "refused" / "refused.dcm")


def test_debug_output_holds_no_patient_name_id_birth_date_or_accession(
    bridge: BridgeProcess, fresh_fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    """The study is stored, the Patient created and the study published; the refused instance gets 0xC000; the
    output at debug level holds none of the markers, while it does show the work by UIDs."""
    study_uid, refused = marked_study(tmp_path)

    sent = storescu(bridge.port, tmp_path / "study")
    refusal = storescu(bridge.port, refused)
    wait_for(
        lambda: (bridge.study_row(study_uid) or {}).get("publish_state") == "published",
        timeout=60,
        what="the marked study to be published",
    )
    bridge.stop()

    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "Received Store Response (Error: CannotUnderstand)" in refusal.stdout + refusal.stderr  # 0xC000
    assert len(patients_with(fresh_fhir_server, PATIENT_ID)) == 1  # the publisher did search and create it
    output = bridge.log()
    assert study_uid in output and '"level": "debug"' in output  # the output is the debug one, and about the study
    leaked = {marker for marker in MARKERS if re.search(re.escape(marker), output, re.IGNORECASE)}
    assert not leaked, [line for line in output.splitlines() if any(m in line.lower() for m in leaked)][:10]
