"""Building the ImagingStudy of a very large study: time and memory (issue 6, target 5).

Indexes INSTANCES instances of one study (in SERIES series) into a temporary SQLite index, then measures, over
REPEAT runs, the time to load the snapshot from the index, to build the FHIR resource, and to hash it, and the
peak Python memory of that (tracemalloc) against the size of the resource's JSON.

    python benchmarks/mapping_scale.py                       # 20000 instances in 10 series
    python benchmarks/mapping_scale.py --instances 50000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=20_000)
    parser.add_argument("--series", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))

    from sqlalchemy import insert, select

    from pacs_bridge.debounce import DebounceSettings
    from pacs_bridge.fhir.imaging_study import MappingSettings, build_imaging_study
    from pacs_bridge.fhir.resource import content_hash
    from pacs_bridge.index.engine import make_engine
    from pacs_bridge.index.models import Instance, Series, Study
    from pacs_bridge.index.repository import Index
    from pacs_bridge.index.schema import prepare_schema
    from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes

    with tempfile.TemporaryDirectory(prefix="pacs-bridge-mapping-") as temporary:
        engine = make_engine(f"sqlite:///{Path(temporary) / 'index.db'}")
        prepare_schema(engine)
        index = Index(engine, DebounceSettings(quiet_period=timedelta(seconds=30), max_delay=timedelta(minutes=5)))
        study_uid = "1.2.826.0.1.3680043.10.1482.77"
        now = datetime.now(UTC)
        per_series = args.instances // args.series
        # The first instance of each series through the real ingest path, the rest in bulk (same rows).
        for number in range(1, args.series + 1):
            index.record_instance(
                InstanceRecord(
                    study=StudyAttributes(study_uid=study_uid, patient_id="P1", study_date="20240315"),
                    series=SeriesAttributes(
                        series_uid=f"{study_uid}.{number}", modality="CT", series_number=number, series_description="x"
                    ),
                    sop_instance_uid=f"{study_uid}.{number}.1",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    instance_number=1,
                ),
                received_at=now,
            )
        with engine.begin() as connection:
            series_ids = {uid: id_ for uid, id_ in connection.execute(select(Series.series_uid, Series.id))}
            rows = [
                {
                    "series_id": series_ids[f"{study_uid}.{number}"],
                    "sop_instance_uid": f"{study_uid}.{number}.{n}",
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                    "instance_number": n,
                    "received_at": now,
                }
                for number in range(1, args.series + 1)
                for n in range(2, per_series + 1)
            ]
            connection.execute(insert(Instance), rows)
            assert connection.execute(select(Study.id)).scalar() is not None
        mapping = MappingSettings()
        loads, builds, hashes, peaks = [], [], [], []
        size = 0
        for _ in range(args.repeat):  # timings, without tracemalloc's overhead
            started = time.perf_counter()
            snapshot = index.load_snapshot(study_uid)
            loaded = time.perf_counter()
            resource = build_imaging_study(snapshot, mapping)
            built = time.perf_counter()
            content_hash(resource)
            hashed = time.perf_counter()
            loads.append(loaded - started)
            builds.append(built - loaded)
            hashes.append(hashed - built)
            size = len(json.dumps(resource, separators=(",", ":")).encode())
        del snapshot, resource
        for _ in range(min(args.repeat, 2)):  # memory, traced
            tracemalloc.start()
            content_hash(build_imaging_study(index.load_snapshot(study_uid), mapping))
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        snapshot = index.load_snapshot(study_uid)
        engine.dispose()
    instances = snapshot.number_of_instances
    median = statistics.median
    print(f"{instances} instances in {len(snapshot.series)} series; resource JSON {size / 2**20:.1f} MiB")
    print(f"load snapshot from the index: {median(loads) * 1000:7.0f} ms (median of {args.repeat})")
    print(f"build the ImagingStudy:       {median(builds) * 1000:7.0f} ms")
    print(f"content hash:                 {median(hashes) * 1000:7.0f} ms")
    print(
        f"build alone (issue target < 500 ms): {median(builds) * 1000:.0f} ms; "
        f"load + build + hash: {(median(loads) + median(builds) + median(hashes)) * 1000:.0f} ms"
    )
    print(
        f"peak Python memory of load + build + hash: {median(peaks) / 2**20:.1f} MiB "
        f"({median(peaks) / size:.1f}x the resource's JSON)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
