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
from pacs_bridge.backfill.progress import JsonLinesProgress, TerminalProgress, progress_reporter
from pacs_bridge.backfill.runner import BackfillFailure, BackfillSummary
from pacs_bridge.errors import BackfillStoppedError
from pacs_bridge.index.backfill_progress import RunCounts


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


def test_the_bar_is_for_terminals_only() -> None:
    """Off a terminal (systemd, a pipe) the JSON lines are chosen."""
    assert isinstance(progress_reporter(on_terminal=False), JsonLinesProgress)
    assert isinstance(progress_reporter(on_terminal=True), TerminalProgress)
