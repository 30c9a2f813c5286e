"""run_pass_on_time: one tick publishes what is due, then what falls due before the next tick, on time."""

from __future__ import annotations

import threading

import pytest

from pacs_bridge.publish.scheduler import run_pass_on_time


class RecordingPublisher:
    """Counts passes; ``next_due`` is what it answers after each pass."""

    def __init__(self, *next_due: float | None) -> None:
        self.passes = 0
        self._next_due = list(next_due)

    def run_once(self) -> dict[str, str]:
        self.passes += 1
        return {}

    def seconds_until_next_due(self) -> float | None:
        return self._next_due.pop(0)


@pytest.mark.parametrize(
    ("next_due", "passes"),
    [
        (None, 1),  # nothing waits: one pass, the next tick comes as usual
        (0.05, 2),  # falls due within the tick: a second pass once it is due
        (0.0, 2),  # due now (e.g. released by another pass): a second pass at once
        (1.0, 1),  # falls due at the next tick anyway: no extra pass
        (30.0, 1),  # later: the ticks will get it
    ],
)
def test_a_study_falling_due_before_the_next_tick_gets_its_own_pass(next_due: float | None, passes: int) -> None:
    publisher = RecordingPublisher(next_due, None)

    run_pass_on_time(publisher, tick_seconds=1.0, stopping=threading.Event())

    assert publisher.passes == passes


def test_stopping_cuts_the_wait_short_without_a_second_pass() -> None:
    """A bridge shutting down does not start another pass (nor wait out the rest of the tick)."""
    publisher = RecordingPublisher(0.5)
    stopping = threading.Event()
    stopping.set()

    run_pass_on_time(publisher, tick_seconds=1.0, stopping=stopping)

    assert publisher.passes == 1
