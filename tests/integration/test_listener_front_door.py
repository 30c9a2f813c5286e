"""Hostile and broken peers on the DICOM port, against a real listener (both receive paths): half-open and
trickling connections, floods, oversized PDUs and instances, fragments on the wrong context, aborts mid-data
set. Each test checks the answer, that DCMTK storescu still gets in, and that threads, file descriptors and
memory come back."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import struct
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from pacs_bridge.dicom.received import open_receive_files
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.errors import UnknownStudyError
from pacs_bridge.index.repository import Index
from tests.integration.conftest import listener_settings
from tests.support.associations import wait_for_associations_to_end
from tests.support.dcmtk import storescu
from tests.support.resources import Resources, back_to
from tests.support.studies import SeriesSpec, make_dataset, new_study_uid, uid, write_study

pytestmark = pytest.mark.dcmtk

MAX_ASSOCIATIONS = 4
QUICK_REQUEST_TIMEOUT = 1.0  # dicom.association_request_timeout_seconds for tests marked quick_requests
PDU_TIMEOUT = 1.0
NETWORK_TIMEOUT = 3.0
MAX_PDU_BYTES = 16384
MAX_INSTANCE_BYTES = 64 * 1024
ASSOCIATE_RQ_HEADER = struct.pack(">BBL", 0x01, 0, 300)


@pytest.fixture(autouse=True)
def pynetdicom_leftovers_tolerated(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """What pynetdicom itself does with a connection cut off, which these tests cause on purpose:

    - it logs the cut with its traceback; a record kept by the log capture would keep the association's objects
      alive until the test ends, which the resource checks would see;
    - it drops the message being received with its temporary file open: whoever collects it (the listener's
      sweep, or Python's garbage collector first) closes the file with a ResourceWarning."""
    caplog.set_level(logging.CRITICAL, logger="pynetdicom")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"unclosed file .*tmp\w+\.dcm", category=ResourceWarning)
        yield


@pytest.fixture
def listener(index: Index, receive_path: str, request: pytest.FixtureRequest) -> Iterator[DicomListener]:
    """A listener with small limits: 4 associations, 16 pending connections, 1 s for each PDU, 3 s of silence,
    16 kB PDUs, 64 kB instances; 30 s for an association request, or 1 s for tests marked ``quick_requests``."""
    quick = request.node.get_closest_marker("quick_requests") is not None
    settings = listener_settings(
        receive_path,
        max_associations=MAX_ASSOCIATIONS,
        association_request_timeout_seconds=QUICK_REQUEST_TIMEOUT if quick else 30.0,
        pdu_timeout_seconds=PDU_TIMEOUT,
        network_timeout_seconds=NETWORK_TIMEOUT,
        max_pdu_bytes=MAX_PDU_BYTES,
        max_instance_bytes=MAX_INSTANCE_BYTES,
        max_pending_connections=16,
    )
    running = DicomListener(settings, index, clock=lambda: datetime.now(UTC))
    running.start()
    yield running
    running.stop(drain_timeout_seconds=5)


@pytest.fixture
def baseline(listener: DicomListener, index: Index, tmp_path: Path) -> Resources:
    """This process's threads, descriptors and memory with the listener up and idle, warmed up by one study
    stored and read back (the index has opened its connections)."""
    assert indexed(index, send_study(listener.port, tmp_path / "warm-up", 1)) == 1
    wait_for_associations_to_end(listener)
    return Resources.of()


def half_open(port: int, sent: bytes) -> socket.socket:
    """A connection that sends ``sent`` (part of an association request, or nothing) and then nothing more."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    if sent:
        connection.sendall(sent)
    return connection


HALF_OPEN_KINDS = [
    b"",  # connects, says nothing
    ASSOCIATE_RQ_HEADER[:1],  # 1 to 5 bytes of a PDU header
    ASSOCIATE_RQ_HEADER[:3],
    ASSOCIATE_RQ_HEADER[:5],
    ASSOCIATE_RQ_HEADER + b"\0" * 100,  # a header announcing 300 bytes, then 100 of them
]


def closed_by_peer(connection: socket.socket, *, timeout: float) -> bool:
    """Whether the other end closes ``connection`` within ``timeout`` (EOF or reset)."""
    connection.settimeout(timeout)
    try:
        while connection.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def send_study(port: int, directory: Path, instances: int) -> str:
    study_uid = new_study_uid()
    write_study(directory, study_uid, [SeriesSpec("CT", instances)])
    result = storescu(port, directory, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return study_uid


@contextlib.contextmanager
def hostile_association(port: int, *abstract_syntaxes: str) -> Iterator[tuple[Any, socket.socket]]:
    """A pynetdicom association and its socket, on which the test writes raw bytes; the socket is closed on
    leaving (pynetdicom's requestor drops it unclosed when the peer aborts)."""
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for abstract_syntax in abstract_syntaxes or (CTImageStorage,):
        ae.requested_contexts.append(build_context(abstract_syntax))
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    try:
        yield assoc, raw
    finally:
        if assoc.is_established:
            assoc.abort()
        raw.close()


def indexed(index: Index, study_uid: str) -> int:
    """Instances indexed for ``study_uid`` (0 when the study is not in the index)."""
    try:
        return index.load_snapshot(study_uid).number_of_instances
    except UnknownStudyError:
        return 0


def ended(assoc: Any, *, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.02)
    return not assoc.is_established


def c_store_pdus(
    dataset_bytes: bytes, *, command_context: int, data_set_context: int, move_originator_ids: list[int] | None = None
) -> bytes:
    """The P-DATA-TF PDUs of a C-STORE-RQ (command as pynetdicom encodes it), the data set in one fragment;
    with ``move_originator_ids``, a MoveOriginatorMessageID of those values (two: a command the fast path leaves
    to pynetdicom)."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = uid("3.9.1")
    request.Priority = 2
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    message.command_set.CommandDataSetType = 0x0001
    if move_originator_ids is not None:
        message.command_set.MoveOriginatorApplicationEntityTitle = "MOVER"
        message.command_set.MoveOriginatorMessageID = move_originator_ids
    command = b"".join(pdv for p in message.encode_msg(command_context, 0) for _, pdv in p.presentation_data_value_list)

    def p_data(context_id: int, pdv: bytes) -> bytes:
        item = struct.pack(">LB", len(pdv) + 1, context_id) + pdv
        return struct.pack(">BBL", 0x04, 0, len(item)) + item

    return p_data(command_context, command) + p_data(data_set_context, b"\x02" + dataset_bytes)


def test_half_open_connections_at_twice_max_associations_never_keep_storescu_out(
    listener: DicomListener, index: Index, baseline: Resources, tmp_path: Path
) -> None:
    """8 connections (twice max_associations) that say nothing or part of a request are held pending, without
    an association slot or a thread: storescu gets in and stores a study; closing them gives everything back."""
    held = [half_open(listener.port, HALF_OPEN_KINDS[n % len(HALF_OPEN_KINDS)]) for n in range(2 * MAX_ASSOCIATIONS)]
    try:
        study_uid = send_study(listener.port, tmp_path / "study", 10)
        wait_for_associations_to_end(listener)
        assert listener.pending_connections == len(held)
        assert Resources.of().threads == baseline.threads  # held without a thread
    finally:
        for connection in held:
            connection.close()
    assert index.load_snapshot(study_uid).number_of_instances == 10
    back_to(baseline)


@pytest.mark.quick_requests
@pytest.mark.parametrize("sent", HALF_OPEN_KINDS, ids=["nothing", "1 byte", "3 bytes", "5 bytes", "short request"])
def test_a_connection_without_a_whole_request_is_closed_at_its_deadline(
    listener: DicomListener, baseline: Resources, sent: bytes
) -> None:
    """The ARTIM timer: whatever part of a request was sent, the connection is closed once its time (1 s here)
    is up, long before an idle timeout would have."""
    connection = half_open(listener.port, sent)
    with connection:
        assert closed_by_peer(connection, timeout=30)
    back_to(baseline)


@pytest.mark.quick_requests
def test_a_request_trickled_a_byte_at_a_time_is_closed_at_its_deadline(
    listener: DicomListener, baseline: Resources
) -> None:
    """One byte every 50 ms never lets the connection go quiet, and its request is never whole: closed at the
    deadline all the same (or the trickle would have lasted 15 s)."""
    connection = socket.create_connection(("127.0.0.1", listener.port), timeout=10)
    request = ASSOCIATE_RQ_HEADER + b"\0" * 300
    closed = False
    with connection:
        for byte in request:
            try:
                connection.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.05)
        closed = closed or closed_by_peer(connection, timeout=30)
    assert closed
    back_to(baseline)


def test_past_the_pending_limit_the_oldest_connection_is_closed_and_storescu_still_gets_in(
    listener: DicomListener, index: Index, baseline: Resources, tmp_path: Path
) -> None:
    """16 pending at most: of 24 silent connections the first 8 are closed; storescu's, arriving last, gets in."""
    held = [half_open(listener.port, b"") for _ in range(24)]
    try:
        oldest_closed = [closed_by_peer(connection, timeout=30) for connection in held[:8]]
        assert all(oldest_closed)
        study_uid = send_study(listener.port, tmp_path / "study", 5)
    finally:
        for connection in held:
            connection.close()
    assert index.load_snapshot(study_uid).number_of_instances == 5
    back_to(baseline)


def test_a_flood_of_connections_does_not_keep_storescu_out(
    listener: DicomListener, index: Index, baseline: Resources, tmp_path: Path
) -> None:
    """While a thread opens and drops connections as fast as it can (some saying nothing, some garbage, some
    part of a request), storescu stores 40 instances."""
    stop = threading.Event()
    opened = [0]

    def flood() -> None:
        payloads = [b"", b"GET / HTTP/1.1\r\n\r\n", ASSOCIATE_RQ_HEADER, b"\x04\x00\xff\xff\xff\xff"]
        while not stop.is_set():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", listener.port), timeout=5) as c:
                payload = payloads[opened[0] % len(payloads)]
                if payload:
                    c.sendall(payload)
            opened[0] += 1

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        study_uid = send_study(listener.port, tmp_path / "study", 40)
    finally:
        stop.set()
        flooder.join()
    assert opened[0] > 40
    assert index.load_snapshot(study_uid).number_of_instances == 40
    back_to(baseline)


def test_a_pdu_trickled_after_the_association_is_cut_at_its_deadline(
    listener: DicomListener, index: Index, baseline: Resources, tmp_path: Path
) -> None:
    """An established association whose next PDU comes a byte at a time is cut once that PDU has had its time
    (1 s here), though bytes keep coming; storescu gets in meanwhile and after."""
    with hostile_association(listener.port) as (assoc, raw):
        raw.sendall(struct.pack(">BBL", 0x04, 0, 1000))
        for _ in range(200):  # up to 10 s of trickle
            if not assoc.is_established:
                break
            with contextlib.suppress(OSError):
                raw.sendall(b"\0")
            time.sleep(0.05)
        assert ended(assoc)
    study_uid = send_study(listener.port, tmp_path / "study", 3)
    assert index.load_snapshot(study_uid).number_of_instances == 3
    wait_for_associations_to_end(listener)
    back_to(baseline)


def test_a_p_data_tf_over_the_announced_maximum_aborts_the_association_at_its_header(
    listener: DicomListener, index: Index, baseline: Resources, tmp_path: Path
) -> None:
    """The listener announces 16 kB; a peer announcing a 300 MB PDU is aborted from the header alone (nothing
    of it is buffered); storescu gets in."""
    with hostile_association(listener.port) as (assoc, raw):
        assert assoc.acceptor.maximum_length == MAX_PDU_BYTES
        raw.sendall(struct.pack(">BBL", 0x04, 0, 300_000_000) + b"\0" * 65536)
        assert ended(assoc)
        assert assoc.is_aborted
    study_uid = send_study(listener.port, tmp_path / "study", 3)
    assert index.load_snapshot(study_uid).number_of_instances == 3
    wait_for_associations_to_end(listener)
    back_to(baseline)


def large_instance(sop_instance: str, pixel_bytes: int) -> Dataset:
    ds = make_dataset(SOPInstanceUID=uid(sop_instance))
    ds.Rows, ds.Columns = pixel_bytes // 512, 256
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 16, 16, 15, 1
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    ds.PixelData = bytes(ds.Rows * ds.Columns * 2)
    return ds


def test_an_instance_over_max_instance_bytes_is_refused_naming_the_limit_and_the_association_goes_on(
    listener: DicomListener, index: Index, baseline: Resources
) -> None:
    """A 1 MB instance (limit 64 kB) is read, dropped and refused with 0xC002 and an ErrorComment naming
    dicom.max_instance_bytes (a retry cannot succeed: not 0xA7xx); the next, small one on the same association
    is stored."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    too_large, small = large_instance("3.5.1", 1024 * 1024), make_dataset(SOPInstanceUID=uid("3.5.2"))
    for ds in (too_large, small):
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with hostile_association(listener.port) as (assoc, _raw):
        refused = assoc.send_c_store(too_large)
        stored = assoc.send_c_store(small)
        assoc.release()
    assert refused.Status == 0xC002
    assert "dicom.max_instance_bytes" in refused.ErrorComment and len(refused.ErrorComment) <= 64
    assert stored.Status == 0x0000
    assert [i.sop_instance_uid for s in index.load_snapshot(uid("1")).series for i in s.instances] == [uid("3.5.2")]
    wait_for_associations_to_end(listener)
    back_to(baseline)


def test_storescu_is_told_an_oversized_file_failed_and_its_other_files_are_stored(
    listener: DicomListener, index: Index, baseline: Resources, tmp_path: Path
) -> None:
    from tests.support.studies import write_file

    paths = [
        write_file(make_dataset(SOPInstanceUID=uid("3.6.1")), tmp_path / "a.dcm"),
        write_file(large_instance("3.6.2", 512 * 1024), tmp_path / "b.dcm"),
        write_file(make_dataset(SOPInstanceUID=uid("3.6.3")), tmp_path / "c.dcm"),
    ]
    result = storescu(listener.port, paths, extra_args=("--no-halt",))
    output = result.stdout + result.stderr
    assert "Received Store Response (Error: CannotUnderstand)" in output, output[-2000:]
    assert index.load_snapshot(uid("1")).number_of_instances == 2
    back_to(baseline)


def test_a_data_set_on_another_presentation_context_than_its_command_aborts_and_indexes_nothing(
    listener: DicomListener, index: Index, baseline: Resources, tmp_path: Path
) -> None:
    """PS3.8 E.2: a message's fragments share one presentation context. A C-STORE command on the CT context
    with its data set on the MR one aborts the association; nothing is indexed; storescu gets in."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = True, True  # the contexts' default transfer syntax
    write_dataset(buffer, make_dataset(SOPInstanceUID=uid("3.9.1")))
    with hostile_association(listener.port, CTImageStorage, MRImageStorage) as (assoc, raw):
        contexts = {cx.abstract_syntax: cx.context_id for cx in assoc.accepted_contexts}
        pdus = c_store_pdus(
            buffer.getvalue(), command_context=contexts[CTImageStorage], data_set_context=contexts[MRImageStorage]
        )
        raw.sendall(pdus)
        assert ended(assoc)
    assert indexed(index, uid("1")) == 0
    study_uid = send_study(listener.port, tmp_path / "study", 2)
    assert index.load_snapshot(study_uid).number_of_instances == 2
    wait_for_associations_to_end(listener)
    back_to(baseline)


def receive_files_in(directory: str) -> list[str]:
    """The files of pynetdicom's received data sets (``tmp….dcm``) in ``directory``."""
    return [name for name in os.listdir(directory) if re.fullmatch(r"tmp\w+\.dcm", name)]


def test_aborts_in_quick_succession_mid_data_set_leave_no_temporary_file_while_a_transfer_goes_on(
    listener: DicomListener, index: Index, baseline: Resources, tmp_path: Path
) -> None:
    """20 associations, 0.05 s apart, each send a C-STORE command and half its data set, then abort. The command
    carries a MoveOriginatorMessageID of two values, which the fast path leaves to pynetdicom, so that on both
    receive paths pynetdicom writes the data set to a temporary file. Meanwhile storescu sends a study: stored
    whole. Once the associations are gone, the listener's receive directory holds no file."""
    directory = tempfile.gettempdir()  # where pynetdicom writes, while the listener runs
    seen: set[str] = set()
    sent: dict[str, str] = {}
    sender = threading.Thread(target=lambda: sent.update(study=send_study(listener.port, tmp_path / "study", 10)))
    sender.start()
    for _ in range(20):
        with hostile_association(listener.port) as (assoc, raw):
            context_id = assoc.accepted_contexts[0].context_id
            pdus = c_store_pdus(
                b"\0" * 12000, command_context=context_id, data_set_context=context_id, move_originator_ids=[7, 8]
            )
            raw.sendall(pdus[: len(pdus) - 6000])  # the command, and half of the data set's PDU
            time.sleep(0.05)
            seen |= open_receive_files(directory)
            assoc.abort()
    sender.join(timeout=120)
    assert index.load_snapshot(sent["study"]).number_of_instances == 10
    assert seen, "pynetdicom wrote no data set to a temporary file: the test did not reach what it tests"
    wait_for_associations_to_end(listener)
    deadline = time.monotonic() + 60
    while (receive_files_in(directory) or any(map(os.path.exists, seen))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert receive_files_in(directory) == []
    assert not any(map(os.path.exists, seen)), seen
    back_to(baseline)


def test_an_abort_in_the_middle_of_a_data_set_leaves_nothing_behind(
    listener: DicomListener, index: Index, baseline: Resources, tmp_path: Path
) -> None:
    """The peer sends a C-STORE command and half of its data set, then aborts: nothing is indexed, and no
    temporary file stays, open or on disk (stock pynetdicom drops the file of a message cut off, still open: the
    listener deletes it); storescu gets in meanwhile."""
    with hostile_association(listener.port) as (assoc, raw):
        context_id = assoc.accepted_contexts[0].context_id
        pdus = c_store_pdus(b"\0" * 12000, command_context=context_id, data_set_context=context_id)
        raw.sendall(pdus[: len(pdus) - 6000])  # the command, and half of the data set's PDU
        time.sleep(0.2)  # let the listener take in what was sent before the abort
        left_open = open_receive_files()
        assoc.abort()
    wait_for_associations_to_end(listener)
    study_uid = send_study(listener.port, tmp_path / "study", 2)
    assert index.load_snapshot(study_uid).number_of_instances == 2
    assert indexed(index, uid("3.9.1")) == 0
    wait_for_associations_to_end(listener)
    deadline = time.monotonic() + 60
    while (open_receive_files() or any(map(os.path.exists, left_open))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_receive_files() == set()
    assert not any(map(os.path.exists, left_open)), left_open
    back_to(baseline)
