"""Backfill from a real PACS: Debian's Orthanc, started with its own configuration (C-FIND SCP and the
DICOMweb plugin on 127.0.0.1), fed by DCMTK storescu; the index on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from rich.console import Console
from sqlalchemy import Engine

from pacs_bridge.backfill.dicomweb import DicomWebSource
from pacs_bridge.backfill.dimse import CFindSource
from pacs_bridge.backfill.pacing import Pacer
from pacs_bridge.backfill.progress import JsonLinesProgress, TerminalProgress
from pacs_bridge.backfill.runner import BackfillRequest, BackfillRunner, BackfillSummary
from pacs_bridge.backfill.source import StudySource
from pacs_bridge.backfill_runs import RunState
from pacs_bridge.debounce import DebounceSettings, RetrySettings
from pacs_bridge.dicom.listener_settings import ListenerSettings
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.endpoint import EndpointSettings
from pacs_bridge.fhir.imaging_study import MappingSettings, build_imaging_study, imaging_study_id
from pacs_bridge.index.backfill_progress import BackfillLedger
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.repository import Index, StateCounts
from pacs_bridge.index.schema import prepare_schema
from pacs_bridge.metrics import BridgeMetrics
from pacs_bridge.publish.publisher import Publisher
from tests.conftest import MAX_DELAY, QUIET
from tests.support.dcmtk import storescu
from tests.support.fault_proxy import HttpFaultProxy, Pass, Respond, Slow
from tests.support.fhir_server import FhirTestServer
from tests.support.orthanc import OrthancServer, orthanc_missing
from tests.support.studies import SeriesSpec, new_study_uid, study_datasets, write_file

pytestmark = [
    pytest.mark.orthanc,
    pytest.mark.dcmtk,
    pytest.mark.skipif(orthanc_missing() is not None, reason=orthanc_missing() or ""),
]

WADO = EndpointSettings(id="pacs-wado-rs", connection_type="dicom-wado-rs", address="https://pacs.example.org/wado")
MAPPING = MappingSettings(endpoints=(WADO,), patient_identifier_system="urn:oid:1.2.3.4", site_zone=UTC)
# The only DICOMweb paths a backfill may ask for: QIDO-RS studies and WADO-RS study metadata.
ALLOWED_PATH_ENDS = ("/dicom-web/studies", "/metadata")
FORBIDDEN_WORDS = ("frames", "rendered", "bulk", "thumbnail", "/instances/")


def utc_now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    with OrthancServer(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture
def dicomweb_proxy(orthanc: OrthancServer) -> Iterator[HttpFaultProxy]:
    """A recording (and, when programmed, fault-injecting) proxy in front of Orthanc's HTTP port."""
    with HttpFaultProxy(upstream_port=orthanc.http_port) as proxy:
        yield proxy


def rich_study(study_uid: str, *, study_date: str = "20240315") -> list[Dataset]:
    """A CT + SR study with the attributes the mapping turns into FHIR elements beyond the UIDs."""
    datasets = list(
        study_datasets(
            study_uid, [SeriesSpec("CT", 3, "Axial 5mm"), SeriesSpec("SR", 1, "Dose report")], pixel_bytes=512
        )
    )
    for ds in datasets:
        ds.StudyDate = ds.SeriesDate = study_date
        ds.ReferringPhysicianName = "Ref^Rita"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.BodyPartExamined = "CHEST"
        ds.PerformingPhysicianName = "Perf^Paul"
        ds.TimezoneOffsetFromUTC = "+0100"
        code = Dataset()
        code.CodeValue = "RPID17"
        code.CodingSchemeDesignator = "RADLEX"
        code.CodeMeaning = "CT CHEST WITH CONTRAST"
        ds.ProcedureCodeSequence = [code]
    return datasets


def write_studies(directory: Path, studies: list[list[Dataset]]) -> list[Path]:
    return [write_file(ds, directory / f"{ds.SOPInstanceUID}.dcm") for study in studies for ds in study]


def store_in_orthanc(orthanc: OrthancServer, paths: list[Path]) -> None:
    sent = storescu(orthanc.dicom_port, paths, called_ae="ORTHANC")
    assert sent.returncode == 0, sent.stdout + sent.stderr


def dicomweb(
    url: str, stopping: threading.Event | None = None, *, timeout_seconds: float = 10, **kwargs: Any
) -> DicomWebSource:
    pacer = Pacer(0, stopping or threading.Event())
    http = httpx.Client(timeout=timeout_seconds, trust_env=False)
    return DicomWebSource(http, base_url=url, pacer=pacer, **kwargs)


def cfind(orthanc: OrthancServer, stopping: threading.Event | None = None, **kwargs: Any) -> CFindSource:
    return CFindSource(
        calling_ae_title="PACS_BRIDGE",
        called_ae_title=orthanc.aet,
        host="127.0.0.1",
        port=orthanc.dicom_port,
        pacer=Pacer(0, stopping or threading.Event()),
        timeout_seconds=10,
        **kwargs,
    )


def backfill(index: Index, engine: Engine, source: StudySource, **request: Any) -> BackfillSummary:
    runner = BackfillRunner(
        source=source, sink=index, ledger=BackfillLedger(engine), reporter=JsonLinesProgress(), clock=utc_now
    )
    return runner.run(BackfillRequest(source=source.name, **request))


@pytest.fixture
def c_store_index(tmp_path: Path) -> Iterator[Index]:
    """A second index, filled by the bridge's own DICOM listener, for what C-STORE of a study gives."""
    engine = make_engine(f"sqlite:///{tmp_path / 'c-store.db'}")
    prepare_schema(engine)
    yield Index(engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
    engine.dispose()


def received_by_c_store(index: Index, paths: list[Path]) -> None:
    listener = DicomListener(ListenerSettings(ae_title="PACS_BRIDGE", bind="127.0.0.1", port=0), index, clock=utc_now)
    listener.start()
    try:
        sent = storescu(listener.port, paths)
        assert sent.returncode == 0, sent.stdout + sent.stderr
    finally:
        listener.stop(drain_timeout_seconds=5)


def assert_only_headers_were_asked(proxy: HttpFaultProxy, orthanc: OrthancServer) -> None:
    """Every request the backfill sent was a QIDO-RS study search or a WADO-RS study metadata request, as the
    proxy saw them and as Orthanc logged them."""
    paths = [request.path.split("?")[0] for request in proxy.requests]
    assert paths, "the backfill sent no request"
    assert all(path.endswith(ALLOWED_PATH_ENDS) for path in paths), paths
    logged = [line for line in orthanc.log_text().splitlines() if "HTTP request to plugin for URI" in line]
    assert logged
    assert not [line for line in logged if any(word in line for word in FORBIDDEN_WORDS)]


def test_dicomweb_backfill_builds_the_imaging_study_that_c_store_builds(
    index: Index,
    engine: Engine,
    c_store_index: Index,
    orthanc: OrthancServer,
    dicomweb_proxy: HttpFaultProxy,
    tmp_path: Path,
):
    """The same study sent by storescu to the bridge and to Orthanc, then backfilled from Orthanc's WADO-RS
    metadata into another index: both indexes build the same ImagingStudy; only headers were requested."""
    study_uid = new_study_uid()
    paths = write_studies(tmp_path / "files", [rich_study(study_uid)])
    received_by_c_store(c_store_index, paths)
    store_in_orthanc(orthanc, paths)

    summary = backfill(index, engine, dicomweb(f"{dicomweb_proxy.root_url}/dicom-web"), since=date(2024, 1, 1))

    assert summary.succeeded, summary.failures
    assert (summary.counts.studies_found, summary.counts.studies_indexed, summary.counts.instances_indexed) == (1, 1, 4)
    from_c_store = build_imaging_study(c_store_index.load_snapshot(study_uid), MAPPING)
    from_backfill = build_imaging_study(index.load_snapshot(study_uid), MAPPING)
    assert from_backfill == from_c_store
    assert from_backfill["procedureCode"][0]["coding"][0]["code"] == "RPID17"  # a sequence came through
    assert_only_headers_were_asked(dicomweb_proxy, orthanc)


def test_cfind_backfill_indexes_every_series_and_instance_with_what_orthanc_returns(
    index: Index, engine: Engine, c_store_index: Index, orthanc: OrthancServer, tmp_path: Path
):
    """From C-FIND the study, its series and instances are those C-STORE gives; of the elements Orthanc's C-FIND
    does not return (docs/backfill.md), the resource lacks exactly what the documentation lists."""
    study_uid = new_study_uid()
    paths = write_studies(tmp_path / "files", [rich_study(study_uid)])
    received_by_c_store(c_store_index, paths)
    store_in_orthanc(orthanc, paths)

    summary = backfill(index, engine, cfind(orthanc), since=date(2024, 1, 1))

    assert summary.succeeded, summary.failures
    from_c_store = build_imaging_study(c_store_index.load_snapshot(study_uid), MAPPING)
    from_cfind = build_imaging_study(index.load_snapshot(study_uid), MAPPING)
    documented_gaps = {"procedureCode"}  # Orthanc's C-FIND does not copy sequences it does not index
    assert {key: value for key, value in from_cfind.items() if key not in documented_gaps} == {
        key: value for key, value in from_c_store.items() if key not in documented_gaps
    }


def test_a_second_backfill_writes_nothing_to_the_index_or_the_fhir_server(
    index: Index, engine: Engine, orthanc: OrthancServer, fresh_fhir_server: FhirTestServer, tmp_path: Path
):
    """Backfilled, published once; backfilled again from both sources: every study unchanged, none pending,
    and a publishing pass sends nothing (the server keeps version 1)."""
    study_uids = [new_study_uid() for _ in range(3)]
    store_in_orthanc(orthanc, write_studies(tmp_path / "files", [rich_study(uid) for uid in study_uids]))
    first = backfill(index, engine, dicomweb(orthanc.dicomweb_url), since=date(2024, 1, 1))
    assert (first.counts.studies_indexed, first.succeeded) == (3, True)
    with httpx.Client(timeout=10, trust_env=False) as http:
        publisher = Publisher(
            index=index,
            fhir=FhirClient(http, base_url=fresh_fhir_server.base_url),
            mapping=MAPPING,
            retry=RetrySettings(base=timedelta(seconds=10), cap=timedelta(minutes=5)),
            clock=lambda: utc_now() + QUIET + timedelta(seconds=1),
            claimer="test",
        )
        publisher.run_once()
        versions = {uid: fresh_fhir_server.versions("ImagingStudy", imaging_study_id(uid)) for uid in study_uids}
        assert set(versions.values()) == {1}

        again = backfill(index, engine, dicomweb(orthanc.dicomweb_url), since=date(2024, 1, 1))
        by_cfind = backfill(index, engine, cfind(orthanc), since=date(2024, 1, 1))
        assert (again.counts.studies_unchanged, again.counts.studies_indexed) == (3, 0)
        assert (by_cfind.counts.studies_unchanged, by_cfind.counts.studies_indexed) == (3, 0)
        assert index.count_by_state().pending == 0
        assert publisher.run_once() == {}
        assert {
            uid: fresh_fhir_server.versions("ImagingStudy", imaging_study_id(uid)) for uid in study_uids
        } == versions


def test_a_stopped_backfill_resumes_after_the_windows_it_finished(
    index: Index, engine: Engine, orthanc: OrthancServer, dicomweb_proxy: HttpFaultProxy, tmp_path: Path
):
    """Stopped during its second window, a run keeps the first as done; the same request continues the run
    and does not ask the PACS about the first window again."""
    studies = {year: new_study_uid() for year in (2022, 2023, 2024)}
    store_in_orthanc(
        orthanc,
        write_studies(tmp_path / "files", [rich_study(uid, study_date=f"{year}0601") for year, uid in studies.items()]),
    )
    stopping = threading.Event()

    class StopInSecondWindow(JsonLinesProgress):
        def advanced(self, *, days: int, counts: Any) -> None:
            super().advanced(days=days, counts=counts)
            if days:  # the first window is done: the operator presses Ctrl-C
                stopping.set()

    url = f"{dicomweb_proxy.root_url}/dicom-web"
    request = BackfillRequest(source="dicomweb", since=date(2022, 1, 1), until=date(2024, 12, 31))
    runner = BackfillRunner(
        source=dicomweb(url, stopping),
        sink=index,
        ledger=BackfillLedger(engine),
        reporter=StopInSecondWindow(),
        clock=utc_now,
    )
    stopped = runner.run(request)
    assert stopped.stopped
    [run] = BackfillLedger(engine).latest_runs(limit=1)
    assert (run.state, run.counts.studies_indexed, run.counts.days_done) == (RunState.STOPPED.value, 1, 365)
    asked_before = len(dicomweb_proxy.requests)

    resumed = backfill(index, engine, dicomweb(url), since=date(2022, 1, 1), until=date(2024, 12, 31))

    assert (resumed.resumed, resumed.succeeded, resumed.run_id) == (True, True, stopped.run_id)
    assert (resumed.counts.studies_found, resumed.counts.studies_indexed) == (3, 3)
    assert resumed.counts.days_done == 365 + 365 + 366
    windows_asked = [r.path for r in dicomweb_proxy.requests[asked_before:] if "StudyDate" in r.path]
    assert windows_asked and not [path for path in windows_asked if "StudyDate=2022" in path]
    assert {index.load_snapshot(uid).number_of_instances for uid in studies.values()} == {4}
    assert BackfillLedger(engine).latest_runs(limit=1)[0].state == RunState.COMPLETE.value


def test_bad_answers_fail_their_study_and_the_run_goes_on(
    index: Index, engine: Engine, orthanc: OrthancServer, dicomweb_proxy: HttpFaultProxy, tmp_path: Path
):
    """A 429 with Retry-After is waited out; garbage for one study fails that study, named once, and the others
    are indexed; the run ends incomplete, and running it again indexes the one that failed. The resumed run
    counts each study of the window it retried once, as that attempt found it, and no failure any more."""
    study_uids = [new_study_uid() for _ in range(3)]
    store_in_orthanc(orthanc, write_studies(tmp_path / "files", [rich_study(uid) for uid in study_uids]))
    url = f"{dicomweb_proxy.root_url}/dicom-web"
    # QIDO passes; the first metadata request is told to come back in 1 s, then passes; the next gets garbage.
    dicomweb_proxy.program(Pass(), Respond(429, retry_after="1"), Pass(), Respond(200, body="<html>garbage"))

    summary = backfill(index, engine, dicomweb(url), since=date(2024, 1, 1))

    [failure] = summary.failures
    assert failure.what == f"study {summary_second_study(dicomweb_proxy)}"
    assert failure.error.startswith("the PACS answered")  # the study is named once, by failure.what
    assert "not application/dicom+json" in failure.error or "not JSON" in failure.error
    assert (summary.counts.studies_found, summary.counts.studies_indexed) == (3, 2)
    retried = [r for r in dicomweb_proxy.requests if r.fault.startswith("429")]
    assert len(retried) == 1
    [incomplete] = BackfillLedger(engine).latest_runs(limit=1)
    assert incomplete.state == RunState.INCOMPLETE.value
    assert incomplete.last_error == f"{failure.what}: {failure.error}"

    again = backfill(index, engine, dicomweb(url), since=date(2024, 1, 1))

    assert (again.resumed, again.succeeded) == (True, True)
    # The window is asked again: its 3 studies are found once more, 2 of them now unchanged.
    assert (again.counts.studies_found, again.counts.studies_indexed, again.counts.studies_unchanged) == (3, 1, 2)
    assert (again.counts.instances_indexed, again.counts.failures) == (4, 0)
    [complete] = BackfillLedger(engine).latest_runs(limit=1)
    assert (complete.state, complete.counts, complete.last_error) == (RunState.COMPLETE.value, again.counts, None)
    totals = BackfillLedger(engine).totals()  # what the metrics add up: every failure reported stays counted
    assert (totals.counts.studies_found, totals.counts.studies_indexed, totals.counts.failures) == (3, 1, 1)
    assert {index.load_snapshot(uid).number_of_instances for uid in study_uids} == {4}


def summary_second_study(proxy: HttpFaultProxy) -> str:
    """The study whose metadata request got the garbage (the fourth request)."""
    return proxy.requests[3].path.split("/studies/")[1].split("/")[0]


def timed_study(study_date: str, study_time: str | None) -> list[Dataset]:
    """A rich study of ``study_date`` at ``study_time`` (None: without StudyTime)."""
    datasets = rich_study(new_study_uid(), study_date=study_date)
    for ds in datasets:
        if study_time is None:
            del ds.StudyTime
        else:
            ds.StudyTime = study_time
    return datasets


def test_cfind_windows_with_the_pacs_maximum_are_split_by_date_then_by_study_time(
    index: Index, engine: Engine, tmp_path: Path
):
    """Orthanc answering at most 2 studies per C-FIND: windows are split until each answer is complete, and a
    day holding 3 studies is asked by StudyTime ranges, which find all 3: the run completes, every study
    indexed, each window kept as done."""
    days = {"20240101": ["101530"], "20240102": ["080000", "170000"], "20240103": ["073000", "120000", "235959.5"]}
    studies = [timed_study(day, time) for day, times in days.items() for time in times]
    with OrthancServer(tmp_path / "limited", limit_find_results=2) as orthanc:
        store_in_orthanc(orthanc, write_studies(tmp_path / "files", studies))

        summary = backfill(
            index, engine, cfind(orthanc, max_results=0), since=date(2024, 1, 1), until=date(2024, 1, 31)
        )

    assert (summary.succeeded, summary.failures) == (True, [])
    assert (summary.counts.studies_found, summary.counts.studies_indexed, summary.counts.days_done) == (6, 6, 31)
    assert {index.load_snapshot(study[0].StudyInstanceUID).number_of_instances for study in studies} == {4}
    assert BackfillLedger(engine).latest_runs(limit=1)[0].state == RunState.COMPLETE.value


def test_a_day_the_pacs_limit_hides_studies_of_even_by_study_time_is_named_with_the_limit_to_raise(
    index: Index, engine: Engine, tmp_path: Path
):
    """At most 2 answers per C-FIND: 3 studies of one day at the same second cannot be told apart by StudyTime,
    and studies without a StudyTime are found by no time range. Both days fail, saying that the PACS's limit
    hides studies and which setting raises it; what the PACS did answer is indexed, and the run goes on."""
    same_second = [timed_study("20240104", "101530") for _ in range(3)]
    untimed = [timed_study("20240105", None) for _ in range(3)]
    with OrthancServer(tmp_path / "limited", limit_find_results=2) as orthanc:
        store_in_orthanc(orthanc, write_studies(tmp_path / "files", same_second + untimed))

        summary = backfill(index, engine, cfind(orthanc, max_results=0), since=date(2024, 1, 4), until=date(2024, 1, 5))

    assert [failure.what for failure in summary.failures] == [
        "window 2024-01-04 StudyTime 10:15:30..10:15:30",
        "window 2024-01-05",
    ]
    assert all(
        "LimitFindResults" in failure.error and "pacs.dimse.max_results" in failure.error
        for failure in summary.failures
    )
    assert "hides the others of that second" in summary.failures[0].error
    assert "2 of them have no StudyTime that a time range finds" in summary.failures[1].error
    assert (summary.counts.studies_found, summary.counts.studies_indexed) == (4, 4)
    assert BackfillLedger(engine).latest_runs(limit=1)[0].state == RunState.INCOMPLETE.value


def test_a_stop_during_a_cfind_sends_c_cancel(
    index: Index, engine: Engine, orthanc: OrthancServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Stopped while C-FIND answers arrive: a C-CANCEL is sent for that query and the run stops."""
    store_in_orthanc(orthanc, write_studies(tmp_path / "files", [rich_study(new_study_uid()) for _ in range(6)]))

    class StopOnThirdLook(threading.Event):
        def __init__(self) -> None:
            super().__init__()
            self.looks = 0

        def is_set(self) -> bool:  # the pacer looks once before the query, then once per pending answer
            self.looks += 1
            return self.looks >= 3

    caplog.set_level("INFO", logger="pynetdicom")
    summary = backfill(index, engine, cfind(orthanc, StopOnThirdLook()), since=date(2024, 1, 1))

    assert summary.stopped
    assert "Sending C-CANCEL request" in caplog.text
    assert BackfillLedger(engine).latest_runs(limit=1)[0].state == RunState.STOPPED.value


def test_a_study_partly_received_by_c_store_is_completed_not_duplicated(
    index: Index, engine: Engine, orthanc: OrthancServer, tmp_path: Path
):
    """The listener received the CT series; the PACS holds the whole study: the backfill adds the SR series
    only, and the study is due again once, as one study."""
    study_uid = new_study_uid()
    datasets = rich_study(study_uid)
    paths = write_studies(tmp_path / "files", [datasets])
    ct_paths = [path for path, ds in zip(paths, datasets, strict=True) if ds.Modality == "CT"]
    received_by_c_store(index, ct_paths)
    before = index.load_snapshot(study_uid)
    store_in_orthanc(orthanc, paths)

    summary = backfill(index, engine, dicomweb(orthanc.dicomweb_url), study_uid=study_uid)

    assert (summary.counts.studies_indexed, summary.counts.instances_indexed) == (1, 1)
    after = index.load_snapshot(study_uid)
    assert (before.number_of_instances, after.number_of_instances) == (3, 4)
    assert [series.attributes.modality for series in after.series] == ["CT", "SR"]
    assert after.change_seq == before.change_seq + 1
    assert index.count_by_state().pending == 1


@pytest.mark.parametrize("mode", ["bearer", "basic"])
def test_dicomweb_credentials_come_from_the_environment_and_a_refusal_names_the_window(
    mode: str, index: Index, engine: Engine, orthanc: OrthancServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """pacs.auth as fhir.auth: the secret read from the variable it names is sent; a wrong one is refused (401),
    the error names the window and never the secret."""
    from pacs_bridge.backfill.command import dicomweb_auth
    from pacs_bridge.config import PacsConfig
    from tests.support.auth_proxy import AuthProxy

    store_in_orthanc(orthanc, write_studies(tmp_path / "files", [rich_study(new_study_uid())]))
    expected = "Bearer t0ken-right" if mode == "bearer" else "Basic YnJpZGdlOnMzY3JldC1yaWdodA=="  # bridge:s3cret-right
    auth = (
        {"mode": mode, "token_env": "PACS_TOKEN"}
        if mode == "bearer"
        else {"mode": mode, "username": "bridge", "password_env": "PACS_PASSWORD"}
    )
    with AuthProxy(upstream_port=orthanc.http_port, accept=lambda header: header == expected) as proxy:
        url = proxy.base_url.removesuffix("/fhir") + "/dicom-web"
        pacs = PacsConfig(dicomweb_url=url, auth=auth)  # type: ignore[arg-type]

        def source() -> DicomWebSource:
            http = httpx.Client(timeout=10, trust_env=False, auth=dicomweb_auth(pacs))
            return DicomWebSource(http, base_url=url, pacer=Pacer(0, threading.Event()))

        monkeypatch.setenv("PACS_TOKEN", "t0ken-b4d-91f")
        monkeypatch.setenv("PACS_PASSWORD", "s3cret-b4d-91f")
        refused = backfill(index, engine, source(), since=date(2024, 1, 1), until=date(2024, 12, 31))
        monkeypatch.setenv("PACS_TOKEN", "t0ken-right")
        monkeypatch.setenv("PACS_PASSWORD", "s3cret-right")
        accepted = backfill(index, engine, source(), since=date(2024, 1, 1), until=date(2024, 12, 31))

    [failure] = refused.failures
    assert failure.what == "window 2024-01-01..2024-12-31"
    assert "HTTP 401" in failure.error and "check pacs.auth" in failure.error
    assert "b4d-91f" not in failure.error
    assert (accepted.succeeded, accepted.counts.studies_indexed) == (True, 1)
    assert proxy.refused == 1


def test_a_run_without_until_stopped_one_day_is_continued_the_next(
    index: Index, engine: Engine, orthanc: OrthancServer, tmp_path: Path
):
    """--until defaults to today: a run stopped on 30 December is the one the same command continues on
    31 December (its finished window skipped, the new day included)."""
    studies = {year: new_study_uid() for year in (2023, 2024)}
    store_in_orthanc(
        orthanc,
        write_studies(tmp_path / "files", [rich_study(uid, study_date=f"{year}0601") for year, uid in studies.items()]),
    )
    stopping = threading.Event()

    class StopAfterFirstWindow(JsonLinesProgress):
        def advanced(self, *, days: int, counts: Any) -> None:
            super().advanced(days=days, counts=counts)
            if days:
                stopping.set()

    def run_on(day: date, source: DicomWebSource, reporter: JsonLinesProgress) -> BackfillSummary:
        runner = BackfillRunner(
            source=source,
            sink=index,
            ledger=BackfillLedger(engine),
            reporter=reporter,
            clock=lambda: datetime(day.year, day.month, day.day, 12, tzinfo=UTC),
        )
        return runner.run(BackfillRequest(source="dicomweb", since=date(2023, 1, 1)))

    stopped = run_on(date(2024, 12, 30), dicomweb(orthanc.dicomweb_url, stopping), StopAfterFirstWindow())
    resumed = run_on(date(2024, 12, 31), dicomweb(orthanc.dicomweb_url), JsonLinesProgress())

    assert stopped.stopped
    assert (resumed.resumed, resumed.run_id, resumed.succeeded) == (True, stopped.run_id, True)
    assert resumed.counts.studies_indexed == 2
    [run] = BackfillLedger(engine).latest_runs(limit=1)
    assert (run.since, run.until, run.days_total, run.counts.days_done) == (
        date(2023, 1, 1),
        date(2024, 12, 31),
        731,
        731,
    )


def test_a_metadata_request_that_times_out_fails_its_study_only(
    index: Index, engine: Engine, orthanc: OrthancServer, dicomweb_proxy: HttpFaultProxy, tmp_path: Path
):
    """The PACS holds one metadata answer far beyond pacs.timeout_seconds: that study fails, named, with the
    key to look at; it is not asked again at once, and the other studies are indexed."""
    store_in_orthanc(orthanc, write_studies(tmp_path / "files", [rich_study(new_study_uid()) for _ in range(2)]))
    dicomweb_proxy.program(Pass(), Slow(60))  # QIDO passes; the first metadata request is held a minute

    summary = backfill(
        index, engine, dicomweb(f"{dicomweb_proxy.root_url}/dicom-web", timeout_seconds=5), since=date(2024, 1, 1)
    )

    [failure] = summary.failures
    assert failure.what == f"study {dicomweb_proxy.requests[1].path.split('/studies/')[1].split('/')[0]}"
    assert "no answer to GET" in failure.error and "pacs.timeout_seconds" in failure.error
    assert summary.counts.studies_indexed == 1
    metadata_requests = [request for request in dicomweb_proxy.requests if request.path.endswith("/metadata")]
    assert len(metadata_requests) == 2  # the held one, not asked again; the other study's


def test_the_metrics_follow_the_running_run_even_when_a_later_one_exists(
    index: Index, engine: Engine, orthanc: OrthancServer, tmp_path: Path
):
    """Run 1 (2022..2023) is stopped after its first year; run 2 (2024) then completes. While run 1 is continued,
    the gauges are run 1's (running, days remaining) and status lists it first, though run 2 has the higher id."""
    store_in_orthanc(
        orthanc,
        write_studies(
            tmp_path / "files", [rich_study(new_study_uid(), study_date=f"{y}0601") for y in (2022, 2023, 2024)]
        ),
    )
    ledger = BackfillLedger(engine)
    metrics = BridgeMetrics(lambda: StateCounts(pending=0, published=0, failed=0), backfill_totals=ledger.totals)
    stopping = threading.Event()
    seen_while_resumed: list[tuple[str, int]] = []

    class StopAfterFirstWindow(JsonLinesProgress):
        def advanced(self, *, days: int, counts: Any) -> None:
            super().advanced(days=days, counts=counts)
            if days:
                stopping.set()

    class Scrape(JsonLinesProgress):
        def advanced(self, *, days: int, counts: Any) -> None:
            super().advanced(days=days, counts=counts)
            exposition = metrics.render().decode()
            running = "pacs_bridge_backfill_running 1.0" in exposition
            remaining = next(
                line for line in exposition.splitlines() if line.startswith("pacs_bridge_backfill_days_remaining ")
            )
            seen_while_resumed.append((f"running={running} {remaining}", ledger.latest_runs(limit=1)[0].run_id))

    def run(reporter: JsonLinesProgress, until: date, since: date, source: DicomWebSource) -> BackfillSummary:
        runner = BackfillRunner(source=source, sink=index, ledger=ledger, reporter=reporter, clock=utc_now)
        return runner.run(BackfillRequest(source="dicomweb", since=since, until=until))

    first = run(StopAfterFirstWindow(), date(2023, 12, 31), date(2022, 1, 1), dicomweb(orthanc.dicomweb_url, stopping))
    second = run(JsonLinesProgress(), date(2024, 12, 31), date(2024, 1, 1), dicomweb(orthanc.dicomweb_url))
    assert (first.stopped, second.succeeded, second.run_id) == (True, True, (first.run_id or 0) + 1)

    resumed = run(Scrape(), date(2023, 12, 31), date(2022, 1, 1), dicomweb(orthanc.dicomweb_url))

    assert (resumed.run_id, resumed.succeeded) == (first.run_id, True)
    # The second year is done (its progress recorded) while run 1 still runs: 0 days left of run 1's 730.
    assert seen_while_resumed[-1] == ("running=True pacs_bridge_backfill_days_remaining 0.0", first.run_id)
    assert "pacs_bridge_backfill_running 0.0" in metrics.render().decode()


def test_an_unreachable_pacs_stops_the_run_at_its_first_request_naming_the_url_or_ae(
    index: Index, engine: Engine, tmp_path: Path
):
    """Orthanc is down (stopped): over DICOMweb and over C-FIND the run asks once, then stops with one error
    naming the URL or the AE and what to check, instead of failing each of its 5 windows in turn."""
    with OrthancServer(tmp_path / "stopped") as orthanc:
        pass  # started to have real ports, then stopped: connections are refused
    web = dicomweb(orthanc.dicomweb_url)
    dimse = cfind(orthanc)

    with warnings.catch_warnings():
        # pynetdicom 3.0 drops the socket of a refused connection without closing it (transport.py connect)
        warnings.simplefilter("ignore", ResourceWarning)
        summaries = [
            backfill(index, engine, source, since=date(2020, 1, 1), until=date(2024, 12, 31)) for source in (web, dimse)
        ]

    for summary, source in zip(summaries, (web, dimse), strict=True):
        assert (summary.failures, summary.succeeded, source.requests_sent) == ([], False, 1 if source is web else 0)
        assert summary.counts.days_done == 0
    assert f"cannot reach the PACS at {orthanc.dicomweb_url} (ConnectError" in (summaries[0].unreachable or "")
    assert "check pacs.dicomweb_url and that the PACS runs" in (summaries[0].unreachable or "")
    assert f"the PACS ORTHANC@127.0.0.1:{orthanc.dicom_port}" in (summaries[1].unreachable or "")
    assert "check pacs.dimse (ae_title, host, port)" in (summaries[1].unreachable or "")
    runs = BackfillLedger(engine).latest_runs(limit=2)
    assert [(run.state, run.last_error) for run in runs] == [
        (RunState.INCOMPLETE.value, summary.unreachable) for summary in reversed(summaries)
    ]


def test_a_pacs_that_goes_away_mid_run_stops_it_after_three_requests_in_a_row(
    index: Index, engine: Engine, tmp_path: Path
):
    """Orthanc answers the first window, then stops: the next two windows fail (each after its attempts) and the
    third request ends the run, naming the URL; the last window is not asked."""
    study_uid = new_study_uid()
    orthanc = OrthancServer(tmp_path / "going").start()
    try:
        store_in_orthanc(orthanc, write_studies(tmp_path / "files", [rich_study(study_uid, study_date="20200601")]))

        class StopThePacsAfterTheFirstWindow(JsonLinesProgress):
            def advanced(self, *, days: int, counts: Any) -> None:
                super().advanced(days=days, counts=counts)
                orthanc.stop()

        source = dicomweb(orthanc.dicomweb_url, max_attempts=1)
        runner = BackfillRunner(
            source=source,
            sink=index,
            ledger=BackfillLedger(engine),
            reporter=StopThePacsAfterTheFirstWindow(),
            clock=utc_now,
        )
        summary = runner.run(BackfillRequest(source="dicomweb", since=date(2020, 1, 1), until=date(2024, 12, 31)))
    finally:
        orthanc.stop()

    assert summary.counts.studies_indexed == 1
    assert [failure.what for failure in summary.failures] == [
        "window 2021-01-01..2021-12-31",
        "window 2022-01-01..2022-12-31",
    ]
    assert f"the PACS at {orthanc.dicomweb_url} stopped answering: 3 requests in a row" in (summary.unreachable or "")
    assert source.requests_sent == 2 + 3  # the first window's QIDO and metadata, then 2021, 2022, 2023


def test_over_long_values_are_indexed_as_the_listener_indexes_them_without_a_warning_per_instance(
    index: Index,
    engine: Engine,
    c_store_index: Index,
    orthanc: OrthancServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    """A study whose description (LO, at most 64 characters) has 200 and whose accession number (SH, 16) has 40:
    backfilled over DICOMweb and C-FIND with pydicom's default validation (a warning per value read), no
    warning is raised or logged, and the ImagingStudy is the one the listener builds from C-STORE."""
    study_uid = new_study_uid()
    datasets = rich_study(study_uid)
    for ds in datasets:  # elements made without validation: pydicom would warn as each value is set
        ds["StudyDescription"] = DataElement(0x00081030, "LO", "CT THORAX " * 20, validation_mode=pydicom_config.IGNORE)
        ds["AccessionNumber"] = DataElement(0x00080050, "SH", "A" * 40, validation_mode=pydicom_config.IGNORE)
    paths = write_studies(tmp_path / "files", [datasets])
    received_by_c_store(c_store_index, paths)
    store_in_orthanc(orthanc, paths)
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.WARN)
    caplog.set_level("DEBUG", logger="pydicom")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as pytest's filterwarnings, whatever else the session set
        by_dicomweb = backfill(index, engine, dicomweb(orthanc.dicomweb_url), study_uid=study_uid)
        monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.WARN)
        by_cfind = backfill(index, engine, cfind(orthanc), study_uid=study_uid)

    assert (by_dicomweb.succeeded, by_cfind.succeeded) == (True, True)
    assert not [record for record in caplog.records if record.name.startswith("pydicom")]
    from_c_store = build_imaging_study(c_store_index.load_snapshot(study_uid), MAPPING)
    from_backfill = build_imaging_study(index.load_snapshot(study_uid), MAPPING)
    assert from_backfill == from_c_store
    assert from_backfill["description"] == from_c_store["description"]


def test_the_progress_bar_fits_80_columns(index: Index, engine: Engine, orthanc: OrthancServer, tmp_path: Path):
    """On an 80-column terminal the bar of a backfill since 1900 shows its days, the time left and the studies'
    figures whole, each line within 80 columns."""
    store_in_orthanc(orthanc, write_studies(tmp_path / "files", [rich_study(new_study_uid())]))
    shown = io.StringIO()
    reporter = TerminalProgress(console=Console(file=shown, width=80, force_terminal=False, color_system=None))
    runner = BackfillRunner(
        source=dicomweb(orthanc.dicomweb_url),
        sink=index,
        ledger=BackfillLedger(engine),
        reporter=reporter,
        clock=utc_now,
    )

    summary = runner.run(BackfillRequest(source="dicomweb", until=date(2024, 12, 31)))

    days = (date(2024, 12, 31) - date(1900, 1, 1)).days + 1
    assert summary.counts.days_done == days
    lines = shown.getvalue().splitlines()
    assert lines and all(len(line) <= 80 for line in lines), lines
    bar = next(line for line in lines if "days" in line)
    assert f"{days:,}/{days:,} days" in bar and "ETA" in bar
    assert "1 studies found, 1 indexed, 0 unchanged, 0 failed" in shown.getvalue()
    assert "…" not in shown.getvalue()


def test_a_dry_run_says_which_studies_are_new_changed_or_unchanged_and_changes_nothing(
    index: Index, engine: Engine, orthanc: OrthancServer, tmp_path: Path
):
    """Indexed: study A as the PACS holds it, study B without its SR series. The PACS holds A, B whole and a new
    C: a dry run says 1 new, 1 changed, 1 unchanged, and would index C's 4 instances and B's 1; nothing in the
    index changes and no run is kept. Without an index (sink None) every study is new."""
    a, b, c = (rich_study(new_study_uid()) for _ in range(3))
    paths = write_studies(tmp_path / "files", [a, b, c])
    by_uid = {ds.SOPInstanceUID: path for path, ds in zip(paths, [*a, *b, *c], strict=True)}
    received_by_c_store(index, [by_uid[ds.SOPInstanceUID] for ds in [*a, *(ds for ds in b if ds.Modality == "CT")]])
    store_in_orthanc(orthanc, paths)
    before = {study[0].StudyInstanceUID: index.load_snapshot(study[0].StudyInstanceUID) for study in (a, b)}

    dry = backfill(index, engine, dicomweb(orthanc.dicomweb_url), since=date(2024, 1, 1), dry_run=True)
    runner = BackfillRunner(
        source=dicomweb(orthanc.dicomweb_url), sink=None, ledger=None, reporter=JsonLinesProgress(), clock=utc_now
    )
    without_index = runner.run(BackfillRequest(source="dicomweb", since=date(2024, 1, 1), dry_run=True))

    assert (dry.succeeded, dry.run_id, dry.counts.studies_found) == (True, None, 3)
    assert (dry.new_studies, dry.counts.studies_indexed - dry.new_studies, dry.counts.studies_unchanged) == (1, 1, 1)
    assert dry.counts.instances_indexed == 4 + 1
    assert {uid: index.load_snapshot(uid) for uid in before} == before
    assert index.count_by_state() == StateCounts(pending=2, published=0, failed=0)
    assert BackfillLedger(engine).latest_runs() == []
    assert (
        without_index.new_studies,
        without_index.counts.studies_indexed,
        without_index.counts.instances_indexed,
    ) == (3, 3, 12)
