"""The DICOM listener with a real index behind it, fed by pynetdicom's SCU and by DCMTK's storescu."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.repository import Index
from pacs_bridge.logs import configure_logging
from tests.conftest import MAX_DELAY, QUIET
from tests.integration.conftest import listener_settings
from tests.support.dcmtk import echoscu, storescu
from tests.support.studies import SeriesSpec, make_dataset, uid, write_file, write_study


def utc_now() -> datetime:
    return datetime.now(UTC)


def encoded_as(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """``ds`` with the file meta pynetdicom reads to pick the presentation context."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


def associate(port: int, *transfer_syntaxes: str) -> Any:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.requested_contexts.append(build_context(CTImageStorage, list(transfer_syntaxes) or [ExplicitVRLittleEndian]))
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    return assoc


def test_stored_instance_is_indexed_before_success_is_answered(listener: DicomListener, index: Index):
    """C-STORE success means the instance is already in the index."""
    assoc = associate(listener.port)
    status = assoc.send_c_store(encoded_as(make_dataset()))
    assoc.release()
    assert status.Status == 0x0000
    assert index.load_snapshot(uid("1")).number_of_instances == 1


@pytest.fixture
def logging_at_debug(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The bridge's logging set up at debug level (its events captured by ``caplog``); the previous set-up
    afterwards."""
    structlog_config = structlog.get_config()
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    configure_logging("debug", "json")
    caplog.set_level(logging.DEBUG, logger="pacs_bridge.dicom")
    yield caplog
    structlog.configure(**structlog_config)
    root.handlers[:], root.level = root_handlers, root_level


def test_at_debug_level_each_stored_instance_is_logged(
    listener: DicomListener, index: Index, logging_at_debug: pytest.LogCaptureFixture
):
    assoc = associate(listener.port)
    assert assoc.send_c_store(encoded_as(make_dataset())).Status == 0x0000
    assoc.release()
    events = [record.msg for record in logging_at_debug.records if isinstance(record.msg, dict)]
    (stored,) = [event for event in events if event["event"] == "instance_stored"]
    assert stored["study_uid"] == uid("1")
    assert stored["outcome"] == "new"


def test_dataset_without_study_uid_is_refused_and_the_association_goes_on(listener: DicomListener, index: Index):
    """0xC000 with an ErrorComment naming the attribute; the next instance and a C-ECHO still succeed."""
    assoc = associate(listener.port)
    refused = assoc.send_c_store(encoded_as(make_dataset(StudyInstanceUID=None)))
    stored = assoc.send_c_store(encoded_as(make_dataset(SOPInstanceUID=uid("3.1.2"))))
    echo = assoc.send_c_echo()
    assoc.release()
    assert refused.Status == 0xC000
    assert "StudyInstanceUID" in refused.ErrorComment
    assert len(refused.ErrorComment) <= 64
    assert (stored.Status, echo.Status) == (0x0000, 0x0000)
    assert index.load_snapshot(uid("1")).number_of_instances == 1


def test_conflicting_instance_gets_a_failure_naming_the_conflict(listener: DicomListener, index: Index):
    """The same SOP Instance UID under another study is refused with 0xC001."""
    assoc = associate(listener.port)
    first = assoc.send_c_store(encoded_as(make_dataset()))
    conflicting = assoc.send_c_store(encoded_as(make_dataset(StudyInstanceUID=uid("9"), SeriesInstanceUID=uid("9.1"))))
    assoc.release()
    assert (first.Status, conflicting.Status) == (0x0000, 0xC001)
    assert "already indexed" in conflicting.ErrorComment


def test_compressed_transfer_syntax_is_accepted_without_decoding_pixels(listener: DicomListener, index: Index):
    """A JPEG Baseline instance whose pixel data is not even valid JPEG is indexed: pixels are never decoded."""
    ds = encoded_as(make_dataset(), JPEGBaseline8Bit)
    ds.PixelData = encapsulate([b"\xff\xd8 not a real JPEG stream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    assoc = associate(listener.port, JPEGBaseline8Bit)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    assert index.load_snapshot(uid("1")).number_of_instances == 1


def test_database_down_answers_out_of_resources(
    tmp_path: Path, receive_path: str, logging_at_debug: pytest.LogCaptureFixture
):
    """When the index cannot be written the sender gets 0xA700 (retry later), never success; the association's
    closing event counts it as try_later, apart from an instance refused for good (0xC000)."""
    broken = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2")
    running = DicomListener(
        listener_settings(receive_path),
        Index(broken, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY)),
        clock=utc_now,
    )
    running.start()
    try:
        assoc = associate(running.port, ImplicitVRLittleEndian)
        status = assoc.send_c_store(encoded_as(make_dataset(), ImplicitVRLittleEndian))
        refused = assoc.send_c_store(encoded_as(make_dataset(StudyInstanceUID=None), ImplicitVRLittleEndian))
        assoc.release()
    finally:
        running.stop(drain_timeout_seconds=5)  # waits for the association to end, and its closing event
        broken.dispose()
    assert (status.Status, refused.Status) == (0xA700, 0xC000)
    events = [record.msg for record in logging_at_debug.records if isinstance(record.msg, dict)]
    (released,) = [event for event in events if event["event"] == "association_released"]
    assert (released["stored"], released["try_later"], released["refused"]) == (0, 1, 1)


def test_bytes_that_are_not_dicom_do_not_stop_the_listener(listener: DicomListener):
    """Garbage on the socket is dropped; the listener answers C-ECHO afterwards."""
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 8)
        raw.settimeout(5)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            raw.recv(1024)
    assert echoscu(listener.port).returncode == 0


def test_a_value_pydicom_would_warn_about_is_stored_as_sent(listener: DicomListener, index: Index, tmp_path: Path):
    """pydicom's value checks are off in the listener (extraction checks what the index needs): a description
    longer than LO allows is stored, neither refused nor warned about (the test run turns warnings into errors,
    so a warning in the handler would have refused it)."""
    description = "CT chest abdomen pelvis " * 4  # 96 characters; LO allows 64
    settings = pydicom_config.settings
    previous = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom_config.IGNORE  # let the test write it
    try:
        path = write_file(make_dataset(StudyDescription=description), tmp_path / "long.dcm")
    finally:
        settings.reading_validation_mode = previous
    result = storescu(listener.port, [path])
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    assert index.load_snapshot(uid("1")).attributes.study_description == description.strip()


def test_dcmtk_storescu_sends_a_multi_series_study(listener: DicomListener, index: Index, tmp_path: Path):
    """DCMTK's storescu, the modality no one here wrote, stores every instance successfully."""
    write_study(tmp_path / "study", uid("7"), [SeriesSpec("CT", 6), SeriesSpec("CT", 4), SeriesSpec("SR", 1)])
    result = storescu(listener.port, tmp_path / "study")
    assert result.returncode == 0, result.stderr
    snapshot = index.load_snapshot(uid("7"))
    assert [len(s.instances) for s in snapshot.series] == [6, 4, 1]


def test_dcmtk_storescu_gets_a_failure_status_for_a_file_without_study_uid(
    listener: DicomListener, index: Index, tmp_path: Path
):
    """storescu reports the 0xC000 failure for the bad file; the good file of the same run is stored."""
    bad = make_dataset(StudyInstanceUID=None, SOPInstanceUID=uid("3.9.9"))
    bad_path = write_file(bad, tmp_path / "bad.dcm")
    good_path = write_file(make_dataset(), tmp_path / "good.dcm")
    result = storescu(listener.port, [bad_path, good_path], extra_args=("--no-halt",))
    assert "Received Store Response (Error: CannotUnderstand)" in result.stdout + result.stderr
    assert index.load_snapshot(uid("1")).number_of_instances == 1
    assert echoscu(listener.port).returncode == 0


def _open_spill_files(spool: Path) -> list[int]:
    """Sizes of the files this process has open in ``spool`` (anonymous temporary files included)."""
    sizes = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(spool)):
            sizes.append(os.fstat(int(fd.name)).st_size)
    return sizes


class SpillWatchingSink:
    """The real index, noting which spill files are open while each instance is being recorded."""

    def __init__(self, index: Index, spool: Path) -> None:
        self.index = index
        self.spool = spool
        self.seen: list[list[int]] = []

    def record_instance(self, record, *, received_at):  # type: ignore[no-untyped-def]
        self.seen.append(_open_spill_files(self.spool))
        return self.index.record_instance(record, received_at=received_at)


@pytest.mark.parametrize(("pixel_bytes", "spilled"), [(4096 * 3072 * 2, True), (64 * 64 * 2, False)])
def test_large_instance_spills_to_a_temporary_file_and_a_small_one_stays_in_memory(
    index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pixel_bytes: int, spilled: bool
):
    """With the fast path, a 24 MB instance is received into a temporary file (memory stays flat); an 8 kB one
    never touches disk; no file is left behind. (Stock pynetdicom writes every instance to a file.)"""
    import tempfile

    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    sink = SpillWatchingSink(index, spool)
    running = DicomListener(listener_settings("fast_path"), sink, clock=utc_now)
    running.start()
    side = int((pixel_bytes // 2) ** 0.5)
    ds = make_dataset(SOPInstanceUID=uid("3.1.77"))
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = side, side, 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.PixelData = bytes(side * side * 2)
    path = write_file(ds, tmp_path / "instance.dcm")
    del ds
    try:
        result = storescu(running.port, [path])
    finally:
        running.stop(drain_timeout_seconds=5)
    assert result.returncode == 0, result.stdout + result.stderr
    assert index.load_snapshot(uid("1")).number_of_instances == 1
    (open_while_recording,) = sink.seen
    if spilled:
        assert len(open_while_recording) == 1 and open_while_recording[0] > side * side * 2
    else:
        assert open_while_recording == []
    assert list(spool.iterdir()) == []
    assert _open_spill_files(spool) == []
