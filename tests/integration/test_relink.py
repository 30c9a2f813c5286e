"""The relink pass against the real FHIR test server, the index on SQLite and PostgreSQL, a fake clock to move
through its schedule: studies published by identifier only get their Patient and ServiceRequest once these exist."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from structlog.testing import capture_logs

from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.index.repository import Index
from pacs_bridge.publish.linking import MAX_RELINK_DELAY, relink_delay
from pacs_bridge.publish.publisher import PublishOutcome
from pacs_bridge.publish.relink import Relinker, RelinkOutcome
from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes
from tests.conftest import QUIET, FakeClock
from tests.integration.test_publisher import WADO, make_publisher
from tests.support.fault_proxy import HttpFaultProxy, Respond
from tests.support.fhir_server import FhirTestServer
from tests.support.orders import ACCESSION_SYSTEM, seed_service_request
from tests.support.patients import SYSTEM, seed_patient
from tests.support.studies import uid

pytestmark = pytest.mark.fhir_server

INTERVAL = timedelta(minutes=15)
PAUSE = timedelta(seconds=15)
LOOKUP = MappingSettings(
    endpoints=(WADO,),
    patient_identifier_system=SYSTEM,
    patient_mode="lookup",
    accession_identifier_system=ACCESSION_SYSTEM,
    accession_mode="lookup",
)


class RecordingObserver:
    def __init__(self) -> None:
        self.lookups: list[tuple[str, str]] = []

    def relink_looked_up(self, *, link: str, outcome: str) -> None:
        self.lookups.append((link, outcome))


@pytest.fixture
def searches() -> Iterator[tuple[httpx.Client, list[str]]]:
    """An HTTP client that notes "METHOD path" of every request it sends."""
    sent: list[str] = []

    def note(request: httpx.Request) -> None:
        sent.append(f"{request.method} {request.url.path}")

    with httpx.Client(timeout=10, trust_env=False, event_hooks={"request": [note]}) as client:
        yield client, sent


def record(study: str = "1", **attributes: str) -> InstanceRecord:
    study_attributes = {"patient_id": f"PAT-{study}", "accession_number": f"ACC-{study}", "study_date": "20240315"}
    return InstanceRecord(
        study=StudyAttributes(study_uid=uid(study), **{**study_attributes, **attributes}),
        series=SeriesAttributes(series_uid=uid(f"{study}.1"), modality="CT", series_number=1),
        sop_instance_uid=uid(f"{study}.1.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=1,
    )


def relinker(
    index: Index,
    http: httpx.Client,
    base_url: str,
    clock: FakeClock,
    *,
    mapping: MappingSettings = LOOKUP,
    interval: timedelta = INTERVAL,
    batch_size: int = 16,
    observer: RecordingObserver | None = None,
) -> Relinker:
    return Relinker(
        links=index.links,
        fhir=FhirClient(http, base_url=base_url),
        mapping=mapping,
        interval=interval,
        clock=clock,
        claimer="relinker",
        batch_size=batch_size,
        pause=PAUSE,
        observer=observer,  # type: ignore[arg-type]  # only relink_looked_up is called
    )


def publish_unlinked(
    index: Index,
    http: httpx.Client,
    server: FhirTestServer,
    clock: FakeClock,
    *studies: str,
    mapping: MappingSettings = LOOKUP,
) -> None:
    """Publish ``studies`` (lookup modes) before their Patients and orders exist: by identifier only."""
    for study in studies:
        index.record_instance(record(study), received_at=clock())
    clock.advance(QUIET)
    published = make_publisher(
        index, http, server.base_url, clock, mapping=mapping, relink_interval=INTERVAL
    ).run_once()
    assert published == dict.fromkeys((uid(study) for study in studies), PublishOutcome.PUBLISHED)


def test_a_patient_and_an_order_created_after_publishing_are_linked_by_one_more_version(
    index: Index, http: httpx.Client, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """Nothing is looked up before relink_seconds; then the Patient and ServiceRequest made meanwhile are found,
    the study is republished through the publisher (version 2) with both literal references, and nothing waits."""
    publish_unlinked(index, http, fresh_fhir_server, clock, "1")
    patient_id = seed_patient(fresh_fhir_server, "PAT-1")
    order_id = seed_service_request(fresh_fhir_server, "ACC-1")
    relink = relinker(index, http, fresh_fhir_server.base_url, clock)

    clock.advance(INTERVAL - timedelta(seconds=1))
    assert relink.run_once() == {}
    clock.advance(timedelta(seconds=1))
    with capture_logs() as logs:
        assert relink.run_once() == {uid("1"): RelinkOutcome.LINKED}
    assert [(entry["event"], entry["links"]) for entry in logs if entry["event"] == "study_relinked"] == [
        ("study_relinked", ["patient", "order"])
    ]

    publisher = make_publisher(index, http, fresh_fhir_server.base_url, clock, mapping=LOOKUP)
    assert publisher.run_once() == {uid("1"): PublishOutcome.PUBLISHED}
    study = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert study is not None
    assert study["subject"]["reference"] == f"Patient/{patient_id}"
    assert study["basedOn"][0]["reference"] == f"ServiceRequest/{order_id}"
    assert fresh_fhir_server.versions("ImagingStudy", uid("1")) == 2
    links = index.links.load(uid("1"))
    assert links is not None and not links.waiting and links.relink_at is None
    clock.advance(MAX_RELINK_DELAY * 2)
    assert relink.run_once() == {}
    assert publisher.run_once() == {}
    assert fresh_fhir_server.request_counts()["PUT ImagingStudy"] == 2


def test_a_study_that_keeps_not_matching_is_looked_up_less_and_less_often_at_least_daily(
    index: Index, searches: tuple[httpx.Client, list[str]], clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """Each due lookup that finds nothing doubles the wait (15 min, 30, 60, ...) up to a day; between them the
    pass sends nothing at all. Two searches per lookup (the Patient and the order)."""
    http, sent = searches
    publish_unlinked(index, http, fresh_fhir_server, clock, "1")
    relink = relinker(index, http, fresh_fhir_server.base_url, clock)
    waits = []
    for attempt in range(9):
        links = index.links.load(uid("1"))
        assert links is not None and links.relink_at is not None and links.relink_attempts == attempt
        waits.append(links.relink_at - clock())
        clock.advance(links.relink_at - clock() - timedelta(seconds=1))
        sent.clear()
        assert relink.run_once() == {}
        assert sent == [], "nothing is looked up before the study is due"
        clock.advance(timedelta(seconds=1))
        assert relink.run_once() == {uid("1"): RelinkOutcome.WAITING}
        assert sent == ["POST /fhir/Patient/_search", "POST /fhir/ServiceRequest/_search"]

    assert waits == [relink_delay(attempt, INTERVAL) for attempt in range(9)]
    assert waits[:3] == [INTERVAL, 2 * INTERVAL, 4 * INTERVAL] and waits[-1] == MAX_RELINK_DELAY
    assert fresh_fhir_server.versions("ImagingStudy", uid("1")) == 1, "no version while nothing is found"


def test_the_work_of_a_pass_is_one_batch(
    index: Index, http: httpx.Client, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """Three studies due, batches of two: the first pass looks up two, the next one the third."""
    publish_unlinked(index, http, fresh_fhir_server, clock, "1", "2", "3")
    relink = relinker(index, http, fresh_fhir_server.base_url, clock, batch_size=2)
    clock.advance(INTERVAL)

    first = relink.run_once()
    second = relink.run_once()

    assert (len(first), len(second)) == (2, 1)
    assert set(first) | set(second) == {uid("1"), uid("2"), uid("3")}


def test_the_pass_rests_while_the_server_does_not_answer_and_gives_the_studies_back(
    index: Index, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """A 503 ends the pass at once: the studies are given back with no attempt counted, nothing is asked during
    the pause, and once the server answers the Patient made meanwhile is linked."""
    publish_unlinked(index, http, fresh_fhir_server, clock, "1", "2")
    observer = RecordingObserver()
    relink = relinker(index, http, f"{proxy.root_url}/fhir", clock, observer=observer)
    clock.advance(INTERVAL)
    proxy.outage(Respond(503, body="maintenance"))

    with capture_logs() as logs:
        assert relink.run_once() == {}
    assert [request.fault for request in proxy.requests] == ["503"], "one failed search, then the pass stopped"
    assert [entry["studies_given_back"] for entry in logs if entry["event"] == "relink_paused"] == [2]
    assert observer.lookups == [("patient", "unavailable")]
    for study in ("1", "2"):
        links = index.links.load(uid(study))
        assert links is not None and links.relink_attempts == 0

    proxy.restore()
    patient_id = seed_patient(fresh_fhir_server, "PAT-1")
    clock.advance(PAUSE - timedelta(seconds=1))
    assert relink.run_once() == {}
    assert len(proxy.requests) == 1, "nothing asked while resting"
    clock.advance(timedelta(seconds=1))
    assert relink.run_once() == {uid("1"): RelinkOutcome.LINKED, uid("2"): RelinkOutcome.WAITING}
    links = index.links.load(uid("1"))
    assert links is not None and links.patient.reference == f"Patient/{patient_id}" and links.order.waiting


def test_a_refused_search_backs_off_like_a_lookup_that_found_nothing(
    index: Index, http: httpx.Client, proxy: HttpFaultProxy, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """403 to the search will not pass by itself: one more attempt, the next lookup later, and the log names the
    status (not the identifier searched)."""
    publish_unlinked(index, http, fresh_fhir_server, clock, "1")
    relink = relinker(index, http, f"{proxy.root_url}/fhir", clock)
    clock.advance(INTERVAL)
    proxy.outage(Respond(403, body="not allowed"))

    with capture_logs() as logs:
        assert relink.run_once() == {uid("1"): RelinkOutcome.REFUSED}

    links = index.links.load(uid("1"))
    assert links is not None and links.relink_attempts == 1
    assert links.relink_at == clock() + relink_delay(1, INTERVAL)
    (refused,) = [entry for entry in logs if entry["event"] == "relink_refused"]
    assert (refused["http_status"], refused["study_uid"]) == (403, uid("1"))
    assert "PAT-1" not in str(logs)


def test_an_identifier_whose_issuer_is_no_longer_mapped_is_never_searched_again(
    index: Index,
    searches: tuple[httpx.Client, list[str]],
    clock: FakeClock,
    fresh_fhir_server: FhirTestServer,
) -> None:
    """Published while HOSP-A was mapped; the configuration no longer maps it: the relink pass sends no search for
    that PatientID (even with a matching Patient on the server) and stops looking; the order is still looked up."""
    hosp_a = dataclasses.replace(LOOKUP, patient_identifier_system="", patient_issuer_systems={"HOSP-A": SYSTEM})
    index.record_instance(record("1", issuer_of_patient_id="HOSP-A"), received_at=clock())
    clock.advance(QUIET)
    http, sent = searches
    publisher = make_publisher(index, http, fresh_fhir_server.base_url, clock, mapping=hosp_a)
    assert publisher.run_once() == {uid("1"): PublishOutcome.PUBLISHED}
    seed_patient(fresh_fhir_server, "PAT-1")
    unmapped = dataclasses.replace(hosp_a, patient_issuer_systems={})
    observer = RecordingObserver()
    relink = relinker(index, http, fresh_fhir_server.base_url, clock, mapping=unmapped, observer=observer)
    clock.advance(INTERVAL)
    sent.clear()

    assert relink.run_once() == {uid("1"): RelinkOutcome.WAITING}

    assert sent == ["POST /fhir/ServiceRequest/_search"]
    assert observer.lookups == [("patient", "not_searchable"), ("order", "no_match")]
    links = index.links.load(uid("1"))
    assert links is not None and links.patient.key is None and links.order.waiting


def test_create_mode_relinking_looks_the_patient_up_and_never_creates_one(
    index: Index, http: httpx.Client, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """patient.mode create with two Patients carrying the identifier (412: by identifier); once the duplicate is
    merged away, the relink pass finds the one left; it never sends a create."""
    create = dataclasses.replace(LOOKUP, patient_mode="create", accession_mode="identifier")
    first = seed_patient(fresh_fhir_server, "PAT-1")
    second = seed_patient(fresh_fhir_server, "PAT-1")
    publish_unlinked(index, http, fresh_fhir_server, clock, "1", mapping=create)
    http.delete(f"{fresh_fhir_server.base_url}/Patient/{second}").raise_for_status()
    writes = fresh_fhir_server.request_counts()
    clock.advance(INTERVAL)

    assert relinker(index, http, fresh_fhir_server.base_url, clock, mapping=create).run_once() == {
        uid("1"): RelinkOutcome.LINKED
    }
    links = index.links.load(uid("1"))
    assert links is not None and links.patient.reference == f"Patient/{first}"
    assert fresh_fhir_server.request_counts() == writes, "the relink pass wrote nothing"


def test_relinking_off_looks_nothing_up(
    index: Index, searches: tuple[httpx.Client, list[str]], clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """publish.relink_seconds 0: the pass does nothing, however long the studies wait."""
    http, sent = searches
    publish_unlinked(index, http, fresh_fhir_server, clock, "1")
    relink = relinker(index, http, fresh_fhir_server.base_url, clock, interval=timedelta(0))
    clock.advance(MAX_RELINK_DELAY * 3)
    sent.clear()

    assert relink.run_once() == {}
    assert sent == []
