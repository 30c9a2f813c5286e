"""APScheduler wiring only: publishing passes, and relink passes, each one at a time, each scheduling the next.

The database holds all state; the scheduler just ticks. A pass that ends schedules the next of its kind as a
one-off job: a publishing pass after ``interval`` (the tick), or sooner when a study falls due or the FHIR server
is to be probed before then; a relink pass (``publish/relink.py``) after ``interval``, as a job of its own so that
a batch of lookups never holds up publishing. A pass that drains a long backlog therefore delays the next one
instead of overlapping it, and APScheduler never has a tick to skip (its "maximum number of running instances
reached" warning, once a second).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

PUBLISH_JOB_ID = "publish-due-studies"
RELINK_JOB_ID = "relink-published-studies"

log = structlog.get_logger("pacs_bridge.publish")


def next_pass_delay(tick_seconds: float, *waits: float | None) -> float:
    """Seconds until the next pass: the tick, or the soonest of ``waits`` (seconds until a study falls due,
    until the next probe; None: nothing planned) when that comes first."""
    planned = [wait for wait in waits if wait is not None]
    return max(0.0, min([tick_seconds, *planned]))


class PublishScheduler:
    """Runs ``run_pass`` on APScheduler's threads: first at once, then each time after the delay the previous
    pass returned (seconds, at most ``interval``); ``relink``, when given, likewise every ``interval``."""

    def __init__(
        self, run_pass: Callable[[], float], *, interval: timedelta, relink: Callable[[], Any] | None = None
    ) -> None:
        self._interval = interval.total_seconds()
        self._stopped = threading.Event()
        # Held while a pass schedules the next and while stop marks the stop: once stop has, no pass adds a job.
        # APScheduler's shutdown holds its job store lock while it waits for the running pass, so a pass that
        # called add_job then would wait for that lock, and shutdown for the pass, for ever.
        self._scheduling = threading.Lock()
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._jobs: dict[str, Callable[[], float]] = {PUBLISH_JOB_ID: run_pass}
        if relink is not None:

            def run_relink() -> float:
                relink()
                return self._interval

            self._jobs[RELINK_JOB_ID] = run_relink

    def start(self) -> None:
        self._scheduler.start()
        for job_id in self._jobs:
            self._schedule(job_id, 0.0)

    def stop(self) -> None:
        """Stop scheduling and wait for a running pass to finish."""
        with self._scheduling:
            self._stopped.set()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def _schedule(self, job_id: str, delay: float) -> None:
        with self._scheduling:
            if self._stopped.is_set():
                return
            self._scheduler.add_job(
                self._run,
                "date",
                args=(job_id,),
                run_date=datetime.now(UTC) + timedelta(seconds=delay),
                id=job_id,
                replace_existing=True,
                misfire_grace_time=None,
            )

    def _run(self, job_id: str) -> None:
        delay = self._interval
        try:
            delay = min(self._jobs[job_id](), self._interval)
        except Exception:  # a pass never raises; should one, the next still comes
            log.exception("pass_crashed", job=job_id)
        finally:
            self._schedule(job_id, delay)
