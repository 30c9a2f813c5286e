"""Unit tests for ``pacs_bridge.debounce``: when a study is due, and how long to wait before a retry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pacs_bridge.debounce import DebounceSettings, RetrySettings, due_at, retry_delay

T0 = datetime(2024, 3, 15, 10, 0, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
DEBOUNCE = DebounceSettings(quiet_period=timedelta(seconds=30), max_delay=timedelta(seconds=300))


@pytest.mark.parametrize(
    ("first_change_s", "last_change_s", "expected_s"),
    [
        # a single change: due one quiet period later
        (0, 0, 30),
        # a burst that stops early: quiet period after the last change wins
        (0, 60, 90),
        # still changing near the end: quiet would be 310, max_delay caps at 300
        (0, 280, 300),
        # a study that keeps changing long after max_delay: stays capped at first change + 300
        (0, 3600, 300),
        # the two rules give the same moment: last change 270 + 30 == first change 0 + 300
        (0, 270, 300),
        # the rules are relative to the first change, not to T0
        (100, 150, 180),
    ],
)
def test_due_at_is_the_earlier_of_quiet_period_and_max_delay(
    first_change_s: int, last_change_s: int, expected_s: int
) -> None:
    """due_at = min(last change + quiet period, first change + max delay)."""
    due = due_at(
        first_change_at=T0 + first_change_s * SECOND,
        last_change_at=T0 + last_change_s * SECOND,
        settings=DEBOUNCE,
    )

    assert due == T0 + expected_s * SECOND


def test_due_at_keeps_the_timezone_of_its_inputs() -> None:
    """Aware UTC in, aware UTC out: due_at never drops the tzinfo."""
    due = due_at(first_change_at=T0, last_change_at=T0, settings=DEBOUNCE)

    assert due.tzinfo is UTC


NO_JITTER = RetrySettings(base=timedelta(seconds=5), cap=timedelta(minutes=10), jitter_fraction=0.0)


@pytest.mark.parametrize(
    ("attempt", "expected_s"),
    [
        (1, 5),  # first failure: the base delay
        (2, 10),  # doubles...
        (3, 20),  # ...each attempt
        (7, 320),  # 5 * 2**6
        (8, 600),  # 5 * 2**7 = 640, capped at 10 minutes
        (50, 600),  # far past the cap
        (0, 5),  # attempt 0 is treated as the first
        (-3, 5),  # nonsense counts do not shrink the delay below base
    ],
)
def test_retry_delay_doubles_from_base_up_to_the_cap(attempt: int, expected_s: int) -> None:
    """Without jitter the delay is base * 2**(attempt-1), never above cap."""
    assert retry_delay(attempt, NO_JITTER) == expected_s * SECOND


JITTERED = RetrySettings(base=timedelta(seconds=10), cap=timedelta(minutes=10), jitter_fraction=0.2)


@pytest.mark.parametrize(
    ("random_fraction", "low_s", "high_s"),
    [
        (0.0, 8.0, 8.0),  # lowest draw: 20 % early
        (0.5, 10.0, 10.0),  # middle draw: no jitter at all
        (0.999999, 11.99, 12.0),  # highest draw (random() < 1): just under 20 % late
    ],
)
def test_retry_delay_jitter_stays_within_the_jitter_fraction(
    random_fraction: float, low_s: float, high_s: float
) -> None:
    """The spread is ±jitter_fraction of the un-jittered delay, linear in random_fraction."""
    delay = retry_delay(1, JITTERED, random_fraction=random_fraction).total_seconds()

    assert low_s <= delay <= high_s


def test_retry_delay_with_jitter_never_exceeds_the_cap() -> None:
    """retry_max_seconds is 'the longest delay between retries' (example config), jitter included."""
    settings = RetrySettings(base=timedelta(seconds=5), cap=timedelta(minutes=10), jitter_fraction=0.2)

    assert retry_delay(20, settings, random_fraction=0.999999) <= settings.cap


@pytest.mark.parametrize(
    ("attempt", "retry_after_s", "expected_s"),
    [
        (1, 60, 60),  # server asks for longer than our backoff: we wait as asked
        (1, 2, 5),  # server asks for less than our backoff: our backoff stands
        (8, 3600, 3600),  # Retry-After may exceed the cap: the server knows best
        (3, 20, 20),  # equal: the same value either way
        (1, 0, 5),  # Retry-After 0 does not make us retry at once
    ],
)
def test_retry_after_is_a_floor_for_the_retry_delay(attempt: int, retry_after_s: int, expected_s: int) -> None:
    """We never come back earlier than the server's Retry-After, but not later than needed either."""
    delay = retry_delay(attempt, NO_JITTER, retry_after=retry_after_s * SECOND)

    assert delay == expected_s * SECOND


def test_retry_after_floor_applies_after_jitter() -> None:
    """Even the earliest jittered draw does not undercut Retry-After."""
    delay = retry_delay(1, JITTERED, retry_after=9 * SECOND, random_fraction=0.0)

    assert delay == 9 * SECOND


@pytest.mark.parametrize(
    "attempt",
    [
        1_000,  # 2**999 seconds would overflow timedelta
        10**9,  # a corrupted attempts column
        2**63,  # beyond a 64-bit integer
    ],
)
def test_huge_attempt_number_gives_the_cap_without_overflow(attempt: int) -> None:
    """Attempt counts of any size give the capped delay instead of OverflowError."""
    assert retry_delay(attempt, NO_JITTER) == NO_JITTER.cap


def test_default_retry_settings_start_at_five_seconds_and_cap_at_ten_minutes() -> None:
    """The defaults match the documented retry_base_seconds and retry_max_seconds (5 and 600)."""
    settings = RetrySettings()

    assert (settings.base, settings.cap) == (timedelta(seconds=5), timedelta(minutes=10))
    assert retry_delay(1, settings) == 5 * SECOND
