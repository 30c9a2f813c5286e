"""Stopping the listener: new connections refused, pending and idle ones closed at once, transfers drained."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.repository import Index
from tests.integration.conftest import listener_settings
from tests.support.dcmtk import dcmtk_env, require_dcmtk
from tests.support.relay import PacedRelay
from tests.support.studies import SeriesSpec, new_study_uid, write_study

pytestmark = pytest.mark.dcmtk

LONG_DRAIN = 120.0  # no stop below should come near it


def utc_now() -> datetime:
    return datetime.now(UTC)


def refused(port: int, *, within: float = 30.0) -> bool:
    """Whether connecting to ``port`` is refused (the listening socket closed) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        except ConnectionRefusedError:
            return True
        except (TimeoutError, ConnectionResetError):
            pass
        time.sleep(0.05)
    return False


def test_a_transfer_under_way_finishes_during_the_drain_while_new_connections_are_refused(
    index: Index, receive_path: str, tmp_path: Path
) -> None:
    """storescu sends 60 instances through a relay passing 300 kB/s (about 2 s of sending, on any machine);
    the stop comes once some are indexed: new connections are refused at once, the send goes on to its end,
    every instance is stored, and the stop returns once the association is released, without aborting it."""
    running = DicomListener(listener_settings(receive_path), index, clock=utc_now)
    running.start()
    port = running.port
    study_uid = new_study_uid()
    write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 60)])
    with PacedRelay(upstream_port=port, bytes_per_second=300_000) as relay:
        args = [require_dcmtk("storescu"), "-aec", "PACS_BRIDGE", "+sd", "127.0.0.1", str(relay.port)]
        send = subprocess.Popen(
            [*args, str(tmp_path / "study")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dcmtk_env()
        )
        try:
            deadline = time.monotonic() + 60
            while running.open_connections == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            stopper = threading.Thread(target=running.stop, kwargs={"drain_timeout_seconds": LONG_DRAIN})
            stopper.start()
            assert refused(port), "new connections were still accepted while stopping"
            output, _ = send.communicate(timeout=120)
        finally:
            if send.poll() is None:
                send.kill()
                send.wait()
    stopper.join(timeout=60)
    assert not stopper.is_alive()
    assert send.returncode == 0, output
    assert index.load_snapshot(study_uid).number_of_instances == 60


def test_an_idle_association_is_aborted_at_once(index: Index, receive_path: str) -> None:
    """An association that sends nothing is not waited for: the stop aborts it and returns long before the
    drain time."""
    running = DicomListener(listener_settings(receive_path), index, clock=utc_now)
    running.start()
    ae = AE()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    time.sleep(1.5)  # idle for longer than the second a connection counts as recently active
    started = time.monotonic()
    running.stop(drain_timeout_seconds=LONG_DRAIN)
    took = time.monotonic() - started
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.02)
    assert assoc.is_aborted
    assert took < LONG_DRAIN / 4


def test_pending_connections_are_closed_at_once(index: Index, receive_path: str) -> None:
    """Connections that never finished an association request are closed by the stop, not waited for."""
    running = DicomListener(listener_settings(receive_path), index, clock=utc_now)
    running.start()
    held = [socket.create_connection(("127.0.0.1", running.port), timeout=10) for _ in range(20)]
    held[0].sendall(b"\x01\x00\x00\x00")
    deadline = time.monotonic() + 10
    while running.pending_connections < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    running.stop(drain_timeout_seconds=LONG_DRAIN)
    took = time.monotonic() - started
    for connection in held:
        with connection:
            connection.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert connection.recv(16) == b""
    assert took < LONG_DRAIN / 4


def test_pydicoms_value_checks_are_off_only_while_a_listener_runs(index: Index) -> None:
    """Starting a listener turns pydicom's value checks off for the process; they stay off while any listener
    runs and come back as they were when the last one stops."""
    settings = pydicom_config.settings
    before = settings.reading_validation_mode
    assert before != pydicom_config.IGNORE  # the test run's own setting, which the listener must put back
    first = DicomListener(listener_settings(), index, clock=utc_now)
    second = DicomListener(listener_settings(), index, clock=utc_now)
    first.start()
    try:
        second.start()
        try:
            assert settings.reading_validation_mode == pydicom_config.IGNORE
            first.stop(drain_timeout_seconds=5)
            assert settings.reading_validation_mode == pydicom_config.IGNORE  # the second still needs it
        finally:
            second.stop(drain_timeout_seconds=5)
    finally:
        first.stop(drain_timeout_seconds=5)
    assert settings.reading_validation_mode == before
