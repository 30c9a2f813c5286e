"""Pure timing rules: when a changed study is due, and when a failed publish is tried again."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True, kw_only=True)
class DebounceSettings:
    """Publish once a study has been quiet for ``quiet_period``, never later than ``max_delay`` after its
    first unpublished change."""

    quiet_period: timedelta
    max_delay: timedelta


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrySettings:
    """Exponential backoff for retryable publish failures: ``base * 2**(attempt-1)``, capped, with jitter."""

    base: timedelta = timedelta(seconds=5)
    cap: timedelta = timedelta(minutes=10)
    jitter_fraction: float = 0.2


def due_at(*, first_change_at: datetime, last_change_at: datetime, settings: DebounceSettings) -> datetime:
    """The moment a study with unpublished changes becomes due for publishing."""
    return min(last_change_at + settings.quiet_period, first_change_at + settings.max_delay)


def retry_delay(
    attempt: int,
    settings: RetrySettings,
    *,
    retry_after: timedelta | None = None,
    random_fraction: float = 0.5,
) -> timedelta:
    """How long to wait before attempt ``attempt + 1``, after ``attempt`` failed attempts (``attempt >= 1``).

    ``random_fraction`` in [0, 1) spreads retries of many studies over ``±jitter_fraction`` of the delay, so
    a returning server is not hit by all of them in the same second. A server's ``Retry-After`` is a floor:
    we never come back earlier than it asked.
    """
    exponent = max(attempt, 1) - 1
    # Cap the exponent before multiplying so huge attempt counts cannot overflow timedelta.
    uncapped = settings.base * (2 ** min(exponent, 30))
    jitter = 1.0 + settings.jitter_fraction * (2.0 * random_fraction - 1.0)
    # Jitter first, then the cap: the cap is the longest we ever wait of our own accord.
    delay = min(timedelta(seconds=uncapped.total_seconds() * jitter), settings.cap)
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay
