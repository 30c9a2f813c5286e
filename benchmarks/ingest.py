"""Ingest throughput: DCMTK storescu -> pacs-bridge (durable index) versus a bare pynetdicom storage SCP.

One run = one ``storescu`` association sending N generated instances over loopback; its wall time gives
instances per second. The targets alternate, R runs each:

* ``bare pynetdicom``: a storage SCP whose C-STORE handler returns 0x0000 and does nothing else, in its own
  process (``python benchmarks/ingest.py --serve-bare PORT``), so that it does not share our GIL;
* ``bridge sqlite``: ``python -m pacs_bridge run`` on a fresh SQLite file (WAL, synchronous=FULL), its FHIR
  server a closed port and its quiet period an hour, so publishing never runs during ingest;
* ``bridge postgresql`` (with ``--postgres URL``): the same on a fresh schema of that database.

Every bridge run starts a fresh bridge on a fresh database, and is checked afterwards: all N instances must
be in its ``instances`` table, or the benchmark fails (a fast but lossy run is worthless).

Run from the repository root::

    python benchmarks/ingest.py [--instances 1000] [--repeat 3] [--pixel-bytes 8192] [--postgres URL]

The temporary directory (files sent, SQLite database) is made under ``TMPDIR``: put it on the disk you mean
to measure, since a tmpfs turns the fsync at every commit into a no-op.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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


def this_tree_environment(base: dict[str, str]) -> dict[str, str]:
    """``base`` with this checkout first on PYTHONPATH, so ``python -m pacs_bridge`` runs the code measured."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), base.get("PYTHONPATH", "")) if p)
    return {**base, "PYTHONPATH": path}


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
    name: str, command: Sequence[str], *, port: int, log_path: Path, cwd: Path, env: dict[str, str] | None = None
) -> Iterator[None]:
    """Start ``command``, wait until it answers a C-ECHO on ``port``, stop it with SIGTERM on leaving."""
    with log_path.open("wb") as log:
        # A session of its own: a Ctrl-C in the terminal reaches only us, and we stop the server ourselves.
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
        if returncode != 0:
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


def stop_process(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL if it has not exited in time. Returns its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def send_study(files: Path, port: int, *, instances: int, nagle: bool = False) -> float:
    """One storescu association sending every file in ``files``; returns its wall time in seconds."""
    command = [dcmtk("storescu"), "-aet", CALLING_AE, "-aec", CALLED_AE, "+sd", "127.0.0.1", str(port), str(files)]
    started = time.perf_counter()
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=dcmtk_environment(nagle=nagle),
        timeout=STORESCU_TIMEOUT_SECONDS,
        check=False,
    )
    elapsed = time.perf_counter() - started
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or output:
        # Without -v storescu prints nothing unless something went wrong (a failure status, an abort).
        raise BenchmarkError(
            f"storescu sending {instances} instances exited with status {result.returncode}:\n{output[-3000:]}"
        )
    return elapsed


# ---- targets ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Target:
    """One thing to measure: ``run`` starts it fresh, sends the study once, checks it, and returns seconds."""

    name: str
    run: Callable[[int], float]  # run number -> storescu wall time
    seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    files: Path
    instances: int
    workdir: Path
    nagle: bool = False  # the sender leaves Nagle's algorithm on


def run_bare(workload: Workload, run_number: int) -> float:
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-bare", str(port)]
    log_path = workload.workdir / f"bare-{run_number}.log"
    with running_server("bare pynetdicom SCP", command, port=port, log_path=log_path, cwd=workload.workdir):
        return send_study(workload.files, port, instances=workload.instances, nagle=workload.nagle)


def bridge_config(*, port: int, database_url: str) -> dict[str, Any]:
    """A bridge on 127.0.0.1:``port`` whose publisher never runs during a benchmark run."""
    return {
        "dicom": {"ae_title": CALLED_AE, "bind": "127.0.0.1", "port": port},
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
) -> float:
    import yaml

    with database(run_number) as database_url:
        port = free_port()
        config_path = workload.workdir / f"{label}-{run_number}.yaml"
        config_path.write_text(yaml.safe_dump(bridge_config(port=port, database_url=database_url)))
        command = [sys.executable, "-m", "pacs_bridge", "run", "--config", str(config_path)]
        log_path = workload.workdir / f"{label}-{run_number}.log"
        name = f"pacs-bridge ({label})"
        environment = this_tree_environment(dict(os.environ))
        with running_server(name, command, port=port, log_path=log_path, cwd=workload.workdir, env=environment):
            elapsed = send_study(workload.files, port, instances=workload.instances, nagle=workload.nagle)
            # Success was answered only after each commit, so every instance must be readable now.
            indexed = count_instances(database_url)
        if indexed != workload.instances:
            raise BenchmarkError(
                f"pacs-bridge ({label}) run {run_number}: storescu got success for {workload.instances} instances "
                f"but the index holds {indexed}; the figures of a lossy run are worthless. Its log ends:\n"
                f"{log_tail(log_path)}"
            )
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


def write_files(directory: Path, *, instances: int, pixel_bytes: int) -> float:
    """One CT series of ``instances`` files under a new study UID; returns the mean file size in bytes."""
    from tests.support.studies import SeriesSpec, new_study_uid, write_study

    paths = write_study(directory, new_study_uid(), [SeriesSpec("CT", instances)], pixel_bytes=pixel_bytes)
    return statistics.fmean(path.stat().st_size for path in paths)


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


def machine_lines(workdir: Path, postgres_url: str | None) -> list[str]:
    lines = [
        revision(),
        f"machine: {os.cpu_count()} cores, {cpu_model()}, {platform.system()} {platform.release()}",
        f"python {platform.python_version()}, pynetdicom {version('pynetdicom')}, pydicom {version('pydicom')}, "
        f"SQLAlchemy {version('SQLAlchemy')}, SQLite {sqlite3.sqlite_version}, DCMTK {dcmtk_version()}",
        f"temporary files on {filesystem_of(workdir)} ({workdir.parent})",
    ]
    if postgres_url is not None:
        lines.append(f"PostgreSQL {postgres_version(postgres_url)}")
    return lines


def report(targets: Sequence[Target], *, instances: int) -> list[str]:
    def rate(seconds: float) -> float:
        return instances / seconds

    bare = statistics.median(rate(s) for s in targets[0].seconds)
    header = f"{'target':<20} {'median inst/s':>13} {'min':>8} {'max':>8} {'ms/inst':>8} {'vs bare':>8}"
    lines = [header, "-" * len(header)]
    for target in targets:
        rates = [rate(s) for s in target.seconds]
        median = statistics.median(rates)
        lines.append(
            f"{target.name:<20} {median:>13.1f} {min(rates):>8.1f} {max(rates):>8.1f} "
            f"{1000 / median:>8.2f} {median / bare:>7.2f}x"
        )
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=_at_least_one, default=1000, help="instances sent per run (default 1000)")
    parser.add_argument("--repeat", type=_at_least_one, default=3, help="runs per target, alternating (default 3)")
    parser.add_argument(
        "--pixel-bytes", type=_at_least_one, default=8192, help="pixel data per instance (default 8192)"
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="also measure the bridge on this PostgreSQL database (a fresh schema per run, dropped after), "
        "e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test",
    )
    parser.add_argument(
        "--nagle",
        action="store_true",
        help="run storescu without TCP_NODELAY, as senders that leave Nagle on do (use fewer --instances)",
    )
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser


def _raise_keyboard_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def benchmark(args: argparse.Namespace) -> None:
    started = time.monotonic()
    # SIGTERM unwinds like Ctrl-C: servers stopped, temporary files removed.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    with tempfile.TemporaryDirectory(prefix="pacs-bridge-bench-") as temporary:
        workdir = Path(temporary)
        files = workdir / "study"
        mean_size = write_files(files, instances=args.instances, pixel_bytes=args.pixel_bytes)
        workload = Workload(files=files, instances=args.instances, workdir=workdir, nagle=args.nagle)
        targets = [
            Target(name="bare pynetdicom", run=lambda n: run_bare(workload, n)),
            Target(
                name="bridge sqlite",
                run=lambda n: run_bridge(
                    workload,
                    n,
                    label="sqlite",
                    database=sqlite_database(workdir),
                    count_instances=count_sqlite_instances,
                ),
            ),
        ]
        if args.postgres:
            postgres = postgres_database(args.postgres)
            targets.append(
                Target(
                    name="bridge postgresql",
                    run=lambda n: run_bridge(
                        workload, n, label="postgresql", database=postgres, count_instances=count_postgres_instances
                    ),
                )
            )
        print(
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {args.instances} instances of {mean_size / 1000:.1f} kB "
            f"(pixel data {args.pixel_bytes} B) per run, one storescu association, {args.repeat} runs per target"
            f"{', sender with Nagle on' if args.nagle else ''}",
            flush=True,
        )
        for run_number in range(1, args.repeat + 1):
            # Rotate the order each round, so drift (page cache, CPU clock) does not always favour one target.
            shift = (run_number - 1) % len(targets)
            for target in targets[shift:] + targets[:shift]:
                seconds = target.run(run_number)
                target.seconds.append(seconds)
                print(
                    f"  run {run_number}: {target.name:<18} {seconds:7.2f} s  {args.instances / seconds:8.1f} inst/s",
                    flush=True,
                )
        print()
        print("\n".join(report(targets, instances=args.instances)))
        print()
        print("\n".join(machine_lines(workdir, args.postgres)))
    print(f"total {time.monotonic() - started:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return 0
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
