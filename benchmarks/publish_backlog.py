"""Publishing a backlog at the FHIR server's pace (issue 19): pacs-bridge against a bare client, same run, same server.

Everything runs against the project's real FHIR test server (tests/fhir_server, Medplum's engine, validating
every write), started here on a free loopback port and emptied between measurements. The bridge is
``python -m pacs_bridge run`` with the default configuration but for the addresses (and ``--concurrency``,
``--batch-size`` when given); its log level is the default, info.

* ``small`` / ``large``: N studies (3 instances each; ``large``: 2000 each, 4 series) are written into a fresh
  index, where they fall due all at the same instant T0 while the bridge runs; drain time = the last
  ``published_at`` minus T0. The peer, measured in the same round on the emptied server: a bare client that
  sends the same ImagingStudy bodies (built beforehand, outside its timing) one after another, GET + PUT each,
  over one kept-alive connection. Targets: small >= 0.5x the bare rate, large >= 0.8x.
* ``outage``: N small studies fall due while the fault proxy (tests/support/fault_proxy.py) answers every
  request with 503 and ``Retry-After: 1`` (``--retry-after``; ``--outage-kind refused``: connections refused);
  after ``--outage-seconds`` it passes again (recovery R). Measured: last ``published_at`` minus R, against the
  drain time of the same N studies through the same proxy without an outage, in the same run. Target: <= drain +
  1 s (+ the Retry-After when longer: a study that failed just before R is not retried sooner).
* ``bridges`` (needs ``--postgres``): ``--bridges`` bridges on one PostgreSQL schema drain N studies, then
  ``--changed`` of them get a new instance. Target: the server counts N + changed ImagingStudy PUTs, and every
  study holds one version per change.

It uses the test suite's helpers (tests/support: the FHIR test server, the fault proxy, DCMTK's echoscu to see
the bridge answer), which import pytest: install the test extras first, ``pip install -e '.[test]'``, with
DCMTK (``apt-get install -y dcmtk``) and Node + npm for the FHIR test server (it runs ``npm ci`` in
tests/fhir_server itself when its packages are missing). Run from the repository root::

    python benchmarks/publish_backlog.py                        # small, large, outage on SQLite: ~3 min
    python benchmarks/publish_backlog.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test
    python benchmarks/publish_backlog.py --phases small,large --repeat 5 --concurrency 4
    python benchmarks/publish_backlog.py --commit HEAD          # the bridge as committed, not the working tree
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ingest  # the sibling benchmark: processes, ports, commits, PostgreSQL schemas, machine lines

PHASES = ("small", "large", "outage", "bridges")
SMALL_INSTANCES = 3
LARGE_SERIES = 4
DUE_LEAD_SECONDS = 1.5  # T0 this long after the bridge answers: its next pass (at most a tick later) sees it
DRAIN_TIMEOUT_SECONDS = 600.0
SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage


class Run:
    """One measurement's shared pieces: the FHIR server, the temporary directory, the code to measure."""

    def __init__(self, args: argparse.Namespace, workdir: Path, server: Any, bridge_root: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.server = server
        self.bridge_root = bridge_root
        self.counter = 0

    def label(self, name: str) -> str:
        self.counter += 1
        return f"{self.counter:02d}-{name}"

    def bridge_config(self, *, database_url: str, fhir_base_url: str, port: int) -> dict[str, Any]:
        publish: dict[str, Any] = {}
        if self.args.concurrency is not None:
            publish["concurrency"] = self.args.concurrency
        if self.args.batch_size is not None:
            publish["batch_size"] = self.args.batch_size
        return {
            "dicom": {"ae_title": ingest.CALLED_AE, "bind": "127.0.0.1", "port": port},
            "database": {"url": database_url},
            "fhir": {"base_url": fhir_base_url},
            "debounce": {"quiet_seconds": 1},
            "endpoints": [
                {
                    "id": "pacs-wado-rs",
                    "connection_type": "dicom-wado-rs",
                    "address": "https://pacs.example.org/dicom-web",
                }
            ],
            "patient": {"identifier_system": "urn:oid:1.2.36.146.595.217.0.1"},
            "site": {"timezone": "UTC"},
            "publish": publish,
            "logging": {"format": "json"},
        }


# ---- the index ----------------------------------------------------------------------------------------------


def study_records(number: int, *, instances: int, series: int) -> list[Any]:
    """One generated study: ``series`` CT series sharing ``instances`` instances."""
    from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes
    from tests.support.studies import uid

    study_uid = uid(f"7.{number}")
    study = StudyAttributes(
        study_uid=study_uid,
        patient_id=f"PAT-{number:05d}",
        accession_number=f"ACC-{number:05d}",
        study_date="20240315",
        study_time="101530",
        study_description="CT chest",
    )
    records = []
    for instance in range(instances):
        series_number = instance * series // instances + 1
        records.append(
            InstanceRecord(
                study=study,
                series=SeriesAttributes(
                    series_uid=f"{study_uid}.{series_number}", modality="CT", series_number=series_number
                ),
                sop_instance_uid=f"{study_uid}.{series_number}.{instance + 1}",
                sop_class_uid=SOP_CLASS,
                instance_number=instance + 1,
            )
        )
    return records


@dataclass
class Backlog:
    """An index holding ``studies`` generated studies that are due in an hour until ``make_due`` says when."""

    database_url: str
    study_uids: list[str]
    instances: int
    engine: Any = None
    index: Any = None

    @classmethod
    def fill(cls, database_url: str, *, studies: int, instances: int, series: int, first: int = 1) -> Backlog:
        from pacs_bridge.debounce import DebounceSettings
        from pacs_bridge.index.engine import make_engine
        from pacs_bridge.index.repository import Index
        from pacs_bridge.index.schema import prepare_schema

        engine = make_engine(database_url)
        prepare_schema(engine)
        # A second's quiet period for the changes made later ("bridges"); the backlog itself is due in an hour.
        index = Index(engine, DebounceSettings(quiet_period=timedelta(seconds=1), max_delay=timedelta(hours=2)))
        received_at = datetime.now(UTC) + timedelta(hours=1)
        uids = []
        for number in range(first, first + studies):
            records = study_records(number, instances=instances, series=series)
            index.record_instances([(record, received_at) for record in records])
            uids.append(records[0].study.study_uid)
        return cls(database_url=database_url, study_uids=uids, instances=instances, engine=engine, index=index)

    def make_due(self, due_at: datetime) -> None:
        """Every study of the backlog falls due at ``due_at``."""
        from sqlalchemy import update

        from pacs_bridge.index.models import Study

        with self.engine.begin() as connection:
            connection.execute(update(Study).values(due_at=due_at, first_change_at=due_at, last_change_at=due_at))

    def published(self) -> tuple[int, datetime | None]:
        """How many studies are published, and the last ``published_at``."""
        from sqlalchemy import func, select

        from pacs_bridge.index.models import Study

        with self.engine.connect() as connection:
            count, last = connection.execute(
                select(func.count(), func.max(Study.published_at)).where(Study.publish_state == "published")
            ).one()
        if isinstance(last, str):  # SQLite's aggregate skips the column type's result processing
            last = datetime.fromisoformat(last)
        if last is not None and last.tzinfo is None:
            last = last.replace(tzinfo=UTC)
        return int(count), last

    def bodies(self, config: dict[str, Any]) -> list[tuple[str, bytes]]:
        """Each study's ImagingStudy as the bridge builds it: (id, JSON body), for the bare client."""
        from pacs_bridge.config import Config
        from pacs_bridge.fhir.imaging_study import build_imaging_study
        from pacs_bridge.wiring import mapping_settings

        mapping = mapping_settings(Config.model_validate(config))
        built = []
        for study_uid in self.study_uids:
            resource = build_imaging_study(self.index.load_snapshot(study_uid), mapping)
            built.append((resource["id"], json.dumps(resource, separators=(",", ":")).encode("utf-8")))
        return built

    def close(self) -> None:
        self.engine.dispose()


@contextlib.contextmanager
def fresh_database(run: Run, name: str, *, postgres: bool = False) -> Iterator[str]:
    """A new empty database: an SQLite file in the run's directory, or a fresh PostgreSQL schema."""
    if postgres:
        with ingest.postgres_database(run.args.postgres)(0) as url:
            yield url
        return
    path = run.workdir / f"index-{run.label(name.replace(' ', '-'))}.db"
    yield f"sqlite:///{path}"
    for suffix in ("", "-wal", "-shm", "-writers"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


# ---- the peers --------------------------------------------------------------------------------------------


def bare_client(base_url: str, bodies: Sequence[tuple[str, bytes]]) -> float:
    """GET + PUT each body, one after another, over one kept-alive connection; returns the seconds taken."""
    import httpx

    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    with httpx.Client(timeout=60, trust_env=False) as client:
        started = time.perf_counter()
        for resource_id, body in bodies:
            client.get(f"{base_url}/ImagingStudy/{resource_id}", headers={"Accept": "application/fhir+json"})
            response = client.put(f"{base_url}/ImagingStudy/{resource_id}", content=body, headers=headers)
            if response.status_code not in (200, 201):
                raise ingest.BenchmarkError(f"the bare client's PUT got {response.status_code}: {response.text[:300]}")
        return time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Bridge:
    """A running ``pacs-bridge run``."""

    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    @contextlib.contextmanager
    def running(cls, run: Run, name: str, *, database_url: str, fhir_base_url: str) -> Iterator[Bridge]:
        import yaml

        port = ingest.free_port()
        label = run.label(name)
        config_path = run.workdir / f"{label}.yaml"
        config_path.write_text(
            yaml.safe_dump(run.bridge_config(database_url=database_url, fhir_base_url=fhir_base_url, port=port))
        )
        log_path = run.workdir / f"{label}.log"
        environment = ingest.this_tree_environment(dict(os.environ), root=run.bridge_root)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "pacs_bridge", "run", "--config", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=run.workdir,
                env=environment,
                start_new_session=True,
            )
        try:
            ingest.wait_until_answering(f"pacs-bridge ({name})", process, port=port, log_path=log_path)
            yield cls(process=process, log_path=log_path)
        finally:
            returncode = ingest.stop_process(process)
        if returncode != 0:
            raise ingest.BenchmarkError(f"pacs-bridge ({name}) exited with {returncode}:\n{ingest.log_tail(log_path)}")

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") == name:
                    found.append(entry)
        return found


def wait_published(backlog: Backlog, *, count: int, what: str) -> datetime:
    """Poll the index until ``count`` studies are published; returns the last ``published_at``."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
    while True:
        published, last = backlog.published()
        if published >= count and last is not None:
            return last
        if time.monotonic() > deadline:
            raise ingest.BenchmarkError(
                f"{what}: {published} of {count} studies published in {DRAIN_TIMEOUT_SECONDS} s"
            )
        time.sleep(0.05)


@dataclass
class Drain:
    seconds: float
    cpu_seconds: float


def drain(
    run: Run, backlog: Backlog, name: str, *, fhir_base_url: str, during: Callable[[], None] | None = None
) -> Drain:
    """Start a bridge on ``backlog``, make everything due at T0 and wait until all is published; the drain time
    is the last ``published_at`` minus T0 (``during`` runs right after T0, e.g. to end an outage)."""
    with Bridge.running(run, name, database_url=backlog.database_url, fhir_base_url=fhir_base_url) as bridge:
        due_at = datetime.now(UTC) + timedelta(seconds=DUE_LEAD_SECONDS)
        backlog.make_due(due_at)
        cpu_before = cpu_seconds(bridge.process.pid)
        if during is not None:
            time.sleep(max(0.0, (due_at - datetime.now(UTC)).total_seconds()))
            during()
        last = wait_published(backlog, count=len(backlog.study_uids), what=name)
        cpu = cpu_seconds(bridge.process.pid) - cpu_before
    return Drain(seconds=(last - due_at).total_seconds(), cpu_seconds=cpu)


def check_writes(run: Run, expected: int, what: str) -> None:
    puts = run.server.request_counts().get("PUT ImagingStudy", 0)
    if puts != expected:
        raise ingest.BenchmarkError(f"{what}: the server got {puts} ImagingStudy PUTs, expected {expected} (one each)")


# ---- the phases -------------------------------------------------------------------------------------------


@dataclass
class Rates:
    name: str
    studies: int
    instances: int
    target: float
    bridge: list[float] = field(default_factory=list)  # studies per second, one per round
    bare: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # the bridge's CPU per study

    def ratio(self) -> float:
        return statistics.median(self.bridge) / statistics.median(self.bare)


def backlog_phase(run: Run, rates: Rates, *, series: int, postgres: bool = False) -> None:
    """Rounds of: the bare client, then the bridge (or the other way round), each on an emptied server."""
    for round_number in range(1, run.args.repeat + 1):
        with fresh_database(run, rates.name, postgres=postgres) as database_url:
            backlog = Backlog.fill(database_url, studies=rates.studies, instances=rates.instances, series=series)
            try:
                config = run.bridge_config(database_url=database_url, fhir_base_url=run.server.base_url, port=0)
                bodies = backlog.bodies(config)
                order = ("bare", "bridge") if round_number % 2 else ("bridge", "bare")
                for peer in order:
                    run.server.reset()
                    if peer == "bare":
                        rates.bare.append(rates.studies / bare_client(run.server.base_url, bodies))
                    else:
                        drained = drain(run, backlog, rates.name, fhir_base_url=run.server.base_url)
                        check_writes(run, rates.studies, rates.name)
                        rates.bridge.append(rates.studies / drained.seconds)
                        rates.cpu_ms.append(1000 * drained.cpu_seconds / rates.studies)
            finally:
                backlog.close()
        print(
            f"  {rates.name} round {round_number}: bridge {rates.bridge[-1]:7.1f} studies/s "
            f"({rates.cpu_ms[-1]:.2f} ms CPU each), bare {rates.bare[-1]:7.1f} studies/s, "
            f"{rates.bridge[-1] / rates.bare[-1]:.2f}x  (load {os.getloadavg()[0]:.2f})",
            flush=True,
        )


def outage_phase(run: Run) -> list[str]:
    """The same N studies drained through the fault proxy without, then after, an outage."""
    from tests.support.fault_proxy import HttpFaultProxy, Respond

    studies, outage_seconds = run.args.outage_studies, run.args.outage_seconds
    results: dict[str, float] = {}
    for kind in ("baseline", "outage"):
        run.server.reset()
        with (
            fresh_database(run, f"outage-{kind}") as database_url,
            HttpFaultProxy(upstream_port=run.server.port) as proxy,
        ):
            backlog = Backlog.fill(database_url, studies=studies, instances=SMALL_INSTANCES, series=1)
            try:
                recovered: list[datetime] = []

                def outage_then_recovery(proxy: HttpFaultProxy = proxy, recovered: list[datetime] = recovered) -> None:
                    time.sleep(outage_seconds)  # the outage itself: the bridge is failing meanwhile
                    recovered.append(datetime.now(UTC))
                    proxy.restore()

                if kind == "outage":
                    if run.args.outage_kind == "refused":
                        proxy.refuse()
                    else:
                        proxy.outage(Respond(503, retry_after=f"{run.args.retry_after:g}"))
                drained = drain(
                    run,
                    backlog,
                    f"outage-{kind}",
                    fhir_base_url=f"{proxy.root_url}/fhir",
                    during=outage_then_recovery if kind == "outage" else None,
                )
                check_writes(run, studies, f"outage {kind}")
                if kind == "baseline":
                    results["drain"] = drained.seconds
                else:
                    _, last = backlog.published()
                    assert last is not None
                    results["after_recovery"] = (last - recovered[0]).total_seconds()
            finally:
                backlog.close()
    excess = results["after_recovery"] - results["drain"]
    refused = run.args.outage_kind == "refused"
    allowed = 1.0 if refused else max(1.0, run.args.retry_after)
    verdict = "met" if excess <= allowed else "NOT met"
    fault = "connections refused" if refused else f"503 with Retry-After: {run.args.retry_after:g}"
    return [
        f"outage ({fault}, {outage_seconds:g} s) over {studies} due studies: last published "
        f"{results['after_recovery']:.2f} s after the recovery; the same studies drain in {results['drain']:.2f} s "
        f"without an outage; excess {excess:+.2f} s (target <= +{allowed:g} s): {verdict}"
    ]


def bridges_phase(run: Run) -> list[str]:
    """Several bridges on one PostgreSQL schema: N studies, then M changed; each written once per change."""
    studies, changed, count = run.args.studies, run.args.changed, run.args.bridges
    run.server.reset()
    with fresh_database(run, "bridges", postgres=True) as database_url:
        backlog = Backlog.fill(database_url, studies=studies, instances=SMALL_INSTANCES, series=1)
        try:
            with contextlib.ExitStack() as stack:
                bridges = [
                    stack.enter_context(
                        Bridge.running(
                            run, f"bridges-{n}", database_url=database_url, fhir_base_url=run.server.base_url
                        )
                    )
                    for n in range(1, count + 1)
                ]
                due_at = datetime.now(UTC) + timedelta(seconds=DUE_LEAD_SECONDS)
                backlog.make_due(due_at)
                last = wait_published(backlog, count=studies, what="bridges")
                seconds = (last - due_at).total_seconds()
                check_writes(run, studies, "bridges, first drain")
                # A new instance in M studies, indexed as a listener would; due a second later (quiet period).
                changes_made_at = datetime.now(UTC)
                for number in range(1, changed + 1):
                    record = study_records(number, instances=SMALL_INSTANCES + 1, series=1)[-1]
                    backlog.index.record_instance(record, received_at=datetime.now(UTC))
                wait_changed(backlog, changed, since=changes_made_at)
                time.sleep(2)  # a second write would show here
                check_writes(run, studies + changed, "bridges, after the changes")
                per_bridge = [len(bridge.events("study_published")) for bridge in bridges]
        finally:
            backlog.close()
    versions = {run.server.versions("ImagingStudy", study_uid) for study_uid in backlog.study_uids[:changed]}
    unchanged = {run.server.versions("ImagingStudy", study_uid) for study_uid in backlog.study_uids[changed:]}
    verdict = "met" if (versions, unchanged) == ({2}, {1}) else "NOT met"
    return [
        f"{count} bridges on one PostgreSQL: {studies} studies drained in {seconds:.2f} s ({studies / seconds:.1f}/s), "
        f"study_published per bridge {per_bridge}; then {changed} changed: {studies + changed} ImagingStudy PUTs, "
        f"versions {sorted(versions)} (changed) and {sorted(unchanged)} (the others); one write per change: {verdict}"
    ]


def wait_changed(backlog: Backlog, changed: int, *, since: datetime) -> None:
    """Poll the index until ``changed`` studies have been published again after ``since``."""
    from sqlalchemy import func, select

    from pacs_bridge.index.models import Study

    deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
    while True:
        with backlog.engine.connect() as connection:
            done = connection.execute(
                select(func.count()).where(Study.published_at > since, Study.publish_state == "published")
            ).scalar_one()
        if done >= changed:
            return
        if time.monotonic() > deadline:
            raise ingest.BenchmarkError(f"bridges: {done} of {changed} changed studies published again")
        time.sleep(0.05)


# ---- report and command line --------------------------------------------------------------------------------


def report(all_rates: Sequence[Rates]) -> list[str]:
    header = (
        f"{'backlog':<26} {'bridge studies/s':>16} {'bare studies/s':>14} {'ratio':>7} "
        f"{'CPU ms/study':>12} {'target':>8}"
    )
    lines = [header, "-" * len(header)]
    for rates in all_rates:
        ratio = rates.ratio()
        verdict = "met" if ratio >= rates.target else "NOT met"
        lines.append(
            f"{rates.name:<26} {statistics.median(rates.bridge):>16.1f} {statistics.median(rates.bare):>14.1f} "
            f"{ratio:>6.2f}x {statistics.median(rates.cpu_ms):>12.2f} {f'>= {rates.target}x':>8} {verdict}"
        )
    return lines


def _phases(text: str) -> tuple[str, ...]:
    keys = tuple(key.strip() for key in text.split(",") if key.strip())
    if not keys or any(key not in PHASES for key in keys):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(PHASES)}, got {text!r}")
    return keys


def _parser() -> argparse.ArgumentParser:
    positive = ingest._at_least_one
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--phases", type=_phases, help=f"what to run (default {','.join(PHASES[:3])}; bridges too with --postgres)"
    )
    parser.add_argument("--studies", type=positive, default=1000, help="small studies per backlog (default 1000)")
    parser.add_argument("--large-studies", type=positive, default=20, help="large studies (default 20)")
    parser.add_argument("--large-instances", type=positive, default=2000, help="instances per large study (2000)")
    parser.add_argument("--repeat", type=positive, default=3, help="rounds of small and large (default 3)")
    parser.add_argument("--outage-studies", type=positive, default=300, help="studies due during the outage (300)")
    parser.add_argument("--outage-seconds", type=float, default=20.0, help="length of the outage (default 20 s)")
    parser.add_argument(
        "--outage-kind",
        choices=("503", "refused"),
        default="503",
        help="503 with Retry-After: 1 (default) or refused connections",
    )
    parser.add_argument(
        "--retry-after", type=int, default=1, help="the outage's Retry-After in whole seconds (default 1)"
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="also the small backlog on PostgreSQL, and the bridges phase (a fresh schema each, dropped after)",
    )
    parser.add_argument("--bridges", type=positive, default=2, help="bridges sharing PostgreSQL (default 2)")
    parser.add_argument("--changed", type=positive, default=100, help="studies changed after the drain (100)")
    parser.add_argument("--concurrency", type=positive, help="the bridge's publish.concurrency (default: its own)")
    parser.add_argument("--batch-size", type=positive, help="the bridge's publish.batch_size (default: its own)")
    parser.add_argument("--commit", metavar="REV", help="measure the bridge as committed at REV (e.g. HEAD)")
    return parser


def benchmark(args: argparse.Namespace) -> None:
    from tests.support.fhir_server import FhirTestServer

    started = time.monotonic()
    phases = args.phases or (PHASES if args.postgres else PHASES[:3])
    if "bridges" in phases and not args.postgres:
        raise ingest.BenchmarkError("the bridges phase needs --postgres URL")
    revision_at_start = ingest.revision()
    signal.signal(signal.SIGTERM, ingest._raise_keyboard_interrupt)
    with tempfile.TemporaryDirectory(prefix="pacs-bridge-publish-bench-") as temporary, FhirTestServer() as server:
        workdir = Path(temporary)
        bridge_root, measured = ingest.REPO_ROOT, revision_at_start
        if args.commit is not None:
            bridge_root = workdir / "code"
            commit = ingest.export_commit(args.commit, bridge_root)
            measured = f"pacs-bridge at commit {commit[:12]} (exported from {ingest.REPO_ROOT})"
        run = Run(args, workdir, server, bridge_root)
        settings = (
            ", ".join(
                f"{key} {value}"
                for key, value in (("concurrency", args.concurrency), ("batch_size", args.batch_size))
                if value is not None
            )
            or "defaults"
        )
        print(
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC: phases {','.join(phases)}; publish settings: {settings}; "
            f"load average {ingest.load_average()}",
            flush=True,
        )
        all_rates = []
        if "small" in phases:
            small = Rates(f"{args.studies} x {SMALL_INSTANCES} instances", args.studies, SMALL_INSTANCES, 0.5)
            backlog_phase(run, small, series=1)
            all_rates.append(small)
            if args.postgres:
                small_pg = Rates(f"{small.name}, PostgreSQL", args.studies, SMALL_INSTANCES, 0.5)
                backlog_phase(run, small_pg, series=1, postgres=True)
                all_rates.append(small_pg)
        if "large" in phases:
            large = Rates(
                f"{args.large_studies} x {args.large_instances} instances",
                args.large_studies,
                args.large_instances,
                0.8,
            )
            backlog_phase(run, large, series=LARGE_SERIES)
            all_rates.append(large)
        lines = report(all_rates) if all_rates else []
        if "outage" in phases:
            lines += ["", *outage_phase(run)]
        if "bridges" in phases:
            lines += ["", *bridges_phase(run)]
        print()
        print("\n".join(lines))
        print(f"load average at the end {ingest.load_average()} (1, 5, 15 min; {os.cpu_count()} cores)")
        print(measured)
        print("\n".join(ingest.machine_lines(workdir, args.postgres, ["postgresql"] if args.postgres else [])))
    print(f"total {time.monotonic() - started:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    ingest.use_this_tree()
    try:
        benchmark(args)
    except ingest.BenchmarkError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped and temporary files removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
