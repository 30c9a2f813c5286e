"""`run` without --config: it reads $PACS_BRIDGE_CONFIG and says so in its (JSON) log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml


def read_events_until(process: subprocess.Popen[str], last: str, *, timeout: float) -> list[dict[str, Any]]:
    """The JSON log events ``process`` writes until one named ``last`` (or it exits, or ``timeout`` runs out)."""
    assert process.stdout is not None
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        events.append(event)
        if event.get("event") == last:
            break
    return events


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """The processes a test starts (it appends each); any still running at its end is killed and reaped, so a
    failed test leaves nothing behind for the next ones."""
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_run_reads_the_file_named_by_the_variable_and_logs_which(tmp_path: Path, started: list[subprocess.Popen[str]]):
    """PACS_BRIDGE_CONFIG names the file; the first log line, configuration_loaded, gives it and its source.
    The FHIR server does not answer (nothing listens on port 9): SIGTERM still stops the bridge, exit status 0."""
    config = tmp_path / "bridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dicom": {"bind": "127.0.0.1", "port": 0},
                "database": {"url": "sqlite:///index.db"},
                "fhir": {"base_url": "http://127.0.0.1:9/fhir"},
                "logging": {"format": "json"},
            }
        ),
        encoding="utf-8",
    )
    environment = {**os.environ, "PACS_BRIDGE_CONFIG": str(config)}
    process = subprocess.Popen(
        [sys.executable, "-m", "pacs_bridge", "run"],
        cwd=tmp_path.parent,  # elsewhere: the index is still beside the configuration
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started.append(process)
    events = read_events_until(process, "bridge_started", timeout=60)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)  # it stops at once; the bound is for a loaded machine

    assert process.returncode == 0

    assert events[0] == {
        **events[0],
        "event": "configuration_loaded",
        "config_file": str(config),
        "config_source": "PACS_BRIDGE_CONFIG",
    }
    assert events[-1]["event"] == "bridge_started"
    assert events[-1]["database"] == f"sqlite:///{tmp_path / 'index.db'}"
