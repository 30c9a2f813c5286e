"""The socket every association is served on (dicom/connection.py): on real TCP connections, and under DCMTK
storescu with Nagle on."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from pacs_bridge.dicom.connection import ConnectionLimits, GuardedSocket
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.repository import Index
from tests.support.associations import wait_for_associations_to_end
from tests.support.dcmtk import require_dcmtk
from tests.support.studies import SeriesSpec, new_study_uid, write_study

COMMAND, LAST = 0x01, 0x02
RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    return pdu(0x04, struct.pack(">LBB", len(data) + 2, context_id, control) + data)


@pytest.fixture
def guarded_pair(tcp_pair: tuple[socket.socket, socket.socket]) -> Iterator[tuple[socket.socket, GuardedSocket]]:
    """(client, the accepted end as a GuardedSocket: PDUs within 1 s, P-DATA-TF up to 4 kB, data sets 1 kB)."""
    client, accepted = tcp_pair
    limits = ConnectionLimits(pdu_timeout_seconds=1.0, max_pdu_bytes=4096, max_instance_bytes=1000)
    guarded = GuardedSocket.adopt(accepted, limits, peer="test")
    yield client, guarded
    guarded.close()


def read_pdu(sock: socket.socket) -> bytes:
    """One PDU, read as pynetdicom reads it: its 6-byte header, then its body."""
    header = sock.recv(6)
    (length,) = struct.unpack(">L", header[2:6])
    body = b""
    while len(body) < length:
        part = sock.recv(length - len(body))
        assert part
        body += part
    return header + body


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux-only")
def test_nagle_is_off_and_quickack_is_armed_again_after_every_receive(
    guarded_pair: tuple[socket.socket, GuardedSocket],
) -> None:
    client, guarded = guarded_pair
    assert guarded.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    for chunk in (RELEASE_RQ[:4], RELEASE_RQ[4:]):
        guarded.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        client.sendall(chunk)
        assert guarded.recv(64) == chunk
        assert guarded.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1


def test_a_pdu_whose_bytes_trickle_in_fails_at_its_deadline(guarded_pair: tuple[socket.socket, GuardedSocket]) -> None:
    """One byte every 0.1 s keeps each receive short of any idle timeout, but the PDU (announced 100 bytes)
    must be whole 1 s after its first byte: the read fails long before the trickle would have ended."""
    client, guarded = guarded_pair
    stop = threading.Event()

    def trickle() -> None:
        client.sendall(struct.pack(">BBL", 0x05, 0, 100))
        for _ in range(300):
            if stop.wait(0.1):
                return
            try:
                client.sendall(b"\0")
            except OSError:
                return

    sender = threading.Thread(target=trickle)
    sender.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match=r"dicom\.pdu_timeout_seconds"):
            while True:
                guarded.recv(4096)
    finally:
        stop.set()
        sender.join()
    assert time.monotonic() - started < 25, "the deadline did not hold against the trickle"
    assert guarded.guard.violation is not None and guarded.guard.violation.reason == "pdu_timeout"


def test_a_p_data_tf_over_the_announced_maximum_is_answered_with_an_a_abort(
    guarded_pair: tuple[socket.socket, GuardedSocket],
) -> None:
    client, guarded = guarded_pair
    client.sendall(struct.pack(">BBL", 0x04, 0, 300_000_000))  # 300 MB in one PDU, announced
    with pytest.raises(ConnectionAbortedError, match=r"dicom\.max_pdu_bytes"):
        guarded.recv(6)
    client.settimeout(10)
    assert client.recv(64)[:1] == b"\x07"  # A-ABORT
    with pytest.raises(ConnectionAbortedError):  # and it stays failed
        guarded.recv(6)


def test_a_data_set_fragment_on_another_context_than_its_command_is_aborted(
    guarded_pair: tuple[socket.socket, GuardedSocket],
) -> None:
    client, guarded = guarded_pair
    client.sendall(p_data(1, COMMAND | LAST, b"c" * 20) + p_data(3, LAST, b"d" * 20))
    read_pdu(guarded)
    with pytest.raises(ConnectionAbortedError, match="presentation context 3, its command on 1"):
        read_pdu(guarded)


def test_the_pdus_carrying_only_more_of_an_oversized_data_set_are_read_and_dropped(
    guarded_pair: tuple[socket.socket, GuardedSocket],
) -> None:
    """Limit 1000 bytes: the PDU that crosses it is handed on, the next ones are not, the last fragment is; the
    next message is whole again."""
    client, guarded = guarded_pair
    command = p_data(1, COMMAND | LAST, b"c" * 40)
    crossing = [p_data(1, 0, bytes([n]) * 700) for n in range(2)]
    dropped = [p_data(1, 0, b"x" * 3000) for _ in range(5)]
    last = p_data(1, LAST, b"z" * 10)
    following = [p_data(1, COMMAND | LAST, b"C" * 40), p_data(1, LAST, b"Z" * 10)]
    client.sendall(b"".join([command, *crossing, *dropped, last, *following]))
    read = [read_pdu(guarded) for _ in range(6)]
    assert read == [command, *crossing, last, *following]


def test_storescu_with_nagle_on_stores_a_series(listener: DicomListener, index: Index, tmp_path: Path):
    """DCMTK storescu run without TCP_NODELAY (Nagle on, as Debian builds it) gets success for every instance."""
    study_uid = new_study_uid()
    write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 20)])
    environment = {key: value for key, value in os.environ.items() if key != "TCP_NODELAY"}
    result = subprocess.run(
        [
            require_dcmtk("storescu"),
            "-aec",
            "PACS_BRIDGE",
            "+sd",
            "127.0.0.1",
            str(listener.port),
            str(tmp_path / "study"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert index.load_snapshot(study_uid).number_of_instances == 20


def test_every_pdu_of_an_association_is_read_through_the_guarded_socket(
    listener: DicomListener, index: Index, tmp_path: Path
) -> None:
    """Pins what the guarantees rest on: pynetdicom (and the fast path) read the association request and every
    PDU after it through the GuardedSocket's recv/recv_into. Had they read another way (``recvmsg``, ``makefile``,
    the socket of another object), the stream monitor would have missed PDUs and this would fail."""
    study_uid = new_study_uid()
    (path,) = write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 1)])
    dataset = dcmread(path)
    ae = AE()
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    (acceptor,) = listener.associations
    guarded = acceptor.dul.socket.socket
    assert isinstance(guarded, GuardedSocket)
    assert assoc.send_c_store(dataset).Status == 0x0000
    assert assoc.send_c_store(dataset).Status == 0x0000
    monitor = guarded.guard.monitor
    received_before_release = monitor.pdus_received
    assoc.release()
    wait_for_associations_to_end(listener)
    # A-ASSOCIATE-RQ, then each C-STORE's command and data set (one or two PDUs each), then the A-RELEASE-RQ.
    assert 3 <= received_before_release <= 5
    assert monitor.pdus_received == received_before_release + 1
    assert monitor.data_sets_received == 2
    assert index.load_snapshot(study_uid).number_of_instances == 1
