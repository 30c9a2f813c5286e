"""Peak memory of pacs-bridge while it receives one very large instance (issue: memory flat in object size).

Writes one DICOM file with MEGABYTES of (never decoded) pixel data, starts ``pacs-bridge run`` on a temporary
SQLite index, sends the file with DCMTK storescu, and reads the bridge's peak resident set size (VmHWM in
/proc/PID/status) against its resident size before the send. The bridge spools received datasets to a
temporary file, so the peak should not grow with the object.

    python benchmarks/large_instance.py                 # 1024 MB
    python benchmarks/large_instance.py --megabytes 256
    python benchmarks/large_instance.py --stock         # dicom.fast_path: off (stock pynetdicom receives it)
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import ingest  # the sibling benchmark: process, port and DCMTK helpers
import yaml


def memory_kib(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise ingest.BenchmarkError(f"/proc/{pid}/status has no {field}")


def write_large_instance(path: Path, megabytes: int) -> int:
    from tests.support.studies import make_dataset, write_file

    side = int((megabytes * 1024 * 1024 / 2) ** 0.5)
    ds = make_dataset()
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.PixelData = bytes(side * side * 2)
    write_file(ds, path)
    return path.stat().st_size


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=1024, help="pixel data of the instance (default 1024)")
    parser.add_argument("--stock", action="store_true", help="run the bridge with dicom.fast_path: off")
    args = parser.parse_args(argv)
    ingest.use_this_tree()
    with tempfile.TemporaryDirectory(prefix="pacs-bridge-large-") as temporary:
        workdir = Path(temporary)
        size = write_large_instance(workdir / "large.dcm", args.megabytes)
        port = ingest.free_port()
        database = workdir / "index.db"
        config_path = workdir / "bridge.yaml"
        dicom_settings = {"fast_path": "off"} if args.stock else {}
        config = ingest.bridge_config(port=port, database_url=f"sqlite:///{database}", dicom_settings=dicom_settings)
        config_path.write_text(yaml.safe_dump(config))
        log_path = workdir / "bridge.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "pacs_bridge", "run", "--config", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=ingest.this_tree_environment(dict(__import__("os").environ)),
                start_new_session=True,
            )
        try:
            ingest.wait_until_answering("pacs-bridge", process, port=port, log_path=log_path)
            before = memory_kib(process.pid, "VmRSS")
            started = time.perf_counter()
            sent = subprocess.run(
                [
                    ingest.dcmtk("storescu"),
                    "-aet",
                    ingest.CALLING_AE,
                    "-aec",
                    ingest.CALLED_AE,
                    "127.0.0.1",
                    str(port),
                    str(workdir / "large.dcm"),
                ],
                capture_output=True,
                text=True,
                env=ingest.dcmtk_environment(),
                timeout=1800,
                check=False,
            )
            elapsed = time.perf_counter() - started
            peak = memory_kib(process.pid, "VmHWM")
        finally:
            ingest.stop_process(process)
        if sent.returncode != 0:
            raise ingest.BenchmarkError(f"storescu failed: {sent.stdout}{sent.stderr}\n{ingest.log_tail(log_path)}")
        with sqlite3.connect(database) as connection:
            indexed = connection.execute("SELECT count(*) FROM instances").fetchone()[0]
        if indexed != 1:
            raise ingest.BenchmarkError("the instance was acknowledged but is not in the index")
    print(f"receive path: {'stock pynetdicom' if args.stock else 'fast path'}")
    print(f"instance: {size / 2**20:.0f} MiB, sent in {elapsed:.1f} s ({size / 2**20 / elapsed:.0f} MiB/s)")
    print(f"bridge RSS before the send: {before / 1024:.0f} MiB; peak during the whole run: {peak / 1024:.0f} MiB")
    print(f"peak - before = {(peak - before) / 1024:.0f} MiB for a {size / 2**20:.0f} MiB object")
    return 0


if __name__ == "__main__":
    sys.exit(main())
