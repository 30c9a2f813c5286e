"""APScheduler wiring only: one interval job that runs a publishing pass.

The database holds all state; the scheduler just ticks. ``coalesce`` and ``max_instances=1`` make a slow
pass delay the next tick instead of piling passes up.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

PUBLISH_JOB_ID = "publish-due-studies"


class PublishScheduler:
    def __init__(self, tick: Callable[[], Any], *, interval: timedelta) -> None:
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(
            tick,
            "interval",
            seconds=interval.total_seconds(),
            id=PUBLISH_JOB_ID,
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
