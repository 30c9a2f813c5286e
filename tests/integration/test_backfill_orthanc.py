"""Backfill from a real PACS: Debian's Orthanc, started with its own configuration (C-FIND SCP and the
DICOMweb plugin on 127.0.0.1), fed by DCMTK storescu; the index on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import Engine

from pacs_bridge.backfill.dicomweb import DicomWebSource
from pacs_bridge.backfill.dimse import CFindSource
from pacs_bridge.backfill.pacing import Pacer
from pacs_bridge.backfill.progress import JsonLinesProgress
from pacs_bridge.backfill.runner import BackfillRequest, BackfillRunner, BackfillSummary
from pacs_bridge.backfill.source import StudySource
from pacs_bridge.dicom.scp import DicomListener, ListenerSettings
from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.endpoint import EndpointSettings
from pacs_bridge.fhir.imaging_study import MappingSettings, build_imaging_study, imaging_study_id
from pacs_bridge.index.backfill_progress import BackfillLedger, RunState
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.repository import Index
from pacs_bridge.index.schema import prepare_schema
from pacs_bridge.publish.debounce import DebounceSettings, RetrySettings
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
    """A 429 with Retry-After is waited out; garbage for one study fails that study, named, and the others are
    indexed; the run ends incomplete, and running it again indexes the one that failed."""
    study_uids = [new_study_uid() for _ in range(3)]
    store_in_orthanc(orthanc, write_studies(tmp_path / "files", [rich_study(uid) for uid in study_uids]))
    url = f"{dicomweb_proxy.root_url}/dicom-web"
    # QIDO passes; the first metadata request is told to come back in 1 s, then passes; the next gets garbage.
    dicomweb_proxy.program(Pass(), Respond(429, retry_after="1"), Pass(), Respond(200, body="<html>garbage"))

    summary = backfill(index, engine, dicomweb(url), since=date(2024, 1, 1))

    assert [failure.what for failure in summary.failures] == [f"study {summary_second_study(dicomweb_proxy)}"]
    assert "not application/dicom+json" in summary.failures[0].error or "not JSON" in summary.failures[0].error
    assert (summary.counts.studies_found, summary.counts.studies_indexed) == (3, 2)
    retried = [r for r in dicomweb_proxy.requests if r.fault.startswith("429")]
    assert len(retried) == 1
    assert BackfillLedger(engine).latest_runs(limit=1)[0].state == RunState.INCOMPLETE.value

    again = backfill(index, engine, dicomweb(url), since=date(2024, 1, 1))

    assert (again.resumed, again.succeeded, again.counts.studies_indexed) == (True, True, 3)
    assert {index.load_snapshot(uid).number_of_instances for uid in study_uids} == {4}


def summary_second_study(proxy: HttpFaultProxy) -> str:
    """The study whose metadata request got the garbage (the fourth request)."""
    return proxy.requests[3].path.split("/studies/")[1].split("/")[0]


def test_cfind_windows_with_the_pacs_maximum_are_split_and_an_overfull_day_is_named(
    index: Index, engine: Engine, tmp_path: Path
):
    """Orthanc answering at most 2 studies per C-FIND: windows are split until each answer is complete; a day
    holding 3 studies cannot be split, so it is reported (its first 2 are indexed) and the run is incomplete."""
    days = {"20240101": 1, "20240102": 2, "20240103": 3}
    studies = [rich_study(new_study_uid(), study_date=day) for day, count in days.items() for _ in range(count)]
    with OrthancServer(tmp_path / "limited", limit_find_results=2) as orthanc:
        store_in_orthanc(orthanc, write_studies(tmp_path / "files", studies))

        summary = backfill(
            index, engine, cfind(orthanc, max_results=0), since=date(2024, 1, 1), until=date(2024, 1, 31)
        )

    assert [failure.what for failure in summary.failures] == ["window 2024-01-03"]
    assert "raise the PACS's C-FIND limit" in summary.failures[0].error
    assert (summary.counts.studies_found, summary.counts.studies_indexed) == (5, 5)


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
