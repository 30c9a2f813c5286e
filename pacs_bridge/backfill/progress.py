"""How a backfill shows its progress: a rich progress bar on a terminal, JSON lines (``backfill_progress``
log events, one every ``interval`` seconds and at the end) when not on one.

The bar measures study dates covered (the only total known before the PACS is asked): days done of days
planned, with studies found and indexed, the rate of studies per second and the time left.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pacs_bridge.backfill.runner import BackfillFailure, BackfillSummary
from pacs_bridge.index.backfill_progress import RunCounts

log = structlog.get_logger("pacs_bridge.backfill")


class _Rate:
    """Studies per second over this start of the run."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._started = monotonic()
        self._first: int | None = None

    def per_second(self, studies: int) -> float:
        if self._first is None:
            self._first = studies
        elapsed = self._monotonic() - self._started
        return (studies - self._first) / elapsed if elapsed > 0 else 0.0


class JsonLinesProgress:
    """Off a terminal: a ``backfill_progress`` log event at most every ``interval`` seconds, and at the end."""

    def __init__(self, *, interval: float = 10.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._monotonic = monotonic
        self._rate = _Rate(monotonic)
        self._days_total = 0
        self._days_done = 0
        self._logged_at: float | None = None

    def started(self, *, days_total: int, days_done: int, resumed: bool, counts: RunCounts) -> None:
        self._days_total, self._days_done = days_total, days_done
        self._rate.per_second(counts.studies_found)
        self._emit(counts)

    def advanced(self, *, days: int, counts: RunCounts) -> None:
        self._days_done += days
        if self._logged_at is None or self._monotonic() - self._logged_at >= self._interval:
            self._emit(counts)

    def failed(self, failure: BackfillFailure) -> None:
        pass  # logged by the runner as backfill_failed

    def finished(self, summary: BackfillSummary) -> None:
        self._emit(summary.counts)

    def _emit(self, counts: RunCounts) -> None:
        self._logged_at = self._monotonic()
        rate = self._rate.per_second(counts.studies_found)
        log.info(
            "backfill_progress",
            days_done=self._days_done,
            days_total=self._days_total,
            studies_found=counts.studies_found,
            studies_indexed=counts.studies_indexed,
            studies_unchanged=counts.studies_unchanged,
            instances_indexed=counts.instances_indexed,
            failures=counts.failures,
            studies_per_second=round(rate, 2),
        )


class TerminalProgress:
    """On a terminal: a rich progress bar on stderr; log lines and failures print above it."""

    def __init__(self, *, console: Console | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._console = console or Console(stderr=True)
        self._rate = _Rate(monotonic)
        self._progress = Progress(
            TextColumn("[bold]backfill[/bold]"),
            BarColumn(),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} days"),
            TextColumn("{task.fields[studies]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self._console,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task: Any = None
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []

    def started(self, *, days_total: int, days_done: int, resumed: bool, counts: RunCounts) -> None:
        self._rate.per_second(counts.studies_found)
        self._task = self._progress.add_task(
            "backfill", total=max(days_total, 1), completed=days_done, studies=self._studies(counts)
        )
        self._progress.start()
        self._route_logs_above_bar()
        if resumed:
            self._console.print(f"continuing an earlier run: {days_done:,} of {days_total:,} days done already")

    def advanced(self, *, days: int, counts: RunCounts) -> None:
        self._progress.update(self._task, advance=days, studies=self._studies(counts))

    def failed(self, failure: BackfillFailure) -> None:
        pass  # logged by the runner as backfill_failed, above the bar

    def finished(self, summary: BackfillSummary) -> None:
        self._progress.update(self._task, studies=self._studies(summary.counts))
        self._progress.stop()
        self._restore_logs()

    def _studies(self, counts: RunCounts) -> str:
        rate = self._rate.per_second(counts.studies_found)
        return (
            f"{counts.studies_found:,} studies found, {counts.studies_indexed:,} indexed, "
            f"{counts.studies_unchanged:,} unchanged, {counts.failures:,} failed, {rate:.1f}/s"
        )

    def _route_logs_above_bar(self) -> None:
        """Log lines written while the bar shows go through its console, which prints them above it."""
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
                self._handlers.append((handler, handler.stream))
                handler.setStream(_ConsoleWriter(self._console))

    def _restore_logs(self) -> None:
        for handler, stream in self._handlers:
            handler.setStream(stream)
        self._handlers.clear()


class _ConsoleWriter(io.TextIOBase):
    """A text stream that prints through a rich console (above a live progress bar)."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self._console.print(line, markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        return None


def progress_reporter(*, on_terminal: bool | None = None) -> JsonLinesProgress | TerminalProgress:
    """The bar on a terminal (stderr a TTY), JSON lines otherwise."""
    if on_terminal is None:
        on_terminal = sys.stderr.isatty() and sys.stdout.isatty()
    return TerminalProgress() if on_terminal else JsonLinesProgress()
