"""patient.mode lookup and create against the real FHIR test server: PatientResolver, then the publisher."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import Engine
from structlog.testing import capture_logs

from pacs_bridge.cli import main
from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.fhir.patient import PatientMode
from pacs_bridge.index.repository import Index
from pacs_bridge.publish.patients import PatientResolver
from pacs_bridge.publish.publisher import Publisher, PublishOutcome
from pacs_bridge.reconcile import reconcile
from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes
from tests.conftest import QUIET, FakeClock
from tests.integration.test_publish_outage import publisher as outage_publisher
from tests.integration.test_publish_outage import study_row
from tests.integration.test_publisher import RETRY
from tests.support.fault_proxy import HttpFaultProxy, Pass, Respond
from tests.support.fhir_server import FhirTestServer
from tests.support.patients import SYSTEM, patients_with, seed_patient
from tests.support.studies import uid

pytestmark = pytest.mark.fhir_server

JANE = StudyAttributes(
    study_uid=uid("1"),
    patient_id="PAT-0001",
    patient_name="Doe^Jane",
    patient_birth_date="19700102",
    patient_sex="F",
)


def mapping(mode: PatientMode, **kwargs: Any) -> MappingSettings:
    return MappingSettings(patient_identifier_system=SYSTEM, patient_mode=mode, **kwargs)


def resolver(http: httpx.Client, server: FhirTestServer, mode: PatientMode, **kwargs: Any) -> PatientResolver:
    return PatientResolver(FhirClient(http, base_url=server.base_url), mapping(mode, **kwargs))


def fallbacks(logs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {key: value for key, value in entry.items() if key != "log_level"}
        for entry in logs
        if entry["event"] == "patient_lookup_fallback"
    ]


# ---- lookup ----------------------------------------------------------------------------------------------------


def test_lookup_references_the_single_matching_patient(http: httpx.Client, fresh_fhir_server: FhirTestServer) -> None:
    """One Patient with system|value: its literal reference; another issuer's same number is not a match."""
    patient_id = seed_patient(fresh_fhir_server, "PAT-0001")
    seed_patient(fresh_fhir_server, "PAT-0001", system="urn:oid:9.9.9")  # same number, other issuer
    seed_patient(fresh_fhir_server, "PAT-0002")

    with capture_logs() as logs:
        reference = resolver(http, fresh_fhir_server, "lookup").reference(JANE)

    assert reference == f"Patient/{patient_id}"
    assert fallbacks(logs) == []
    assert fresh_fhir_server.request_counts() == {"POST Patient": 3}, "lookup writes nothing"


@pytest.mark.parametrize(("seeded", "reason"), [(0, "no_match"), (2, "several_matches")])
def test_lookup_without_exactly_one_match_falls_back_to_the_identifier_and_says_so(
    http: httpx.Client, fresh_fhir_server: FhirTestServer, seeded: int, reason: str
) -> None:
    """0 or 2 matches: no reference (subject stays by identifier), one warning with the study UID and the count,
    and no patient data in it."""
    for _ in range(seeded):
        seed_patient(fresh_fhir_server, "PAT-0001")

    with capture_logs() as logs:
        reference = resolver(http, fresh_fhir_server, "lookup").reference(JANE)

    assert reference is None
    assert fallbacks(logs) == [
        {
            "event": "patient_lookup_fallback",
            "study_uid": uid("1"),
            "mode": "lookup",
            "reason": reason,
            "matches": seeded,
        }
    ]


def test_an_identifier_without_system_is_never_searched(http: httpx.Client, fresh_fhir_server: FhirTestServer) -> None:
    """An issuer missing from patient.issuers gives no system: no search (the same number may be another
    issuer's patient), so even a Patient with that bare value is not referenced."""
    seed_patient(fresh_fhir_server, "PAT-0001", system="urn:oid:1.2.3.4")  # HOSP-A's patient with that number
    study = StudyAttributes(study_uid=uid("1"), patient_id="PAT-0001", issuer_of_patient_id="HOSP-C")

    with capture_logs() as logs:
        reference = resolver(
            http, fresh_fhir_server, "create", patient_issuer_systems={"HOSP-A": "urn:oid:1.2.3.4"}
        ).reference(study)

    assert reference is None
    assert [(entry["reason"], entry["issuer"], entry["mode"]) for entry in fallbacks(logs)] == [
        ("issuer_not_mapped", "HOSP-C", "create")
    ]
    assert fresh_fhir_server.request_counts() == {"POST Patient": 1}, "only the seeding: nothing created"


# ---- create ----------------------------------------------------------------------------------------------------


def test_create_makes_the_patient_once_from_the_study(http: httpx.Client, fresh_fhir_server: FhirTestServer) -> None:
    """A new patient: one Patient with identifier, name, gender and birth date, id assigned by the server; the
    next study of the same patient gets the same reference and no second Patient."""
    patients = resolver(http, fresh_fhir_server, "create")

    with capture_logs() as logs:
        first = patients.reference(JANE)
        second = patients.reference(StudyAttributes(study_uid=uid("2"), patient_id="PAT-0001"))

    (created,) = patients_with(fresh_fhir_server, "PAT-0001")
    assert first == second == f"Patient/{created['id']}"
    assert {key: value for key, value in created.items() if key not in ("id", "meta")} == {
        "resourceType": "Patient",
        "identifier": [{"system": SYSTEM, "value": "PAT-0001"}],
        "name": [{"text": "Jane Doe", "family": "Doe", "given": ["Jane"]}],
        "gender": "female",
        "birthDate": "1970-01-02",
    }
    assert created["meta"]["versionId"] == "1"
    assert [entry["event"] for entry in logs] == ["patient_created"]
    assert logs[0]["study_uid"] == uid("1")


def test_create_never_changes_an_existing_patient(http: httpx.Client, fresh_fhir_server: FhirTestServer) -> None:
    """A Patient the EHR already holds, with other demographics: referenced as it is, still version 1."""
    existing: dict[str, Any] = {
        "name": [{"family": "Doe-Smith", "given": ["Janet"]}],
        "gender": "unknown",
        "birthDate": "1970-01-01",
    }
    patient_id = seed_patient(fresh_fhir_server, "PAT-0001", **existing)

    reference = resolver(http, fresh_fhir_server, "create").reference(JANE)

    assert reference == f"Patient/{patient_id}"
    assert fresh_fhir_server.versions("Patient", patient_id) == 1
    stored = fresh_fhir_server.read("Patient", patient_id)
    assert stored is not None
    assert {key: stored[key] for key in existing} == existing
    assert len(patients_with(fresh_fhir_server, "PAT-0001")) == 1


def test_create_with_several_matches_falls_back_to_the_identifier(
    http: httpx.Client, fresh_fhir_server: FhirTestServer
) -> None:
    """Two Patients carry the identifier: the server refuses to choose (412), and so do we."""
    ids = {seed_patient(fresh_fhir_server, "PAT-0001") for _ in range(2)}

    with capture_logs() as logs:
        reference = resolver(http, fresh_fhir_server, "create").reference(JANE)

    assert reference is None
    assert [(entry["reason"], entry["study_uid"]) for entry in fallbacks(logs)] == [("several_matches", uid("1"))]
    assert {patient["id"] for patient in patients_with(fresh_fhir_server, "PAT-0001")} == ids


def test_create_reads_the_id_when_the_server_returns_no_body(fresh_fhir_server: FhirTestServer) -> None:
    """With Prefer: return=minimal the server answers 201 with Location only, and 200 with nothing at all
    (the Patient existed): the id comes from Location, else from a search."""

    def prefer_minimal_creates(request: httpx.Request) -> None:
        if request.method == "POST" and request.url.path.endswith("/Patient"):  # not the search
            request.headers["Prefer"] = "return=minimal"

    with httpx.Client(timeout=10, trust_env=False, event_hooks={"request": [prefer_minimal_creates]}) as minimal:
        patients = resolver(minimal, fresh_fhir_server, "create")
        created = patients.reference(JANE)
        found = patients.reference(JANE)

    (patient,) = patients_with(fresh_fhir_server, "PAT-0001")
    assert created == found == f"Patient/{patient['id']}"


def test_create_escapes_a_patient_id_with_query_characters(
    http: httpx.Client, fresh_fhir_server: FhirTestServer
) -> None:
    """A PatientID with '&', '+', '#' and a space stays one value in If-None-Exist: created once, found again."""
    study = StudyAttributes(study_uid=uid("1"), patient_id="A+B 1&2#3")
    patients = resolver(http, fresh_fhir_server, "create")

    first = patients.reference(study)
    second = patients.reference(study)

    (patient,) = patients_with(fresh_fhir_server, "A+B 1&2#3")
    assert first == second == f"Patient/{patient['id']}"
    assert patient["identifier"] == [{"system": SYSTEM, "value": "A+B 1&2#3"}]


# ---- through the publisher -------------------------------------------------------------------------------------


def record(patient_name: str = "Doe^Jane") -> InstanceRecord:
    return InstanceRecord(
        study=StudyAttributes(
            study_uid=uid("1"),
            patient_id="PAT-0001",
            patient_name=patient_name,
            patient_sex="F",
            study_date="20240315",
            study_time="1015",
        ),
        series=SeriesAttributes(series_uid=uid("1.1"), modality="CT", series_number=1),
        sop_instance_uid=uid("1.1.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=1,
    )


def publisher(index: Index, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock) -> Publisher:
    return outage_publisher(index, http, proxy, clock, mapping=mapping("create"))


def test_a_failed_patient_create_is_retried_like_any_publish_failure(
    index: Index,
    engine: Engine,
    http: httpx.Client,
    proxy: HttpFaultProxy,
    clock: FakeClock,
    fresh_fhir_server: FhirTestServer,
) -> None:
    """503 on the Patient's create: pending with backoff, no ImagingStudy; the next attempt creates the Patient
    and the ImagingStudy references it."""
    proxy.program(Respond(503, body="busy"))
    publish = publisher(index, http, proxy, clock)
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)

    assert publish.run_once() == {uid("1"): PublishOutcome.RETRY_SCHEDULED}
    row = study_row(engine)
    assert (row.publish_state, row.attempts) == ("pending", 1)
    assert row.last_error == "HTTP 503: conditional create of the study's Patient: busy"
    assert fresh_fhir_server.read("ImagingStudy", uid("1")) is None
    assert [request.fault for request in proxy.requests] == ["503"], "nothing sent after the Patient failed"

    clock.advance(RETRY.cap)
    assert publish.run_once() == {uid("1"): PublishOutcome.PUBLISHED}
    (patient,) = patients_with(fresh_fhir_server, "PAT-0001")
    study = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert study is not None and study["subject"]["reference"] == f"Patient/{patient['id']}"


def test_a_refused_patient_create_marks_the_study_failed_with_the_reason(
    index: Index,
    engine: Engine,
    http: httpx.Client,
    proxy: HttpFaultProxy,
    clock: FakeClock,
    fresh_fhir_server: FhirTestServer,
) -> None:
    """A 4xx on the Patient's create is a refusal: failed, the server's reason shown, no ImagingStudy."""
    outcome = '{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"forbidden",'
    outcome += '"diagnostics":"this client may not create Patients"}]}'
    proxy.program(Respond(403, body=outcome), Pass())
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)

    assert publisher(index, http, proxy, clock).run_once() == {uid("1"): PublishOutcome.FAILED}
    row = study_row(engine)
    assert row.publish_state == "failed"
    assert row.last_error is not None
    assert row.last_error.startswith(
        "HTTP 403: conditional create of the study's Patient: this client may not create Patients"
    )
    assert fresh_fhir_server.read("ImagingStudy", uid("1")) is None


def test_a_patient_the_mapping_cannot_make_valid_is_not_sent_and_fails_the_study(
    index: Index,
    engine: Engine,
    http: httpx.Client,
    proxy: HttpFaultProxy,
    clock: FakeClock,
    fresh_fhir_server: FhirTestServer,
) -> None:
    """A control character in PatientName: the Patient fails validation before any request; the study fails
    with the element named."""
    index.record_instance(record(patient_name="Doe^Ja\x07ne"), received_at=clock())
    clock.advance(QUIET)

    assert publisher(index, http, proxy, clock).run_once() == {uid("1"): PublishOutcome.FAILED}
    row = study_row(engine)
    assert row.last_error is not None and "name[0].given[0]: contains a control character" in row.last_error
    assert proxy.requests == []


@pytest.mark.parametrize("mode", ["lookup", "create"])
def test_reconcile_compares_with_the_patient_the_server_holds_and_creates_none(
    index: Index, http: httpx.Client, clock: FakeClock, fresh_fhir_server: FhirTestServer, mode: PatientMode
) -> None:
    """A study published with a Patient reference is not reported stale; nor when the Patient disappears (the
    publisher never downgrades a literal reference: the resource would not change); when another Patient takes
    the identifier it is (the subject would change), and reconcile itself never creates one."""
    patient_id = seed_patient(fresh_fhir_server, "PAT-0001") if mode == "lookup" else None
    fhir = FhirClient(http, base_url=fresh_fhir_server.base_url)
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)
    published = Publisher(
        index=index, fhir=fhir, mapping=mapping(mode), retry=RETRY, clock=clock, claimer="test"
    ).run_once()
    assert published == {uid("1"): PublishOutcome.PUBLISHED}
    (patient,) = patients_with(fresh_fhir_server, "PAT-0001")
    assert patient_id in (None, patient["id"])

    assert reconcile(index, fhir, mapping(mode), fix=False, clock=clock).discrepancies == []

    http.delete(f"{fresh_fhir_server.base_url}/Patient/{patient['id']}").raise_for_status()
    assert reconcile(index, fhir, mapping(mode), fix=False, clock=clock).discrepancies == []

    seed_patient(fresh_fhir_server, "PAT-0001")
    writes = fresh_fhir_server.request_counts()
    report = reconcile(index, fhir, mapping(mode), fix=False, clock=clock)
    assert [(d.kind, d.study_uid) for d in report.discrepancies] == [("stale", uid("1"))]
    assert fresh_fhir_server.request_counts() == writes, "reconcile wrote nothing"


def test_reconcile_counts_the_studies_whose_patient_it_found_none_for_in_one_line_not_one_warning_each(
    index: Index,
    database_url: str,
    http: httpx.Client,
    clock: FakeClock,
    fresh_fhir_server: FhirTestServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Three studies published in lookup mode with no Patient on the server (subject by identifier): reconcile
    finds nothing to repair, counts the three fallbacks by reason, and says so in one line."""
    fhir = FhirClient(http, base_url=fresh_fhir_server.base_url)
    for number in range(1, 4):
        instance = InstanceRecord(
            study=replace(JANE, study_uid=uid(str(number)), patient_id=f"PAT-000{number}"),
            series=SeriesAttributes(series_uid=uid(f"{number}.1"), modality="CT", series_number=1),
            sop_instance_uid=uid(f"{number}.1.1"),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        )
        index.record_instance(instance, received_at=clock())
    clock.advance(QUIET)
    published = Publisher(
        index=index, fhir=fhir, mapping=mapping("lookup"), retry=RETRY, clock=clock, claimer="test"
    ).run_once()
    assert set(published.values()) == {PublishOutcome.PUBLISHED} and len(published) == 3

    with capture_logs() as logs:
        report = reconcile(index, fhir, mapping("lookup"), fix=False, clock=clock)
    assert (report.discrepancies, report.lookup_fallbacks) == ([], {("patient", "no_match"): 3})
    assert fallbacks(logs) == []

    config = tmp_path / "pacs-bridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": {"url": database_url},
                "fhir": {"base_url": fresh_fhir_server.base_url},
                "patient": {"mode": "lookup", "identifier_system": SYSTEM},
            }
        ),
        encoding="utf-8",
    )
    capsys.readouterr()  # the publisher's lines
    main(["reconcile", "--config", str(config)])
    captured = capsys.readouterr()
    assert (
        captured.out.count(
            "subject by identifier for 3 studies, the Patient lookup found none to reference "
            "(no_match 3): compared as published, not a discrepancy"
        )
        == 1
    )
    assert "patient_lookup_fallback" not in captured.out + captured.err
