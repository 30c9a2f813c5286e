"""Concurrent edits: the publisher writes If-Match the version it last wrote, and merges on 412. Real FHIR test
server, the index on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.index.models import Study
from pacs_bridge.index.repository import Index
from pacs_bridge.publish.publisher import Publisher, PublishOutcome
from pacs_bridge.reconcile import reconcile
from tests.conftest import QUIET, FakeClock
from tests.integration.test_publisher import MAPPING, RETRY, record
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import uid

pytestmark = pytest.mark.fhir_server


@pytest.fixture
def publisher(index: Index, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock) -> Publisher:
    return Publisher(
        index=index,
        fhir=FhirClient(http, base_url=fresh_fhir_server.base_url),
        mapping=MAPPING,
        retry=RETRY,
        clock=clock,
        claimer="test",
        random_fraction=lambda: 0.5,
    )


def published_version(engine: Engine) -> str | None:
    with Session(engine) as session:
        return session.scalars(select(Study.published_version)).one()


def publish_change(index: Index, publisher: Publisher, clock: FakeClock, instance: int) -> PublishOutcome:
    index.record_instance(record(instance=instance), received_at=clock())
    clock.advance(QUIET)
    return publisher.run_once()[uid("1")]


def test_a_resource_edited_by_someone_else_is_merged_not_overwritten(
    index: Index, engine: Engine, publisher: Publisher, fresh_fhir_server: FhirTestServer, clock: FakeClock
):
    """Someone adds encounter, note and a literal basedOn (version 2); our next change reads version 2 and
    writes version 3 with their elements and our new instance, and the change after that keeps them too."""
    assert publish_change(index, publisher, clock, 1) is PublishOutcome.PUBLISHED
    assert published_version(engine) == "1"
    theirs = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert theirs is not None
    theirs["encounter"] = {"reference": "Encounter/enc-1"}
    theirs["note"] = [{"text": "reviewed by the radiologist"}]
    theirs["basedOn"] = [*theirs.get("basedOn", []), {"reference": "ServiceRequest/sr-1"}]
    theirs["numberOfInstances"] = 99  # ours: wrong values in elements we own are replaced
    edited = fresh_fhir_server.client.put(f"{fresh_fhir_server.base_url}/ImagingStudy/{uid('1')}", json=theirs)
    assert edited.status_code == 200, edited.text

    assert publish_change(index, publisher, clock, 2) is PublishOutcome.PUBLISHED
    merged = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert merged is not None
    assert merged["meta"]["versionId"] == "3"
    assert merged["encounter"] == {"reference": "Encounter/enc-1"}
    assert merged["note"] == [{"text": "reviewed by the radiologist"}]
    assert {"reference": "ServiceRequest/sr-1"} in merged["basedOn"]
    assert merged["numberOfInstances"] == 2 and len(merged["series"][0]["instance"]) == 2
    assert published_version(engine) == "3"
    assert fresh_fhir_server.request_counts()["PUT ImagingStudy"] == 3  # ours v1, theirs v2, merged v3

    assert publish_change(index, publisher, clock, 3) is PublishOutcome.PUBLISHED
    later = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert later is not None and later["meta"]["versionId"] == "4"
    assert (later["encounter"], later["note"], later["numberOfInstances"]) == (merged["encounter"], merged["note"], 3)


class RacingClient(FhirClient):
    """The real client, but right after its first read someone else writes a note to the resource."""

    def __init__(self, http: httpx.Client, *, base_url: str, server: FhirTestServer) -> None:
        super().__init__(http, base_url=base_url)
        self._server = server
        self.raced = False

    def read(self, resource_type: str, resource_id: str) -> tuple[dict[str, Any], str | None] | None:
        current = super().read(resource_type, resource_id)
        if current is not None and not self.raced:
            self.raced = True
            edited = {**current[0], "note": [{"text": "written between the bridge's read and write"}]}
            response = self._server.client.put(f"{self._server.base_url}/{resource_type}/{resource_id}", json=edited)
            assert response.status_code == 200, response.text
        return current


def test_a_write_between_our_read_and_our_put_gets_412_and_is_merged_too(
    index: Index, engine: Engine, http: httpx.Client, fresh_fhir_server: FhirTestServer, clock: FakeClock
):
    """Our If-Match on the version read is refused (412) because someone wrote meanwhile; we read again and
    write on their version, keeping their note."""
    racing = RacingClient(http, base_url=fresh_fhir_server.base_url, server=fresh_fhir_server)
    publisher = Publisher(
        index=index, fhir=racing, mapping=MAPPING, retry=RETRY, clock=clock, claimer="test", random_fraction=lambda: 0.5
    )
    assert publish_change(index, publisher, clock, 1) is PublishOutcome.PUBLISHED
    assert publish_change(index, publisher, clock, 2) is PublishOutcome.PUBLISHED
    assert racing.raced
    final = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert final is not None
    assert final["note"] == [{"text": "written between the bridge's read and write"}]
    assert (final["numberOfInstances"], final["meta"]["versionId"]) == (2, "3")
    assert published_version(engine) == "3"
    # ours v1, the racer's v2, ours If-Match "1" refused with 412, ours If-Match "2" -> v3
    assert fresh_fhir_server.request_counts()["PUT ImagingStudy"] == 4


def test_our_own_successive_writes_need_no_merge(
    index: Index, engine: Engine, publisher: Publisher, fresh_fhir_server: FhirTestServer, clock: FakeClock
):
    """With nobody else writing, each change is one PUT (If-Match the version read, which is ours)."""
    for instance in (1, 2, 3):
        assert publish_change(index, publisher, clock, instance) is PublishOutcome.PUBLISHED
    assert published_version(engine) == "3"
    assert fresh_fhir_server.request_counts()["PUT ImagingStudy"] == 3


def test_a_resource_deleted_on_the_server_is_recreated_on_the_next_change(
    index: Index, engine: Engine, publisher: Publisher, fresh_fhir_server: FhirTestServer, clock: FakeClock
):
    """DELETE on the server; our next change finds it gone and writes it again, with every instance."""
    assert publish_change(index, publisher, clock, 1) is PublishOutcome.PUBLISHED
    deleted = fresh_fhir_server.client.delete(f"{fresh_fhir_server.base_url}/ImagingStudy/{uid('1')}")
    assert deleted.is_success, deleted.text
    assert fresh_fhir_server.read("ImagingStudy", uid("1")) is None

    assert publish_change(index, publisher, clock, 2) is PublishOutcome.PUBLISHED
    recreated = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert recreated is not None and recreated["numberOfInstances"] == 2
    assert published_version(engine) == recreated["meta"]["versionId"]


def test_reconcile_reports_only_edits_of_what_we_own(
    index: Index, engine: Engine, publisher: Publisher, http: httpx.Client, fresh_fhir_server, clock: FakeClock
):
    """A note someone added is no discrepancy (the publisher's merge keeps it, so republishing would change
    nothing); a changed description, which we own, is stale."""
    assert publish_change(index, publisher, clock, 1) is PublishOutcome.PUBLISHED
    fhir = FhirClient(http, base_url=fresh_fhir_server.base_url)
    url = f"{fresh_fhir_server.base_url}/ImagingStudy/{uid('1')}"
    annotated = {**(fresh_fhir_server.read("ImagingStudy", uid("1")) or {}), "note": [{"text": "seen"}]}
    assert fresh_fhir_server.client.put(url, json=annotated).status_code == 200
    assert reconcile(index, fhir, MAPPING, fix=False, clock=clock).discrepancies == []

    edited = {**(fresh_fhir_server.read("ImagingStudy", uid("1")) or {}), "description": "edited by hand"}
    assert fresh_fhir_server.client.put(url, json=edited).status_code == 200
    report = reconcile(index, fhir, MAPPING, fix=False, clock=clock)
    assert [(d.study_uid, d.kind) for d in report.discrepancies] == [(uid("1"), "stale")]
