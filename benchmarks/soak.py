"""Throughput and resources of pacs-bridge while N half-open connections are held against it (issue 14).

Starts ``pacs-bridge run`` (SQLite index, the configuration's defaults otherwise), then alternately sends the
same number of instances with DCMTK storescu on one association with no connection held, and with HALF_OPEN
connections held open that never finish an association request (they connect and say nothing, or send 1 to 5
bytes of a PDU header, or a header announcing more than they send). A keeper thread replaces each one the bridge
closes (at its association request deadline, or as the oldest past dicom.max_pending_connections), so HALF_OPEN
stay held for the whole send. Prints both rates and their ratio, and the bridge's threads, file descriptors and
resident memory: idle, with the connections held, after the send, and once they are released.

    python benchmarks/soak.py                          # 200 held, 2000 x 9.7 kB per send, 3 sends each way
    python benchmarks/soak.py --half-open 1000         # more than max_pending_connections (256): eviction churn
    python benchmarks/soak.py --stock                  # the bridge with dicom.fast_path: off
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ingest  # the sibling benchmark: process, port and DCMTK helpers
import yaml

_HEADER = struct.pack(">BBL", 0x01, 0, 300)
_HALF_SENT = [b"", _HEADER[:1], _HEADER[:3], _HEADER[:5], _HEADER + b"\0" * 100]


@dataclass(frozen=True)
class Held:
    """What a process holds (from /proc/PID)."""

    threads: int
    fds: int
    rss_kib: int

    @classmethod
    def of(cls, pid: int) -> Held:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
        return cls(
            threads=int(fields["Threads"]),
            fds=len(os.listdir(f"/proc/{pid}/fd")),
            rss_kib=int(fields["VmRSS"].split()[0]),
        )

    def __str__(self) -> str:
        return f"{self.threads:4d} threads {self.fds:6d} fds {self.rss_kib / 1024:8.1f} MiB RSS"


class HalfOpenKeeper:
    """Keeps ``count`` connections to ``port`` open that never finish an association request."""

    def __init__(self, port: int, count: int) -> None:
        self._port = port
        self._count = count
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, daemon=True)
        self.replaced = 0

    def __enter__(self) -> HalfOpenKeeper:
        for number in range(self._count):
            self._sockets.append(self._open(number))
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self._sockets:
            sock.close()

    def _open(self, number: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self._port), timeout=10)
        sent = _HALF_SENT[number % len(_HALF_SENT)]
        if sent:
            sock.sendall(sent)
        sock.setblocking(False)
        return sock

    def _keep(self) -> None:
        while not self._stop.wait(0.2):
            readable, _, _ = select.select(self._sockets, [], [], 0)
            for sock in readable:
                with contextlib.suppress(OSError):
                    if sock.recv(4096):
                        continue  # an A-ABORT before the close; the close follows
                index = self._sockets.index(sock)
                sock.close()
                with contextlib.suppress(OSError):
                    self._sockets[index] = self._open(index)
                    self.replaced += 1


def send(directory: Path, port: int) -> float:
    """storescu sends every file of ``directory`` on one association; seconds it took."""
    started = time.perf_counter()
    arguments = ["-aet", ingest.CALLING_AE, "-aec", ingest.CALLED_AE, "+sd", "127.0.0.1", str(port), str(directory)]
    result = subprocess.run(
        [ingest.dcmtk("storescu"), *arguments],
        capture_output=True,
        text=True,
        env=ingest.dcmtk_environment(),
        timeout=900,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or result.stdout.strip() or result.stderr.strip():
        raise ingest.BenchmarkError(f"storescu failed ({result.returncode}): {result.stdout}{result.stderr}")
    return elapsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half-open", type=int, default=200, help="connections held half-open (default 200)")
    parser.add_argument("--instances", type=int, default=2000, help="instances per send (default 2000)")
    parser.add_argument("--repeat", type=int, default=3, help="sends each way, alternating (default 3)")
    parser.add_argument("--stock", action="store_true", help="run the bridge with dicom.fast_path: off")
    args = parser.parse_args(argv)
    ingest.use_this_tree()
    with tempfile.TemporaryDirectory(prefix="pacs-bridge-soak-") as temporary:
        workdir = Path(temporary)
        (study,), mean_size = ingest.write_files(
            workdir / "study", instances=args.instances, pixel_bytes=ingest.DEFAULT_PIXEL_BYTES, parts=1
        )
        port = ingest.free_port()
        dicom_settings = {"fast_path": "off"} if args.stock else {}
        config = ingest.bridge_config(
            port=port, database_url=f"sqlite:///{workdir / 'index.db'}", dicom_settings=dicom_settings
        )
        config_path = workdir / "bridge.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = workdir / "bridge.log"
        print(
            f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC: {args.instances} x {mean_size / 1000:.1f} kB per "
            f"send, {args.repeat} sends each way, {args.half_open} half-open connections held during the others; "
            f"{'stock pynetdicom' if args.stock else 'fast path'}; load average {ingest.load_average()}",
            flush=True,
        )
        command = [sys.executable, "-m", "pacs_bridge", "run", "--config", str(config_path)]
        environment = ingest.this_tree_environment(dict(os.environ))
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=environment, start_new_session=True
            )
        try:
            ingest.wait_until_answering("pacs-bridge", process, port=port, log_path=log_path)
            send(study, port)  # warm-up: the index has its connections, the caches their entries
            idle = Held.of(process.pid)
            print(f"idle:                      {idle}")
            clear: list[float] = []
            held: list[float] = []
            for run in range(1, args.repeat + 1):
                seconds = send(study, port)
                clear.append(seconds)
                print(f"  send {run}, none held:   {args.instances / seconds:8.1f} inst/s", flush=True)
                with HalfOpenKeeper(port, args.half_open) as keeper:
                    time.sleep(0.5)
                    holding = Held.of(process.pid)
                    seconds = send(study, port)
                    after_send = Held.of(process.pid)
                    replaced = keeper.replaced
                held.append(seconds)
                print(
                    f"  send {run}, {args.half_open} held: {args.instances / seconds:8.1f} inst/s "
                    f"({replaced} replaced by the keeper meanwhile)",
                    flush=True,
                )
                print(f"    held, before the send:   {holding}")
                print(f"    held, after the send:    {after_send}")
            deadline = time.monotonic() + 30
            released = Held.of(process.pid)
            while (released.threads > idle.threads or released.fds > idle.fds) and time.monotonic() < deadline:
                time.sleep(0.2)
                released = Held.of(process.pid)
            print(f"released:                  {released}")
        finally:
            ingest.stop_process(process)
    rate_clear = statistics.median(args.instances / s for s in clear)
    rate_held = statistics.median(args.instances / s for s in held)
    print()
    print(f"median, none held:          {rate_clear:8.1f} inst/s")
    print(f"median, {args.half_open} half-open held: {rate_held:8.1f} inst/s  ({rate_held / rate_clear:.2f}x)")
    print(f"load average at the end {ingest.load_average()} (1, 5, 15 min; {os.cpu_count()} cores)")
    print(ingest.revision())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ingest.BenchmarkError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
