"""APScheduler wiring only: one interval job that runs a publishing pass, and one that runs a relink pass.

The database holds all state; the scheduler just ticks. ``coalesce`` and ``max_instances=1`` make a slow
pass delay the next tick instead of piling passes up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

from apscheduler.schedulers.background import BackgroundScheduler

PUBLISH_JOB_ID = "publish-due-studies"
RELINK_JOB_ID = "relink-published-studies"


class _Passes(Protocol):
    def run_once(self) -> Any: ...

    def seconds_until_next_due(self) -> float | None: ...


def run_pass_on_time(publisher: _Passes, *, tick_seconds: float, stopping: threading.Event) -> None:
    """One tick: a publishing pass, then, when a study falls due before the next tick, a wait until then and a
    second pass. A quiet study is so published when its quiet period ends, not up to a tick later; the tick
    stays the longest a pass waits. ``stopping`` cuts the wait short (no second pass then)."""
    publisher.run_once()
    wait = publisher.seconds_until_next_due()
    if wait is not None and wait < tick_seconds and not stopping.wait(wait):
        publisher.run_once()


class PublishScheduler:
    def __init__(
        self, tick: Callable[[], Any], *, interval: timedelta, relink: Callable[[], Any] | None = None
    ) -> None:
        """``relink``: the relink pass (``publish/relink.py``), a job of its own at the same interval, so that a
        batch of lookups never holds up publishing."""
        self._scheduler = BackgroundScheduler(timezone="UTC")
        jobs = [(PUBLISH_JOB_ID, tick)] + ([(RELINK_JOB_ID, relink)] if relink is not None else [])
        for job_id, job in jobs:
            self._scheduler.add_job(
                job,
                "interval",
                seconds=interval.total_seconds(),
                id=job_id,
                coalesce=True,
                max_instances=1,
                misfire_grace_time=None,
            )

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        """Stop ticking and wait for a running pass to finish."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
