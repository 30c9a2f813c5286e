"""A PACS that answers C-FIND badly: silent, garbage, a failure status, unreachable. Each fails its window,
named, and the run goes on with the next; an unreachable one stops the run. The PACS here is a pynetdicom
C-FIND SCP on 127.0.0.1 whose handler misbehaves as each test programs it."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from sqlalchemy import Engine

from pacs_bridge.backfill.dimse import PATIENT_ISSUER_NOT_RETURNED, CFindSource
from pacs_bridge.backfill.pacing import Pacer
from pacs_bridge.backfill.progress import JsonLinesProgress
from pacs_bridge.backfill.runner import BackfillRequest, BackfillRunner, BackfillSummary
from pacs_bridge.fhir.imaging_study import MappingSettings, build_imaging_study
from pacs_bridge.index.backfill_progress import BackfillLedger
from pacs_bridge.index.repository import Index
from tests.support.orthanc import free_port

Handler = Callable[[Any], Iterator[tuple[int, Dataset | None]]]


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of a test: lets a handler that hangs return, so the SCP can shut down."""
    event = threading.Event()
    yield event
    event.set()


def faulty_pacs(handler: Handler) -> Any:
    ae = AE(ae_title="FAULTY")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    return ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, handler)])


def backfill_from(port: int, index: Index, engine: Engine, *, until: date) -> BackfillSummary:
    source = CFindSource(
        calling_ae_title="PACS_BRIDGE",
        called_ae_title="FAULTY",
        host="127.0.0.1",
        port=port,
        pacer=Pacer(0, threading.Event()),
        timeout_seconds=1,
    )
    runner = BackfillRunner(
        source=source,
        sink=index,
        ledger=BackfillLedger(engine),
        reporter=JsonLinesProgress(),
        clock=lambda: datetime.now(UTC),
    )
    return runner.run(BackfillRequest(source="dimse", since=date(2023, 1, 1), until=until))


def study_answer(uid: str | None) -> Dataset:
    answer = Dataset()
    answer.QueryRetrieveLevel = "STUDY"
    if uid is not None:
        answer.StudyInstanceUID = uid
    answer.StudyDate = "20230601"
    return answer


def test_a_pacs_that_never_answers_fails_each_window_after_the_timeout(
    index: Index, engine: Engine, release: threading.Event
):
    """No C-FIND response within pacs.timeout_seconds: the association is dropped, the window named, and the
    next window is asked on a new association (which fails the same way)."""

    def silent(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        release.wait(30)
        yield 0x0000, None

    server = faulty_pacs(silent)
    try:
        summary = backfill_from(server.server_address[1], index, engine, until=date(2024, 12, 31))
    finally:
        release.set()
        server.shutdown()

    assert [failure.what for failure in summary.failures] == [
        "window 2023-01-01..2023-12-31",
        "window 2024-01-01..2024-12-31",
    ]
    assert all("no C-FIND response within 1 s (pacs.timeout_seconds)" in f.error for f in summary.failures)
    assert not summary.stopped


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        # an identifier without the Study Instance UID asked for
        ([(0xFF00, study_answer(None)), (0x0000, None)], "a C-FIND answer has no StudyInstanceUID (0020,000D)"),
        # a failure status, with its comment
        ([(0xC001, None)], "C-FIND at the STUDY level failed with status 0xC001"),
    ],
)
def test_garbage_and_failure_statuses_fail_the_window_and_the_run_goes_on(
    answers: list[tuple[int, Dataset | None]], message: str, index: Index, engine: Engine
):
    """The first window gets the bad answer; the second a good, empty one: only the first is reported."""
    calls = []

    def programmed(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        calls.append(event.identifier.StudyDate)
        if len(calls) == 1:
            yield from answers
        else:
            yield 0x0000, None

    server = faulty_pacs(programmed)
    try:
        summary = backfill_from(server.server_address[1], index, engine, until=date(2024, 12, 31))
    finally:
        server.shutdown()

    assert calls == ["20230101-20231231", "20240101-20241231"]
    [failure] = summary.failures
    assert failure.what == "window 2023-01-01..2023-12-31"
    assert message in failure.error


def test_an_unreachable_pacs_stops_the_run_naming_it_with_the_keys_to_check(index: Index, engine: Engine):
    """Nothing listens at pacs.dimse: the run stops at its first association, saying which PACS and which keys,
    rather than failing each of its two windows in turn."""
    with warnings.catch_warnings():
        # pynetdicom 3.0 drops the socket of a refused connection without closing it (transport.py connect)
        warnings.simplefilter("ignore", ResourceWarning)
        summary = backfill_from(free_port(), index, engine, until=date(2024, 12, 31))

    assert (summary.failures, summary.succeeded, summary.counts.days_done) == ([], False, 0)
    assert "cannot open an association with the PACS FAULTY@127.0.0.1:" in (summary.unreachable or "")
    assert "check pacs.dimse (ae_title, host, port)" in (summary.unreachable or "")


def answering_pacs(*, issuer_key_returned: bool) -> Any:
    """A PACS holding one CT study of one instance, whose study-level answers leave IssuerOfPatientID out (as
    a PACS that does not support the key does) or return it empty."""

    def answer(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        level = event.identifier.QueryRetrieveLevel
        found = Dataset()
        found.QueryRetrieveLevel = level
        found.StudyInstanceUID = "1.2.826.0.1.3680043.10.1482.77"
        if level == "STUDY":
            found.StudyDate = "20230601"
            found.PatientID = "PAT-77"
            found.PatientName = "Marker^Phi"
            if issuer_key_returned:
                found.IssuerOfPatientID = ""
        elif level == "SERIES":
            found.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1482.77.1"
            found.Modality = "CT"
        else:
            found.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1482.77.1"
            found.SOPInstanceUID = "1.2.826.0.1.3680043.10.1482.77.1.1"
            found.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        yield 0xFF00, found
        yield 0x0000, None

    return faulty_pacs(answer)


@pytest.mark.parametrize(
    ("issuer_key_returned", "subject_identifier"),
    [
        # the PACS does not return the key: the issuer is unknown, the identifier gets no system
        (False, {"value": "PAT-77", "assigner": {"display": PATIENT_ISSUER_NOT_RETURNED}}),
        # the PACS returns it empty: the study names no issuer, patient.identifier_system applies
        (True, {"system": "urn:oid:1.2.3.4", "value": "PAT-77"}),
    ],
)
def test_a_patient_issuer_the_pacs_does_not_return_is_never_taken_for_none(
    issuer_key_returned: bool, subject_identifier: dict[str, Any], index: Index, engine: Engine
):
    """Patient identity is never guessed: only a PACS that answers the issuer key (even empty) lets the PatientID
    take patient.identifier_system."""
    server = answering_pacs(issuer_key_returned=issuer_key_returned)
    try:
        summary = backfill_from(server.server_address[1], index, engine, until=date(2023, 12, 31))
    finally:
        server.shutdown()

    assert (summary.succeeded, summary.counts.studies_indexed) == (True, 1)
    snapshot = index.load_snapshot("1.2.826.0.1.3680043.10.1482.77")
    resource = build_imaging_study(snapshot, MappingSettings(patient_identifier_system="urn:oid:1.2.3.4"))
    identifier = resource["subject"]["identifier"]
    assert {key: identifier[key] for key in ("system", "value", "assigner") if key in identifier} == subject_identifier


def test_no_c_find_answer_reaches_the_logs_even_at_debug_level(
    index: Index, engine: Engine, caplog: pytest.LogCaptureFixture
):
    """pynetdicom logs C-FIND response identifiers by default: the backfill turns that off, so the patient's
    name and ID appear in no log line, whatever the level."""
    caplog.set_level("DEBUG")
    caplog.set_level("DEBUG", logger="pynetdicom")  # whatever an earlier configure_logging left it at
    server = answering_pacs(issuer_key_returned=True)
    try:
        summary = backfill_from(server.server_address[1], index, engine, until=date(2023, 12, 31))
    finally:
        server.shutdown()

    assert summary.counts.studies_indexed == 1
    assert "Sending Find Request" in caplog.text  # pynetdicom did log at debug level
    assert "Marker" not in caplog.text
    assert "PAT-77" not in caplog.text
