"""What the publisher records of subject's and basedOn's links, and the never-downgrade rule, against the real FHIR
test server with the index on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from sqlalchemy import Engine, func, select
from structlog.testing import capture_logs

from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.index.models import StudyLink
from pacs_bridge.index.repository import Index
from pacs_bridge.publish.linking import search_key
from pacs_bridge.publish.publisher import Publisher, PublishOutcome
from pacs_bridge.records import InstanceRecord, Link, SeriesAttributes, StudyAttributes, StudyLinks
from tests.conftest import QUIET, FakeClock
from tests.integration.test_publisher import WADO, make_publisher
from tests.support.fhir_server import FhirTestServer
from tests.support.orders import ACCESSION_SYSTEM, seed_service_request
from tests.support.patients import SYSTEM, seed_patient
from tests.support.studies import uid

pytestmark = pytest.mark.fhir_server

LOOKUP = MappingSettings(
    endpoints=(WADO,),
    patient_identifier_system=SYSTEM,
    patient_mode="lookup",
    accession_identifier_system=ACCESSION_SYSTEM,
    accession_mode="lookup",
)
RELINK = timedelta(minutes=15)
PATIENT_KEY = search_key(f"{SYSTEM}|PAT-0001")
ORDER_KEY = search_key(f"{ACCESSION_SYSTEM}|ACC-0001")


def record(instance: int = 1, **study: str) -> InstanceRecord:
    attributes = {"patient_id": "PAT-0001", "accession_number": "ACC-0001", "study_date": "20240315", **study}
    return InstanceRecord(
        study=StudyAttributes(study_uid=uid("1"), **attributes),
        series=SeriesAttributes(series_uid=uid("1.1"), modality="CT", series_number=1),
        sop_instance_uid=uid(f"1.1.{instance}"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=instance,
    )


def publisher(index: Index, http: httpx.Client, server: FhirTestServer, clock: FakeClock) -> Publisher:
    return make_publisher(index, http, server.base_url, clock, mapping=LOOKUP, relink_interval=RELINK)


def publish(publisher: Publisher, index: Index, clock: FakeClock, instance: int, **attributes: str) -> PublishOutcome:
    index.record_instance(record(instance, **attributes), received_at=clock())
    clock.advance(QUIET)
    return publisher.run_once()[uid("1")]


def test_a_study_published_without_its_patient_and_order_waits_for_the_relink_pass(
    index: Index, http: httpx.Client, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """Neither exists yet: both links are recorded waiting (key, no reference), first looked up relink_seconds
    after the publish."""
    assert publish(publisher(index, http, fresh_fhir_server, clock), index, clock, 1) == PublishOutcome.PUBLISHED

    assert index.links.load(uid("1")) == StudyLinks(
        patient=Link(key=PATIENT_KEY), order=Link(key=ORDER_KEY), relink_at=clock() + RELINK
    )


def test_a_literal_reference_is_never_downgraded_when_the_server_no_longer_finds_it(
    index: Index, http: httpx.Client, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """Published with both references; then a second Patient with the identifier (several matches) and the order
    gone (no match): the next change is published with both references still there, and nothing waits."""
    patient_id = seed_patient(fresh_fhir_server, "PAT-0001")
    order_id = seed_service_request(fresh_fhir_server, "ACC-0001")
    bridge = publisher(index, http, fresh_fhir_server, clock)
    assert publish(bridge, index, clock, 1) == PublishOutcome.PUBLISHED

    seed_patient(fresh_fhir_server, "PAT-0001")
    http.delete(f"{fresh_fhir_server.base_url}/ServiceRequest/{order_id}").raise_for_status()
    with capture_logs() as logs:
        assert publish(bridge, index, clock, 2) == PublishOutcome.PUBLISHED
    kept = [entry for entry in logs if entry["event"] == "reference_kept"]
    assert [(entry["link"], entry["reason"]) for entry in kept] == [
        ("patient", "several_matches"),
        ("order", "no_match"),
    ]
    assert patient_id not in str(kept) and order_id not in str(kept), "no server id (it may be an MRN) in the log"

    study = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert study is not None and study["numberOfInstances"] == 2
    assert study["subject"]["reference"] == f"Patient/{patient_id}"
    assert study["basedOn"][0]["reference"] == f"ServiceRequest/{order_id}"
    assert index.links.load(uid("1")) == StudyLinks(
        patient=Link(key=PATIENT_KEY, reference=f"Patient/{patient_id}"),
        order=Link(key=ORDER_KEY, reference=f"ServiceRequest/{order_id}"),
    )


def test_a_corrected_patient_id_does_not_keep_the_old_patients_reference(
    index: Index, http: httpx.Client, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """The reference belongs to the identifier it was found for: after a corrected PatientID with no Patient yet,
    subject is by the new identifier only, and that link waits."""
    seed_patient(fresh_fhir_server, "PAT-0001")
    bridge = publisher(index, http, fresh_fhir_server, clock)
    assert publish(bridge, index, clock, 1) == PublishOutcome.PUBLISHED

    assert publish(bridge, index, clock, 2, patient_id="PAT-0002") == PublishOutcome.PUBLISHED

    study = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert study is not None
    assert study["subject"] == {"type": "Patient", "identifier": {"system": SYSTEM, "value": "PAT-0002"}}
    links = index.links.load(uid("1"))
    assert links is not None and links.patient == Link(key=search_key(f"{SYSTEM}|PAT-0002"))


def test_a_kept_reference_sends_no_new_version(
    index: Index, http: httpx.Client, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """The Patient gone, a change that leaves the resource as it was (PatientSex, which lookup mode does not map)
    is published UNCHANGED: the kept reference gives the same content hash, and nothing is sent."""
    patient_id = seed_patient(fresh_fhir_server, "PAT-0001")
    bridge = publisher(index, http, fresh_fhir_server, clock)
    assert publish(bridge, index, clock, 1) == PublishOutcome.PUBLISHED
    http.delete(f"{fresh_fhir_server.base_url}/Patient/{patient_id}").raise_for_status()

    assert publish(bridge, index, clock, 1, patient_sex="F") == PublishOutcome.UNCHANGED

    assert fresh_fhir_server.request_counts()["PUT ImagingStudy"] == 1
    assert fresh_fhir_server.versions("ImagingStudy", uid("1")) == 1


def test_identifier_modes_keep_no_links_and_ask_the_index_nothing_more(
    index: Index, engine: Engine, http: httpx.Client, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """The defaults (patient and accession mode identifier) look nothing up: no study_links row is written."""
    identifier_modes = MappingSettings(endpoints=(WADO,), patient_identifier_system=SYSTEM)
    bridge = make_publisher(index, http, fresh_fhir_server.base_url, clock, mapping=identifier_modes)

    assert publish(bridge, index, clock, 1) == PublishOutcome.PUBLISHED

    assert index.links.load(uid("1")) is None
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(StudyLink)).scalar_one() == 0
