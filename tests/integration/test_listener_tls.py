"""DICOM TLS on a real listener, spoken to by DCMTK's storescu and echoscu with their TLS options."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pacs_bridge.dicom.listener_settings import server_tls_context
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.repository import Index
from tests.integration.conftest import listener_settings
from tests.support.association_requests import (
    CT_IMAGE_STORAGE,
    RELEASE_RQ,
    associate_rq,
    presentation_context,
    read_pdu,
)
from tests.support.certificates import Pki, make_pki
from tests.support.dcmtk import dcmtk_env, require_dcmtk
from tests.support.studies import make_dataset, uid, write_file

pytestmark = pytest.mark.dcmtk


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def tls_listener(
    index: Index, pki: Pki, *, verify_clients: bool, receive_path: str, **settings: object
) -> DicomListener:
    context = server_tls_context(
        str(pki.server_cert_pem), str(pki.server_key_pem), str(pki.ca_pem) if verify_clients else ""
    )
    return DicomListener(
        listener_settings(receive_path, tls=context, **settings), index, clock=lambda: datetime.now(UTC)
    )


@pytest.fixture
def running(index: Index, pki: Pki, receive_path: str, request: pytest.FixtureRequest) -> Iterator[DicomListener]:
    listener = tls_listener(index, pki, verify_clients=getattr(request, "param", False), receive_path=receive_path)
    listener.start()
    yield listener
    listener.stop(drain_timeout_seconds=5)


def dcmtk_run(
    tool: str, port: int, *tls_options: str, files: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    args = [require_dcmtk(tool), "-aec", "PACS_BRIDGE", *tls_options, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=dcmtk_env(), check=False)


def test_storescu_over_tls_stores_and_verifies_our_certificate(
    running: DicomListener, index: Index, pki: Pki, tmp_path: Path
):
    """storescu with anonymous TLS, trusting our CA, stores an instance: the server certificate is ours."""
    path = write_file(make_dataset(), tmp_path / "one.dcm")
    result = dcmtk_run("storescu", running.port, "+tla", "+cf", str(pki.ca_pem), files=(path,))
    assert result.returncode == 0, result.stdout + result.stderr
    assert index.load_snapshot(uid("1")).number_of_instances == 1


def test_sender_trusting_another_ca_refuses_our_certificate(running: DicomListener, tmp_path: Path):
    """A sender that trusts another CA does not associate: our certificate is what it checks."""
    other = make_pki(tmp_path / "other")
    result = dcmtk_run("echoscu", running.port, "+tla", "+cf", str(other.ca_pem))
    assert result.returncode != 0
    assert "certificate verify failed" in result.stdout + result.stderr


def test_plain_tcp_sender_cannot_talk_to_a_tls_listener(running: DicomListener, pki: Pki):
    """A sender without TLS fails to associate, and the listener goes on serving TLS senders."""
    assert dcmtk_run("echoscu", running.port).returncode != 0
    assert dcmtk_run("echoscu", running.port, "+tla", "+cf", str(pki.ca_pem)).returncode == 0


@pytest.mark.parametrize("running", [True], indirect=True)
def test_client_certificate_is_required_when_client_ca_is_set(running: DicomListener, pki: Pki):
    """With client_ca, a sender presenting a certificate from that CA is served; one without is refused."""
    with_certificate = dcmtk_run(
        "echoscu", running.port, "+tls", str(pki.client_key_pem), str(pki.client_cert_pem), "+cf", str(pki.ca_pem)
    )
    assert with_certificate.returncode == 0, with_certificate.stdout + with_certificate.stderr
    assert dcmtk_run("echoscu", running.port, "+tla", "+cf", str(pki.ca_pem)).returncode != 0


def serve_one_handed_over(listener: DicomListener) -> tuple[int, threading.Thread]:
    """A socket that accepts one connection and hands it to ``listener``, as the main process does for its
    listener processes (listener_processes.py); returns its port and the accepting thread."""
    server = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        with server:
            connection, address = server.accept()
            listener.adopt(connection, address)

    thread = threading.Thread(target=accept)
    thread.start()
    return int(server.getsockname()[1]), thread


def test_a_handed_over_connection_is_served_over_tls_and_reported_done(
    index: Index, pki: Pki, tmp_path: Path, receive_path: str
) -> None:
    """A listener process's listener: TLS is negotiated on the adopted connection, the instance is stored, and
    the end of the connection is reported; a plain TCP sender is dropped and reported done too."""
    listener = tls_listener(index, pki, verify_clients=False, receive_path=receive_path)
    done = threading.Semaphore(0)
    listener.start(listen=False, on_connection_closed=done.release)
    try:
        path = write_file(make_dataset(), tmp_path / "one.dcm")
        port, thread = serve_one_handed_over(listener)
        result = dcmtk_run("storescu", port, "+tla", "+cf", str(pki.ca_pem), files=(path,))
        thread.join(30)
        assert result.returncode == 0, result.stdout + result.stderr
        assert done.acquire(timeout=30)
        port, thread = serve_one_handed_over(listener)
        assert dcmtk_run("echoscu", port).returncode != 0
        thread.join(30)
        assert done.acquire(timeout=30)
        assert listener.is_accepting
    finally:
        listener.stop(drain_timeout_seconds=5)
    assert index.load_snapshot(uid("1")).number_of_instances == 1


def test_a_tls_handshake_never_finished_is_closed_at_the_deadline_and_keeps_no_one_out(
    index: Index, pki: Pki, tmp_path: Path, receive_path: str
) -> None:
    """Connections that open TLS with half a ClientHello, or none, wait in the front door without a thread and
    are closed when the association request deadline (1 s here) is up; storescu over TLS gets in meanwhile."""
    listener = tls_listener(
        index, pki, verify_clients=False, receive_path=receive_path, association_request_timeout_seconds=1.0
    )
    listener.start()
    try:
        stalled = [socket.create_connection(("127.0.0.1", listener.port), timeout=10) for _ in range(4)]
        stalled[0].sendall(b"\x16\x03\x01\x02\x00\x01")  # a TLS record header and the start of a ClientHello
        path = write_file(make_dataset(), tmp_path / "one.dcm")
        result = dcmtk_run("storescu", listener.port, "+tla", "+cf", str(pki.ca_pem), files=(path,))
        assert result.returncode == 0, result.stdout + result.stderr
        for connection in stalled:
            with connection:
                connection.settimeout(30)
                with contextlib.suppress(ConnectionResetError):
                    assert connection.recv(4096) == b""
    finally:
        listener.stop(drain_timeout_seconds=5)
    assert index.load_snapshot(uid("1")).number_of_instances == 1


def test_over_tls_a_request_pynetdicom_cannot_negotiate_gets_an_abort_and_a_valid_one_an_accept(
    running: DicomListener, pki: Pki
) -> None:
    """The front door checks a TLS peer's request from what it decrypted (dicom/negotiation.py): a presentation
    context without a transfer syntax gets its A-ABORT at once; a valid request is accepted and released."""
    client = ssl.create_default_context(cafile=str(pki.ca_pem))
    client.check_hostname = False
    malformed = associate_rq([presentation_context(1, CT_IMAGE_STORAGE, ())])
    with client.wrap_socket(socket.create_connection(("127.0.0.1", running.port), timeout=10)) as connection:
        connection.sendall(malformed)
        assert read_pdu(connection, timeout=5) == (0x07, bytes([0, 0, 2, 6]))
    with client.wrap_socket(socket.create_connection(("127.0.0.1", running.port), timeout=10)) as connection:
        connection.sendall(associate_rq())
        accepted = read_pdu(connection, timeout=5)
        assert accepted is not None and accepted[0] == 0x02
        connection.sendall(RELEASE_RQ)
        released = read_pdu(connection, timeout=5)
        assert released is not None and released[0] == 0x06
