"""The bridge as an operator runs it: metrics after a study, systemd notifications, logs free of patient data."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.bridge_process import BridgeProcess, free_port, wait_for
from tests.support.dcmtk import storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import SeriesSpec, make_dataset, new_study_uid, write_file, write_study

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk]


@pytest.fixture
def http_port() -> int:
    return free_port()


@pytest.fixture
def bridge(tmp_path: Path, fresh_fhir_server: FhirTestServer, http_port: int) -> Iterator[BridgeProcess]:
    process = BridgeProcess(
        tmp_path,
        database_url=f"sqlite:///{tmp_path / 'bridge.db'}",
        fhir_base_url=fresh_fhir_server.base_url,
        extra={"http": {"bind": "127.0.0.1", "port": http_port}},
    )
    try:
        yield process
    finally:
        process.close()


def metric_lines(port: int) -> list[str]:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    return [line for line in response.text.splitlines() if line.startswith("pacs_bridge_")]


def test_metrics_after_a_study_count_stores_refusals_publishes_and_latency(
    bridge: BridgeProcess, fresh_fhir_server: FhirTestServer, http_port: int, tmp_path: Path
):
    """/metrics after one 5-instance study and one refused file: the counts and one latency observation."""
    bridge.start()
    study_uid = new_study_uid()
    write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 5)])
    write_file(make_dataset(StudyInstanceUID=None), tmp_path / "bad" / "bad.dcm")
    assert storescu(bridge.port, tmp_path / "study").returncode == 0
    storescu(bridge.port, tmp_path / "bad")
    wait_for(
        lambda: (bridge.study_row(study_uid) or {}).get("publish_state") == "published",
        timeout=30,
        what="the study to be published",
    )
    assert httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=10).json() == {"status": "ready"}
    lines = metric_lines(http_port)
    assert 'pacs_bridge_cstore_results_total{calling_ae="MODALITY",status="0x0000"} 5.0' in lines
    assert 'pacs_bridge_cstore_results_total{calling_ae="MODALITY",status="0xC000"} 1.0' in lines
    assert 'pacs_bridge_publish_attempts_total{http_status="201",outcome="published"} 1.0' in lines
    assert "pacs_bridge_publish_latency_seconds_count 1.0" in lines
    assert 'pacs_bridge_studies{state="published"} 1.0' in lines
    assert "pacs_bridge_open_associations 0.0" in lines
    received = next(line for line in lines if line.startswith("pacs_bridge_received_bytes_total"))
    assert float(received.split()[-1]) > 5 * 8000


def test_systemd_is_told_ready_watchdog_and_stopping(
    bridge: BridgeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Under a NOTIFY_SOCKET the bridge sends READY=1, WATCHDOG=1 pings, and STOPPING=1 on SIGTERM."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket:
        notify_socket.bind(str(path))
        notify_socket.settimeout(20)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "600000")  # ping every 0.2 s
        bridge.start()
        messages = [notify_socket.recv(4096).decode() for _ in range(3)]
        assert messages[0] == "READY=1"
        assert "WATCHDOG=1" in messages[1:]
        assert bridge.stop() == 0
        while (message := notify_socket.recv(4096).decode()) == "WATCHDOG=1":
            pass
        assert message == "STOPPING=1"


def test_patient_names_and_ids_in_three_character_sets_never_reach_the_logs(bridge: BridgeProcess, tmp_path: Path):
    """Latin-1, UTF-8 and ISO 2022 Japanese patients are indexed and published; no name or ID is logged."""
    patients = [
        ("ISO_IR 100", "Müller^Jürgen", "PID-LATIN1-4711"),
        ("ISO_IR 192", "Ωμέγα^Ελένη", "PID-UTF8-0815"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", "PID-JIS-1234"),
    ]
    study_uids = []
    for index, (charset, name, patient_id) in enumerate(patients, start=1):
        study_uid = new_study_uid()
        study_uids.append(study_uid)
        ds = make_dataset(
            SpecificCharacterSet=charset,
            PatientName=name,
            PatientID=patient_id,
            PatientBirthDate="19700101",
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=f"{study_uid}.1",
            SOPInstanceUID=f"{study_uid}.1.1",
        )
        write_file(ds, tmp_path / "patients" / f"{index}.dcm")
    bridge.start()
    assert storescu(bridge.port, tmp_path / "patients").returncode == 0
    for study_uid in study_uids:
        wait_for(
            lambda uid=study_uid: (bridge.study_row(uid) or {}).get("publish_state") == "published",
            timeout=30,
            what=f"study {study_uid} to be published",
        )
    assert bridge.stop() == 0
    log = bridge.log()
    assert '"event": "study_published"' in log
    for _, name, patient_id in patients:
        for part in [*name.replace("=", "^").split("^"), patient_id]:
            assert part not in log, f"patient data {part!r} in the log"
    assert "19700101" not in log
