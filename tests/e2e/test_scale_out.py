"""Two bridges, one PostgreSQL, HAProxy in front: any bridge may receive any part of a study, one publishes it."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bridge_process import BridgeProcess, free_port, wait_for
from tests.support.dcmtk import echoscu, storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import SeriesSpec, new_study_uid, write_study

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk, pytest.mark.postgresql]

SERIES = 6
INSTANCES_PER_SERIES = 15


@pytest.fixture
def bridges(
    tmp_path: Path, postgres_schema_url: str, fresh_fhir_server: FhirTestServer
) -> Iterator[list[BridgeProcess]]:
    """Two bridge processes sharing one PostgreSQL schema (quiet period 3 s)."""
    running = []
    try:
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            bridge = BridgeProcess(
                directory,
                database_url=postgres_schema_url,
                fhir_base_url=fresh_fhir_server.base_url,
                quiet_seconds=3,
            )
            running.append(bridge)
            bridge.start()
        yield running
    finally:
        for bridge in running:
            bridge.close()


@pytest.fixture
def haproxy(tmp_path: Path, bridges: list[BridgeProcess]) -> Iterator[int]:
    """HAProxy in TCP mode, round robin over both bridges, as a site would run it; yields its port."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        pytest.fail("HAProxy is not installed; run: apt-get install -y haproxy")
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    servers = "\n".join(f"    server {b.directory.name} 127.0.0.1:{b.port}" for b in bridges)
    config.write_text(
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 120s\n    timeout server 120s\n"
        f"frontend dicom\n    bind 127.0.0.1:{port}\n    default_backend bridges\n"
        f"backend bridges\n    balance roundrobin\n{servers}\n",
        encoding="utf-8",
    )
    log = (tmp_path / "haproxy.log").open("wb")
    process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: echoscu(port).returncode == 0, timeout=20, what="HAProxy to forward a C-ECHO")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def stored_instances(bridge: BridgeProcess) -> int:
    """Instances this bridge stored, from its association_released log events."""
    events = (json.loads(line) for line in bridge.log().splitlines() if line.startswith("{"))
    return sum(event.get("stored", 0) for event in events if event.get("event") == "association_released")


def test_a_study_split_across_two_bridges_is_published_once_and_whole(
    haproxy: int, bridges: list[BridgeProcess], fresh_fhir_server: FhirTestServer, tmp_path: Path
):
    """Six series on six associations through HAProxy land on both bridges; exactly one ImagingStudy write
    holds all of them, and both bridges see the study as published."""
    study_uid = new_study_uid()
    for number in range(1, SERIES + 1):
        write_study(
            tmp_path / "study" / str(number),
            study_uid,
            [SeriesSpec("CT", INSTANCES_PER_SERIES)],
            first_series_number=number,
        )
    for number in range(1, SERIES + 1):
        result = storescu(haproxy, tmp_path / "study" / str(number))
        assert result.returncode == 0, result.stdout + result.stderr

    stored_per_bridge = [stored_instances(bridge) for bridge in bridges]
    assert sum(stored_per_bridge) == SERIES * INSTANCES_PER_SERIES
    assert all(stored_per_bridge), f"instances stored per bridge: {stored_per_bridge}"
    found = wait_for(
        lambda: fresh_fhir_server.search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}"),
        timeout=60,
        what="the ImagingStudy",
    )
    wait_for(
        lambda: (bridges[0].study_row(study_uid) or {}).get("publish_state") == "published",
        timeout=30,
        what="the study to be marked published",
    )
    assert len(found) == 1
    study = found[0]
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (SERIES, SERIES * INSTANCES_PER_SERIES)
    assert fresh_fhir_server.request_counts()["PUT ImagingStudy"] == 1
    publishers = [bridge.log().count('"event": "study_published"') for bridge in bridges]
    assert sorted(publishers) == [0, 1], f"study_published events per bridge: {publishers}"
