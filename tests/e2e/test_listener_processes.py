"""dicom.listener_processes: 2 — one port, two listener processes, one index, metrics and readiness in the main."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from tests.support.bridge_process import BridgeProcess, free_port, log_events, wait_for
from tests.support.dcmtk import storescu
from tests.support.studies import SeriesSpec, new_study_uid, write_study

pytestmark = [pytest.mark.dcmtk]

ASSOCIATIONS = 4
INSTANCES_PER_ASSOCIATION = 12


@pytest.fixture
def http_port() -> int:
    return free_port()


@pytest.fixture
def bridge(tmp_path: Path, database_url: str, http_port: int) -> Iterator[BridgeProcess]:
    """A bridge with two listener processes; its FHIR server is a closed port and nothing becomes due."""
    process = BridgeProcess(
        tmp_path,
        database_url=database_url,
        fhir_base_url=f"http://127.0.0.1:{free_port()}/fhir",
        quiet_seconds=3600,
        max_delay_seconds=3600,
        extra={"dicom": {"listener_processes": 2}, "http": {"bind": "127.0.0.1", "port": http_port}},
    )
    try:
        yield process
    finally:
        process.close()


def metric_value(port: int, name: str) -> float | None:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_four_associations_at_once_are_spread_over_both_processes_and_indexed_once(
    bridge: BridgeProcess, tmp_path: Path, http_port: int
) -> None:
    """Four storescu associations at once: every C-STORE succeeds, every instance is indexed exactly once,
    both listener processes served associations, /metrics counts all of them, and SIGTERM exits 0."""
    bridge.start()
    ready = httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=10)
    # No FHIR server listens here: ready all the same (instances are taken and kept), the outage named aside.
    assert (ready.status_code, ready.json()["status"], list(ready.json()["degraded"])) == (
        200,
        "ready",
        ["fhir_server"],
    )
    (started,) = log_events(bridge.log(), "listener_started")
    listener_pids = set(started["listener_pids"])
    assert len(listener_pids) == 2 and bridge.process is not None and bridge.process.pid not in listener_pids

    study_uid = new_study_uid()
    paths = write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", INSTANCES_PER_ASSOCIATION)] * ASSOCIATIONS)
    sent = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths}
    assert len(sent) == ASSOCIATIONS * INSTANCES_PER_ASSOCIATION
    parts = [tmp_path / f"part-{number}" for number in range(ASSOCIATIONS)]  # one series per association
    for number, part in enumerate(parts):
        part.mkdir()
        for path in paths[number * INSTANCES_PER_ASSOCIATION : (number + 1) * INSTANCES_PER_ASSOCIATION]:
            path.rename(part / path.name)
    with ThreadPoolExecutor(ASSOCIATIONS) as pool:
        results = list(pool.map(lambda part: storescu(bridge.port, part), parts))
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Received Store Response (Success)" in result.stdout + result.stderr

    assert bridge.instance_uids(study_uid) == sent
    assert bridge.instance_count() == len(sent)  # each once
    released = log_events(bridge.log(), "association_released")
    assert sum(event["stored"] for event in released) == len(sent)
    serving_pids = {event["pid"] for event in log_events(bridge.log(), "association_established")}
    assert serving_pids == listener_pids  # both processes took associations, and only they did
    # Both processes report to the main one's registry (counts are sent twice a second).
    wait_for(
        lambda: metric_value(http_port, "pacs_bridge_cstore_results_total") == len(sent),
        timeout=10,
        what="/metrics to count every C-STORE",
    )
    wait_for(
        lambda: metric_value(http_port, "pacs_bridge_open_associations") == 0,
        timeout=10,
        what="/metrics to show no open association",
    )

    assert bridge.stop() == 0
    stopped = log_events(bridge.log(), "listener_stopped")
    assert {event.get("pid") for event in stopped if "pid" in event} == listener_pids
    assert [event["listener_exit_statuses"] for event in stopped if "listener_exit_statuses" in event] == [[0, 0]]


def test_a_listener_process_that_dies_stops_the_bridge_with_a_failure(bridge: BridgeProcess) -> None:
    """A listener process killed from outside: the bridge says so and exits 1, for systemd to restart it."""
    bridge.start()
    (started,) = log_events(bridge.log(), "listener_started")
    os.kill(started["listener_pids"][0], signal.SIGKILL)
    assert bridge.process is not None
    assert bridge.process.wait(timeout=60) == 1
    (exited,) = log_events(bridge.log(), "listener_process_exited")
    assert exited["pid"] == started["listener_pids"][0] and exited["status"] == -signal.SIGKILL
    assert "exited with status" in bridge.log()
