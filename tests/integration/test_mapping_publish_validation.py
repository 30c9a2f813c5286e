"""Validation before sending, through the real publisher, index (SQLite and PostgreSQL) and FHIR test server:
an invalid resource is never sent and its study is marked failed with the reason; a valid one is published."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from io import BytesIO

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacs_bridge.debounce import RetrySettings
from pacs_bridge.dicom.extract import extract_instance
from pacs_bridge.dicom.header import read_header
from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.endpoint import EndpointSettings
from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.index.models import PublishState
from pacs_bridge.index.repository import Index
from pacs_bridge.publish.publisher import Publisher, PublishOutcome
from tests.conftest import QUIET, FakeClock
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import make_dataset, uid
from tests.unit.test_extract import encode, from_wire

pytestmark = pytest.mark.fhir_server

WADO = EndpointSettings(id="pacs-wado-rs", connection_type="dicom-wado-rs", address="https://pacs.example.org/wado")
MAPPING = MappingSettings(endpoints=(WADO,), patient_identifier_system="urn:oid:1.2.3.4")
RETRY = RetrySettings(base=timedelta(seconds=10), cap=timedelta(minutes=5), jitter_fraction=0.0)


def publisher_for(
    index: Index, http: httpx.Client, server: FhirTestServer, clock: FakeClock, mapping: MappingSettings
) -> Publisher:
    return Publisher(
        index=index,
        fhir=FhirClient(http, base_url=server.base_url),
        mapping=mapping,
        retry=RETRY,
        clock=clock,
        claimer="test",
        random_fraction=lambda: 0.5,
    )


def receive(index: Index, clock: FakeClock, **overrides: object) -> str:
    """One instance through the listener's reader and extract into the index; returns the study UID."""
    ds = make_dataset(
        StudyInstanceUID=uid("60"),
        SeriesInstanceUID=uid("60.1"),
        SOPInstanceUID=uid("60.1.1"),
        ReferringPhysicianName="Doe^Jane",
        BodyPartExamined="CHEST",
        **overrides,
    )
    record = extract_instance(read_header(BytesIO(encode(ds)), ExplicitVRLittleEndian))
    index.record_instance(record, received_at=clock())
    return record.study.study_uid


def status_of(index: Index, study_uid: str) -> tuple[str, str | None]:
    """The study's publish state and last error, as the operator sees them."""
    status = index.study_status(study_uid)
    assert status is not None
    return status.publish_state, status.last_error


def test_valid_study_is_validated_and_published(
    index: Index, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock
) -> None:
    """The usual case: validation passes silently and the study lands on the server."""
    study_uid = receive(index, clock)
    clock.advance(QUIET)

    outcome = publisher_for(index, http, fresh_fhir_server, clock, MAPPING).run_once()

    assert outcome == {study_uid: PublishOutcome.PUBLISHED}
    stored = fresh_fhir_server.read("ImagingStudy", study_uid)
    assert stored is not None and stored["referrer"]["display"] == "Jane Doe"


def test_misconfigured_identifier_system_is_not_sent_and_the_study_fails_with_the_reason(
    index: Index, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock
) -> None:
    """A uri with a space: no request reaches the server; last_error names the element."""
    study_uid = receive(index, clock)
    clock.advance(QUIET)
    mapping = dataclasses.replace(MAPPING, patient_identifier_system="HOSP A")

    outcome = publisher_for(index, http, fresh_fhir_server, clock, mapping).run_once()

    assert outcome == {study_uid: PublishOutcome.FAILED}
    assert fresh_fhir_server.request_counts() == {}
    state, error = status_of(index, study_uid)
    assert state == PublishState.FAILED
    assert error is not None and "subject.identifier.system: a uri may not contain whitespace" in error


def test_control_character_from_the_wire_is_not_sent_and_the_study_fails(
    index: Index, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock
) -> None:
    """A StudyDescription with a raw control byte is indexed, then refused before sending, naming the element."""
    ds = from_wire(
        make_dataset(StudyInstanceUID=uid("61"), SeriesInstanceUID=uid("61.1"), SOPInstanceUID=uid("61.1.1")),
        StudyDescription=b"CT\x01chest ",
    )
    index.record_instance(extract_instance(ds), received_at=clock())
    clock.advance(QUIET)

    outcome = publisher_for(index, http, fresh_fhir_server, clock, MAPPING).run_once()

    assert outcome == {uid("61"): PublishOutcome.FAILED}
    assert fresh_fhir_server.request_counts() == {}
    state, error = status_of(index, uid("61"))
    assert state == PublishState.FAILED
    assert error is not None and "description: contains a control character" in error
