"""How a backfill shows its progress: a rich progress bar on a terminal, JSON lines (``backfill_progress``
log events, one every ``interval`` seconds and at the end) when not on one.

The bar measures study dates covered (the only total known before the PACS is asked): days done of days
planned and the time left, with the studies found, indexed, unchanged and failed and their rate on a line
below. Both fit the terminal's width: the bar shrinks, the label and the elapsed time are left out under
``WIDE_COLUMNS``, and the figures are worded more briefly, then fewer, as the width needs.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from pacs_bridge.backfill.runner import BackfillFailure, BackfillSummary
from pacs_bridge.backfill_runs import RunCounts

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


# From this many columns on, the bar's line also has its label and the elapsed time.
WIDE_COLUMNS = 100


def figures_line(counts: RunCounts, rate: float, width: int) -> str:
    """The studies' figures in at most ``width`` characters: the most that fits, failures always."""
    found, indexed, unchanged, failed = (
        f"{value:,}"
        for value in (counts.studies_found, counts.studies_indexed, counts.studies_unchanged, counts.failures)
    )
    variants = (
        f"{found} studies found, {indexed} indexed, {unchanged} unchanged, {failed} failed, {rate:.1f} studies/s",
        f"{found} found, {indexed} indexed, {unchanged} unchanged, {failed} failed, {rate:.1f}/s",
        f"{found} found, {indexed} indexed, {failed} failed",
        f"{found} found, {failed} failed",
    )
    return next((line for line in variants if len(line) <= width), variants[-1])


class _FittedProgress(Progress):
    """The bar's line with the columns the console's width has room for, and the figures on a line below."""

    def __init__(self, *, console: Console, wide: tuple[ProgressColumn, ...], narrow: tuple[ProgressColumn, ...]):
        self._wide, self._narrow, self._display = wide, narrow, console  # rendered once before init ends
        super().__init__(*wide, console=console, expand=True, redirect_stdout=False, redirect_stderr=False)

    def get_renderables(self) -> Iterable[RenderableType]:
        width = self._display.width
        self.columns = self._wide if width >= WIDE_COLUMNS else self._narrow
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            line = figures_line(task.fields["counts"], task.fields["rate"], width)
            yield Text(line, no_wrap=True, overflow="ellipsis")


class TerminalProgress:
    """On a terminal: a rich progress bar on stderr; log lines and failures print above it."""

    def __init__(self, *, console: Console | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._console = console or Console(stderr=True)
        self._rate = _Rate(monotonic)
        bar = BarColumn(bar_width=None)  # as wide as the other columns leave
        days = TextColumn("{task.completed:,.0f}/{task.total:,.0f} days")
        eta = (TextColumn("ETA"), TimeRemainingColumn())
        self._progress = _FittedProgress(
            console=self._console,
            wide=(TextColumn("[bold]backfill[/bold]"), bar, days, TimeElapsedColumn(), *eta),
            narrow=(bar, days, *eta),
        )
        self._task: Any = None
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []

    def started(self, *, days_total: int, days_done: int, resumed: bool, counts: RunCounts) -> None:
        self._rate.per_second(counts.studies_found)
        self._task = self._progress.add_task(
            "backfill", total=max(days_total, 1), completed=days_done, **self._figures(counts)
        )
        self._progress.start()
        self._route_logs_above_bar()
        if resumed:
            self._console.print(f"continuing an earlier run: {days_done:,} of {days_total:,} days done already")

    def advanced(self, *, days: int, counts: RunCounts) -> None:
        self._progress.update(self._task, advance=days, **self._figures(counts))

    def failed(self, failure: BackfillFailure) -> None:
        pass  # logged by the runner as backfill_failed, above the bar

    def finished(self, summary: BackfillSummary) -> None:
        self._progress.update(self._task, **self._figures(summary.counts))
        self._progress.stop()
        self._restore_logs()

    def _figures(self, counts: RunCounts) -> dict[str, Any]:
        return {"counts": counts, "rate": self._rate.per_second(counts.studies_found)}

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
