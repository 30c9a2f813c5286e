"""FHIR writes for a large study sent on several associations (issue 6, target 4).

Starts the project's real FHIR test server and ``pacs-bridge run`` (SQLite index, QUIET seconds of quiet
period), sends STUDIES studies of INSTANCES instances each, split over ASSOCIATIONS concurrent DCMTK storescu
processes, and reports for each study how many ImagingStudy writes it caused and how long after its last
instance was acknowledged the ImagingStudy appeared on the server.

    python benchmarks/publish_latency.py                       # 3 studies x 2400 instances, 4 associations
    python benchmarks/publish_latency.py --quiet 10 --studies 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import ingest  # the sibling benchmark: process, port and DCMTK helpers
import yaml


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=2400)
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=5.0, help="debounce.quiet_seconds (default 5)")
    args = parser.parse_args(argv)
    ingest.use_this_tree()
    from tests.support.fhir_server import FhirTestServer
    from tests.support.studies import SeriesSpec, new_study_uid, write_study

    delays: list[float] = []
    writes: list[int] = []
    with tempfile.TemporaryDirectory(prefix="pacs-bridge-publish-") as temporary, FhirTestServer() as server:
        workdir = Path(temporary)
        port = ingest.free_port()
        config = ingest.bridge_config(port=port, database_url=f"sqlite:///{workdir / 'index.db'}")
        config["fhir"] = {"base_url": server.base_url, "timeout_seconds": 30}
        config["debounce"] = {"quiet_seconds": args.quiet, "max_delay_seconds": 600, "tick_seconds": 1}
        config_path = workdir / "bridge.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = workdir / "bridge.log"
        command = [sys.executable, "-m", "pacs_bridge", "run", "--config", str(config_path)]
        environment = ingest.this_tree_environment(dict(os.environ))
        with ingest.running_server("pacs-bridge", command, port=port, log_path=log_path, cwd=workdir, env=environment):
            for number in range(args.studies):
                study_uid = new_study_uid()
                parts = []
                per_part = args.instances // args.associations
                for part in range(args.associations):
                    directory = workdir / f"study-{number}" / str(part)
                    write_study(directory, study_uid, [SeriesSpec("CT", per_part)], first_series_number=part + 1)
                    parts.append(directory)
                before = server.request_counts().get("PUT ImagingStudy", 0)
                senders = [
                    subprocess.Popen(
                        [
                            ingest.dcmtk("storescu"),
                            "-aet",
                            ingest.CALLING_AE,
                            "-aec",
                            ingest.CALLED_AE,
                            "+sd",
                            "127.0.0.1",
                            str(port),
                            str(directory),
                        ],
                        env=ingest.dcmtk_environment(),
                    )
                    for directory in parts
                ]
                if any(sender.wait(timeout=600) != 0 for sender in senders):
                    raise ingest.BenchmarkError("a storescu failed")
                last_acknowledged = time.monotonic()
                identifier = f"urn:dicom:uid|urn:oid:{study_uid}"
                deadline = last_acknowledged + args.quiet + 120
                while not server.search("ImagingStudy", identifier=identifier):
                    if time.monotonic() > deadline:
                        raise ingest.BenchmarkError(f"study {number} was not published in time")
                    time.sleep(0.02)
                delays.append(time.monotonic() - last_acknowledged)
                # Let a further tick pass: a second write would show here.
                time.sleep(2)
                writes.append(server.request_counts().get("PUT ImagingStudy", 0) - before)
                found = server.search("ImagingStudy", identifier=identifier)[0]
                if found["numberOfInstances"] != per_part * args.associations:
                    raise ingest.BenchmarkError(f"study {number} published with {found['numberOfInstances']} instances")
                print(
                    f"study {number + 1}: {writes[-1]} ImagingStudy write(s), appeared {delays[-1]:.2f} s after "
                    f"the last instance (quiet period {args.quiet:g} s)",
                    flush=True,
                )
    print()
    print(f"{args.studies} studies x {args.instances} instances over {args.associations} associations")
    print(f"ImagingStudy writes per study: {writes}")
    print(
        f"seconds from last instance to publish: min {min(delays):.2f}, median {statistics.median(delays):.2f}, "
        f"max {max(delays):.2f} (target: <= quiet + 1 s = {args.quiet + 1:g} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
