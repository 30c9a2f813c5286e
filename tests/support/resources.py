"""What a process holds: threads, file descriptors and resident memory, read from /proc (Linux).

baseline = Resources.of()            # this process; Resources.of(pid) for another
... an attack ...
back_to(baseline)                    # polls until threads and fds are back and RSS is near, else fails
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

RSS_SLACK_BYTES = 32 * 1024 * 1024  # allocator pools and caches a process keeps; far below what an attack costs


@dataclass(frozen=True, slots=True)
class Resources:
    threads: int
    fds: int
    rss_bytes: int

    @classmethod
    def of(cls, pid: int | None = None) -> Resources:
        proc = Path("/proc") / (str(pid) if pid is not None else "self")
        status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
        threads = int(status["Threads"].strip())
        rss_bytes = int(status["VmRSS"].split()[0]) * 1024
        fds = len(os.listdir(proc / "fd")) - (1 if pid is None else 0)  # listdir's own descriptor
        return cls(threads=threads, fds=fds, rss_bytes=rss_bytes)

    def describe(self) -> str:
        return f"{self.threads} threads, {self.fds} fds, {self.rss_bytes / 2**20:.1f} MiB RSS"


def open_files(pid: int | None) -> list[str]:
    """What the process's file descriptors refer to (``socket:[inode]``, paths, ``… (deleted)``)."""
    directory = Path("/proc") / (str(pid) if pid is not None else "self") / "fd"
    targets = []
    for fd in os.listdir(directory):
        try:
            targets.append(os.readlink(directory / fd))
        except OSError:
            continue
    return targets


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident size (VmHWM; ``/proc/PID/clear_refs`` 5 resets it to the current one)."""
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"/proc/{pid}/status has no VmHWM")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far."""
    fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def back_to(baseline: Resources, *, pid: int | None = None, timeout: float = 30.0) -> Resources:
    """Wait until the process holds no more threads and file descriptors than ``baseline`` and at most
    ``RSS_SLACK_BYTES`` more memory; fail naming what stayed."""
    deadline = time.monotonic() + timeout
    while True:
        now = Resources.of(pid)
        if (
            now.threads <= baseline.threads
            and now.fds <= baseline.fds
            and now.rss_bytes <= baseline.rss_bytes + RSS_SLACK_BYTES
        ):
            return now
        if time.monotonic() > deadline:
            pytest.fail(
                f"resources did not come back: {now.describe()}, baseline {baseline.describe()}; "
                f"open: {sorted(open_files(pid))}"
            )
        time.sleep(0.05)
