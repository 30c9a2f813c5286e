"""What validating before sending costs: build, hash and validate one ImagingStudy of N instances, R4 and R5.

Run: python -m benchmarks.validation_cost [instances]   (default 2000; 4 series; every mapped element filled)
Prints the median and worst of 20 runs after one warm-up, and the one-off import of the fhir.resources models.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

from pacs_bridge.fhir.imaging_study import build_imaging_study
from pacs_bridge.fhir.resource import content_hash
from pacs_bridge.fhir.validation import validate_resource
from pacs_bridge.records import SeriesSnapshot, StudySnapshot
from tests.unit.test_imaging_study import SETTINGS, ct_instances, fully_described_snapshot


def big_study(instances: int, series: int = 4) -> StudySnapshot:
    template = fully_described_snapshot()
    base = template.series[0]
    per_series = instances // series
    return dataclasses.replace(
        template,
        series=tuple(
            SeriesSnapshot(
                attributes=dataclasses.replace(base.attributes, series_uid=f"1.2.3.{k}", series_number=k),
                instances=ct_instances(f"1.2.3.{k}", per_series),
            )
            for k in range(1, series + 1)
        ),
    )


def timed(action: object, runs: int = 20) -> tuple[float, float]:
    assert callable(action)
    action()  # warm-up
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), max(samples)


def main() -> None:
    instances = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    study = big_study(instances)
    start = time.perf_counter()
    validate_resource(build_imaging_study(study, SETTINGS), fhir_version="R4")
    print(f"first validation incl. model import: {(time.perf_counter() - start) * 1000:.0f} ms")
    for version in ("R4", "R5"):
        settings = dataclasses.replace(SETTINGS, fhir_version=version)
        resource = build_imaging_study(study, settings)
        for name, action in (
            ("build", lambda s=settings: build_imaging_study(study, s)),
            ("hash", lambda r=resource: content_hash(r)),
            ("validate", lambda r=resource, v=version: validate_resource(r, fhir_version=v)),
        ):
            median, worst = timed(action)
            print(f"{version} {instances} instances {name:8s} median {median:6.1f} ms  worst {worst:6.1f} ms")


if __name__ == "__main__":
    main()
