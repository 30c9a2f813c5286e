"""Backfill rate: studies per second that ``pacs-bridge backfill --source dicomweb`` indexes from Orthanc, against
a bare client sending the same QIDO-RS and WADO-RS metadata requests to the same Orthanc in the same run
(issue 16).

Orthanc (Debian's, with its DICOMweb plugin, started by this script on free loopback ports) is loaded once
with N small studies (one CT series of 2 instances each, StudyDate spread over ``--days`` days of 2024).
Then, alternately, ``--runs`` times each:

* ``bridge``: ``BackfillRunner`` + ``DicomWebSource`` (no rate limit) into a fresh SQLite index (WAL,
  synchronous=FULL) — QIDO-RS windows split while a page is full, each study's metadata parsed with
  ``Dataset.from_json``, mapped by ``extract_instance`` and committed by ``Index.record_instances``;
  with ``--postgres URL`` also into a fresh schema of that database;
* ``bare``: one ``httpx.Client`` sending the very requests the bridge's run sent (recorded from its first
  run: the QIDO-RS pages and the metadata GETs), reading each answer with ``json.loads`` and nothing more.
  The floor: what Orthanc itself costs.

Each bridge run is checked: its index must hold every study and instance, or the benchmark fails.

Run from the repository root::

    python benchmarks/backfill.py                    # 1000 studies, 3 runs each
    python benchmarks/backfill.py --studies 200 --runs 1
    python benchmarks/backfill.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from pacs_bridge.backfill.dicomweb import DicomWebSource  # noqa: E402
from pacs_bridge.backfill.pacing import Pacer  # noqa: E402
from pacs_bridge.backfill.runner import BackfillRequest, BackfillRunner  # noqa: E402
from pacs_bridge.backfill_runs import RunCounts  # noqa: E402
from pacs_bridge.debounce import DebounceSettings  # noqa: E402
from pacs_bridge.index.backfill_progress import BackfillLedger  # noqa: E402
from pacs_bridge.index.engine import make_engine  # noqa: E402
from pacs_bridge.index.repository import Index  # noqa: E402
from pacs_bridge.index.schema import prepare_schema  # noqa: E402
from tests.support.orthanc import OrthancServer, orthanc_missing  # noqa: E402
from tests.support.studies import SeriesSpec, new_study_uid, study_datasets, write_file  # noqa: E402

INSTANCES_PER_STUDY = 2
FIRST_DAY = date(2024, 1, 1)


class BenchmarkError(Exception):
    """The benchmark could not measure what it claims to; the message says why."""


class SilentProgress:
    def started(self, **_: Any) -> None:
        pass

    def advanced(self, **_: Any) -> None:
        pass

    def failed(self, failure: Any) -> None:
        raise BenchmarkError(f"the backfill failed {failure.what}: {failure.error}")

    def finished(self, summary: Any) -> None:
        pass


class RecordingTransport(httpx.HTTPTransport):
    """The bridge's transport, noting each URL it asks for (so the bare client can ask for exactly those)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        return super().handle_request(request)


def load_orthanc(orthanc: OrthancServer, workdir: Path, *, studies: int, days: int) -> None:
    paths = []
    for number in range(studies):
        study_uid = new_study_uid()
        for ds in study_datasets(study_uid, [SeriesSpec("CT", INSTANCES_PER_STUDY)], pixel_bytes=512):
            ds.StudyDate = ds.SeriesDate = (FIRST_DAY + timedelta(days=number % days)).strftime("%Y%m%d")
            paths.append(write_file(ds, workdir / "files" / f"{ds.SOPInstanceUID}.dcm"))
    orthanc.upload(paths)
    if orthanc.instance_count() != len(paths):
        raise BenchmarkError(f"Orthanc holds {orthanc.instance_count()} instances, {len(paths)} were uploaded")


def run_bridge(
    orthanc: OrthancServer, database_url: str, *, studies: int, days: int, recorder: RecordingTransport | None
) -> tuple[float, int]:
    """One backfill into a fresh index; returns (seconds, requests)."""
    engine = make_engine(database_url)
    try:
        prepare_schema(engine)
        index = Index(engine, DebounceSettings(quiet_period=timedelta(hours=1), max_delay=timedelta(hours=1)))
        transport = recorder or httpx.HTTPTransport()
        source = DicomWebSource(
            httpx.Client(transport=transport, timeout=60, trust_env=False),
            base_url=orthanc.dicomweb_url,
            pacer=Pacer(0, threading.Event()),
        )
        runner = BackfillRunner(
            source=source,
            sink=index,
            ledger=BackfillLedger(engine),
            reporter=SilentProgress(),
            clock=lambda: datetime.now(UTC),
        )
        last_day = FIRST_DAY + timedelta(days=days - 1)
        started = time.perf_counter()
        summary = runner.run(BackfillRequest(source="dicomweb", since=FIRST_DAY, until=last_day))
        elapsed = time.perf_counter() - started
        check(summary.counts, engine_url=database_url, studies=studies)
        return elapsed, source.requests_sent
    finally:
        engine.dispose()


def check(counts: RunCounts, *, engine_url: str, studies: int) -> None:
    if (counts.studies_indexed, counts.failures) != (studies, 0):
        raise BenchmarkError(
            f"the bridge indexed {counts.studies_indexed} of {studies} studies, {counts.failures} failed"
        )
    engine = create_engine(engine_url)
    try:
        with engine.connect() as connection:
            held = connection.execute(text("SELECT count(*) FROM instances")).scalar_one()
    finally:
        engine.dispose()
    if held != studies * INSTANCES_PER_STUDY:
        raise BenchmarkError(f"the index holds {held} instances, {studies * INSTANCES_PER_STUDY} expected")


def run_bare(urls: list[str]) -> float:
    """The same GETs, answers read as JSON and dropped."""
    started = time.perf_counter()
    with httpx.Client(timeout=60, trust_env=False, headers={"Accept": "application/dicom+json"}) as client:
        for url in urls:
            response = client.get(url)
            response.raise_for_status()
            json.loads(response.content)
    return time.perf_counter() - started


def fresh_sqlite(workdir: Path) -> str:
    return f"sqlite:///{workdir / f'index-{uuid.uuid4().hex[:8]}.db'}"


class FreshPostgres:
    """Fresh schemas of one PostgreSQL database, one per run, dropped at the end."""

    def __init__(self, base_url: str) -> None:
        self._base_url = base_url
        self._schemas: list[str] = []

    def __call__(self) -> str:
        schema = f"pb_bench_{uuid.uuid4().hex[:10]}"
        self._admin(f'CREATE SCHEMA "{schema}"')
        self._schemas.append(schema)
        separator = "&" if "?" in self._base_url else "?"
        return f"{self._base_url}{separator}options=-csearch_path%3D{schema}"

    def drop_all(self) -> None:
        for schema in self._schemas:
            self._admin(f'DROP SCHEMA "{schema}" CASCADE')
        self._schemas.clear()

    def _admin(self, statement: str) -> None:
        admin = create_engine(self._base_url)
        try:
            with admin.begin() as connection:
                connection.execute(text(statement))
        finally:
            admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--days", type=int, default=100, help="study dates spread over this many days")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--postgres", default="", help="also backfill into fresh schemas of this database")
    args = parser.parse_args()
    if (missing := orthanc_missing()) is not None:
        raise SystemExit(missing)
    with tempfile.TemporaryDirectory(prefix="pacs-bridge-backfill-bench-") as temporary:
        workdir = Path(temporary)
        with OrthancServer(workdir / "orthanc", verbose=False) as orthanc:
            print(f"loading {args.studies} studies ({args.studies * INSTANCES_PER_STUDY} instances) into Orthanc ...")
            load_orthanc(orthanc, workdir, studies=args.studies, days=args.days)
            targets: dict[str, Callable[[], str]] = {"bridge sqlite": lambda: fresh_sqlite(workdir)}
            postgres = FreshPostgres(args.postgres) if args.postgres else None
            if postgres is not None:
                targets["bridge postgresql"] = postgres
            recorder = RecordingTransport()
            seconds: dict[str, list[float]] = {name: [] for name in [*targets, "bare"]}
            requests = 0
            try:
                for run in range(args.runs):
                    for name, database in targets.items():
                        elapsed, requests = run_bridge(
                            orthanc,
                            database(),
                            studies=args.studies,
                            days=args.days,
                            recorder=recorder if run == 0 and name == "bridge sqlite" else None,
                        )
                        seconds[name].append(elapsed)
                    seconds["bare"].append(run_bare(recorder.urls))
                    print(
                        f"run {run + 1}: " + ", ".join(f"{name} {values[-1]:.2f} s" for name, values in seconds.items())
                    )
            finally:
                if postgres is not None:
                    postgres.drop_all()
    load = os.getloadavg()
    print()
    print(
        f"{args.studies} studies x {INSTANCES_PER_STUDY} instances, {requests} requests per backfill "
        f"({len(recorder.urls)} recorded for the bare client), {args.runs} runs each; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(f"{'target':<18} {'median studies/s':>16} {'min':>8} {'max':>8} {'vs bare':>8}")
    bare = args.studies / statistics.median(seconds["bare"])
    for name, values in seconds.items():
        rates = [args.studies / value for value in values]
        median = args.studies / statistics.median(values)
        print(f"{name:<18} {median:>16.1f} {min(rates):>8.1f} {max(rates):>8.1f} {median / bare:>7.2f}x")


if __name__ == "__main__":
    try:
        main()
    except BenchmarkError as exc:
        raise SystemExit(f"benchmark failed: {exc}") from None
