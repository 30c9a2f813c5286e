"""The front door of a running bridge (``pacs-bridge run``): stopping with half-open and idle connections, and
running out of file descriptors."""

from __future__ import annotations

import contextlib
import resource
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.bridge_process import BridgeProcess, listener_totals, log_events, wait_for
from tests.support.dcmtk import echoscu, storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.resources import Resources, cpu_seconds, peak_rss_bytes
from tests.support.studies import SeriesSpec, new_study_uid, write_study

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk]

DRAIN_SECONDS = 60.0  # far longer than any stop below may take
HALF_OPEN = 20


def start_bridge(tmp_path: Path, fhir_server: FhirTestServer, **dicom: Any) -> BridgeProcess:
    return BridgeProcess(
        tmp_path,
        database_url=f"sqlite:///{tmp_path / 'bridge.db'}",
        fhir_base_url=fhir_server.base_url,
        extra={"dicom": {"shutdown_drain_seconds": DRAIN_SECONDS, "max_associations": 64, **dicom}},
    ).start()


@pytest.fixture
def bridge(tmp_path: Path, fhir_server: FhirTestServer) -> Iterator[BridgeProcess]:
    running = start_bridge(tmp_path, fhir_server)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def one_process_bridge(tmp_path: Path, fhir_server: FhirTestServer) -> Iterator[BridgeProcess]:
    """A bridge whose one process accepts and holds the associations (with listener processes, the main process
    accepts and hands each connection on at once: the associations hold descriptors elsewhere)."""
    running = start_bridge(tmp_path, fhir_server, listener_processes=1)
    try:
        yield running
    finally:
        running.close()


def idle_association(port: int) -> Any:
    ae = AE(ae_title="IDLE")
    ae.acse_timeout = ae.dimse_timeout = 5
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE")


def test_sigterm_with_half_open_and_idle_connections_stops_at_once(bridge: BridgeProcess) -> None:
    """20 connections that never finished an association request and one idle association: SIGTERM closes the
    first and aborts the second at once, without waiting out the 60 s drain; the bridge exits 0."""
    header = struct.pack(">BBL", 0x01, 0, 300)
    held = [socket.create_connection(("127.0.0.1", bridge.port), timeout=5) for _ in range(HALF_OPEN)]
    try:
        for number, connection in enumerate(held):
            connection.sendall((header + b"\0" * 50)[: number % 8])
        idle = idle_association(bridge.port)
        assert idle.is_established
        wait_for(
            lambda: echoscu(bridge.port).returncode == 0, timeout=30, what="the bridge to serve past the half-open"
        )
        signalled = time.monotonic()
        exit_code = bridge.stop(timeout=DRAIN_SECONDS)
        stopped_after = time.monotonic() - signalled
        wait_for(lambda: not idle.is_established, timeout=10, what="the idle association to be aborted")
    finally:
        for connection in held:
            connection.close()
    stopped = listener_totals(bridge.log(), "listener_stopped")
    held_what = f"{HALF_OPEN} half-open connections, 1 idle association"
    print(f"SIGTERM with {held_what}: exit {exit_code} after {stopped_after:.2f} s")
    assert exit_code == 0, bridge.log()
    assert stopped_after < DRAIN_SECONDS / 2, "the stop waited for connections that were not transferring"
    assert (stopped["pending_closed"], stopped["idle_aborted"], stopped["aborted_after_drain"]) == (HALF_OPEN, 1, 0)


def test_out_of_file_descriptors_the_accept_loop_pauses_logs_once_and_recovers(
    one_process_bridge: BridgeProcess, tmp_path: Path
) -> None:
    """Idle associations use up the descriptors the bridge may open (its limit lowered to a few more than it
    holds); then senders knock: accepting fails with EMFILE and, rather than spin on a listening socket that
    stays readable, the loop pauses, logged once. The bridge uses no more CPU than with the associations alone;
    once they end, a study is stored."""
    bridge = one_process_bridge
    assert bridge.process is not None
    pid = bridge.process.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    limit = Resources.of(pid).fds + 12
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    held: list[Any] = []
    knocking: list[socket.socket] = []
    try:
        while Resources.of(pid).fds < limit - 1 and len(held) < 40:
            assoc = idle_association(bridge.port)
            assert assoc.is_established
            held.append(assoc)
        idle_before = cpu_seconds(pid)
        time.sleep(2.0)
        idle = cpu_seconds(pid) - idle_before  # the associations' own threads (stock pynetdicom polls)
        for _ in range(10):  # senders that keep trying while the bridge is out of descriptors
            with contextlib.suppress(OSError):
                knocking.append(socket.create_connection(("127.0.0.1", bridge.port), timeout=2))
        wait_for(lambda: log_events(bridge.log(), "accept_paused"), timeout=30, what="the accept loop to pause")
        paused_before = cpu_seconds(pid)
        time.sleep(2.0)
        paused = cpu_seconds(pid) - paused_before
        print(f"{len(held)} associations hold the descriptors; CPU in 2 s: {idle:.2f} s idle, {paused:.2f} s paused")
        assert paused < idle + 0.5, "the accept loop spins"
    finally:
        for connection in knocking:
            connection.close()
        for assoc in held:
            if assoc.is_established:
                assoc.release()
    wait_for(lambda: echoscu(bridge.port).returncode == 0, timeout=30, what="the bridge to accept again")
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    study_uid = new_study_uid()
    write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 3)])
    assert storescu(bridge.port, tmp_path / "study").returncode == 0
    assert len(log_events(bridge.log(), "accept_paused")) == 1
    assert log_events(bridge.log(), "accept_resumed")
    assert not log_events(bridge.log(), "front_door_failed")
    assert len(bridge.instance_uids(study_uid)) == 3


def test_a_large_instance_costs_the_bridge_a_bounded_amount_of_memory(bridge: BridgeProcess, tmp_path: Path) -> None:
    """A 160 MB instance, sent by storescu in the largest PDUs the bridge announces, raises the bridge's peak
    resident memory by well under the instance's size, whichever path receives it (the fast path spills it to
    a temporary file past 4 MB; stock pynetdicom writes every data set to one)."""
    from tests.support.studies import make_dataset, write_file

    side = 8944  # 8944 x 8944 x 2 bytes: 160 MB of pixel data
    ds = make_dataset(SOPInstanceUID="1.2.826.0.1.3680043.10.1482.7.1")
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 16, 12, 11, 1
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    ds.PixelData = bytes(side * side * 2)
    path = write_file(ds, tmp_path / "large.dcm")
    del ds
    before = sum(map(peak_rss_bytes, bridge.pids()))
    result = storescu(bridge.port, [path])
    assert result.returncode == 0, result.stdout + result.stderr
    grown = sum(map(peak_rss_bytes, bridge.pids())) - before
    print(f"{path.stat().st_size / 2**20:.0f} MiB instance: the bridge's peak RSS grew {grown / 2**20:.1f} MiB")
    assert grown < 48 * 2**20
    assert bridge.instance_count() == 1
