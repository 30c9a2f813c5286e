"""One backfill run: windows -> studies found -> instance headers -> ``extract_instance`` -> the index.

Instances are recorded through the index's public ingest API (``record_instances``), exactly as the listener
records C-STOREs, so a study already indexed is merged (not duplicated), an unchanged one changes nothing
(and is not published again), and a changed or new one becomes due through the usual debounce; the running
service publishes it.

A window's failure, or a study's, is reported naming it, and the run goes on with the next one; a window
is kept as done only when every study in it was indexed, with the figures of its studies, so running the
same command again retries what failed and counts each study once. A single day for which a PACS that cannot
page (C-FIND) gives its most answers is asked again by StudyTime ranges. The database failing stops the run
(nothing could be kept), and so does a PACS that cannot be reached (``PacsUnreachableError``): asking about
each window in turn would only wait for each. A stop request (SIGINT/SIGTERM) ends the run after the request
under way; its progress is kept and the same command continues it.

A dry run records nothing and keeps no progress: it compares what the PACS holds with the index, read only
(``preview_study``), or with no index at all, when there is none yet (every study is then new).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Protocol

import structlog
from pydicom import config as pydicom_config

from pacs_bridge.backfill.source import FoundStudies, StudyQuery, StudySource
from pacs_bridge.backfill.windows import (
    EARLIEST_STUDY_DATE,
    WHOLE_DAY,
    TimeRange,
    days_covered,
    plan_windows,
    split_window,
)
from pacs_bridge.backfill_runs import RunCounts, RunKey, RunState, Window
from pacs_bridge.dicom.extract import extract_instance
from pacs_bridge.errors import (
    BackfillStoppedError,
    IndexUnavailableError,
    InvalidInstanceError,
    PacsQueryError,
    PacsUnreachableError,
)
from pacs_bridge.index.backfill_progress import BackfillLedger
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
    """The index's public ingest API, as the backfill uses it (``preview_study`` for a dry run)."""

    def record_instances(self, batch: Sequence[tuple[InstanceRecord, datetime]]) -> list[RecordOutcome | Exception]: ...

    def preview_study(self, records: Sequence[InstanceRecord]) -> list[RecordOutcome] | None: ...


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
    counts: RunCounts  # the run's: its windows done (by earlier starts too) and this start's others
    failures: list[BackfillFailure] = field(default_factory=list)
    stopped: bool = False
    dry_run: bool = False
    new_studies: int = 0  # of counts.studies_indexed, those the index did not hold (dry run only)
    unreachable: str | None = None  # why the run ended early: the PACS cannot be reached

    @property
    def succeeded(self) -> bool:
        return not self.failures and not self.stopped and self.unreachable is None


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
        sink: InstanceSink | None,
        ledger: BackfillLedger | None,
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
        self._new_studies = 0

    def run(self, request: BackfillRequest) -> BackfillSummary:
        """Run ``request``; ``sink`` None (no index yet) and ``ledger`` None are for a dry run only."""
        if not request.dry_run and (self._sink is None or self._ledger is None):
            raise ValueError("a backfill that records needs the index and its ledger")
        # Values longer than their VR allows (and the like) are read as they come, without a warning per
        # instance: extract_instance bounds what it keeps, as it does for the listener (dicom/scp.py). The
        # setting is pydicom's, process-wide: it is put back when the run ends.
        previous_mode = pydicom_config.settings.reading_validation_mode
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        try:
            return self._run(request)
        finally:
            pydicom_config.settings.reading_validation_mode = previous_mode

    def _run(self, request: BackfillRequest) -> BackfillSummary:
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
        if self._ledger is not None and not request.dry_run:
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
        unreachable = None
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
        except PacsUnreachableError as exc:
            state, unreachable = RunState.INCOMPLETE, str(exc)
            self._pending_error = unreachable
            log.error("backfill_pacs_unreachable", source=self._source.name, error=unreachable)
        except BaseException:
            # The database failed, or a second signal: what was done is kept, the display closed.
            state = RunState.INCOMPLETE
            self._reporter.finished(self._summary(resumed=resumed, stopped=True, dry_run=request.dry_run))
            raise
        finally:
            self._source.close()
            if self._ledger is not None and self._run_id is not None:
                self._flush(force=True)
                self._ledger.finish(self._run_id, state, now=self._clock())
        summary = self._summary(resumed=resumed, stopped=stopped, dry_run=request.dry_run)
        summary.unreachable = unreachable
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
            new_studies=self._new_studies,
        )

    # ---- windows ---------------------------------------------------------------------------------------------------

    def _window(self, window: Window) -> None:
        covered = days_covered(window, self._done)
        if covered == window.days:
            return
        query = StudyQuery(window=window, modality=self._modality)
        before = self._total
        try:
            found = self._source.find_studies(query, whole=not window.splittable)
        except PacsQueryError as exc:
            self._fail(query.describe(), exc)
            self._advance(window.days - covered)
            return
        if found.full and window.splittable:
            log.info("backfill_window_split", window=str(window), answers=len(found.study_uids))
            for half in split_window(window):
                self._window(half)
            return
        failed = self._day_by_study_time(query, found) if found.full else self._studies(found.study_uids)
        self._advance(window.days - covered, window_done=None if failed else window, window_counts=self._total - before)

    def _day_by_study_time(self, day: StudyQuery, answered: FoundStudies) -> int:
        """A single day for which the PACS gave its most answers and cannot page (C-FIND): asked again by
        StudyTime ranges, each halved while its answer is full, down to one second; returns how many studies
        and ranges failed.

        A PACS matches a time range only against a StudyTime it holds: the day's first answers that no range
        found (no StudyTime, or one the PACS does not compare as a time) are indexed, and the day is failed,
        since studies like them beyond the PACS's limit stay hidden.
        """
        log.info("backfill_day_split_by_study_time", window=str(day.window), answers=len(answered.study_uids))
        failed = self._study_times(day, WHOLE_DAY, answered)
        missed = [uid for uid in answered.study_uids if uid not in self._seen]
        if missed:
            failed += self._studies(missed) + 1
            self._fail(
                day.describe(),
                f"the PACS gave its most answers ({len(answered.study_uids)}) for this day, and {len(missed)} of them "
                "have no StudyTime that a time range finds, so studies like them beyond the PACS's limit are "
                "hidden; raise the PACS's C-FIND limit (Orthanc: LimitFindResults) and pacs.dimse.max_results to "
                "it, or backfill that day with --source dicomweb",
            )
        return failed

    def _study_times(self, day: StudyQuery, times: TimeRange, answered: FoundStudies) -> int:
        """The studies of ``day`` with a StudyTime in ``times``, whose answer, ``answered``, was full: each half
        of the range asked and indexed in turn; returns how many studies and ranges failed."""
        query = replace(day, study_times=times)
        if not times.splittable:
            failed = self._studies(answered.study_uids) + 1
            self._fail(
                query.describe(),
                f"the PACS gave its most answers ({len(answered.study_uids)}) for studies of a single second, so "
                "the PACS's C-FIND limit hides the others of that second; raise it (Orthanc: LimitFindResults) and "
                "pacs.dimse.max_results to it, or backfill that day with --source dicomweb",
            )
            return failed
        failed = 0
        for half in times.halves():
            part = replace(day, study_times=half)
            try:
                found = self._source.find_studies(part, whole=True)
            except PacsQueryError as exc:
                self._fail(part.describe(), exc)
                failed += 1
                continue
            failed += self._study_times(day, half, found) if found.full else self._studies(found.study_uids)
        return failed

    def _whole_query(self, query: StudyQuery) -> None:
        before = self._total
        try:
            found = self._source.find_studies(query, whole=True)
        except PacsQueryError as exc:
            self._fail(query.describe(), exc)
            return
        if not found.study_uids:
            self._fail(query.describe(), "the PACS does not find it; check the UID (and --modality)")
            return
        failed = self._studies(found.study_uids)
        self._advance(0, whole_done=not failed, window_counts=self._total - before)

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
            self._fail(what, exc)
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
        if not self._dry_run and self._sink is not None:  # run() refuses to record without an index
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
                changed = self._preview(study)
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

    def _preview(self, study: _FetchedStudy) -> int:
        """Dry run: how many of the study's instances recording would add or change (all of a study the index
        does not hold, or of every study when there is no index)."""
        outcomes = self._sink.preview_study(study.records) if self._sink is not None else None
        if outcomes is None:
            if study.records:
                self._new_studies += 1
            return len(study.records)
        return sum(outcome in (RecordOutcome.NEW, RecordOutcome.UPDATED) for outcome in outcomes)

    # ---- bookkeeping -----------------------------------------------------------------------------------------------

    def _fail(self, what: str, error: str | PacsQueryError) -> None:
        failure = BackfillFailure(what=what, error=_reason(what, str(error)))
        self._failures.append(failure)
        self._count(RunCounts(failures=1))
        self._pending_error = f"{what}: {failure.error}"
        log.warning("backfill_failed", what=what, error=failure.error)
        self._reporter.failed(failure)

    def _count(self, counts: RunCounts) -> None:
        self._total += counts
        self._unflushed += counts

    def _advance(
        self,
        days: int,
        *,
        window_done: Window | None = None,
        whole_done: bool = False,
        window_counts: RunCounts | None = None,
    ) -> None:
        self._count(RunCounts(days_done=days))
        if self._ledger is not None and self._run_id is not None:
            self._ledger.record(
                self._run_id,
                self._unflushed,
                now=self._clock(),
                window_done=window_done,
                whole_query_done=whole_done,
                window_counts=window_counts,
                last_error=self._take_last_error(),
            )
            self._unflushed = RunCounts()
            self._flushed_at = self._monotonic()
        self._reporter.advanced(days=days, counts=self._total)

    def _flush(self, *, force: bool = False) -> None:
        if self._ledger is None or self._run_id is None or (self._unflushed.is_empty and self._pending_error is None):
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


def _reason(what: str, error: str) -> str:
    """The error without the name of what failed, which the sources' messages start with (``study 1.2: ...``,
    ``study 1.2, series 1.2.3: ...``): the failure names it once."""
    if error.startswith(what) and error[len(what) : len(what) + 1] in (":", ","):
        return error[len(what) :].lstrip(":, ") or error
    return error


def _as_dict(counts: RunCounts) -> dict[str, int]:
    return {name: getattr(counts, name) for name in RunCounts.__dataclass_fields__}
