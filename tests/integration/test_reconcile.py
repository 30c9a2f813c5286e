"""reconcile against the real FHIR test server: a deleted, an edited and a duplicated ImagingStudy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from pacs_bridge.cli import main
from pacs_bridge.debounce import RetrySettings
from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.index.repository import Index
from pacs_bridge.publish.publisher import Publisher, PublishOutcome
from pacs_bridge.reconcile import reconcile
from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes
from tests.conftest import QUIET, FakeClock
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import uid

pytestmark = pytest.mark.fhir_server

MAPPING = MappingSettings()


def record(study: str) -> InstanceRecord:
    return InstanceRecord(
        study=StudyAttributes(study_uid=uid(study), patient_id="PAT-1", study_description="CT chest"),
        series=SeriesAttributes(series_uid=uid(f"{study}.1"), modality="CT", series_number=1),
        sop_instance_uid=uid(f"{study}.1.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=1,
    )


@pytest.fixture
def fhir(fresh_fhir_server: FhirTestServer) -> Iterator[FhirClient]:
    with httpx.Client(timeout=10) as http:
        yield FhirClient(http, base_url=fresh_fhir_server.base_url)


@pytest.fixture
def drifted(index: Index, fhir: FhirClient, fresh_fhir_server: FhirTestServer, clock: FakeClock) -> Publisher:
    """Three published studies; then on the server: study 1 deleted, study 2 edited, study 3 duplicated."""
    publisher = Publisher(index=index, fhir=fhir, mapping=MAPPING, retry=RetrySettings(), clock=clock, claimer="test")
    for study in ("1", "2", "3"):
        index.record_instance(record(study), received_at=clock())
    clock.advance(QUIET)
    assert set(publisher.run_once().values()) == {PublishOutcome.PUBLISHED}
    client = fresh_fhir_server.client
    base = fresh_fhir_server.base_url
    assert client.delete(f"{base}/ImagingStudy/{uid('1')}").is_success
    edited = fresh_fhir_server.read("ImagingStudy", uid("2"))
    assert edited is not None
    edited["description"] = "edited by hand on the server"
    assert client.put(f"{base}/ImagingStudy/{uid('2')}", json=edited).is_success
    duplicate = fresh_fhir_server.read("ImagingStudy", uid("3"))
    assert duplicate is not None
    duplicate = {**duplicate, "id": "copy-of-3"}
    duplicate.pop("meta")
    assert client.put(f"{base}/ImagingStudy/copy-of-3", json=duplicate).is_success
    return publisher


def test_reconcile_reports_missing_stale_and_duplicate_studies(
    drifted: Publisher, index: Index, fhir: FhirClient, clock: FakeClock
):
    """Without fix: one discrepancy of each kind, named by study, nothing changed."""
    report = reconcile(index, fhir, MAPPING, fix=False, clock=clock)
    assert report.checked == 3
    assert sorted((d.kind, d.study_uid, d.fixed) for d in report.discrepancies) == [
        ("duplicate", uid("3"), False),
        ("missing", uid("1"), False),
        ("stale", uid("2"), False),
    ]
    assert index.count_by_state().published == 3


def test_reconcile_fix_repairs_the_server_through_the_publisher(
    drifted: Publisher,
    index: Index,
    fhir: FhirClient,
    fresh_fhir_server: FhirTestServer,
    clock: FakeClock,
):
    """With fix: the duplicate is deleted, the other two republished at the next pass; then all is clean."""
    report = reconcile(index, fhir, MAPPING, fix=True, clock=clock)
    assert all(d.fixed for d in report.discrepancies) and len(report.discrepancies) == 3
    assert fresh_fhir_server.read("ImagingStudy", "copy-of-3") is None
    assert drifted.run_once() == {uid("1"): PublishOutcome.PUBLISHED, uid("2"): PublishOutcome.PUBLISHED}
    restored = fresh_fhir_server.read("ImagingStudy", uid("2"))
    assert restored is not None and restored["description"] == "CT chest"
    assert reconcile(index, fhir, MAPPING, fix=False, clock=clock).discrepancies == []


def test_reconcile_command_exits_3_until_fixed(
    drifted: Publisher,
    database_url: str,
    fresh_fhir_server: FhirTestServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    """pacs-bridge reconcile lists each discrepancy and exits 3; with --fix it repairs them and exits 0."""
    config = tmp_path / "pacs-bridge.yaml"
    config.write_text(
        yaml.safe_dump({"database": {"url": database_url}, "fhir": {"base_url": fresh_fhir_server.base_url}}),
        encoding="utf-8",
    )
    with pytest.raises(SystemExit) as exited:
        main(["reconcile", "--config", str(config)])
    assert exited.value.code == 3
    out = capsys.readouterr().out
    assert f"missing   {uid('1')}  no ImagingStudy/{uid('1')}" in out
    assert "3 published studies checked" in out
    main(["reconcile", "--fix", "--config", str(config)])
    assert "-> deleted" in capsys.readouterr().out
