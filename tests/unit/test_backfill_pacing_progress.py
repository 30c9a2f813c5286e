"""The backfill's pace (requests spaced by max_requests_per_second, waits cut short by a stop) and its progress
display (a bar on a terminal, JSON lines off one)."""

from __future__ import annotations

import io
import logging
import sys

import pytest
from rich.console import Console
from structlog.testing import capture_logs

from pacs_bridge.backfill.pacing import Pacer, backoff_seconds
from pacs_bridge.backfill.progress import JsonLinesProgress, TerminalProgress, figures_line, progress_reporter
from pacs_bridge.backfill.runner import BackfillFailure, BackfillSummary
from pacs_bridge.backfill_runs import RunCounts
from pacs_bridge.errors import BackfillStoppedError


class FakeTime:
    """A monotonic clock and a stop event in one: waiting advances the clock instead of sleeping."""

    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []
        self.stop = False

    def __call__(self) -> float:
        return self.now

    def is_set(self) -> bool:
        return self.stop

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return self.stop


def test_requests_start_at_most_max_requests_per_second() -> None:
    """At 4 requests a second, a request asked for 0.1 s after the last waits the remaining 0.15 s."""
    time = FakeTime()
    pacer = Pacer(4, time, monotonic=time)  # type: ignore[arg-type]

    pacer.wait_turn()
    time.now += 0.1
    pacer.wait_turn()
    time.now += 0.3  # slower than the limit: no wait
    pacer.wait_turn()

    assert time.waits == [pytest.approx(0.15)]


def test_no_limit_means_one_request_after_the_other_without_waiting() -> None:
    """max_requests_per_second 0: never a wait."""
    time = FakeTime()
    pacer = Pacer(0, time, monotonic=time)  # type: ignore[arg-type]

    for _ in range(5):
        pacer.wait_turn()

    assert time.waits == []


def test_a_stop_request_ends_the_wait_for_the_next_turn() -> None:
    """Once a stop is requested, no further request starts."""
    time = FakeTime()
    pacer = Pacer(1, time, monotonic=time)  # type: ignore[arg-type]
    pacer.wait_turn()
    time.stop = True

    with pytest.raises(BackfillStoppedError):
        pacer.wait_turn()


@pytest.mark.parametrize(
    ("attempt", "seconds"),
    [
        (1, 1.0),  # after the first busy answer
        (2, 2.0),
        (4, 8.0),
        (7, 60.0),  # capped at a minute
        (30, 60.0),
    ],
)
def test_backoff_doubles_up_to_a_minute(attempt: int, seconds: float) -> None:
    """Without Retry-After: 1, 2, 4 ... s, at most 60."""
    assert backoff_seconds(attempt) == seconds


def summary(counts: RunCounts) -> BackfillSummary:
    return BackfillSummary(run_id=1, resumed=False, counts=counts)


def test_off_a_terminal_progress_is_a_json_line_every_interval_and_at_the_end() -> None:
    """backfill_progress at the start, then at most once per interval, and once at the end."""
    time = FakeTime()
    progress = JsonLinesProgress(interval=10, monotonic=time)
    with capture_logs() as logs:
        progress.started(days_total=366, days_done=0, resumed=False, counts=RunCounts())
        time.now += 5
        progress.advanced(days=31, counts=RunCounts(studies_found=50, studies_indexed=50))  # too soon
        time.now += 6
        progress.advanced(days=29, counts=RunCounts(studies_found=100, studies_indexed=99, failures=1))
        progress.finished(summary(RunCounts(studies_found=120, studies_indexed=119, failures=1)))

    events = [entry for entry in logs if entry["event"] == "backfill_progress"]
    assert [(e["days_done"], e["studies_found"], e["studies_indexed"], e["failures"]) for e in events] == [
        (0, 0, 0, 0),
        (60, 100, 99, 1),
        (60, 120, 119, 1),
    ]
    assert events[1]["studies_per_second"] == pytest.approx(100 / 11, abs=0.01)


def test_on_a_terminal_a_bar_shows_days_and_studies_and_log_lines_print_above_it() -> None:
    """The bar names days done of days planned and the study counts; a log line written meanwhile goes through
    the bar's console, and the log handler gets its own stream back at the end."""
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=200, color_system=None)
    handler = logging.StreamHandler(sys.stdout)  # as logs.configure_logging makes it
    root = logging.getLogger()
    root.addHandler(handler)
    original_stream = handler.stream
    try:
        progress = TerminalProgress(console=console)
        progress.started(days_total=366, days_done=100, resumed=True, counts=RunCounts(studies_found=7))
        handler.stream.write("backfill_failed what='study 1.2.3'\n")
        progress.advanced(days=266, counts=RunCounts(studies_found=40, studies_indexed=38, failures=2))
        progress.failed(BackfillFailure(what="study 1.2.3", error="HTTP 500"))
        progress.finished(summary(RunCounts(studies_found=40, studies_indexed=38, failures=2)))
    finally:
        root.removeHandler(handler)

    text = screen.getvalue()
    assert "continuing an earlier run: 100 of 366 days done already" in text
    assert "backfill_failed what='study 1.2.3'" in text
    assert "366/366 days" in text
    assert "40 studies found, 38 indexed, 0 unchanged, 2 failed" in text
    assert handler.stream is original_stream


@pytest.mark.parametrize("width", [40, 60, 80, 100, 160])
def test_the_bar_and_its_figures_fit_the_terminal_width(width: int) -> None:
    """A backfill since 1900 with six-figure counts: at any width from 40 columns the days done, the time left
    and the failures show whole, every line within the width; the label and the elapsed time from 100 on."""
    screen = io.StringIO()
    progress = TerminalProgress(console=Console(file=screen, width=width, force_terminal=False, color_system=None))
    counts = RunCounts(studies_found=123_456, studies_indexed=120_000, studies_unchanged=3_000, failures=456)
    progress.started(days_total=45_656, days_done=0, resumed=False, counts=RunCounts())
    progress.advanced(days=20_000, counts=counts)
    progress.finished(summary(counts))

    lines = screen.getvalue().splitlines()
    assert lines and all(len(line) <= width for line in lines), lines
    assert "20,000/45,656 days" in lines[0] and "ETA" in lines[0]
    assert "456 failed" in lines[1] and "…" not in screen.getvalue()
    assert lines[0].startswith("backfill") == (width >= 100)


def test_the_figures_are_worded_more_briefly_then_fewer_as_the_width_needs() -> None:
    """The longest wording that fits; the failures always."""
    counts = RunCounts(studies_found=1_234_567, studies_indexed=1_200_000, studies_unchanged=34_567, failures=1)

    assert figures_line(counts, 12.34, 200) == (
        "1,234,567 studies found, 1,200,000 indexed, 34,567 unchanged, 1 failed, 12.3 studies/s"
    )
    assert figures_line(counts, 12.34, 80) == "1,234,567 found, 1,200,000 indexed, 34,567 unchanged, 1 failed, 12.3/s"
    assert figures_line(counts, 12.34, 50) == "1,234,567 found, 1,200,000 indexed, 1 failed"
    assert figures_line(counts, 12.34, 30) == "1,234,567 found, 1 failed"


def test_the_bar_is_for_terminals_only() -> None:
    """Off a terminal (systemd, a pipe) the JSON lines are chosen."""
    assert isinstance(progress_reporter(on_terminal=False), JsonLinesProgress)
    assert isinstance(progress_reporter(on_terminal=True), TerminalProgress)
