"""Association requests pynetdicom cannot negotiate, associations it ends on an exception, and releases that cut
a message short, against a real listener (both receive paths, both databases): the PDU the peer gets back, the
one log line, the open-associations gauge, that storescu still gets in, and that threads and file descriptors
come back (dicom/negotiation.py, dicom/association_ledger.py)."""

from __future__ import annotations

import logging
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, acse
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from pacs_bridge.dicom.negotiation import MIN_PEER_MAXIMUM_LENGTH
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.errors import UnknownStudyError
from pacs_bridge.index.repository import Index, StateCounts
from pacs_bridge.logs import configure_logging, log_thread_exception
from pacs_bridge.metrics import BridgeMetrics
from tests.integration.conftest import listener_settings
from tests.support.association_requests import (
    CT_IMAGE_STORAGE,
    RELEASE_RQ,
    associate_rq,
    c_store_command,
    closed_by_peer,
    item,
    p_data_tf,
    presentation_context,
    read_pdu,
    user_information,
)
from tests.support.associations import wait_for_associations_to_end
from tests.support.dcmtk import storescu
from tests.support.resources import Resources, back_to
from tests.support.studies import SeriesSpec, make_dataset, new_study_uid, uid, write_study

pytestmark = pytest.mark.dcmtk

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT = 0x02, 0x03, 0x07
ANSWER_SECONDS = 5.0  # far longer than an answer takes; far shorter than any timeout of the listener's
COMMAND_LAST, DATA_SET_MORE = 0x03, 0x00  # message control headers


@pytest.fixture(autouse=True)
def dropped_receive_files_tolerated() -> Iterator[None]:
    """Stock pynetdicom drops the temporary file of a message cut off still open; whoever collects it first
    (the listener's sweep, or the garbage collector) closes it, the collector with a ResourceWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"unclosed file .*tmp\w+\.dcm", category=ResourceWarning)
        yield


@pytest.fixture
def bridge_logging(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The bridge's logging set up (its events captured by ``caplog``); the previous set-up afterwards."""
    structlog_config = structlog.get_config()
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    pynetdicom_level = logging.getLogger("pynetdicom").level
    configure_logging("info", "json")
    caplog.set_level(logging.INFO, logger="pacs_bridge")
    # pynetdicom logs the exceptions these tests cause with their tracebacks: a record the capture kept would
    # keep the association's objects (its sockets, files) alive until the test ends, which back_to would see.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    yield caplog
    structlog.configure(**structlog_config)
    root.handlers[:], root.level = root_handlers, root_level
    logging.getLogger("pynetdicom").setLevel(pynetdicom_level)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [record.msg for record in caplog.records if isinstance(record.msg, dict) and record.msg["event"] == name]


@pytest.fixture
def metrics() -> BridgeMetrics:
    return BridgeMetrics(lambda: StateCounts(pending=0, published=0, failed=0))


@pytest.fixture
def listener(
    index: Index, receive_path: str, metrics: BridgeMetrics, bridge_logging: pytest.LogCaptureFixture
) -> Iterator[DicomListener]:
    """A listener reporting to ``metrics``, with the default timeouts (30 s and more): an answer within
    ``ANSWER_SECONDS`` is the front door's, not a timeout's."""
    running = DicomListener(
        listener_settings(receive_path, max_associations=4), index, clock=lambda: datetime.now(UTC), observer=metrics
    )
    running.start()
    yield running
    running.stop(drain_timeout_seconds=5)


@pytest.fixture
def baseline(listener: DicomListener, index: Index, tmp_path: Path) -> Resources:
    """This process's threads and descriptors with the listener up and idle, after one study stored and read back
    (the index has opened its connections)."""
    assert indexed(index, send_study(listener.port, tmp_path / "warm-up", 1)) == 1
    wait_for_associations_to_end(listener)
    return Resources.of()


def open_associations(metrics: BridgeMetrics) -> float | None:
    return metrics.registry.get_sample_value("pacs_bridge_open_associations")


def send_study(port: int, directory: Path, instances: int) -> str:
    study_uid = new_study_uid()
    write_study(directory, study_uid, [SeriesSpec("CT", instances)])
    result = storescu(port, directory, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return study_uid


def indexed(index: Index, study_uid: str) -> int:
    try:
        return index.load_snapshot(study_uid).number_of_instances
    except UnknownStudyError:
        return 0


def connect(port: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def wait_until(condition: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


# What the peer gets for each request: (PDU type, body), body = reserved, then result/source/reason.
ABORT_INVALID_PARAMETER = (A_ABORT, bytes([0, 0, 2, 6]))
ABORT_UNRECOGNIZED_PARAMETER = (A_ABORT, bytes([0, 0, 2, 4]))
REJECT_PERMANENT_ACSE = (A_ASSOCIATE_RJ, bytes([0, 1, 2, 1]))

MALFORMED = {
    # the request of QA finding F6: pynetdicom's acceptor died, its DUL thread and socket stayed for good
    "context without a transfer syntax": (
        associate_rq([presentation_context(1, CT_IMAGE_STORAGE, ())]),
        ABORT_INVALID_PARAMETER,
        "invalid_presentation_context",
    ),
    "even context IDs": (
        associate_rq([presentation_context(0), presentation_context(2)]),
        ABORT_INVALID_PARAMETER,
        "invalid_presentation_context",
    ),
    "implementation class UID of 60 kB": (
        associate_rq(user_info=user_information(implementation_class_uid=b"1." * 30000)),
        ABORT_INVALID_PARAMETER,
        "invalid_uid",
    ),
    "unknown item type": (
        associate_rq([presentation_context(1), item(0x99, b"Z" * 3000)]),
        ABORT_UNRECOGNIZED_PARAMETER,
        "unknown_item",
    ),
    # QA finding F1: accepted, the instance stored, then an exception where the response should be
    "maximum length 6": (
        associate_rq(user_info=user_information(6)),
        REJECT_PERMANENT_ACSE,
        "maximum_length_too_small",
    ),
    "maximum length 1": (
        associate_rq(user_info=user_information(1)),
        REJECT_PERMANENT_ACSE,
        "maximum_length_too_small",
    ),
}


@pytest.mark.parametrize(("request_pdu", "answer", "reason"), list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_request_pynetdicom_cannot_negotiate_is_answered_at_once_and_closed(
    listener: DicomListener,
    index: Index,
    baseline: Resources,
    bridge_logging: pytest.LogCaptureFixture,
    tmp_path: Path,
    request_pdu: bytes,
    answer: tuple[int, bytes],
    reason: str,
) -> None:
    """The front door answers (A-ABORT or A-ASSOCIATE-RJ), closes the connection though the peer keeps its side
    open, and logs one line naming the peer and the reason; pynetdicom never sees the request."""
    with connect(listener.port) as connection:
        connection.sendall(request_pdu)
        assert read_pdu(connection, timeout=ANSWER_SECONDS) == answer
        assert closed_by_peer(connection, timeout=ANSWER_SECONDS)
        peer = f"127.0.0.1:{connection.getsockname()[1]}"
    (refused,) = events(bridge_logging, "association_request_refused")
    assert (refused["peer"], refused["reason"], refused["level"]) == (peer, reason, "warning")
    assert len(refused["detail"]) < 200  # a peer's value is quoted cut short
    assert listener.associations == []
    assert indexed(index, send_study(listener.port, tmp_path / "study", 2)) == 2
    back_to(baseline)


def test_a_hundred_such_requests_held_open_by_the_peer_leave_no_thread_or_descriptor_behind(
    listener: DicomListener, baseline: Resources, tmp_path: Path
) -> None:
    """QA finding F6: each request without a transfer syntax used to hold a thread and two descriptors for as
    long as its peer kept the socket open. Now every one is answered and closed by the bridge while the peer
    still holds its side, and the bridge's threads are back to the baseline before the peer lets go."""
    request = associate_rq([presentation_context(1, CT_IMAGE_STORAGE, ())])
    held = [connect(listener.port) for _ in range(100)]
    try:
        for connection in held:
            connection.sendall(request)
        assert {read_pdu(connection, timeout=ANSWER_SECONDS) for connection in held} == {ABORT_INVALID_PARAMETER}
        assert all(closed_by_peer(connection, timeout=ANSWER_SECONDS) for connection in held)
        wait_until(lambda: Resources.of().threads <= baseline.threads, timeout=30, what="threads back to baseline")
        send_study(listener.port, tmp_path / "study", 2)
    finally:
        for connection in held:
            connection.close()
    back_to(baseline)


@pytest.mark.parametrize("maximum_length", [MIN_PEER_MAXIMUM_LENGTH, 0], ids=["the floor", "no limit"])
def test_a_peer_announcing_the_smallest_maximum_length_served_or_none_gets_its_instance_stored(
    listener: DicomListener, index: Index, metrics: BridgeMetrics, maximum_length: int
) -> None:
    ae = AE(ae_title="SMALL_PDUS")
    ae.maximum_pdu_size = maximum_length
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    dataset = make_dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert assoc.send_c_store(dataset).Status == 0x0000
    assoc.release()
    assert indexed(index, str(dataset.StudyInstanceUID)) == 1
    wait_until(lambda: open_associations(metrics) == 0, timeout=10, what="the gauge back to 0")


def raw_association(port: int) -> socket.socket:
    """A connection with an association established on one CT context (ID 1, implicit VR little endian)."""
    connection = connect(port)
    connection.sendall(associate_rq([presentation_context(1, CT_IMAGE_STORAGE, (b"1.2.840.10008.1.2",))]))
    answer = read_pdu(connection, timeout=ANSWER_SECONDS)
    assert answer is not None and answer[0] == A_ASSOCIATE_AC
    return connection


def implicit_little_endian(dataset: Any) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = True, True
    write_dataset(buffer, dataset)
    return bytes(buffer.getvalue())


def test_an_association_pynetdicom_ends_on_an_exception_gets_its_end_line_and_the_gauge_goes_back(
    listener: DicomListener,
    metrics: BridgeMetrics,
    baseline: Resources,
    bridge_logging: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A C-STORE command set without its Affected SOP Instance UID makes pynetdicom's DUL thread stop on an
    exception (caught with "Exception in DUL.run()" and an A-ABORT on the fast path, uncaught as stock
    pynetdicom's, which just closes the connection), which raises neither EVT_RELEASED nor EVT_ABORTED: the
    association still ends with one end line, and the open-associations gauge comes back to 0 (it used to stay
    1 higher for each). The thread's exception is one warning line. storescu gets in."""
    monkeypatch.setattr(threading, "excepthook", log_thread_exception)  # as the bridge's logging set-up does
    with raw_association(listener.port) as connection:
        wait_until(lambda: open_associations(metrics) == 1, timeout=10, what="the association counted open")
        connection.sendall(p_data_tf(1, COMMAND_LAST, c_store_command(uid("9.1").encode(), leave_out=(0x1000,))))
        answer = read_pdu(connection, timeout=ANSWER_SECONDS)  # the A-ABORT, or None: closed
        assert answer is None or answer[0] == A_ABORT
        assert closed_by_peer(connection, timeout=ANSWER_SECONDS)
    wait_for_associations_to_end(listener)
    wait_until(lambda: open_associations(metrics) == 0, timeout=10, what="the gauge back to 0")
    wait_until(lambda: events(bridge_logging, "association_aborted"), timeout=10, what="the association's end line")
    (ended,) = events(bridge_logging, "association_aborted")
    assert (ended["calling_ae"], ended["stored"], ended["refused"]) == ("HOSTILE", 0, 0)
    send_study(listener.port, tmp_path / "study", 2)
    wait_until(lambda: open_associations(metrics) == 0, timeout=10, what="the gauge back to 0 after storescu")
    assert [event["stored"] for event in events(bridge_logging, "association_released")] == [2]
    assert events(bridge_logging, "thread_failed") == []
    assert all(event["level"] == "warning" for event in events(bridge_logging, "association_thread_failed"))
    back_to(baseline)


def test_a_release_request_in_the_middle_of_a_data_set_is_answered_with_an_abort(
    listener: DicomListener,
    index: Index,
    metrics: BridgeMetrics,
    baseline: Resources,
    bridge_logging: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """QA finding F5: a C-STORE command, part of its data set, then an A-RELEASE-RQ used to get an A-RELEASE-RP.
    It gets an A-ABORT (service provider, unexpected PDU), a line saying the partial message was dropped, and
    nothing is indexed."""
    dataset = make_dataset(SOPInstanceUID=uid("9.2"))
    encoded = implicit_little_endian(dataset)
    with raw_association(listener.port) as connection:
        connection.sendall(
            p_data_tf(1, COMMAND_LAST, c_store_command(uid("9.2").encode()))
            + p_data_tf(1, DATA_SET_MORE, encoded[: len(encoded) // 2])
            + RELEASE_RQ
        )
        assert read_pdu(connection, timeout=ANSWER_SECONDS) == (A_ABORT, bytes([0, 0, 2, 2]))
        assert closed_by_peer(connection, timeout=ANSWER_SECONDS)
    (cut,) = events(bridge_logging, "connection_cut")
    assert cut["reason"] == "message_out_of_order" and "partial message is dropped" in cut["detail"]
    wait_for_associations_to_end(listener)
    assert indexed(index, str(dataset.StudyInstanceUID)) == 0
    send_study(listener.port, tmp_path / "study", 2)
    wait_until(lambda: open_associations(metrics) == 0, timeout=10, what="the gauge back to 0")
    back_to(baseline)


def test_a_connection_whose_association_thread_died_is_closed(
    listener: DicomListener,
    baseline: Resources,
    bridge_logging: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The backstop for a pynetdicom failure the front door does not know of: here one is injected into
    pynetdicom's negotiation, so that the thread serving the association dies with the request unanswered while
    its DUL thread holds the connection (what a request without a transfer syntax used to do). The listener
    stops that DUL thread and closes the connection within seconds; the thread's exception is one warning line
    (raised under pynetdicom's code, not the bridge's)."""
    monkeypatch.setattr(threading, "excepthook", log_thread_exception)

    def failing_negotiation(self: Any) -> None:
        raise RuntimeError("a negotiation failure injected by the test")

    monkeypatch.setattr(acse.ACSE, "negotiate_association", failing_negotiation)
    with connect(listener.port) as connection:
        connection.sendall(associate_rq())
        assert closed_by_peer(connection, timeout=15)
    monkeypatch.undo()
    (stopped,) = events(bridge_logging, "association_thread_stopped")
    assert stopped["level"] == "warning"
    (failed,) = events(bridge_logging, "association_thread_failed")
    assert failed["error"] == "RuntimeError: a negotiation failure injected by the test"
    send_study(listener.port, tmp_path / "study", 2)
    back_to(baseline)
