"""The publisher against the real FHIR test server, with the index on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session
from structlog.testing import capture_logs

from pacs_bridge.debounce import DebounceSettings, RetrySettings
from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.endpoint import EndpointSettings
from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.models import RejectedInstance, Study
from pacs_bridge.index.repository import Index
from pacs_bridge.index.schema import prepare_schema
from pacs_bridge.publish.publisher import Publisher, PublishOutcome
from pacs_bridge.records import InstanceRecord, RejectionReason, SeriesAttributes, StudyAttributes
from tests.conftest import MAX_DELAY, QUIET, FakeClock
from tests.integration.test_index_rejection import note
from tests.integration.test_snapshot_batch import counted
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import uid

pytestmark = pytest.mark.fhir_server

WADO = EndpointSettings(id="pacs-wado-rs", connection_type="dicom-wado-rs", address="https://pacs.example.org/wado/")
MAPPING = MappingSettings(endpoints=(WADO,), patient_identifier_system="urn:oid:1.2.3.4")
RETRY = RetrySettings(base=timedelta(seconds=10), cap=timedelta(minutes=5), jitter_fraction=0.0)


def record(study: str = "1", series: int = 1, instance: int = 1) -> InstanceRecord:
    return InstanceRecord(
        study=StudyAttributes(study_uid=uid(study), patient_id="PAT-1", study_date="20240315", study_time="1015"),
        series=SeriesAttributes(series_uid=uid(f"{study}.{series}"), modality="CT", series_number=series),
        sop_instance_uid=uid(f"{study}.{series}.{instance}"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=instance,
    )


def make_publisher(index: Index, http: httpx.Client, base_url: str, clock: FakeClock, **kwargs) -> Publisher:
    options = {"mapping": MAPPING, "retry": RETRY, "claimer": "test", **kwargs}
    return Publisher(
        index=index,
        fhir=FhirClient(http, base_url=base_url),
        clock=clock,
        random_fraction=lambda: 0.5,
        **options,
    )


def test_due_study_is_published_once_with_its_endpoint(
    index: Index, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock
):
    """One PUT of the Endpoint, one of the ImagingStudy, holding every instance; nothing before it is due."""
    publisher = make_publisher(index, http, fresh_fhir_server.base_url, clock)
    for instance in (1, 2, 3):
        index.record_instance(record(instance=instance), received_at=clock())
    assert publisher.run_once() == {}
    clock.advance(QUIET)
    assert publisher.run_once() == {uid("1"): PublishOutcome.PUBLISHED}
    study = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert study is not None
    assert (study["numberOfInstances"], study["meta"]["versionId"]) == (3, "1")
    endpoint = fresh_fhir_server.read("Endpoint", "pacs-wado-rs")
    assert endpoint is not None and endpoint["address"] == "https://pacs.example.org/wado"
    assert fresh_fhir_server.request_counts() == {"PUT Endpoint": 1, "PUT ImagingStudy": 1}


def test_published_study_is_not_sent_again_until_it_changes(
    index: Index, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock
):
    """Re-sent instances send nothing; a new series sends exactly one more version."""
    publisher = make_publisher(index, http, fresh_fhir_server.base_url, clock)
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)
    publisher.run_once()
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET * 20)
    assert publisher.run_once() == {}
    index.record_instance(record(series=2), received_at=clock())
    clock.advance(QUIET)
    assert publisher.run_once() == {uid("1"): PublishOutcome.PUBLISHED}
    assert fresh_fhir_server.versions("ImagingStudy", uid("1")) == 2
    assert fresh_fhir_server.request_counts()["PUT ImagingStudy"] == 2


def test_unchanged_resource_is_not_sent(
    index: Index, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock
):
    """A change that leaves the resource identical (PatientSex, which only patient.mode create maps) is recorded,
    not sent."""
    publisher = make_publisher(index, http, fresh_fhir_server.base_url, clock)
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)
    publisher.run_once()
    changed = record()
    changed = InstanceRecord(
        study=StudyAttributes(**{**_fields(changed.study), "patient_sex": "F"}),
        series=changed.series,
        sop_instance_uid=changed.sop_instance_uid,
        sop_class_uid=changed.sop_class_uid,
        instance_number=changed.instance_number,
    )
    index.record_instance(changed, received_at=clock())
    clock.advance(QUIET)
    assert publisher.run_once() == {uid("1"): PublishOutcome.UNCHANGED}
    assert fresh_fhir_server.request_counts()["PUT ImagingStudy"] == 1
    assert index.count_by_state().published == 1


def _fields(attributes: StudyAttributes) -> dict[str, str]:
    return {name: getattr(attributes, name) for name in attributes.__dataclass_fields__}


def test_server_down_keeps_the_study_pending_and_it_publishes_when_back(
    index: Index, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock
):
    """Connection refused is retried after the backoff; nothing is lost, and one resource results."""
    down = make_publisher(index, http, "http://127.0.0.1:9/fhir", clock)
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)
    assert down.run_once() == {uid("1"): PublishOutcome.RETRY_SCHEDULED}
    assert index.count_by_state().pending == 1
    up = make_publisher(index, http, fresh_fhir_server.base_url, clock)
    assert up.run_once() == {}, "retried before its backoff of 10 s"
    clock.advance(timedelta(seconds=10))
    assert up.run_once() == {uid("1"): PublishOutcome.PUBLISHED}
    assert fresh_fhir_server.versions("ImagingStudy", uid("1")) == 1


def test_resource_refused_by_the_server_marks_the_study_failed_with_its_reason(
    index: Index, engine, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock
):
    """A 400 is not retried; the OperationOutcome text is recorded on the study for the operator."""
    bad_mapping = MappingSettings(endpoints=(WADO,), patient_identifier_system="not a uri")
    # Our own validation would refuse it before sending (test_mapping_validation.py): here the server must.
    publisher = make_publisher(
        index, http, fresh_fhir_server.base_url, clock, mapping=bad_mapping, validate=lambda _resource: None
    )
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)
    assert publisher.run_once() == {uid("1"): PublishOutcome.FAILED}
    with Session(engine) as session:
        row = session.scalars(select(Study)).one()
    assert row.publish_state == "failed"
    assert row.last_error.startswith("HTTP 400")
    assert "subject" in row.last_error
    clock.advance(QUIET * 20)
    assert publisher.run_once() == {}


def test_endpoint_is_put_once_for_many_studies(
    index: Index, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock
):
    """Five studies share one Endpoint resource, PUT once."""
    publisher = make_publisher(index, http, fresh_fhir_server.base_url, clock, batch_size=2)
    for study in range(1, 6):
        index.record_instance(record(study=str(study)), received_at=clock())
    clock.advance(QUIET)
    outcomes = publisher.run_once()
    assert list(outcomes.values()) == [PublishOutcome.PUBLISHED] * 5
    assert fresh_fhir_server.request_counts() == {"PUT Endpoint": 1, "PUT ImagingStudy": 5}


def due_studies(index: Index, clock: FakeClock, count: int, *, first: int = 1) -> list[str]:
    """``count`` one-instance studies, all due now."""
    numbers = range(first, first + count)
    for number in numbers:
        index.record_instance(record(study=str(number)), received_at=clock())
    clock.advance(QUIET)
    return [uid(str(number)) for number in numbers]


def test_a_pass_publishes_every_due_study_with_one_claim_and_one_record_per_batch(
    index: Index, engine: Engine, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock
):
    """40 due studies, batches of 8, 3 at a time: one pass publishes all of them (no cap per tick), and the
    studies table is written twice per batch (the claim, the results), not once per study."""
    publisher = make_publisher(index, http, fresh_fhir_server.base_url, clock, batch_size=8, concurrency=3)
    study_uids = due_studies(index, clock, 40)
    study_writes: list[str] = []

    def count_writes(_conn, _cursor, statement: str, *_args) -> None:
        if statement.lstrip().upper().startswith("UPDATE STUDIES"):
            study_writes.append(statement)

    event.listen(engine, "before_cursor_execute", count_writes)
    try:
        outcomes = publisher.run_once()
    finally:
        event.remove(engine, "before_cursor_execute", count_writes)

    assert outcomes == {study_uid: PublishOutcome.PUBLISHED for study_uid in study_uids}
    assert fresh_fhir_server.request_counts() == {"PUT Endpoint": 1, "PUT ImagingStudy": 40}
    batches = 40 // 8
    assert len(study_writes) <= 2 * batches + 1, (
        f"{len(study_writes)} writes of the studies table for {batches} batches"
    )


def test_a_pass_reads_each_batch_s_snapshots_in_one_transaction_not_one_per_study(
    index: Index, engine: Engine, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock
):
    """40 due studies, batches of 8: the pass checks out a connection and opens a transaction a few times per
    batch (claim, snapshots, results), not once per study; every study is published."""
    publisher = make_publisher(index, http, fresh_fhir_server.base_url, clock, batch_size=8, concurrency=3)
    study_uids = due_studies(index, clock, 40)
    with counted(engine) as counts:
        outcomes = publisher.run_once()

    assert outcomes == {study_uid: PublishOutcome.PUBLISHED for study_uid in study_uids}
    batches = 40 // 8
    # per batch: the claim, the snapshots, the results; once: the last (empty) claim, the Endpoint's hashes and mark
    assert counts["transactions"] <= 3 * batches + 3, counts
    assert counts["checkouts"] <= 3 * batches + 3, counts


def test_a_row_the_batch_read_cannot_assemble_stops_only_its_own_study(
    index: Index, engine: Engine, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock
):
    """A withdrawn study whose rejection reason no longer parses fails the batch's read: the pass logs it once,
    each worker reads its own study, the bad one ends in ERROR (released) and the others are published."""
    index.record_instance(record(study="1"), received_at=clock())
    index.record_instance(note("1.1.1", reason=RejectionReason.QUALITY, study="1"), received_at=clock())
    with engine.begin() as connection:
        connection.execute(update(RejectedInstance).values(reason_code="not-a-code"))
    others = due_studies(index, clock, 3, first=2)
    publisher = make_publisher(index, http, fresh_fhir_server.base_url, clock)

    with capture_logs() as logs:
        outcomes = publisher.run_once()

    assert outcomes == {uid("1"): PublishOutcome.ERROR, **{study_uid: PublishOutcome.PUBLISHED for study_uid in others}}
    events = [entry["event"] for entry in logs if entry["log_level"] == "error"]
    assert events == ["batch_snapshots_failed", "publish_crashed"]


@pytest.mark.postgresql
def test_two_bridges_on_one_postgresql_write_each_study_once_per_change(
    postgres_schema_url: str, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock
):
    """Two publishers on their own engines (as two bridges) drain 60 due studies at once, then 10 changed ones:
    every study is written once per change, and each ends with one version per change."""
    engines = [make_engine(postgres_schema_url) for _ in range(2)]
    prepare_schema(engines[0])
    indexes = [Index(engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY)) for engine in engines]
    bridges = [
        make_publisher(index, http, fresh_fhir_server.base_url, clock, batch_size=4, concurrency=3, claimer=name)
        for index, name in zip(indexes, ("a", "b"), strict=True)
    ]

    def drain_at_once() -> dict[str, PublishOutcome]:
        outcomes: list[dict[str, PublishOutcome]] = [{}, {}]
        threads = [threading.Thread(target=lambda n=n: outcomes[n].update(bridges[n].run_once())) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not outcomes[0].keys() & outcomes[1].keys(), "a study published by both bridges"
        return {**outcomes[0], **outcomes[1]}

    try:
        first = due_studies(indexes[0], clock, 60)
        assert drain_at_once() == {study_uid: PublishOutcome.PUBLISHED for study_uid in first}
        changed = first[:10]
        for number in range(1, 11):
            indexes[1].record_instance(record(study=str(number), instance=2), received_at=clock())
        clock.advance(QUIET)
        assert drain_at_once() == {study_uid: PublishOutcome.PUBLISHED for study_uid in changed}
    finally:
        for engine in engines:
            engine.dispose()

    # Each bridge sends the Endpoint before its first study unless the other has recorded it: identical, one version.
    assert fresh_fhir_server.request_counts()["PUT ImagingStudy"] == 70
    assert fresh_fhir_server.versions("Endpoint", WADO.id) == 1
    assert [fresh_fhir_server.versions("ImagingStudy", study_uid) for study_uid in changed] == [2] * 10
    assert {fresh_fhir_server.versions("ImagingStudy", study_uid) for study_uid in first[10:]} == {1}
