"""The accession number end to end (issue 15 item 1): the index keeps its issuer (SQLite and PostgreSQL), and the
real FHIR server finds the published study by ``ImagingStudy?identifier=<accession number>``."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest
from structlog.testing import capture_logs

from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.index.repository import Index
from pacs_bridge.metrics import BridgeMetrics
from pacs_bridge.publish.publisher import PublishOutcome
from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes
from tests.conftest import QUIET, FakeClock
from tests.integration.test_publisher import WADO, make_publisher
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import uid

OURS = "http://hospital.example.org/accession"


def record(
    study: str = "1", instance: int = 1, *, accession: str = "ACC-0001", local: str = "", universal: str = ""
) -> InstanceRecord:
    return InstanceRecord(
        study=StudyAttributes(
            study_uid=uid(study),
            patient_id="PAT-0001",
            issuer_of_patient_id="HOSP-A",
            accession_number=accession,
            accession_issuer_local_id=local,
            accession_issuer_universal_id=universal,
            study_date="20240315",
        ),
        series=SeriesAttributes(series_uid=uid(f"{study}.1"), modality="CT"),
        sop_instance_uid=uid(f"{study}.1.{instance}"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )


def test_the_accession_issuer_survives_the_index_round_trip(index: Index, clock: FakeClock) -> None:
    index.record_instance(record(local="RIS-B", universal="1.2.3.6"), received_at=clock())

    attributes = index.load_snapshot(uid("1")).attributes

    assert (attributes.accession_issuer_local_id, attributes.accession_issuer_universal_id) == ("RIS-B", "1.2.3.6")


def test_a_later_instance_without_issuers_keeps_them_while_the_identifiers_stay(index: Index, clock: FakeClock) -> None:
    """A presentation state made later without IssuerOfPatientID or the accession's issuer does not turn the
    study's identifiers into ones without issuer (which would take the configured systems)."""
    index.record_instance(record(local="RIS-B", universal="1.2.3.6"), received_at=clock())
    later = record(instance=2)
    later = replace(later, study=replace(later.study, issuer_of_patient_id=""))

    index.record_instance(later, received_at=clock())

    attributes = index.load_snapshot(uid("1")).attributes
    assert attributes.issuer_of_patient_id == "HOSP-A"
    assert (attributes.accession_issuer_local_id, attributes.accession_issuer_universal_id) == ("RIS-B", "1.2.3.6")


def test_a_new_identifier_takes_its_own_instances_issuer(index: Index, clock: FakeClock) -> None:
    """A corrected PatientID or accession number without an issuer does not inherit the old value's issuer."""
    index.record_instance(record(local="RIS-B"), received_at=clock())
    corrected = record(instance=2, accession="ACC-0002")
    corrected = replace(corrected, study=replace(corrected.study, patient_id="PAT-0009", issuer_of_patient_id=""))

    index.record_instance(corrected, received_at=clock())

    attributes = index.load_snapshot(uid("1")).attributes
    assert (attributes.patient_id, attributes.issuer_of_patient_id) == ("PAT-0009", "")
    assert (attributes.accession_number, attributes.accession_issuer_local_id) == ("ACC-0002", "")


@pytest.mark.fhir_server
def test_the_published_study_is_found_by_its_accession_number(
    index: Index, http: httpx.Client, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """The FHIR server guide's own search, identifier=ACC123456, and system|value, find the study; a study of an
    unmapped RIS is found by value alone, and the log and the metric name that RIS."""
    mapping = MappingSettings(endpoints=(WADO,), accession_identifier_system=OURS)
    metrics = BridgeMetrics(index.count_by_state)
    index.record_instance(record("1"), received_at=clock())
    index.record_instance(record("2", accession="ACC-0002", local="RIS-C"), received_at=clock())
    clock.advance(QUIET)

    with capture_logs() as logs:
        outcomes = make_publisher(
            index, http, fresh_fhir_server.base_url, clock, mapping=mapping, observer=metrics
        ).run_once()

    assert outcomes == {uid("1"): PublishOutcome.PUBLISHED, uid("2"): PublishOutcome.PUBLISHED}

    def found(token: str) -> list[str]:
        return [study["id"] for study in fresh_fhir_server.search("ImagingStudy", identifier=token)]

    assert found("ACC-0001") == [uid("1")]
    assert found(f"{OURS}|ACC-0001") == [uid("1")]
    assert found("ACC-0002") == [uid("2")]
    assert found(f"{OURS}|ACC-0002") == [], "RIS-C's number is not put into our namespace"
    assert found(f"urn:dicom:uid|urn:oid:{uid('1')}") == [uid("1")], "the Study UID still finds it"
    unknown = [
        (entry["identifier"], entry["issuer"]) for entry in logs if entry["event"] == "identifier_issuer_unknown"
    ]
    assert [issuer for identifier, issuer in unknown if identifier == "accession"] == ["RIS-C"]
    assert b'pacs_bridge_accession_issuer_unknown_total{issuer="RIS-C"} 1.0' in metrics.render()
