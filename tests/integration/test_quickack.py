"""Immediate ACKs for senders that leave Nagle on: the socket wrapper, and DCMTK storescu without TCP_NODELAY."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_bridge.dicom import scp
from pacs_bridge.dicom.scp import AdaptivePolling, BusyAssociations, DicomListener, ListenerSettings, QuickAckSocket
from pacs_bridge.index.repository import Index
from tests.support.dcmtk import require_dcmtk
from tests.support.studies import SeriesSpec, new_study_uid, write_study

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux-only")


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        try:
            yield client, accepted
        finally:
            client.close()
            accepted.close()


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


def test_storescu_with_nagle_on_stores_a_series(index: Index, tmp_path: Path):
    """DCMTK storescu run without TCP_NODELAY (Nagle on, as Debian builds it) gets success for every instance."""
    running = DicomListener(
        ListenerSettings(ae_title="PACS_BRIDGE", bind="127.0.0.1", port=0), index, clock=lambda: datetime.now(UTC)
    )
    running.start()
    try:
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
                str(running.port),
                str(tmp_path / "study"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=environment,
            check=False,
        )
    finally:
        running.stop(drain_timeout_seconds=5)
    assert result.returncode == 0, result.stdout + result.stderr
    assert index.load_snapshot(study_uid).number_of_instances == 20


class _DulLoop:
    """The one attribute of pynetdicom's DUL thread that AdaptivePolling steers."""

    def __init__(self) -> None:
        self._run_loop_delay = 0.001


def test_polling_is_fast_while_receiving_and_back_to_idle_after_a_quiet_spell():
    """A receive switches the DUL loop to 0.1 ms polls; 50 ms without one restores its own 1 ms."""
    now = [100.0]
    dul = _DulLoop()
    polling = AdaptivePolling(dul, clock=lambda: now[0], busy_associations=BusyAssociations())
    polling.polled()
    assert dul._run_loop_delay == 0.001
    polling.received()
    assert dul._run_loop_delay == AdaptivePolling.BUSY_DELAY
    now[0] += 0.04
    polling.polled()
    assert dul._run_loop_delay == AdaptivePolling.BUSY_DELAY
    now[0] += 0.02
    polling.polled()
    assert dul._run_loop_delay == 0.001


def test_polling_is_fast_only_while_a_single_association_is_receiving() -> None:
    """Two associations receiving at once both poll at the idle 1 ms (CPU-bound, not latency-bound); once one
    goes quiet or closes, the other polls fast again."""
    now = [100.0]
    busy = BusyAssociations()
    first, second = _DulLoop(), _DulLoop()
    first_polling = AdaptivePolling(first, clock=lambda: now[0], busy_associations=busy)
    second_polling = AdaptivePolling(second, clock=lambda: now[0], busy_associations=busy)
    first_polling.received()
    assert first._run_loop_delay == AdaptivePolling.BUSY_DELAY
    second_polling.received()
    first_polling.polled()
    assert (first._run_loop_delay, second._run_loop_delay, busy.count) == (0.001, 0.001, 2)
    second_polling.closed()
    first_polling.polled()
    assert (first._run_loop_delay, busy.count) == (AdaptivePolling.BUSY_DELAY, 1)
    now[0] += 0.06
    first_polling.polled()
    second_polling.closed()  # twice changes nothing
    assert (first._run_loop_delay, busy.count) == (0.001, 0)


def test_listener_sockets_steer_the_dul_loop_of_their_association(index: Index, tmp_path: Path):
    """On a real association the DUL loop polls fast during a send and slowly once it is over."""
    running = DicomListener(
        ListenerSettings(ae_title="PACS_BRIDGE", bind="127.0.0.1", port=0), index, clock=lambda: datetime.now(UTC)
    )
    running.start()
    try:
        ae = AE()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", running.port, ae_title="PACS_BRIDGE")
        assert assoc.is_established
        (acceptor,) = [a for a in running._server.active_associations]
        assert assoc.send_c_echo().Status == 0x0000
        assert acceptor.dul._run_loop_delay == AdaptivePolling.BUSY_DELAY
        deadline = time.monotonic() + 5
        while acceptor.dul._run_loop_delay != 0.001 and time.monotonic() < deadline:
            threading.Event().wait(0.02)
        assert acceptor.dul._run_loop_delay == 0.001
        assoc.release()
        deadline = time.monotonic() + 10
        while running._server.active_associations and time.monotonic() < deadline:
            threading.Event().wait(0.02)
    finally:
        running.stop(drain_timeout_seconds=5)
    assert scp._BUSY_ASSOCIATIONS.count == 0  # a closed association no longer counts as receiving


def test_every_receive_of_an_association_goes_through_the_wrapper_from_its_request_on(
    index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pins the adaptation to what pynetdicom (3.0.x) does: its DUL reads the A-ASSOCIATE-RQ and every PDU after
    it with ``recv`` on the socket EVT_CONN_OPEN let us wrap, each followed by a re-arm. If pynetdicom read
    through another method (``recv_into``, ``makefile``...), wrapped later, or kept the socket elsewhere, the
    wrapper would pass that through silently and Nagle-on senders would stall again: this test fails instead."""
    received: list[bytes] = []
    rearms = [0]
    passed_through: set[str] = set()
    original_recv, original_rearm, original_getattr = (
        QuickAckSocket.recv,
        QuickAckSocket._rearm,
        QuickAckSocket.__getattr__,
    )

    def recv(self: QuickAckSocket, bufsize: int, flags: int = 0) -> bytes:
        data = original_recv(self, bufsize, flags)
        received.append(data)
        return data

    def rearm(self: QuickAckSocket) -> None:
        rearms[0] += 1
        original_rearm(self)

    def getattr_(self: QuickAckSocket, name: str) -> Any:
        passed_through.add(name)
        return original_getattr(self, name)

    monkeypatch.setattr(QuickAckSocket, "recv", recv)
    monkeypatch.setattr(QuickAckSocket, "_rearm", rearm)
    monkeypatch.setattr(QuickAckSocket, "__getattr__", getattr_)
    running = DicomListener(
        ListenerSettings(ae_title="PACS_BRIDGE", bind="127.0.0.1", port=0), index, clock=lambda: datetime.now(UTC)
    )
    running.start()
    try:
        study_uid = new_study_uid()
        (path,) = write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 1)])
        dataset = dcmread(path)
        ae = AE()  # pynetdicom as a sender leaves Nagle on
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", running.port, ae_title="PACS_BRIDGE")
        assert assoc.is_established
        (acceptor,) = running._server.active_associations
        assert type(acceptor.dul.socket.socket) is QuickAckSocket
        assert assoc.send_c_store(dataset).Status == 0x0000
        assoc.release()
        deadline = time.monotonic() + 10
        while running._server.active_associations and time.monotonic() < deadline:
            threading.Event().wait(0.02)
    finally:
        running.stop(drain_timeout_seconds=5)
    assert received and received[0][:1] == b"\x01"  # the first read is the A-ASSOCIATE-RQ's PDU header
    pdu_types = {data[0] for data in received if len(data) == 6}  # pynetdicom reads each PDU header alone
    assert {0x01, 0x04, 0x05} <= pdu_types  # association request, P-DATA (C-STORE), release request
    assert rearms[0] >= len(received) + 1  # once when wrapped, then after every receive
    assert not passed_through & {"recv_into", "recvfrom", "recvfrom_into", "recvmsg", "recvmsg_into", "makefile"}
    assert index.load_snapshot(study_uid).number_of_instances == 1
