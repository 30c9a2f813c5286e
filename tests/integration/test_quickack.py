"""Immediate ACKs for senders that leave Nagle on: the socket wrapper, and DCMTK storescu without TCP_NODELAY."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE

from pacs_bridge.dicom.scp import DicomListener, QuickAckSocket
from pacs_bridge.index.repository import Index
from tests.support.associations import wait_for_associations_to_end
from tests.support.dcmtk import require_dcmtk
from tests.support.studies import SeriesSpec, new_study_uid, write_study

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux-only")


def test_wrapped_socket_turns_nagle_off_and_rearms_quickack_after_every_recv(
    tcp_pair: tuple[socket.socket, socket.socket],
):
    """TCP_NODELAY is on; after each recv QUICKACK is armed again (Linux clears it once used)."""
    client, accepted = tcp_pair
    wrapped = QuickAckSocket(accepted)
    assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    for chunk in (b"first", b"second"):
        accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        client.sendall(chunk)
        assert wrapped.recv(64) == chunk
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    assert wrapped.fileno() == accepted.fileno()  # select() and the rest pass through


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


def test_every_receive_of_an_association_goes_through_the_wrapper_from_its_request_on(
    listener: DicomListener, index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pins the adaptation to what pynetdicom (3.0.x) does: its DUL reads the A-ASSOCIATE-RQ and every PDU after
    it with ``recv`` on the socket EVT_CONN_OPEN let us wrap, each followed by a re-arm; the inline store reads a
    P-DATA-TF with ``recv_into`` on the same wrapper. If pynetdicom read through another method (``recvmsg``,
    ``makefile``...), wrapped later, or kept the socket elsewhere, the wrapper would pass that through silently
    and Nagle-on senders would stall again: this test fails instead."""
    received: list[bytes] = []
    rearms = [0]
    passed_through: set[str] = set()
    original_recv, original_recv_into, original_rearm, original_getattr = (
        QuickAckSocket.recv,
        QuickAckSocket.recv_into,
        QuickAckSocket._rearm,
        QuickAckSocket.__getattr__,
    )

    def recv(self: QuickAckSocket, bufsize: int, flags: int = 0) -> bytes:
        data = original_recv(self, bufsize, flags)
        received.append(data)
        return data

    def recv_into(self: QuickAckSocket, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        count = original_recv_into(self, buffer, nbytes, flags)
        received.append(bytes(memoryview(buffer)[:count]))
        return count

    def rearm(self: QuickAckSocket) -> None:
        rearms[0] += 1
        original_rearm(self)

    def getattr_(self: QuickAckSocket, name: str) -> Any:
        passed_through.add(name)
        return original_getattr(self, name)

    monkeypatch.setattr(QuickAckSocket, "recv", recv)
    monkeypatch.setattr(QuickAckSocket, "recv_into", recv_into)
    monkeypatch.setattr(QuickAckSocket, "_rearm", rearm)
    monkeypatch.setattr(QuickAckSocket, "__getattr__", getattr_)
    study_uid = new_study_uid()
    (path,) = write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 1)])
    dataset = dcmread(path)
    ae = AE()  # pynetdicom as a sender leaves Nagle on
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    (acceptor,) = listener._server.active_associations
    assert type(acceptor.dul.socket.socket) is QuickAckSocket
    assert assoc.send_c_store(dataset).Status == 0x0000
    assoc.release()
    wait_for_associations_to_end(listener)
    assert received and received[0][:1] == b"\x01"  # the first read is the A-ASSOCIATE-RQ's PDU header
    pdu_types = {data[0] for data in received if len(data) == 6}  # pynetdicom reads each PDU header alone
    assert {0x01, 0x05} <= pdu_types  # association request, release request
    assert any(data[:1] == b"\x04" and len(data) > 6 for data in received)  # the C-STORE, read whole
    assert rearms[0] >= len(received) + 1  # once when wrapped, then after every receive
    assert not passed_through & {"recvfrom", "recvfrom_into", "recvmsg", "recvmsg_into", "makefile"}
    assert index.load_snapshot(study_uid).number_of_instances == 1
