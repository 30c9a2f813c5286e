"""Run `python -m pacs_bridge run` as a subprocess on a temporary config, and read its index from outside.

    bridge = BridgeProcess(tmp_path, database_url=..., fhir_base_url=proxy.root_url + "/fhir")
    bridge.start()            # returns once the bridge answers C-ECHO
    bridge.kill()             # SIGKILL: a power cut, as far as the index is concerned
    bridge.start()            # same config, same database, same port
    bridge.study_row(uid)     # the studies row, read from outside with SQLAlchemy (SQLite or PostgreSQL)
    bridge.stop()             # SIGTERM and wait

Waiting is done by polling a condition with a timeout (``wait_for``), never by sleeping a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from sqlalchemy import Engine, create_engine, func, select

from pacs_bridge.index.engine import normalized_database_url
from pacs_bridge.index.models import Instance, Series, Study
from tests.support.dcmtk import echoscu

T = TypeVar("T")


def wait_for(condition: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def log_events(log: str, *events: str) -> list[dict[str, Any]]:
    """The JSON log entries of ``log`` (a bridge's output) whose ``event`` is one of ``events``, in order."""
    return [entry for line in log.splitlines() if (entry := _json(line)) and entry.get("event") in events]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def listener_events(log: str, event: str) -> list[dict[str, Any]]:
    """The ``event`` lines of the processes that serve associations: the bridge's own with one listener
    process, else each listener process's (which name their ``listener_slot``; the main process's line of the
    same name, about the pool, is left out)."""
    found = log_events(log, event)
    by_listeners = [entry for entry in found if "listener_slot" in entry]
    return by_listeners or found


def listener_totals(log: str, event: str) -> dict[str, int]:
    """The numbers of the ``listener_events`` lines ``event`` (say ``listener_stopped``), summed field by field."""
    totals: dict[str, int] = {}
    for entry in listener_events(log, event):
        for key, value in entry.items():
            if isinstance(value, int) and not isinstance(value, bool) and key not in ("listener_slot", "pid"):
                totals[key] = totals.get(key, 0) + value
    return totals


def _json(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None  # e.g. a traceback line
    return value if isinstance(value, dict) else None


# dicom.fast_path and dicom.listener_processes of the bridges tests start: tests/e2e/conftest.py runs every
# end-to-end test twice, on the default configuration (the fast path, and as many listener processes as auto
# gives: two on a 2-core box) and on the plain one (stock pynetdicom in one process).
FAST_PATH = "auto"
LISTENER_PROCESSES: int | str = "auto"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class BridgeProcess:
    """One bridge configuration; start/stop/kill it as often as a test needs, always on the same database."""

    def __init__(
        self,
        directory: Path,
        *,
        database_url: str,
        fhir_base_url: str,
        fhir_timeout_seconds: float = 10,
        quiet_seconds: float = 1.0,
        max_delay_seconds: float = 60,
        retry_base_seconds: float = 0.2,
        retry_max_seconds: float = 2.0,
        extra: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.database_url = database_url
        self.fhir_port = urllib.parse.urlsplit(fhir_base_url).port  # where its FHIR client connects
        config: dict[str, Any] = {
            "dicom": {
                "ae_title": "PACS_BRIDGE",
                "bind": "127.0.0.1",
                "port": self.port,
                "fast_path": FAST_PATH,
                "listener_processes": LISTENER_PROCESSES,
            },
            "database": {"url": database_url},
            "fhir": {"base_url": fhir_base_url, "timeout_seconds": fhir_timeout_seconds},
            "debounce": {"quiet_seconds": quiet_seconds, "max_delay_seconds": max_delay_seconds, "tick_seconds": 0.2},
            "endpoints": [
                {
                    "id": "pacs-wado-rs",
                    "connection_type": "dicom-wado-rs",
                    "address": "https://pacs.example.org/dicom-web",
                }
            ],
            "patient": {"identifier_system": "urn:oid:1.2.36.146.595.217.0.1"},
            "site": {"timezone": "Europe/Paris"},
            "publish": {"retry_base_seconds": retry_base_seconds, "retry_max_seconds": retry_max_seconds},
            "logging": {"level": "info", "format": "json"},
        }
        for section, values in (extra or {}).items():
            config[section] = {**config.get(section, {}), **values}
        self.config_path = directory / "pacs-bridge.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.index = IndexReader(database_url)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.directory / f"bridge-{self.runs}.log"

    def start(self, *, timeout: float = 30) -> BridgeProcess:
        """Start the bridge and wait until it answers C-ECHO."""
        self.runs += 1
        with self.log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "pacs_bridge", "run", "--config", str(self.config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.process = process
        wait_for(
            lambda: process.poll() is not None or echoscu(self.port).returncode == 0,
            timeout=timeout,
            what="the bridge to answer C-ECHO",
            interval=0.1,
        )
        if process.poll() is not None:
            pytest.fail(f"the bridge exited with {process.returncode}:\n{self.log()}")
        return self

    def stop(self, *, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit code."""
        process = self._running()
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=timeout)

    def pids(self) -> list[int]:
        """The bridge's processes: its own, then the listener processes its start line names (with
        ``dicom.listener_processes`` above 1)."""
        process = self._running()
        started = log_events(self.log(), "listener_started")
        return [process.pid, *(started[-1].get("listener_pids") or [] if started else [])]

    def kill(self) -> None:
        """SIGKILL to each of the bridge's processes: nothing after this point runs in the bridge. (Under
        systemd, with KillMode=mixed, whatever is left of the unit when its main process dies is killed too.)"""
        process = self._running()
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)
        for pid in pids[1:]:  # reaped by init once their parent is gone
            wait_for(lambda pid=pid: not _alive(pid), timeout=30, what=f"listener process {pid} to be gone")

    def close(self) -> None:
        """For a finally: stop the bridge if it still runs, and drop the test's own database connections."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.index.close()

    def _running(self) -> subprocess.Popen[bytes]:
        if self.process is None or self.process.poll() is not None:
            pytest.fail(f"the bridge is not running:\n{self.log()}")
        return self.process

    def log(self, run: int | None = None) -> str:
        path = self.directory / f"bridge-{run or self.runs}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    # ---- the index, from outside ---------------------------------------------------------------------------
    def study_row(self, study_uid: str) -> dict[str, Any] | None:
        return self.index.study_row(study_uid)

    def instance_uids(self, study_uid: str) -> set[str]:
        return self.index.instance_uids(study_uid)

    def instance_count(self) -> int:
        return self.index.instance_count()


class IndexReader:
    """Reads a bridge's index from outside the bridge, with SQLAlchemy (SQLite or PostgreSQL)."""

    def __init__(self, database_url: str) -> None:
        # pool_pre_ping: reads go on across a restart of the database server (tests stop their own cluster).
        self.engine: Engine = create_engine(normalized_database_url(database_url), pool_pre_ping=True)

    def close(self) -> None:
        self.engine.dispose()

    def study_row(self, study_uid: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(Study.__table__).where(Study.study_uid == study_uid)).mappings().first()
        return dict(row) if row is not None else None

    def instance_uids(self, study_uid: str) -> set[str]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(Instance.sop_instance_uid)
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Study.study_uid == study_uid)
            )
            return {uid for (uid,) in rows}

    def instance_count(self) -> int:
        """Instances indexed, all studies (the bridge creates the schema before it answers C-ECHO)."""
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(Instance)).scalar_one())
