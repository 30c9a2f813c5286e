"""The searches a SMART Imaging Access app makes (Argonaut draft 0.1.0, "Finding studies"), against the real FHIR
server, for a study the publisher sent with patient.mode lookup: what docs/mapping.md "Conformance" claims."""

from __future__ import annotations

import httpx
import pytest

from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.index.repository import Index
from pacs_bridge.publish.publisher import PublishOutcome
from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes
from tests.conftest import QUIET, FakeClock
from tests.integration.test_publisher import WADO, make_publisher
from tests.support.fhir_server import FhirTestServer
from tests.support.patients import SYSTEM, seed_patient
from tests.support.studies import uid

pytestmark = pytest.mark.fhir_server


def sr_only_study() -> InstanceRecord:
    return InstanceRecord(
        study=StudyAttributes(
            study_uid=uid("1"), patient_id="PAT-0001", accession_number="ACC-1", study_date="20240315"
        ),
        series=SeriesAttributes(series_uid=uid("1.1"), modality="SR"),
        sop_instance_uid=uid("1.1.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
    )


def test_a_smart_app_finds_the_study_by_patient_and_by_study_uid_with_its_endpoint(
    index: Index, http: httpx.Client, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """patient=<id>&_include=ImagingStudy:endpoint gives the study and its WADO-RS Endpoint; patient=<id>&
    identifier=urn:oid:<UID> gives the study; in IHE IMR mode a lone SR study still carries modality (1..*)."""
    patient_id = seed_patient(fresh_fhir_server, "PAT-0001")
    mapping = MappingSettings(
        endpoints=(WADO,), patient_identifier_system=SYSTEM, patient_mode="lookup", profile="ihe-imr"
    )
    index.record_instance(sr_only_study(), received_at=clock())
    clock.advance(QUIET)

    assert make_publisher(index, http, fresh_fhir_server.base_url, clock, mapping=mapping).run_once() == {
        uid("1"): PublishOutcome.PUBLISHED
    }

    listed = fresh_fhir_server.search("ImagingStudy", patient=patient_id, _include="ImagingStudy:endpoint")
    assert sorted((resource["resourceType"], resource["id"]) for resource in listed) == [
        ("Endpoint", WADO.id),
        ("ImagingStudy", uid("1")),
    ]
    (study,) = [resource for resource in listed if resource["resourceType"] == "ImagingStudy"]
    assert study["modality"] == [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "SR"}]
    assert [
        resource["id"]
        for resource in fresh_fhir_server.search("ImagingStudy", patient=patient_id, identifier=f"urn:oid:{uid('1')}")
    ] == [uid("1")]
