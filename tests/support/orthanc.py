"""Debian's Orthanc as a real PACS for the tests and benchmarks: its own configuration, storage and ports.

``OrthancServer`` starts ``/usr/sbin/Orthanc`` on 127.0.0.1 with free ports, a temporary storage area and
index, the C-FIND SCP open to any calling AE, and the DICOMweb plugin (QIDO-RS, WADO-RS) at ``/dicom-web``::

    with OrthancServer(tmp_path / "orthanc") as orthanc:
        orthanc.store(paths)                 # DCMTK storescu, TCP_NODELAY=1
        orthanc.dicomweb_url                 # http://127.0.0.1:PORT/dicom-web
        orthanc.dicom_port, orthanc.aet      # for C-FIND

Orthanc speaks DICOM through Debian's DCMTK, which leaves Nagle on unless TCP_NODELAY=1 is set in its
environment (every response would stall ~40 ms): it is started with it, as the benchmarks start it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

ORTHANC_AET = "ORTHANC"
DICOMWEB_PLUGIN_DIRECTORIES = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0


def orthanc_binary() -> str | None:
    """The Orthanc executable, or None when Debian's ``orthanc`` package is not installed."""
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's shared library, or None when ``orthanc-dicomweb`` is not installed."""
    for directory in DICOMWEB_PLUGIN_DIRECTORIES:
        for candidate in sorted(Path(directory).glob("libOrthancDicomWeb.so*")):
            return str(candidate)
    return None


def orthanc_missing() -> str | None:
    """Why Orthanc cannot be started here (with the install command), or None when it can."""
    if orthanc_binary() is None:
        return "Orthanc is not installed; run: apt-get install -y orthanc orthanc-dicomweb"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed; run: apt-get install -y orthanc-dicomweb"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def orthanc_config(
    root: Path, *, dicom_port: int, http_port: int, dicomweb: bool = True, limit_find_results: int = 0
) -> dict[str, Any]:
    """Orthanc on 127.0.0.1 only, storing into ``root``; C-FIND and C-STORE from any AE, DICOMweb on.

    ``limit_find_results``: the most patient, study or series answers Orthanc gives one C-FIND (0: no limit), to stand
    for a PACS with a query limit.
    """
    config: dict[str, Any] = {
        "Name": "pacs-bridge-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # HTTP answers 127.0.0.1 only
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,  # C-STORE from any calling AE
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowFind": True,  # C-FIND from any calling AE (Orthanc >= 1.9)
        "LimitFindResults": limit_find_results,
        "LimitFindInstances": 0,  # instance-level answers are never cut short
        "HttpVerbose": True,  # each HTTP request in the log: what the bridge asked for
        "Plugins": [],
    }
    if dicomweb:
        plugin = dicomweb_plugin()
        if plugin is None:
            raise RuntimeError(orthanc_missing() or "no DICOMweb plugin")
        config["Plugins"] = [plugin]
        # Full: WADO-RS metadata read from each stored file, every element (the default, spelled out).
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"}
    return config


class OrthancServer:
    """One Orthanc process on free loopback ports, stopped (and its files removed) on leaving."""

    def __init__(self, root: Path, *, limit_find_results: int = 0, verbose: bool = True) -> None:
        self.root = root
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.aet = ORTHANC_AET
        self.log_path = root / "orthanc.log"
        self._limit_find_results = limit_find_results
        self._verbose = verbose
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    def start(self) -> Self:
        binary = orthanc_binary()
        if binary is None:
            raise RuntimeError(orthanc_missing() or "no Orthanc")
        self.root.mkdir(parents=True, exist_ok=True)
        config_path = self.root / "orthanc.json"
        config = orthanc_config(
            self.root,
            dicom_port=self.dicom_port,
            http_port=self.http_port,
            limit_find_results=self._limit_find_results,
        )
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        command = [binary, *(["--verbose"] if self._verbose else []), str(config_path)]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env={**os.environ, "TCP_NODELAY": "1"},
                start_new_session=True,
            )
        try:
            self._wait_until_answering()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with status {self._process.returncode}:\n{self.log_tail()}")
            try:
                self.get_json("/system")
                return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT_SECONDS:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # ---- talking to it -----------------------------------------------------------------------------------------

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.http_url}{path}", timeout=30) as response:
            return json.load(response)

    def upload(self, paths: list[Path]) -> None:
        """Store Part 10 files through Orthanc's REST API (quicker than C-STORE for many small studies)."""
        for path in paths:
            request = urllib.request.Request(
                f"{self.http_url}/instances", data=path.read_bytes(), headers={"Content-Type": "application/dicom"}
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.load(response)
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise RuntimeError(f"Orthanc refused {path.name}: {answer}")

    def instance_count(self) -> int:
        return int(self.get_json("/statistics")["CountInstances"])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(log empty)"
