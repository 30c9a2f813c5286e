"""End to end: `pacs-bridge run` as a subprocess, DCMTK storescu as the modality, the real FHIR test server."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import bridge_process
from tests.support.bridge_process import free_port, log_events, wait_for
from tests.support.dcmtk import echoscu, storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import SeriesSpec, make_dataset, new_study_uid, write_file, write_study

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk]

QUIET_SECONDS = 2.0


class RunningBridge:
    def __init__(self, process: subprocess.Popen[str], port: int, database: Path, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.database = database
        self.log_path = log_path

    def study_row(self, study_uid: str) -> dict[str, Any]:
        with sqlite3.connect(self.database) as connection:
            connection.row_factory = sqlite3.Row
            row = connection.execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        return dict(row)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@pytest.fixture
def bridge(tmp_path: Path, fresh_fhir_server: FhirTestServer) -> Iterator[RunningBridge]:
    """pacs-bridge running on a temp config: SQLite index, quiet period of 2 s, one WADO-RS endpoint."""
    port = free_port()
    database = tmp_path / "bridge.db"
    config = {
        "dicom": {"ae_title": "PACS_BRIDGE", "bind": "127.0.0.1", "port": port, "fast_path": bridge_process.FAST_PATH},
        "database": {"url": f"sqlite:///{database}"},
        "fhir": {"base_url": fresh_fhir_server.base_url, "timeout_seconds": 10},
        "debounce": {"quiet_seconds": QUIET_SECONDS, "max_delay_seconds": 60, "tick_seconds": 0.2},
        "endpoints": [
            {"id": "pacs-wado-rs", "connection_type": "dicom-wado-rs", "address": "https://pacs.example.org/dicom-web"}
        ],
        "patient": {"identifier_system": "urn:oid:1.2.36.146.595.217.0.1"},
        "site": {"timezone": "Europe/Paris"},
        "logging": {"level": "info", "format": "json"},
    }
    config_path = tmp_path / "pacs-bridge.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log_path = tmp_path / "bridge.log"
    with log_path.open("w", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "pacs_bridge", "run", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
    running = RunningBridge(process, port, database, log_path)
    try:
        wait_for(
            lambda: process.poll() is not None or echoscu(port).returncode == 0,
            timeout=30,
            what="the bridge to answer C-ECHO",
        )
        assert process.poll() is None, running.log()
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def imaging_studies(server: FhirTestServer, study_uid: str) -> list[dict[str, Any]]:
    return server.search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}")


def test_a_study_sent_by_storescu_lands_as_one_imaging_study_and_is_not_rewritten(
    bridge: RunningBridge, fresh_fhir_server: FhirTestServer, tmp_path: Path
):
    """One version for the study, every series and instance listed, Endpoint resolvable; a re-send writes
    nothing; a later new series writes exactly once more; SIGTERM stops the bridge cleanly."""
    study_uid = new_study_uid()
    series = [SeriesSpec("CT", 12, "Axial 5mm"), SeriesSpec("CT", 8, "Coronal"), SeriesSpec("SR", 1, "Dose")]
    write_study(tmp_path / "study", study_uid, series)

    sent = storescu(bridge.port, tmp_path / "study")
    last_instance_at = time.monotonic()
    assert sent.returncode == 0, sent.stdout + sent.stderr

    published = wait_for(lambda: imaging_studies(fresh_fhir_server, study_uid), timeout=30, what="the ImagingStudy")
    delay = time.monotonic() - last_instance_at
    print(f"ImagingStudy appeared {delay:.2f} s after the last instance (quiet_seconds={QUIET_SECONDS})")
    assert len(published) == 1
    study = published[0]
    assert study["meta"]["versionId"] == "1"
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (3, 21)
    assert [(s["modality"]["code"], s["numberOfInstances"], len(s["instance"])) for s in study["series"]] == [
        ("CT", 12, 12),
        ("CT", 8, 8),
        ("SR", 1, 1),
    ]
    acsn = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
    assert study["identifier"] == [
        {"use": "official", "system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"},
        {"type": acsn, "value": "ACC-0001"},  # no accession.identifier_system configured here
    ]
    assert study["started"] == "2024-03-15T10:15:30+01:00"
    reference = study["endpoint"][0]["reference"]
    endpoint = fresh_fhir_server.read(*reference.split("/"))
    assert endpoint is not None and endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert fresh_fhir_server.request_counts() == {"PUT Endpoint": 1, "PUT ImagingStudy": 1}
    change_seq = bridge.study_row(study_uid)["change_seq"]

    # The same files again: indexed as unchanged, so the study never becomes due and nothing is written.
    resent = storescu(bridge.port, tmp_path / "study")
    assert resent.returncode == 0, resent.stdout + resent.stderr
    assert bridge.study_row(study_uid)["change_seq"] == change_seq
    time.sleep(QUIET_SECONDS + 1.0)  # a negative claim needs the debounce window to pass; nothing to poll for
    assert fresh_fhir_server.request_counts() == {"PUT Endpoint": 1, "PUT ImagingStudy": 1}
    assert bridge.study_row(study_uid)["publish_state"] == "published"

    # A new series later: exactly one more write, holding all four series.
    write_study(tmp_path / "later", study_uid, [SeriesSpec("CT", 5, "Late recon")], first_series_number=4)
    later = storescu(bridge.port, tmp_path / "later")
    assert later.returncode == 0, later.stdout + later.stderr
    updated = wait_for(
        lambda: [s for s in imaging_studies(fresh_fhir_server, study_uid) if s["meta"]["versionId"] == "2"],
        timeout=30,
        what="version 2 of the ImagingStudy",
    )[0]
    assert (updated["numberOfSeries"], updated["numberOfInstances"]) == (4, 26)
    wait_for(lambda: bridge.study_row(study_uid)["publish_state"] == "published", timeout=10, what="published")
    assert fresh_fhir_server.request_counts() == {"PUT Endpoint": 1, "PUT ImagingStudy": 2}

    bridge.process.send_signal(signal.SIGTERM)
    assert bridge.process.wait(timeout=30) == 0
    log = bridge.log()
    assert '"event": "bridge_stopped"' in log
    assert "Doe^Jane" not in log and "PAT-0001" not in log, "patient data leaked into the logs"


def test_the_default_configuration_serves_associations_in_a_listener_process_per_core_up_to_two(
    bridge: RunningBridge,
):
    """dicom.listener_processes is left at its default, auto: the start line names one process per usable core,
    at most two, and the pids of those that run beside the main process."""
    (started,) = log_events(bridge.log(), "listener_started")
    expected = min(len(os.sched_getaffinity(0)), 2)

    assert started["listener_processes"] == expected
    if expected > 1:
        assert len(started["listener_pids"]) == expected
        assert all(os.path.exists(f"/proc/{pid}") for pid in started["listener_pids"])


def test_dataset_without_study_uid_is_refused_and_the_listener_still_answers_echo(
    bridge: RunningBridge, tmp_path: Path
):
    """storescu gets CannotUnderstand for the bad file; the bridge logs the refusal and answers C-ECHO."""
    bad = write_file(make_dataset(StudyInstanceUID=None), tmp_path / "bad.dcm")
    result = storescu(bridge.port, [bad])
    assert "Received Store Response (Error: CannotUnderstand)" in result.stdout + result.stderr
    assert echoscu(bridge.port).returncode == 0
    assert '"event": "instance_rejected"' in bridge.log()
    assert "StudyInstanceUID" in bridge.log()


def test_pending_study_survives_a_restart(tmp_path: Path, fresh_fhir_server: FhirTestServer, bridge: RunningBridge):
    """SIGTERM before the study is due: after a restart on the same database it is published."""
    study_uid = new_study_uid()
    write_study(tmp_path / "study", study_uid, [SeriesSpec("MR", 4)])
    assert storescu(bridge.port, tmp_path / "study").returncode == 0
    bridge.process.send_signal(signal.SIGTERM)
    assert bridge.process.wait(timeout=30) == 0
    assert imaging_studies(fresh_fhir_server, study_uid) == []
    assert bridge.study_row(study_uid)["publish_state"] == "pending"

    config_path = tmp_path / "pacs-bridge.yaml"
    with (tmp_path / "bridge-2.log").open("w", encoding="utf-8") as log_file:
        restarted = subprocess.Popen(
            [sys.executable, "-m", "pacs_bridge", "run", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        study = wait_for(lambda: imaging_studies(fresh_fhir_server, study_uid), timeout=30, what="the study")[0]
        assert study["numberOfInstances"] == 4
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=30) == 0


def test_check_config_names_every_bad_key(tmp_path: Path):
    """The console script exits 2 and lists each problem with its key path and a did-you-mean."""
    config = tmp_path / "bad.yaml"
    config.write_text("fhir:\n  base_url: ftp://x\ndicom:\n  prot: 104\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "pacs_bridge", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ},
        check=False,
    )
    assert result.returncode == 2
    assert "at 'fhir.base_url': expected an http(s) URL, got 'ftp://x'" in result.stderr
    assert "at 'dicom.prot': unknown key; did you mean 'port'?" in result.stderr
