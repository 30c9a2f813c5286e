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

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_bridge.dicom.scp import AdaptivePolling, DicomListener, ListenerSettings, QuickAckSocket
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
    polling = AdaptivePolling(dul, clock=lambda: now[0])
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
    finally:
        running.stop(drain_timeout_seconds=5)
