"""A throwaway PostgreSQL cluster of the test's own, from the installed server binaries.

The shared server on 127.0.0.1:5432 is used by every suite on the machine at once, so no test may stop it.
A test that needs to stop PostgreSQL under the bridge starts its own cluster instead::

    with PrivatePostgres() as cluster:      # initdb in a temporary directory, started on a free port
        bridge = BridgeProcess(tmp_path, database_url=cluster.url, ...)
        cluster.stop()                      # pg_ctl stop -m fast: FATAL 57P01 to every session
        cluster.start()                     # same data, same port

The binaries are found under /usr/lib/postgresql/<version>/bin (Debian's layout, highest version first) or,
failing that, in the directory ``pg_config --bindir`` names. Without them the test is skipped with the
install command. initdb and postgres refuse to run as root: as root they run as the ``postgres`` system user
(through ``runuser``), in a directory that user owns. Authentication is ``trust`` and the server listens on
127.0.0.1 only; its Unix socket stays inside the data directory.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import pytest

from tests.support.bridge_process import free_port

SERVICE_USER = "postgres"


def postgres_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None when the server is not installed."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: [int(part) for part in re.findall(r"\d+", path.parent.name)],
        reverse=True,
    )
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


class PrivatePostgres:
    """One PostgreSQL cluster in a temporary directory, on a free 127.0.0.1 port; removed on exit."""

    def __init__(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            pytest.skip(
                "the PostgreSQL server binaries (initdb, pg_ctl, postgres) are not installed: "
                "apt-get install -y postgresql"
            )
        self.bindir = bindir
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            try:
                pwd.getpwnam(SERVICE_USER)
            except KeyError:
                pytest.skip(f"running as root and there is no {SERVICE_USER!r} user to run PostgreSQL as")
        # Directly under the system's temporary directory: pytest's own (/tmp/pytest-of-root) is closed to
        # the postgres user.
        self.directory = Path(tempfile.mkdtemp(prefix="pacs-bridge-pg-"))
        self.data = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        if self._as_root:
            shutil.chown(self.directory, user=SERVICE_USER, group=SERVICE_USER)

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the cluster's ``postgres`` database."""
        return f"postgresql+psycopg://{SERVICE_USER}@127.0.0.1:{self.port}/postgres"

    def __enter__(self) -> PrivatePostgres:
        try:
            self._run(
                "initdb", "--pgdata", str(self.data), "--username", SERVICE_USER, "--auth", "trust",
                "--encoding", "UTF8", "--no-sync",
            )  # fmt: skip
            settings = (
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.data}'\n"
                "max_connections = 50\n"
                "shared_buffers = 16MB\n"
            )
            with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
                conf.write(settings)
            self.start()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self.is_running():
                self.stop(mode="immediate")
        finally:
            self._remove()

    def start(self) -> None:
        """Start the cluster and wait until it accepts connections."""
        self._run("pg_ctl", "start", "--pgdata", str(self.data), "--log", str(self.log_path), "--wait")

    def stop(self, *, mode: str = "fast") -> None:
        """``pg_ctl stop``; ``fast`` (an administrative shutdown) ends every session with FATAL 57P01."""
        self._run("pg_ctl", "stop", "--pgdata", str(self.data), "--mode", mode, "--wait")

    def is_running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if self._as_root:
            command = ["runuser", "-u", SERVICE_USER, "--", *command]
        result = subprocess.run(command, cwd=self.directory, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited with {result.returncode}:\n{result.stdout}{result.stderr}\n{self.log()}"
            )

    def _remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
