"""Immediate ACKs for senders that leave Nagle on: the socket wrapper, and DCMTK storescu without TCP_NODELAY."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pacs_bridge.dicom.scp import DicomListener, ListenerSettings, QuickAckSocket
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
