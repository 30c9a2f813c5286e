"""The publishing schedule: when the next pass runs, and passes that never overlap nor make APScheduler warn."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import pytest

from pacs_bridge.publish.scheduler import PublishScheduler, next_pass_delay


@pytest.mark.parametrize(
    ("waits", "delay"),
    [
        ((None, None), 1.0),  # nothing due, no probe planned: the next tick
        ((0.05, None), 0.05),  # a study falls due within the tick: a pass once it is due
        ((0.0, None), 0.0),  # due now (e.g. released by the last pass): at once
        ((1.0, None), 1.0),  # falls due at the next tick anyway
        ((30.0, None), 1.0),  # later: the ticks will get it
        ((30.0, 0.5), 0.5),  # during an outage: the probe comes first
        ((None, 0.2), 0.2),  # a probe planned, nothing waiting
        ((-0.3, None), 0.0),  # overdue: at once, never a negative delay
    ],
)
def test_the_next_pass_comes_at_the_tick_or_sooner_when_something_is_due(
    waits: tuple[float | None, float | None], delay: float
) -> None:
    assert next_pass_delay(1.0, *waits) == delay


class Passes:
    """Counts passes and whether two ever ran at once; each pass takes ``seconds`` and asks for ``next_in``."""

    def __init__(self, *, seconds: float, next_in: float) -> None:
        self.seconds = seconds
        self.next_in = next_in
        self.count = 0
        self.running = 0
        self.overlapped = False
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.running += 1
            self.overlapped |= self.running > 1
            self.count += 1
        time.sleep(self.seconds)  # the pass's own work, not a wait for state
        with self._lock:
            self.running -= 1
        return self.next_in


def wait_until(condition: object, timeout: float) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_passes_longer_than_the_tick_run_back_to_back_without_overlap_or_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pass of 0.3 s with a 0.05 s tick: the next one starts when it ends, and APScheduler skips nothing
    (its "maximum number of running instances reached" warning was once a second during long passes)."""
    passes = Passes(seconds=0.3, next_in=0.0)
    scheduler = PublishScheduler(passes, interval=timedelta(seconds=0.05))
    caplog.set_level(logging.DEBUG, logger="apscheduler")
    scheduler.start()
    try:
        wait_until(lambda: passes.count >= 4, timeout=30)
    finally:
        scheduler.stop()

    assert not passes.overlapped
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_the_delay_a_pass_returns_is_capped_at_the_tick() -> None:
    """A pass asking for 60 s still gets the next tick (the scheduler never waits longer than the tick)."""
    passes = Passes(seconds=0.0, next_in=60.0)
    scheduler = PublishScheduler(passes, interval=timedelta(seconds=0.05))
    scheduler.start()
    try:
        wait_until(lambda: passes.count >= 3, timeout=30)
    finally:
        scheduler.stop()


def test_stop_waits_for_the_running_pass_and_schedules_no_other() -> None:
    """After stop() returns, no pass runs or starts."""
    passes = Passes(seconds=0.2, next_in=0.0)
    scheduler = PublishScheduler(passes, interval=timedelta(seconds=0.05))
    scheduler.start()
    wait_until(lambda: passes.count >= 1, timeout=30)
    scheduler.stop()
    stopped_at = passes.count

    assert passes.running == 0
    time.sleep(0.3)  # long enough for a pass that was wrongly scheduled to have started
    assert passes.count == stopped_at


def test_a_long_relink_pass_holds_up_neither_publishing_nor_itself() -> None:
    """The relink pass is a chain of its own: a 0.3 s relink pass and a quick publishing pass each run again
    and again, neither overlapping itself, and nothing is skipped."""
    publishing = Passes(seconds=0.0, next_in=0.0)
    relinking = Passes(seconds=0.3, next_in=0.0)
    scheduler = PublishScheduler(publishing, interval=timedelta(seconds=0.05), relink=relinking)
    scheduler.start()
    try:
        wait_until(lambda: relinking.count >= 3 and publishing.count >= 10, timeout=30)
    finally:
        scheduler.stop()

    assert not relinking.overlapped and not publishing.overlapped


def test_stop_returns_while_passes_follow_one_another_without_a_pause() -> None:
    """stop() comes back whenever it lands, even as a pass ends and schedules the next: APScheduler's shutdown
    holds its job store lock while it waits for the running pass, so a pass that added its successor then
    waited for that lock while shutdown waited for it (SIGTERM to `pacs-bridge run` hung for good)."""
    for _ in range(100):
        assert stops_after_a_pass(), "stop() hung"


def stops_after_a_pass() -> bool:
    """Start a scheduler whose passes reschedule at once, stop it after its first; whether stop() returned."""
    passes = Passes(seconds=0.0, next_in=0.0)
    scheduler = PublishScheduler(passes, interval=timedelta(seconds=0.05))
    scheduler.start()
    wait_until(lambda: passes.count >= 1, timeout=30)
    stopping = threading.Thread(target=scheduler.stop, daemon=True)
    stopping.start()
    stopping.join(timeout=30)  # a deadlock never ends; any machine stops within this
    return not stopping.is_alive()
