"""One backfill run: windows -> studies found -> instance headers -> ``extract_instance`` -> the index.

Instances are recorded through the index's public ingest API (``record_instances``), exactly as the listener
records C-STOREs, so a study already indexed is merged (not duplicated), an unchanged one changes nothing
(and is not published again), and a changed or new one becomes due through the usual debounce; the running
service publishes it.

A window's failure, or a study's, is reported naming it, and the run goes on with the next one; a window
is kept as done only when every study in it was indexed, so running the same command again retries what
failed. The database failing stops the run (nothing could be kept). A stop request (SIGINT/SIGTERM) ends
the run after the request under way; its progress is kept and the same command continues it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Protocol

import structlog

from pacs_bridge.backfill.source import StudyQuery, StudySource
from pacs_bridge.backfill.windows import EARLIEST_STUDY_DATE, Window, days_covered, plan_windows, split_window
from pacs_bridge.dicom.extract import extract_instance
from pacs_bridge.errors import BackfillStoppedError, IndexUnavailableError, InvalidInstanceError, PacsQueryError
from pacs_bridge.index.backfill_progress import BackfillLedger, RunCounts, RunKey, RunState
from pacs_bridge.records import InstanceRecord, RecordOutcome

log = structlog.get_logger("pacs_bridge.backfill")
Clock = Callable[[], datetime]
# Counters reach the index (status, metrics) at least this often while a window is under way.
FLUSH_SECONDS = 2.0
# Fetched studies are recorded together, in one transaction, up to this many instances or this long after
# the first of them was fetched: one commit (one fsync on SQLite) for many small studies.
BATCH_INSTANCES = 500
BATCH_SECONDS = 1.0


class InstanceSink(Protocol):
    """The index's public ingest API, as the backfill uses it."""

    def record_instances(self, batch: Sequence[tuple[InstanceRecord, datetime]]) -> list[RecordOutcome | Exception]: ...


class ProgressReporter(Protocol):
    def started(self, *, days_total: int, days_done: int, resumed: bool, counts: RunCounts) -> None: ...

    def advanced(self, *, days: int, counts: RunCounts) -> None: ...

    def failed(self, failure: BackfillFailure) -> None: ...

    def finished(self, summary: BackfillSummary) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillRequest:
    """What ``pacs-bridge backfill`` was asked: its flags."""

    source: str  # dicomweb or dimse
    since: date | None = None  # None: EARLIEST_STUDY_DATE
    until: date | None = None  # None: today
    modality: str = ""
    study_uid: str = ""  # one study, every date
    dry_run: bool = False  # ask the PACS and extract, record nothing


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillFailure:
    what: str  # "window 2024-01-01..2024-06-30", "study 1.2.3"
    error: str


@dataclass(slots=True, kw_only=True)
class BackfillSummary:
    run_id: int | None  # None for a dry run
    resumed: bool
    counts: RunCounts  # the run's, earlier starts of it included
    failures: list[BackfillFailure] = field(default_factory=list)
    stopped: bool = False
    dry_run: bool = False

    @property
    def succeeded(self) -> bool:
        return not self.failures and not self.stopped


@dataclass(slots=True)
class _FetchedStudy:
    """One study's instances, extracted and waiting to be recorded, and what was wrong with the others."""

    study_uid: str
    records: list[InstanceRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class BackfillRunner:
    """Runs one backfill request against one source, recording into one index."""

    def __init__(
        self,
        *,
        source: StudySource,
        sink: InstanceSink,
        ledger: BackfillLedger,
        reporter: ProgressReporter,
        clock: Clock,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._sink = sink
        self._ledger = ledger
        self._reporter = reporter
        self._clock = clock
        self._monotonic = monotonic
        self._run_id: int | None = None
        self._dry_run = False
        self._done: tuple[Window, ...] = ()
        self._seen: set[str] = set()
        self._total = RunCounts()  # the run's counts so far (earlier starts included)
        self._unflushed = RunCounts()
        self._flushed_at = 0.0
        self._failures: list[BackfillFailure] = []
        self._modality = ""
        self._pending_error: str | None = None  # the last failure, for the run's row

    def run(self, request: BackfillRequest) -> BackfillSummary:
        self._dry_run = request.dry_run
        self._modality = request.modality
        windows: list[Window] = []
        since, until = request.since, request.until
        if not request.study_uid:
            since = since or EARLIEST_STUDY_DATE
            until = until or self._clock().date()
            windows = plan_windows(since, until)
        days_total = sum(window.days for window in windows)
        key = RunKey(
            source=self._source.name,
            since=request.since,
            until=request.until,
            modality=request.modality,
            study_uid=request.study_uid,
        )
        resumed, whole_done = False, False
        if not request.dry_run:
            opened = self._ledger.open_run(key, days_total=days_total, now=self._clock(), since=since, until=until)
            self._run_id, resumed, self._done, whole_done = (
                opened.run_id,
                opened.resumed,
                opened.windows_done,
                opened.whole_query_done,
            )
            days_done = sum(days_covered(window, self._done) for window in windows)
            # days_done is recomputed from the windows done: a window split anew is not counted twice
            self._total = RunCounts(**{**_as_dict(opened.counts), "days_done": days_done})
            self._unflushed = RunCounts(days_done=days_done - opened.counts.days_done)
        log.info(
            "backfill_started",
            source=self._source.name,
            since=str(since) if since else None,
            until=str(until) if until else None,
            modality=request.modality or None,
            study_uid=request.study_uid or None,
            dry_run=request.dry_run,
            run_id=self._run_id,
            resumed=resumed,
        )
        self._reporter.started(
            days_total=days_total, days_done=self._total.days_done, resumed=resumed, counts=self._total
        )
        state = RunState.COMPLETE
        stopped = False
        try:
            if request.study_uid:
                if not whole_done:
                    self._whole_query(StudyQuery(study_uid=request.study_uid, modality=request.modality))
            else:
                for window in windows:
                    self._window(window)
            if self._failures:
                state = RunState.INCOMPLETE
        except BackfillStoppedError:
            state, stopped = RunState.STOPPED, True
        except BaseException:
            # The database failed, or a second signal: what was done is kept, the display closed.
            state = RunState.INCOMPLETE
            self._reporter.finished(self._summary(resumed=resumed, stopped=True, dry_run=request.dry_run))
            raise
        finally:
            self._source.close()
            if self._run_id is not None:
                self._flush(force=True)
                self._ledger.finish(self._run_id, state, now=self._clock())
        summary = self._summary(resumed=resumed, stopped=stopped, dry_run=request.dry_run)
        log.info(
            "backfill_finished",
            run_id=self._run_id,
            state=state.value,
            **_as_dict(self._total),
        )
        self._reporter.finished(summary)
        return summary

    def _summary(self, *, resumed: bool, stopped: bool, dry_run: bool) -> BackfillSummary:
        return BackfillSummary(
            run_id=self._run_id,
            resumed=resumed,
            counts=self._total,
            failures=list(self._failures),
            stopped=stopped,
            dry_run=dry_run,
        )

    # ---- windows ---------------------------------------------------------------------------------------------------

    def _window(self, window: Window) -> None:
        covered = days_covered(window, self._done)
        if covered == window.days:
            return
        query = StudyQuery(window=window, modality=self._modality)
        try:
            found = self._source.find_studies(query, whole=not window.splittable)
        except PacsQueryError as exc:
            self._fail(query.describe(), str(exc))
            self._advance(window.days - covered)
            return
        if found.full and window.splittable:
            log.info("backfill_window_split", window=str(window), answers=len(found.study_uids))
            for half in split_window(window):
                self._window(half)
            return
        failed = self._studies(found.study_uids)
        if found.full:
            failed += 1
            self._fail(
                query.describe(),
                f"the PACS gave its most answers ({len(found.study_uids)}) for a single day, so studies of that "
                "day beyond them may be missing; raise the PACS's C-FIND limit (and pacs.dimse.max_results to it), "
                "or backfill that day with --source dicomweb",
            )
        self._advance(window.days - covered, window_done=None if failed else window, studies=len(found.study_uids))

    def _whole_query(self, query: StudyQuery) -> None:
        try:
            found = self._source.find_studies(query, whole=True)
        except PacsQueryError as exc:
            self._fail(query.describe(), str(exc))
            return
        if not found.study_uids:
            self._fail(query.describe(), "the PACS does not find it; check the UID (and --modality)")
            return
        failed = self._studies(found.study_uids)
        self._advance(0, whole_done=not failed, studies=len(found.study_uids))

    # ---- studies ---------------------------------------------------------------------------------------------------

    def _studies(self, study_uids: Sequence[str]) -> int:
        """Index each study; returns how many failed.

        Studies are recorded in batches (``BATCH_INSTANCES`` instances, ``BATCH_SECONDS`` at most since the
        first fetched): one transaction, one commit for several small studies. What was fetched is recorded
        before a stop or an error leaves the window.
        """
        failed = 0
        batch: list[_FetchedStudy] = []
        batch_started = 0.0
        try:
            for study_uid in study_uids:
                if study_uid in self._seen:  # listed again (paging over a list that moved)
                    continue
                self._seen.add(study_uid)
                fetched = self._fetch(study_uid)
                if fetched is None:
                    failed += 1
                    continue
                if not batch:
                    batch_started = self._monotonic()
                batch.append(fetched)
                if (
                    sum(len(study.records) for study in batch) >= BATCH_INSTANCES
                    or self._monotonic() - batch_started >= BATCH_SECONDS
                ):
                    failed += self._record(batch)
                    batch = []
                    self._flush()
        finally:
            if batch:
                failed += self._record(batch)
        return failed

    def _fetch(self, study_uid: str) -> _FetchedStudy | None:
        """The study's instances, extracted; None (and a failure reported) when the PACS gave no usable answer."""
        what = f"study {study_uid}"
        self._count(RunCounts(studies_found=1))
        try:
            datasets = self._source.study_instances(study_uid)
        except PacsQueryError as exc:
            self._fail(what, str(exc))
            return None
        fetched = _FetchedStudy(study_uid=study_uid)
        for dataset in datasets:
            try:
                record = extract_instance(dataset)
            except InvalidInstanceError as exc:
                fetched.problems.append(f"an instance cannot be indexed: {exc}")
                continue
            if record.study.study_uid != study_uid:
                fetched.problems.append(
                    f"the PACS answered instance {record.sop_instance_uid} of study {record.study.study_uid}"
                )
                continue
            fetched.records.append(record)
        if not datasets:
            fetched.problems.append("the PACS lists the study but gives no instance of it")
        return fetched

    def _record(self, batch: list[_FetchedStudy]) -> int:
        """Record the batch's instances in one transaction; returns how many of its studies failed."""
        outcomes: list[RecordOutcome | Exception] = []
        if not self._dry_run:
            received_at = self._clock()
            outcomes = self._sink.record_instances(
                [(record, received_at) for study in batch for record in study.records]
            )
            for outcome in outcomes:
                if isinstance(outcome, IndexUnavailableError):
                    raise outcome
        failed = 0
        position = 0
        for study in batch:
            changed = 0
            if self._dry_run:
                changed = len(study.records)  # what it would index
            else:
                for record, outcome in zip(
                    study.records, outcomes[position : position + len(study.records)], strict=True
                ):
                    if isinstance(outcome, Exception):
                        study.problems.append(f"instance {record.sop_instance_uid} not indexed: {outcome}")
                    elif outcome in (RecordOutcome.NEW, RecordOutcome.UPDATED):
                        changed += 1
                position += len(study.records)
            if study.records:
                self._count(
                    RunCounts(
                        studies_indexed=1 if changed else 0,
                        studies_unchanged=0 if changed else 1,
                        instances_indexed=changed,
                    )
                )
            if study.problems:
                more = f" (and {len(study.problems) - 1} more)" if len(study.problems) > 1 else ""
                self._fail(f"study {study.study_uid}", study.problems[0] + more)
                failed += 1
        return failed

    # ---- bookkeeping -----------------------------------------------------------------------------------------------

    def _fail(self, what: str, error: str) -> None:
        failure = BackfillFailure(what=what, error=error)
        self._failures.append(failure)
        self._count(RunCounts(failures=1))
        self._pending_error = f"{what}: {error}"
        log.warning("backfill_failed", what=what, error=error)
        self._reporter.failed(failure)

    def _count(self, counts: RunCounts) -> None:
        self._total += counts
        self._unflushed += counts

    def _advance(
        self, days: int, *, window_done: Window | None = None, whole_done: bool = False, studies: int = 0
    ) -> None:
        self._count(RunCounts(days_done=days))
        if self._run_id is not None:
            self._ledger.record(
                self._run_id,
                self._unflushed,
                now=self._clock(),
                window_done=window_done,
                whole_query_done=whole_done,
                window_studies=studies,
                last_error=self._take_last_error(),
            )
            self._unflushed = RunCounts()
            self._flushed_at = self._monotonic()
        self._reporter.advanced(days=days, counts=self._total)

    def _flush(self, *, force: bool = False) -> None:
        if self._run_id is None or (self._unflushed.is_empty and self._pending_error is None):
            return
        if not force and self._monotonic() - self._flushed_at < FLUSH_SECONDS:
            return
        self._ledger.record(self._run_id, self._unflushed, now=self._clock(), last_error=self._take_last_error())
        self._unflushed = RunCounts()
        self._flushed_at = self._monotonic()
        self._reporter.advanced(days=0, counts=self._total)

    def _take_last_error(self) -> str | None:
        error, self._pending_error = self._pending_error, None
        return error


def _as_dict(counts: RunCounts) -> dict[str, int]:
    return {name: getattr(counts, name) for name in RunCounts.__dataclass_fields__}
