"""Issue 20's acceptance, end to end: DCMTK storescu sends a study naming an issuer the configuration does not map,
a requested reason given as text and code, and an unmapped body part, to `pacs-bridge run` in lookup mode; the
real FHIR server receives what the standards say, and the operator sees the unknown issuer in the log and the
metrics."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset

from tests.support.bridge_process import BridgeProcess, free_port, log_events, wait_for
from tests.support.dcmtk import storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.patients import SYSTEM, patients_with, seed_patient
from tests.support.studies import SeriesSpec, new_study_uid, study_datasets, write_file

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk]

ACCESSION_SYSTEM = "urn:oid:1.2.3.5"


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def request_attributes() -> Dataset:
    request = Dataset()
    request.ReasonForTheRequestedProcedure = "Persistent cough"
    request.ReasonForRequestedProcedureCodeSequence = [code_item("49727002", "SCT", "Cough")]
    return request


def accession_issuer(local: str) -> Dataset:
    item = Dataset()
    item.LocalNamespaceEntityID = local
    return item


def test_unknown_issuer_coded_reason_and_unmapped_body_part_reach_the_server_as_the_standards_say(
    tmp_path: Path, fresh_fhir_server: FhirTestServer
) -> None:
    """HOSP-B's PAT-0001 is not our PAT-0001: no link, assigner HOSP-B, a log line and the metric; the reason is one
    concept; TORSO gives no R4 bodySite; the accession is in identifier with its RIS's system."""
    ours = seed_patient(fresh_fhir_server, "PAT-0001")
    metrics_port = free_port()
    bridge = BridgeProcess(
        tmp_path,
        database_url=f"sqlite:///{tmp_path / 'bridge.db'}",
        fhir_base_url=fresh_fhir_server.base_url,
        extra={
            "patient": {"mode": "lookup"},  # identifier_system set by BridgeProcess; no issuers table
            "accession": {"issuers": {"RIS-A": ACCESSION_SYSTEM}},
            "http": {"bind": "127.0.0.1", "port": metrics_port},
        },
    ).start()
    try:
        study_uid = new_study_uid()
        for ds in study_datasets(study_uid, [SeriesSpec("CT", 2)], patient_id="PAT-0001", accession="ACC-9"):
            ds.IssuerOfPatientID = "HOSP-B"
            ds.IssuerOfAccessionNumberSequence = [accession_issuer("RIS-A")]
            ds.RequestAttributesSequence = [request_attributes()]
            ds.BodyPartExamined = "TORSO"
            write_file(ds, tmp_path / "study" / f"{ds.SOPInstanceUID}.dcm")

        sent = storescu(bridge.port, tmp_path / "study")

        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_for(
            lambda: (bridge.study_row(study_uid) or {}).get("publish_state") == "published",
            timeout=30,
            what="the study to be published",
        )
        study = fresh_fhir_server.read("ImagingStudy", study_uid)
        assert study is not None
        assert study["subject"] == {
            "type": "Patient",
            "identifier": {"value": "PAT-0001", "assigner": {"display": "HOSP-B"}},
        }
        assert [patient["id"] for patient in patients_with(fresh_fhir_server, "PAT-0001", system=SYSTEM)] == [ours]
        assert study["reasonCode"] == [
            {"coding": [{"system": "http://snomed.info/sct", "code": "49727002"}], "text": "Persistent cough"}
        ]
        assert ["bodySite" in series for series in study["series"]] == [False]
        acsn = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
        assert study["identifier"][1] == {"type": acsn, "system": ACCESSION_SYSTEM, "value": "ACC-9"}
        assert [study["id"] for study in fresh_fhir_server.search("ImagingStudy", identifier="ACC-9")] == [study_uid]

        unknown = log_events(bridge.log(), "identifier_issuer_unknown")
        assert [(entry["identifier"], entry["issuer"]) for entry in unknown] == [("patient", "HOSP-B")]
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10, trust_env=False).text
        assert 'pacs_bridge_patient_issuer_unknown_total{issuer="HOSP-B"} 1.0' in metrics
        assert "PAT-0001" not in bridge.log(), "the PatientID is never logged"
    finally:
        bridge.close()
