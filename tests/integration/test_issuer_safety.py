"""A patient of an issuer the configuration does not map is never searched, linked or created (issue 20).

patient.identifier_system names one namespace. Without a patient.issuers table, a study naming an
IssuerOfPatientID used to have its PatientID put in that namespace, so lookup linked (and create made) the
Patient of another hospital who happens to share the number. Publisher, index (SQLite and PostgreSQL) and the real
FHIR server, through a proxy that records every request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.fhir.patient import PatientMode
from pacs_bridge.index.repository import Index
from pacs_bridge.metrics import BridgeMetrics
from pacs_bridge.publish.publisher import PublishOutcome
from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes
from tests.conftest import QUIET, FakeClock
from tests.integration.test_publish_outage import publisher
from tests.integration.test_publisher import WADO
from tests.support.fault_proxy import HttpFaultProxy
from tests.support.fhir_server import FhirTestServer
from tests.support.patients import SYSTEM, patients_with, seed_patient
from tests.support.studies import uid

pytestmark = pytest.mark.fhir_server


def study_of(issuer: str) -> InstanceRecord:
    return InstanceRecord(
        study=StudyAttributes(
            study_uid=uid("1"),
            patient_id="PAT-0001",
            issuer_of_patient_id=issuer,
            patient_name="Doe^Jane",
            study_date="20240315",
        ),
        series=SeriesAttributes(series_uid=uid("1.1"), modality="CT"),
        sop_instance_uid=uid("1.1.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )


def unknown_issuer_events(logs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {key: entry[key] for key in ("study_uid", "identifier", "issuer")}
        for entry in logs
        if entry["event"] == "identifier_issuer_unknown"
    ]


def patient_requests(proxy: HttpFaultProxy) -> list[str]:
    return [f"{request.method} {request.path}" for request in proxy.requests if "/Patient" in request.path]


@pytest.mark.parametrize("mode", ["lookup", "create"])
def test_a_study_naming_an_unmapped_issuer_is_never_linked_searched_or_created(
    index: Index,
    http: httpx.Client,
    proxy: HttpFaultProxy,
    clock: FakeClock,
    fresh_fhir_server: FhirTestServer,
    mode: PatientMode,
) -> None:
    """identifier_system set, no issuers table, IssuerOfPatientID HOSP-B: our PAT-0001 is not HOSP-B's, so no
    Patient request at all; subject keeps the value with HOSP-B as assigner; a log line and the metric name HOSP-B."""
    ours = seed_patient(fresh_fhir_server, "PAT-0001")  # our own patient who happens to share the number
    metrics = BridgeMetrics(index.count_by_state)
    mapping = MappingSettings(endpoints=(WADO,), patient_identifier_system=SYSTEM, patient_mode=mode)
    index.record_instance(study_of("HOSP-B"), received_at=clock())
    clock.advance(QUIET)

    with capture_logs() as logs:
        outcome = publisher(index, http, proxy, clock, mapping=mapping, observer=metrics).run_once()

    assert outcome == {uid("1"): PublishOutcome.PUBLISHED}
    assert patient_requests(proxy) == [], "no Patient searched or created"
    study = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert study is not None
    assert study["subject"] == {
        "type": "Patient",
        "identifier": {"value": "PAT-0001", "assigner": {"display": "HOSP-B"}},
    }
    assert [patient["id"] for patient in patients_with(fresh_fhir_server, "PAT-0001")] == [ours]
    assert unknown_issuer_events(logs) == [{"study_uid": uid("1"), "identifier": "patient", "issuer": "HOSP-B"}]
    assert [(entry["reason"], entry["issuer"]) for entry in logs if entry["event"] == "patient_lookup_fallback"] == [
        ("issuer_not_mapped", "HOSP-B")
    ]
    assert b'pacs_bridge_patient_issuer_unknown_total{issuer="HOSP-B"} 1.0' in metrics.render()
    assert not any("PAT-0001" in str(entry) for entry in logs), "the PatientID is never logged"


def test_a_study_naming_no_issuer_is_still_linked_in_the_configured_system(
    index: Index, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """The control: no IssuerOfPatientID, identifier_system applies, lookup links the one Patient; nothing logged."""
    ours = seed_patient(fresh_fhir_server, "PAT-0001")
    mapping = MappingSettings(endpoints=(WADO,), patient_identifier_system=SYSTEM, patient_mode="lookup")
    index.record_instance(study_of(""), received_at=clock())
    clock.advance(QUIET)

    with capture_logs() as logs:
        outcome = publisher(index, http, proxy, clock, mapping=mapping).run_once()

    assert outcome == {uid("1"): PublishOutcome.PUBLISHED}
    study = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert study is not None and study["subject"]["reference"] == f"Patient/{ours}"
    assert study["subject"]["identifier"] == {"system": SYSTEM, "value": "PAT-0001"}
    assert unknown_issuer_events(logs) == []


def test_an_issuer_mapped_to_the_configured_system_is_linked(
    index: Index, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """A site's own issuer listed in patient.issuers with its system: searched and linked as before."""
    ours = seed_patient(fresh_fhir_server, "PAT-0001")
    mapping = MappingSettings(
        endpoints=(WADO,),
        patient_identifier_system=SYSTEM,
        patient_issuer_systems={"HOSP-A": SYSTEM},
        patient_mode="lookup",
    )
    index.record_instance(study_of("HOSP-A"), received_at=clock())
    clock.advance(QUIET)

    assert publisher(index, http, proxy, clock, mapping=mapping).run_once() == {uid("1"): PublishOutcome.PUBLISHED}
    study = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert study is not None and study["subject"]["reference"] == f"Patient/{ours}"
