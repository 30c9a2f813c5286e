"""Ingest throughput: DCMTK storescu -> pacs-bridge (durable index) against DCMTK storescp, Orthanc and a bare
pynetdicom storage SCP, in the same run, with the same sender, on the same box (issue 6, targets 1 and 2).

One run = N generated instances sent over loopback by K concurrent ``storescu`` processes (``--associations``,
one association each, N/K instances each); the time until the last one finishes gives instances per second.
Every peer is started by this script as an unprivileged loopback service on a free port, fresh for each run
(empty storage, empty database), and stopped afterwards, also on Ctrl-C or failure:

* ``dcmtk storescp``: DCMTK's storage SCP writing each object to a file (``--fork``: one process per
  association, ``+xa``: every transfer syntax); it never calls fsync. The ceiling;
* ``orthanc``: Debian's Orthanc (``/usr/sbin/Orthanc config.json``) with its own SQLite index and storage area
  in the run's temporary directory, durability at its defaults (``SyncStorageArea`` true: each file is
  fsync'd before the instance is indexed);
* ``bridge sqlite``: ``python -m pacs_bridge run`` on a fresh SQLite file (WAL, synchronous=FULL), its FHIR
  server a closed port and its quiet period an hour, so publishing never runs during ingest;
* ``bridge postgresql`` (with ``--postgres URL``): the same on a fresh schema of that database;
* ``bare pynetdicom``: a stock pynetdicom SCP whose C-STORE handler returns 0x0000 and does nothing else, in
  its own process (``python benchmarks/ingest.py --serve-bare PORT``). The floor.

Each run is checked afterwards: the peer must hold all N instances (files in storescp's directory, Orthanc's
``/statistics``, rows in the bridge's ``instances`` table), or the benchmark fails: a fast but lossy run is
worthless.

Run from the repository root::

    python benchmarks/ingest.py                              # 2000 x 9.7 kB, 1 association, 3 runs each
    python benchmarks/ingest.py --associations 4
    python benchmarks/ingest.py --pixel-bytes 525312         # 526 kB instances (760 per run by default)
    python benchmarks/ingest.py --nagle                      # sender leaves Nagle on (200 instances)
    python benchmarks/ingest.py --associations 4 --listener-processes 1,2    # bridge with 1, then 2 processes
                                                             # (by default: the default configuration, auto)
    python benchmarks/ingest.py --peers orthanc,sqlite --variants default,stock,without-wakeups   # fast path pieces
    python benchmarks/ingest.py --pixel-bytes 525312 --variants pdu-16384,pdu-262144,pdu-1048576  # max PDU sizes
    python benchmarks/ingest.py --commit HEAD                # the bridge as committed, not the working tree

The temporary directory (files sent, storage areas, SQLite databases) is made under ``TMPDIR``: put it on the
disk you mean to measure, since a tmpfs turns every fsync into a no-op.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CALLED_AE = "PACS_BRIDGE"
CALLING_AE = "BENCH_SCU"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
STORESCU_TIMEOUT_SECONDS = 900.0
ECHO_TIMEOUTS = ("-to", "2", "-ta", "5", "-td", "5")  # echoscu: connect, association, DIMSE (seconds)
DEFAULT_PIXEL_BYTES = 8844  # 66 x 67 x 2 bytes: 9.7 kB files, the issue's CT instance
DEFAULT_INSTANCES = 2000
DEFAULT_NAGLE_INSTANCES = 200  # a stock SCP stalls ~40-80 ms per C-STORE behind a Nagle-on sender
DEFAULT_MEGABYTES_PER_RUN = 400  # caps the default N for large instances (526 kB: 760 per run)
PEERS = ("storescp", "orthanc", "sqlite", "postgresql", "bare")


class BenchmarkError(Exception):
    """The benchmark could not measure what it claims to: the message says which target and why."""


# ---- the bare SCP (its own process) -----------------------------------------------------------------------


def serve_bare(port: int) -> None:
    """A storage SCP on 127.0.0.1:``port`` that answers success to every C-STORE and does nothing else.

    Same presentation contexts and PDU size as the bridge's listener: every storage SOP class (and
    Verification) with every transfer syntax, unlimited PDU size. Runs until SIGTERM or SIGINT.
    """
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    def handle_store(_event: Any) -> int:
        return 0x0000

    ae = AE(ae_title="BARE_SCP")
    ae.require_called_aet = False
    ae.maximum_pdu_size = 0
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    if server is None:  # pynetdicom returns the server whenever block=False; this keeps mypy informed
        raise RuntimeError("pynetdicom did not return a server for a non-blocking start_server()")
    try:
        stop.wait()
    finally:
        server.shutdown()


# ---- processes, ports, DCMTK ------------------------------------------------------------------------------


def use_this_tree() -> None:
    """Import ``pacs_bridge`` and ``tests.support`` from this checkout, whatever the editable install points at."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def this_tree_environment(base: dict[str, str], *, root: Path = REPO_ROOT) -> dict[str, str]:
    """``base`` with ``root`` (this checkout, or an exported commit) first on PYTHONPATH, so that
    ``python -m pacs_bridge`` runs the code measured."""
    path = os.pathsep.join(p for p in (str(root), base.get("PYTHONPATH", "")) if p)
    return {**base, "PYTHONPATH": path}


def export_commit(revision_: str, destination: Path) -> str:
    """Extract ``pacs_bridge`` as committed at ``revision_`` into ``destination``; returns the commit id.

    The bridge is started afresh for every run: measuring an exported commit keeps edits made meanwhile in a
    shared working tree (half-written ones included) out of the figures.
    """
    resolved = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", f"{revision_}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if resolved.returncode != 0:
        raise BenchmarkError(f"--commit {revision_!r} is not a commit of {REPO_ROOT}: {resolved.stderr.strip()}")
    commit = resolved.stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", commit, "pacs_bridge"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise BenchmarkError(f"git archive {commit} pacs_bridge failed: {archive.stderr.decode(errors='replace')}")
    destination.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(destination, filter="data")
    return commit


def dcmtk(name: str) -> str:
    """Absolute path of DCMTK's ``name`` (pynetdicom's own console scripts of the same name are skipped)."""
    from tests.support.dcmtk import dcmtk_tool

    path = dcmtk_tool(name)
    if path is None:
        raise BenchmarkError(f"DCMTK's {name} is not installed; run: apt-get install -y dcmtk")
    return path


def dcmtk_environment(*, nagle: bool = False) -> dict[str, str]:
    """TCP_NODELAY=1: Debian's DCMTK otherwise leaves Nagle on and stalls ~80 ms per C-STORE on a receiver
    that delays its ACKs. ``nagle=True`` keeps Nagle on, as many real senders do."""
    from tests.support.dcmtk import dcmtk_env

    environment = dcmtk_env()
    if nagle:
        environment.pop("TCP_NODELAY", None)
    return environment


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log empty)"


@contextlib.contextmanager
def running_server(
    name: str,
    command: Sequence[str],
    *,
    port: int,
    log_path: Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    killed_by_sigterm_ok: bool = False,
) -> Iterator[None]:
    """Start ``command``, wait until it answers a C-ECHO on ``port``, stop it with SIGTERM on leaving.

    ``killed_by_sigterm_ok``: the server has no SIGTERM handler (DCMTK storescp), so dying of the signal is
    its normal way to stop.
    """
    with log_path.open("wb") as log:
        # A session (and process group) of its own: a Ctrl-C in the terminal reaches only us, and we stop the
        # server and any children it forked (storescp --fork) ourselves.
        process = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True
        )
        try:
            wait_until_answering(name, process, port=port, log_path=log_path)
            yield
        except BaseException:
            stop_process(process)
            raise
        returncode = stop_process(process)
        if returncode != 0 and not (killed_by_sigterm_ok and returncode == -signal.SIGTERM):
            raise BenchmarkError(
                f"{name} exited with status {returncode} after SIGTERM; its log ends:\n{log_tail(log_path)}"
            )


def wait_until_answering(name: str, process: subprocess.Popen[bytes], *, port: int, log_path: Path) -> None:
    """Poll with DCMTK echoscu until the server answers, it dies, or the start timeout passes."""
    echoscu = dcmtk("echoscu")
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        if process.poll() is not None:
            raise BenchmarkError(
                f"{name} exited with status {process.returncode} before answering; its log ends:\n{log_tail(log_path)}"
            )
        echo = subprocess.run(
            [echoscu, *ECHO_TIMEOUTS, "-aet", CALLING_AE, "-aec", CALLED_AE, "127.0.0.1", str(port)],
            capture_output=True,
            env=dcmtk_environment(),
            timeout=30,
            check=False,
        )
        if echo.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise BenchmarkError(
                f"{name} did not answer a C-ECHO on 127.0.0.1:{port} within {START_TIMEOUT_SECONDS:.0f} s; "
                f"its log ends:\n{log_tail(log_path)}"
            )
        time.sleep(0.05)


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    """``signum`` to ``process`` and, when it leads its own process group, to the children it forked."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)


def stop_process(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL if it has not exited in time. Returns its exit status."""
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
    else:
        # The leader is gone; children it forked (storescp --fork) may not be.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode


def send_study(workload: Workload, port: int) -> float:
    """Send every part of the study at once, one storescu association per part; returns seconds until the
    last storescu has finished."""
    command = [dcmtk("storescu"), "-aet", CALLING_AE, "-aec", CALLED_AE, "+sd", "127.0.0.1", str(port)]
    environment = dcmtk_environment(nagle=workload.nagle)
    outputs = [workload.workdir / f"storescu-{index}.out" for index in range(len(workload.parts))]
    senders: list[subprocess.Popen[bytes]] = []
    started = time.perf_counter()
    try:
        for part, output in zip(workload.parts, outputs, strict=True):
            with output.open("wb") as sink:
                senders.append(
                    subprocess.Popen([*command, str(part)], stdout=sink, stderr=subprocess.STDOUT, env=environment)
                )
        deadline = time.monotonic() + STORESCU_TIMEOUT_SECONDS
        for sender in senders:
            sender.wait(timeout=max(deadline - time.monotonic(), 0.1))
        elapsed = time.perf_counter() - started
    finally:
        for sender in senders:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
    for part, sender, output in zip(workload.parts, senders, outputs, strict=True):
        text = output.read_text(errors="replace").strip()
        if sender.returncode != 0 or text:
            # Without -v storescu prints nothing unless something went wrong (a failure status, an abort).
            raise BenchmarkError(
                f"storescu sending {part.name} ({workload.instances} instances in {len(workload.parts)} parts) "
                f"exited with status {sender.returncode}:\n{text[-3000:]}"
            )
    return elapsed


def check_count(name: str, run_number: int, *, expected: int, found: int, log_path: Path) -> None:
    """Fail the benchmark when a peer holds fewer (or more) instances than storescu got success for."""
    if found != expected:
        raise BenchmarkError(
            f"{name} run {run_number}: storescu got success for {expected} instances but it holds {found}; "
            f"the figures of a lossy run are worthless. Its log ends:\n{log_tail(log_path)}"
        )


# ---- targets ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Target:
    """One thing to measure: ``run`` starts it fresh, sends the study once, checks it, and returns seconds."""

    key: str  # one of PEERS
    name: str
    run: Callable[[int], float]  # run number -> wall time of the send
    seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    parts: tuple[Path, ...]  # one directory per association
    instances: int
    workdir: Path
    bridge_root: Path = REPO_ROOT  # where ``python -m pacs_bridge`` is imported from
    nagle: bool = False  # the sender leaves Nagle's algorithm on


def run_bare(workload: Workload, run_number: int) -> float:
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-bare", str(port)]
    log_path = workload.workdir / f"bare-{run_number}.log"
    with running_server("bare pynetdicom SCP", command, port=port, log_path=log_path, cwd=workload.workdir):
        return send_study(workload, port)


def run_storescp(workload: Workload, run_number: int) -> float:
    """DCMTK storescp writing files into an empty directory; afterwards the directory must hold N files."""
    output = workload.workdir / f"storescp-{run_number}"
    output.mkdir()
    port = free_port()
    # Defaults otherwise: file format with the received transfer syntax, no bit-preserving mode, max PDU 16 kB.
    # TCP_NODELAY=1 in its environment, as for the sender: Debian's DCMTK otherwise Nagles its responses.
    command = [dcmtk("storescp"), "--fork", "+xa", "-dhl", "-aet", CALLED_AE, "-od", str(output), str(port)]
    log_path = workload.workdir / f"storescp-{run_number}.log"
    name = "DCMTK storescp"
    try:
        with running_server(
            name,
            command,
            port=port,
            log_path=log_path,
            cwd=workload.workdir,
            env=dcmtk_environment(),
            killed_by_sigterm_ok=True,
        ):
            elapsed = send_study(workload, port)
        found = sum(1 for path in output.rglob("*") if path.is_file())
        check_count(name, run_number, expected=workload.instances, found=found, log_path=log_path)
    finally:
        shutil.rmtree(output, ignore_errors=True)
    return elapsed


def orthanc_binary() -> str:
    path = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise BenchmarkError(
            "Orthanc is not installed; run: apt-get install -y orthanc (or leave it out: --peers without orthanc)"
        )
    return path


def orthanc_config(root: Path, *, dicom_port: int, http_port: int) -> dict[str, Any]:
    """Orthanc on 127.0.0.1 only, storing into ``root``; every durability setting at Orthanc's default."""
    return {
        "Name": "pacs-bridge-benchmark",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # HTTP answers 127.0.0.1 only
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,  # accept storescu's called AE title
        "DicomAlwaysAllowStore": True,  # accept a C-STORE from any modality
        "DicomAlwaysAllowEcho": True,
        "Plugins": [],
        # Orthanc's defaults, spelled out because the comparison depends on them: each file written to the
        # storage area is fsync'd (SyncStorageArea), stored as received, MD5s kept in the SQLite index.
        "SyncStorageArea": True,
        "StorageCompression": False,
        "StoreMD5ForAttachments": True,
        "OverwriteInstances": False,
    }


def orthanc_instance_count(http_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/statistics", timeout=30) as response:
        statistics_ = json.load(response)
    return int(statistics_["CountInstances"])


def run_orthanc(workload: Workload, run_number: int) -> float:
    """Orthanc on an empty storage area and index; afterwards its /statistics must count N instances."""
    root = workload.workdir / f"orthanc-{run_number}"
    root.mkdir()
    dicom_port, http_port = free_port(), free_port()
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(orthanc_config(root, dicom_port=dicom_port, http_port=http_port), indent=2))
    log_path = workload.workdir / f"orthanc-{run_number}.log"
    name = "Orthanc"
    try:
        # Orthanc speaks DICOM through Debian's DCMTK, which leaves Nagle on unless TCP_NODELAY=1 is set: without
        # it every C-STORE response stalls ~40 ms (about 21 inst/s here), as under Debian's systemd unit.
        environment = dcmtk_environment()
        command = [orthanc_binary(), str(config_path)]
        with running_server(name, command, port=dicom_port, log_path=log_path, cwd=root, env=environment):
            elapsed = send_study(workload, dicom_port)
            found = orthanc_instance_count(http_port)
        check_count(name, run_number, expected=workload.instances, found=found, log_path=log_path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return elapsed


VARIANTS_HELP = (
    "default (the configuration's defaults), stock (dicom.fast_path: off), without-PIECE (the fast path "
    "without one of its pieces: wakeups, inline_store, shared_contexts), pdu-N "
    "(dicom.max_pdu_bytes: N)"
)


def variant_settings(variant: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The dicom settings and the fast path pieces left out that ``variant`` (see VARIANTS_HELP) stands for."""
    if variant == "default":
        return {}, ()
    if variant == "stock":
        return {"fast_path": "off"}, ()
    if variant.startswith("without-"):
        return {}, tuple(variant.removeprefix("without-").split("+"))
    if variant.startswith("pdu-") and variant.removeprefix("pdu-").isdigit():
        return {"max_pdu_bytes": int(variant.removeprefix("pdu-"))}, ()
    raise BenchmarkError(f"unknown --variants entry {variant!r}: expected one of {VARIANTS_HELP}")


def serve_bridge_without(pieces: Sequence[str], config_path: str) -> int:
    """``pacs-bridge run --config CONFIG_PATH`` with the fast path's ``pieces`` left out (for measuring them)."""
    from pacs_bridge.cli import main as bridge_main
    from pacs_bridge.dicom import fastpath

    unknown = set(pieces) - set(fastpath.PIECES)
    if unknown:
        raise SystemExit(f"unknown fast path pieces {sorted(unknown)}; the pieces are {list(fastpath.PIECES)}")
    fastpath.PIECES = tuple(piece for piece in fastpath.PIECES if piece not in pieces)
    bridge_main(["run", "--config", config_path])
    return 0


def bridge_config(
    *,
    port: int,
    database_url: str,
    listener_processes: int | None = None,
    dicom_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A bridge on 127.0.0.1:``port`` whose publisher never runs during a benchmark run; ``listener_processes``
    None leaves ``dicom.listener_processes`` at its default (auto)."""
    dicom: dict[str, Any] = {"ae_title": CALLED_AE, "bind": "127.0.0.1", "port": port, **(dicom_settings or {})}
    if listener_processes is not None:
        dicom["listener_processes"] = listener_processes
    return {
        "dicom": dicom,
        "database": {"url": database_url},
        # Nothing listens there; with an hour of quiet period no study becomes due anyway.
        "fhir": {"base_url": f"http://127.0.0.1:{free_port()}/fhir", "timeout_seconds": 5},
        "debounce": {"quiet_seconds": 3600, "max_delay_seconds": 3600, "tick_seconds": 60},
        "logging": {"level": "warning", "format": "json"},
    }


def run_bridge(
    workload: Workload,
    run_number: int,
    *,
    label: str,
    database: Callable[[int], contextlib.AbstractContextManager[str]],
    count_instances: Callable[[str], int],
    listener_processes: int | None = None,
    variant: str = "default",
) -> float:
    import yaml

    dicom_settings, pieces_left_out = variant_settings(variant)
    with database(run_number) as database_url:
        port = free_port()
        config_path = workload.workdir / f"{label}-{run_number}.yaml"
        config = bridge_config(
            port=port, database_url=database_url, listener_processes=listener_processes, dicom_settings=dicom_settings
        )
        config_path.write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "pacs_bridge", "run", "--config", str(config_path)]
        if pieces_left_out:
            launcher = [sys.executable, str(Path(__file__).resolve()), "--serve-bridge-without"]
            command = [*launcher, "+".join(pieces_left_out), str(config_path)]
        log_path = workload.workdir / f"{label}-{run_number}.log"
        name = f"pacs-bridge ({label})"
        environment = this_tree_environment(dict(os.environ), root=workload.bridge_root)
        with running_server(name, command, port=port, log_path=log_path, cwd=workload.workdir, env=environment):
            elapsed = send_study(workload, port)
            # Success was answered only after each commit, so every instance must be readable now.
            indexed = count_instances(database_url)
        check_count(name, run_number, expected=workload.instances, found=indexed, log_path=log_path)
        return elapsed


def sqlite_database(workdir: Path) -> Callable[[int], contextlib.AbstractContextManager[str]]:
    @contextlib.contextmanager
    def fresh(run_number: int) -> Iterator[str]:
        path = workdir / f"index-{run_number}.db"
        yield f"sqlite:///{path}"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)

    return fresh


def count_sqlite_instances(database_url: str) -> int:
    path = database_url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as connection:
        (count,) = connection.execute("SELECT count(*) FROM instances").fetchone()
    return int(count)


def postgres_database(admin_url: str) -> Callable[[int], contextlib.AbstractContextManager[str]]:
    """Each run gets a fresh schema of ``admin_url``'s database (via search_path), dropped afterwards."""
    from sqlalchemy import create_engine, text

    from pacs_bridge.index.engine import normalized_database_url

    url = normalized_database_url(admin_url)

    @contextlib.contextmanager
    def fresh(_run_number: int) -> Iterator[str]:
        schema = f"pb_bench_{uuid.uuid4().hex[:12]}"
        admin = create_engine(url)
        try:
            try:
                with admin.begin() as connection:
                    connection.execute(text(f'CREATE SCHEMA "{schema}"'))
            except Exception as exc:
                raise BenchmarkError(
                    f"PostgreSQL at {admin.url.render_as_string(hide_password=True)} is not usable "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0]}); check --postgres and that the server runs"
                ) from exc
            separator = "&" if "?" in url else "?"
            try:
                yield f"{url}{separator}options=-csearch_path%3D{schema}"
            finally:
                with admin.begin() as connection:
                    connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        finally:
            admin.dispose()

    return fresh


def count_postgres_instances(database_url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM instances")).scalar_one())
    finally:
        engine.dispose()


def postgres_version(admin_url: str) -> str:
    from sqlalchemy import create_engine, text

    from pacs_bridge.index.engine import normalized_database_url

    engine = create_engine(normalized_database_url(admin_url))
    try:
        with engine.connect() as connection:
            return str(connection.execute(text("SHOW server_version")).scalar_one()).split()[0]
    finally:
        engine.dispose()


# ---- data, machine, report --------------------------------------------------------------------------------


def pixel_shape(pixel_bytes: int) -> tuple[int, int]:
    """Rows and columns of 2-byte pixels making exactly ``pixel_bytes``, as square as possible."""
    if pixel_bytes % 2:
        raise BenchmarkError(f"--pixel-bytes must be even (2-byte pixels), got {pixel_bytes}")
    pixels = pixel_bytes // 2
    rows = int(pixels**0.5)
    while pixels % rows:
        rows -= 1
    return rows, pixels // rows


def write_files(directory: Path, *, instances: int, pixel_bytes: int, parts: int) -> tuple[tuple[Path, ...], float]:
    """One CT series of ``instances`` files under a new study UID, split in ``parts`` consecutive runs of
    instances, one directory each. Returns the directories and the mean file size in bytes."""
    from tests.support.studies import SeriesSpec, new_study_uid, study_datasets, write_file

    rows, columns = pixel_shape(pixel_bytes)
    pixels = bytes(pixel_bytes)
    directories = tuple(directory / f"part-{index:02d}" for index in range(parts))
    sizes = []
    datasets = study_datasets(new_study_uid(), [SeriesSpec("CT", instances)])
    for index, ds in enumerate(datasets):
        ds.Rows, ds.Columns, ds.PixelData = rows, columns, pixels
        path = write_file(ds, directories[index * parts // instances] / f"{ds.SOPInstanceUID}.dcm")
        sizes.append(path.stat().st_size)
    return directories, statistics.fmean(sizes)


def filesystem_of(path: Path) -> str:
    """The type of the file system holding ``path`` (from /proc/mounts), or "unknown"."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    best, kind = "", "unknown"
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            mount_point = parts[1].replace("\\040", " ")
            inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, kind = mount_point, parts[2]
    return kind


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def dcmtk_version() -> str:
    result = subprocess.run([dcmtk("storescu"), "--version"], capture_output=True, text=True, check=False)
    first = (result.stdout or result.stderr).strip().splitlines()
    return first[0].strip("$ ").replace("dcmtk: ", "") if first else "unknown"


def revision() -> str:
    """pacs-bridge's version and this checkout's commit (``-dirty`` when tracked files are modified)."""
    from pacs_bridge import __version__

    result = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    )
    commit = result.stdout.strip() if result.returncode == 0 else "unknown commit"
    return f"pacs-bridge {__version__} ({commit}, {REPO_ROOT})"


def orthanc_version() -> str:
    result = subprocess.run([orthanc_binary(), "--version"], capture_output=True, text=True, check=False)
    first = (result.stdout or result.stderr).strip().splitlines()
    return first[0].split()[-1] if first else "unknown"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine_lines(workdir: Path, postgres_url: str | None, keys: Sequence[str]) -> list[str]:
    servers = [f"DCMTK {dcmtk_version().removeprefix('storescu ').removeprefix('v')} (storescu sender, storescp)"]
    if "orthanc" in keys:
        servers.append(f"Orthanc {orthanc_version()}")
    if "postgresql" in keys and postgres_url is not None:
        servers.append(f"PostgreSQL {postgres_version(postgres_url)}")
    return [
        f"machine: {os.cpu_count()} cores, {cpu_model()}, {platform.system()} {platform.release()}",
        f"python {platform.python_version()}, pynetdicom {version('pynetdicom')}, pydicom {version('pydicom')}, "
        f"SQLAlchemy {version('SQLAlchemy')}, SQLite {sqlite3.sqlite_version}",
        ", ".join(servers),
        f"temporary files on {filesystem_of(workdir)} ({workdir.parent})",
    ]


def report(targets: Sequence[Target], *, instances: int) -> list[str]:
    def rate(seconds: float) -> float:
        return instances / seconds

    medians = {target.key: statistics.median(rate(s) for s in target.seconds) for target in targets}

    def ratio(median: float, key: str) -> str:
        return f"{median / medians[key]:>9.2f}x" if key in medians else f"{'-':>10}"

    width = max(18, *(len(target.name) for target in targets))
    header = (
        f"{'target':<{width}} {'median inst/s':>13} {'min':>8} {'max':>8} {'ms/inst':>8} {'vs orthanc':>10} "
        f"{'vs bare':>10}"
    )
    lines = [header, "-" * len(header)]
    for target in targets:
        rates = [rate(s) for s in target.seconds]
        median = medians[target.key]
        lines.append(
            f"{target.name:<{width}} {median:>13.1f} {min(rates):>8.1f} {max(rates):>8.1f} {1000 / median:>8.2f} "
            f"{ratio(median, 'orthanc')} {ratio(median, 'bare')}"
        )
    return lines


def issue_targets(targets: Sequence[Target], *, instances: int, nagle: bool) -> list[str]:
    """Issue 6's ingest targets against this run's medians, met or not."""
    medians = {t.key: statistics.median(instances / s for s in t.seconds) for t in targets}
    lines = []
    for key in medians:
        if not key.startswith(("sqlite", "postgresql")):
            continue
        if nagle and "bare" in medians:
            ratio = medians[key] / medians["bare"]
            verdict = "met" if ratio >= 10 else "NOT met"
            lines.append(
                f"issue 6 target 2 (Nagle-on sender, >= 10x stock pynetdicom): bridge {key} {ratio:.2f}x, {verdict}"
            )
        if not nagle and "orthanc" in medians:
            ratio = medians[key] / medians["orthanc"]
            verdict = "met" if ratio >= 1 else "NOT met"
            lines.append(f"issue 6 target 1 (durable ingest >= 1.0x Orthanc): bridge {key} {ratio:.2f}x, {verdict}")
    return lines


# ---- command line -----------------------------------------------------------------------------------------


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _process_counts(text: str) -> tuple[int | None, ...]:
    """``default`` (the configuration's default, auto) or N, comma-separated; ``default`` is None."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected default, N or several of them comma-separated, got {text!r}")
    return tuple(None if part == "default" else _at_least_one(part) for part in parts)


def _peers(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in keys if k not in PEERS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(PEERS)}, got {text!r}")
    return keys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--instances",
        type=_at_least_one,
        help=f"instances sent per run (default {DEFAULT_INSTANCES}; {DEFAULT_NAGLE_INSTANCES} with --nagle; "
        f"fewer for large instances, at most {DEFAULT_MEGABYTES_PER_RUN} MB per run)",
    )
    parser.add_argument("--repeat", type=_at_least_one, default=3, help="runs per target, alternating (default 3)")
    parser.add_argument(
        "--associations",
        type=_at_least_one,
        default=1,
        help="concurrent storescu processes, one association each, sharing the instances (default 1)",
    )
    parser.add_argument(
        "--pixel-bytes",
        type=_at_least_one,
        default=DEFAULT_PIXEL_BYTES,
        help=f"pixel data per instance, even (default {DEFAULT_PIXEL_BYTES}: 9.7 kB files; 525312: 526 kB files)",
    )
    parser.add_argument(
        "--peers",
        type=_peers,
        default=("storescp", "orthanc", "sqlite", "postgresql", "bare"),
        help=f"what to measure, comma-separated (default all of {','.join(PEERS)}; postgresql needs --postgres)",
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="also measure the bridge on this PostgreSQL database (a fresh schema per run, dropped after), "
        "e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test",
    )
    parser.add_argument(
        "--listener-processes",
        type=_process_counts,
        default=(None,),
        metavar="N[,N...]",
        help="the bridge's dicom.listener_processes; several values measure the bridge once for each, e.g. "
        "default,1,2; default: the configuration's default (auto: one per usable core, at most 2)",
    )
    parser.add_argument(
        "--nagle",
        action="store_true",
        help="run storescu without TCP_NODELAY, as senders that leave Nagle on do (issue 6, target 2)",
    )
    parser.add_argument(
        "--commit",
        metavar="REV",
        help="measure the bridge as committed at REV (e.g. HEAD), exported once for the whole benchmark, "
        "instead of this working tree as it is at each run",
    )
    parser.add_argument(
        "--variants",
        type=lambda text: tuple(part.strip() for part in text.split(",") if part.strip()),
        default=("default",),
        metavar="V[,V...]",
        help=f"bridge variants to measure, each a target of its own: {VARIANTS_HELP} (default: default)",
    )
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-bridge-without", nargs=2, metavar=("PIECES", "CONFIG"), help=argparse.SUPPRESS)
    return parser


def default_instances(*, pixel_bytes: int, nagle: bool) -> int:
    if nagle:
        return DEFAULT_NAGLE_INSTANCES
    by_volume = DEFAULT_MEGABYTES_PER_RUN * 1_000_000 // (pixel_bytes + 1000)
    return max(min(DEFAULT_INSTANCES, by_volume), 50)


def _raise_keyboard_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def make_targets(args: argparse.Namespace, workload: Workload) -> list[Target]:
    workdir = workload.workdir
    available: dict[str, tuple[str, Callable[[int], float]]] = {
        "storescp": ("dcmtk storescp", lambda n: run_storescp(workload, n)),
        "orthanc": ("orthanc", lambda n: run_orthanc(workload, n)),
        "bare": ("bare pynetdicom", lambda n: run_bare(workload, n)),
    }
    databases: dict[str, tuple[Callable[[int], contextlib.AbstractContextManager[str]], Callable[[str], int]]] = {
        "sqlite": (sqlite_database(workdir), count_sqlite_instances)
    }
    if args.postgres:
        databases["postgresql"] = (postgres_database(args.postgres), count_postgres_instances)
    targets = []
    for key in PEERS:
        if key not in args.peers:
            continue
        if key in available:
            targets.append(Target(key=key, name=available[key][0], run=available[key][1]))
        elif key in databases:
            database, count = databases[key]
            for processes in args.listener_processes:
                for variant in args.variants:
                    variant_settings(variant)  # an unknown one fails now, not after minutes of other runs
                    # "sqlite" is the default configuration; "sqlite x1" one listener process, "sqlite x2" two,
                    # and so on; then the variant, if any.
                    suffix = f" x{processes}" if processes is not None else ""
                    suffix += f" {variant}" if variant != "default" else ""
                    run = functools.partial(
                        run_bridge,
                        workload,
                        label=key + suffix.replace(" ", "-"),
                        database=database,
                        count_instances=count,
                        listener_processes=processes,
                        variant=variant,
                    )
                    targets.append(Target(key=key + suffix, name=f"bridge {key}{suffix}", run=run))
    return targets


def benchmark(args: argparse.Namespace) -> None:
    started = time.monotonic()
    # Each run starts the bridge afresh from this checkout: a commit made meanwhile would change what is measured.
    revision_at_start = revision()
    if args.commit is not None and "sqlite" not in args.peers and "postgresql" not in args.peers:
        raise BenchmarkError("--commit chooses the bridge's code, but --peers measures no bridge")
    instances = args.instances or default_instances(pixel_bytes=args.pixel_bytes, nagle=args.nagle)
    if args.associations > instances:
        raise BenchmarkError(f"--associations {args.associations} is more than the {instances} instances to send")
    # SIGTERM unwinds like Ctrl-C: servers stopped, temporary files removed.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    with tempfile.TemporaryDirectory(prefix="pacs-bridge-bench-") as temporary:
        workdir = Path(temporary)
        parts, mean_size = write_files(
            workdir / "study", instances=instances, pixel_bytes=args.pixel_bytes, parts=args.associations
        )
        bridge_root, measured = REPO_ROOT, revision_at_start
        if args.commit is not None:
            bridge_root = workdir / "code"
            commit = export_commit(args.commit, bridge_root)
            measured = f"pacs-bridge at commit {commit[:12]} (exported from {REPO_ROOT}; working tree not used)"
        workload = Workload(
            parts=parts, instances=instances, workdir=workdir, bridge_root=bridge_root, nagle=args.nagle
        )
        targets = make_targets(args, workload)
        if "orthanc" in args.peers:
            orthanc_binary()  # fail now, not after minutes of other runs
        print(
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {instances} instances of {mean_size / 1000:.1f} kB "
            f"(mean {mean_size:.0f} B; pixel data {args.pixel_bytes} B) per run, "
            f"{args.associations} concurrent storescu association{'s' if args.associations > 1 else ''}, "
            f"{args.repeat} runs per target{', sender with Nagle on' if args.nagle else ', TCP_NODELAY=1'}; "
            f"load average {load_average()}",
            flush=True,
        )
        for run_number in range(1, args.repeat + 1):
            # Rotate the order each round, so drift (page cache, CPU clock) does not always favour one target.
            shift = (run_number - 1) % len(targets)
            for target in targets[shift:] + targets[:shift]:
                seconds = target.run(run_number)
                target.seconds.append(seconds)
                print(
                    f"  run {run_number}: {target.name:<34} {seconds:7.2f} s  {instances / seconds:8.1f} inst/s"
                    f"  (load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
        print()
        print("\n".join(report(targets, instances=instances)))
        print()
        for line in issue_targets(targets, instances=instances, nagle=args.nagle):
            print(line)
        print(f"load average at the end {load_average()} (1, 5, 15 min; {os.cpu_count()} cores)")
        print(measured)
        print("\n".join(machine_lines(workdir, args.postgres, [t.key for t in targets])))
        if args.commit is None and revision() != revision_at_start:
            print(f"WARNING: the checkout changed during the benchmark; at the start it was {revision_at_start}")
    print(f"total {time.monotonic() - started:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return 0
    if args.serve_bridge_without is not None:  # pacs_bridge from PYTHONPATH: the code measured (--commit)
        pieces, config_path = args.serve_bridge_without
        return serve_bridge_without(pieces.split("+"), config_path)
    use_this_tree()
    try:
        benchmark(args)
    except BenchmarkError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped and temporary files removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
