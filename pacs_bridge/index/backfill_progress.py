"""The progress of backfills, kept in the index database: one row per run, one per window done.

A run is identified by what it asks for (``RunKey``: source, dates, modality, study). Starting a backfill
continues the last run with the same key that did not complete, skipping the windows it did; once a run
has completed, the same command starts a new one (which asks the PACS again, and changes nothing in the
index for studies it already holds).

A run's figures (``status``) are those of its windows done, each kept with the window, plus those its latest
start found in the windows it has not done: a start asks those windows again, so their studies are counted
once, as the latest attempt found them, and a failure is counted until the window or study that failed is
done. The metrics, read at scrape time so that a backfill running as its own process shows in the service's
``/metrics``, add up what only grows: the figures of every window done, and every failure reported.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Date,
    Engine,
    ForeignKey,
    Integer,
    Row,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, mapped_column

from pacs_bridge.backfill_runs import BackfillTotals, OpenedRun, RunCounts, RunKey, RunState, RunStatus, Window
from pacs_bridge.errors import IndexUnavailableError
from pacs_bridge.index.models import Base, UtcDateTime


class BackfillRun(Base):
    __tablename__ = "backfill_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_key: Mapped[str] = mapped_column(String(255), index=True)
    source: Mapped[str] = mapped_column(String(16))
    since: Mapped[date | None] = mapped_column(Date)
    until: Mapped[date | None] = mapped_column(Date)
    modality: Mapped[str] = mapped_column(String(16), default="")
    study_uid: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    days_total: Mapped[int] = mapped_column(Integer, default=0)
    days_done: Mapped[int] = mapped_column(Integer, default=0)
    studies_found: Mapped[int] = mapped_column(Integer, default=0)
    studies_indexed: Mapped[int] = mapped_column(Integer, default=0)  # with a new or changed instance
    studies_unchanged: Mapped[int] = mapped_column(Integer, default=0)  # already indexed as the PACS has them
    instances_indexed: Mapped[int] = mapped_column(Integer, default=0)  # new or changed instances
    failures: Mapped[int] = mapped_column(Integer, default=0)  # studies and windows failed and not done since
    failures_reported: Mapped[int] = mapped_column(Integer, default=0)  # every failure of every start
    last_error: Mapped[str | None] = mapped_column(Text)


class BackfillWindow(Base):
    """A window of a run whose studies were all indexed (``first_day`` NULL: a run for one study)."""

    __tablename__ = "backfill_windows"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("backfill_runs.id", ondelete="CASCADE"), index=True)
    first_day: Mapped[date | None] = mapped_column(Date)
    last_day: Mapped[date | None] = mapped_column(Date)
    studies: Mapped[int] = mapped_column(Integer, default=0)  # found
    studies_indexed: Mapped[int] = mapped_column(Integer, default=0)
    studies_unchanged: Mapped[int] = mapped_column(Integer, default=0)
    instances_indexed: Mapped[int] = mapped_column(Integer, default=0)
    done_at: Mapped[datetime] = mapped_column(UtcDateTime)


_runs = cast(Table, BackfillRun.__table__)
_windows = cast(Table, BackfillWindow.__table__)


_COUNT_COLUMNS = tuple(RunCounts.__dataclass_fields__)
# What a window done keeps of the counts of its studies (``studies`` being those found).
_WINDOW_COLUMNS = {
    "studies": "studies_found",
    "studies_indexed": "studies_indexed",
    "studies_unchanged": "studies_unchanged",
    "instances_indexed": "instances_indexed",
}


class BackfillLedger:
    """Backfill runs and the windows they finished, in the index database (each method one transaction)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        try:
            with self._engine.begin() as connection:
                yield connection
        except SQLAlchemyError as exc:
            raise IndexUnavailableError(
                f"the index database failed while keeping the backfill's progress ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}); check that the database in `database.url` is running and writable"
            ) from exc

    def open_run(
        self, key: RunKey, *, days_total: int, now: datetime, since: date | None = None, until: date | None = None
    ) -> OpenedRun:
        """Continue the latest unfinished run with ``key``, or start a new one; ``since`` and ``until`` are the
        dates it covers (the key's, or the defaults they stood for), shown by ``status``."""
        since = since or key.since
        until = until or key.until
        with self._transaction() as conn:
            row = conn.execute(
                select(_runs)
                .where(_runs.c.run_key == key.text(), _runs.c.state != RunState.COMPLETE.value)
                .order_by(_runs.c.id.desc())
                .limit(1)
            ).first()
            if row is not None:
                # This start asks again every window not done: what earlier starts found in them (and their
                # failures) is dropped, and the run's figures start again from those of its windows done.
                sums = conn.execute(
                    select(*(func.coalesce(func.sum(_windows.c[column]), 0) for column in _WINDOW_COLUMNS)).where(
                        _windows.c.run_id == row.id
                    )
                ).one()
                counts = RunCounts(
                    days_done=row.days_done,
                    **{name: int(value) for name, value in zip(_WINDOW_COLUMNS.values(), sums, strict=True)},
                )
                conn.execute(
                    update(_runs)
                    .where(_runs.c.id == row.id)
                    .values(
                        state=RunState.RUNNING.value,
                        updated_at=now,
                        finished_at=None,
                        days_total=days_total,
                        since=since,
                        until=until,
                        last_error=None,
                        **{name: getattr(counts, name) for name in _COUNT_COLUMNS},
                    )
                )
                done = conn.execute(
                    select(_windows.c.first_day, _windows.c.last_day).where(_windows.c.run_id == row.id)
                ).all()
                return OpenedRun(
                    run_id=row.id,
                    resumed=True,
                    windows_done=tuple(
                        Window(first_day=first, last_day=last) for first, last in done if first is not None
                    ),
                    whole_query_done=any(first is None for first, _ in done),
                    counts=counts,
                )
            run_id = conn.execute(
                insert(_runs)
                .values(
                    run_key=key.text(),
                    source=key.source,
                    since=since,
                    until=until,
                    modality=key.modality,
                    study_uid=key.study_uid,
                    state=RunState.RUNNING.value,
                    started_at=now,
                    updated_at=now,
                    days_total=days_total,
                )
                .returning(_runs.c.id)
            ).scalar_one()
            return OpenedRun(run_id=run_id, resumed=False, windows_done=(), whole_query_done=False, counts=RunCounts())

    def record(
        self,
        run_id: int,
        counts: RunCounts,
        *,
        now: datetime,
        window_done: Window | None = None,
        whole_query_done: bool = False,
        window_counts: RunCounts | None = None,
        last_error: str | None = None,
    ) -> None:
        """Add ``counts`` to the run and, in the same transaction, note a window (or the whole query) done with
        ``window_counts``, the figures of its studies."""
        values: dict[str, object] = {name: _runs.c[name] + getattr(counts, name) for name in _COUNT_COLUMNS}
        values["failures_reported"] = _runs.c.failures_reported + counts.failures
        values["updated_at"] = now
        if last_error is not None:
            values["last_error"] = last_error
        with self._transaction() as conn:
            conn.execute(update(_runs).where(_runs.c.id == run_id).values(**values))
            if window_done is not None or whole_query_done:
                window_counts = window_counts or RunCounts()
                conn.execute(
                    insert(_windows).values(
                        run_id=run_id,
                        first_day=window_done.first_day if window_done else None,
                        last_day=window_done.last_day if window_done else None,
                        done_at=now,
                        **{column: getattr(window_counts, name) for column, name in _WINDOW_COLUMNS.items()},
                    )
                )

    def finish(self, run_id: int, state: RunState, *, now: datetime) -> None:
        with self._transaction() as conn:
            conn.execute(
                update(_runs).where(_runs.c.id == run_id).values(state=state.value, updated_at=now, finished_at=now)
            )

    def latest_runs(self, *, limit: int = 5) -> list[RunStatus]:
        """The runs that recorded progress last (a resumed old run among them), most recent first."""
        with self._transaction() as conn:
            rows = conn.execute(select(_runs).order_by(_runs.c.updated_at.desc(), _runs.c.id.desc()).limit(limit)).all()
        return [_run_status(row) for row in rows]

    def totals(self) -> BackfillTotals:
        with self._transaction() as conn:
            found, indexed, unchanged, instances = conn.execute(
                select(*(func.coalesce(func.sum(_windows.c[column]), 0) for column in _WINDOW_COLUMNS))
            ).one()
            failures = conn.execute(select(func.coalesce(func.sum(_runs.c.failures_reported), 0))).scalar_one()
            running = _runs.c.state == RunState.RUNNING.value
            # The running run first (an older one resumed included), then the one updated last.
            latest = conn.execute(
                select(_runs).order_by(running.desc(), _runs.c.updated_at.desc(), _runs.c.id.desc()).limit(1)
            ).first()
        return BackfillTotals(
            counts=RunCounts(
                studies_found=int(found),
                studies_indexed=int(indexed),
                studies_unchanged=int(unchanged),
                instances_indexed=int(instances),
                failures=int(failures),
            ),
            latest=_run_status(latest) if latest is not None else None,
        )


def _run_status(values: Row[Any]) -> RunStatus:
    return RunStatus(
        run_id=values.id,
        source=values.source,
        since=values.since,
        until=values.until,
        modality=values.modality,
        study_uid=values.study_uid,
        state=values.state,
        started_at=values.started_at,
        updated_at=values.updated_at,
        finished_at=values.finished_at,
        days_total=values.days_total,
        counts=RunCounts(**{name: getattr(values, name) for name in _COUNT_COLUMNS}),
        last_error=values.last_error,
    )
