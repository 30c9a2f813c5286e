"""The index: durable studies / series / instances and each study's publish state, over SQLAlchemy.

``Index`` is what the rest of the bridge holds: one object per database, whose methods are each one
transaction. It hands each to the module that owns its concern:

- ``index/ingest.py``: received instances indexed (the per-C-STORE hot path), with ``index/rejection_notes.py``
  for IHE IOCM rejection notes and ``index/changes.py`` for what an instance changes on its study;
- ``index/snapshot.py``: studies' snapshots for the publisher, one study or a claimed batch at a time;
- ``index/publish_state.py``: claiming due studies, publish results, backoff, Endpoints sent, counts and the
  operator's requests;
- ``index/links.py``: the links published studies carry and the relink queue (``Index.links``).

It implements ``study_queue.PublishQueue`` (what the publisher asks of it) and ``InstanceSink`` (the listener's
and group commit's). Database errors become ``IndexUnavailableError`` (retry later) or ``UnstorableValueError``
(``index/database.py``).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.errors import IndexUnavailableError, UnknownStudyError
from pacs_bridge.index.changes import preview_outcomes
from pacs_bridge.index.database import IndexDatabase
from pacs_bridge.index.ingest import InstanceIngest, ReceivedInstance, TakeLateArrivals
from pacs_bridge.index.links import LinkIndex
from pacs_bridge.index.models import PublishState
from pacs_bridge.index.publish_state import PublishStates, StudyStatus
from pacs_bridge.index.snapshot import SnapshotReader
from pacs_bridge.records import InstanceRecord, RecordOutcome, StudySnapshot
from pacs_bridge.study_queue import ClaimedStudy, PublishResult, StateCounts

_locks_guard = threading.Lock()
_named_locks: dict[str, tuple[threading.Lock, int]] = {}  # name -> (its lock, how many hold or wait for it)


@contextmanager
def _process_lock(name: str) -> Iterator[None]:
    """The in-process lock called ``name``, forgotten once nobody holds or waits for it (names hold PatientIDs:
    they are not kept)."""
    with _locks_guard:
        lock, users = _named_locks.get(name, (threading.Lock(), 0))
        _named_locks[name] = (lock, users + 1)
    try:
        with lock:
            yield
    finally:
        with _locks_guard:
            lock, users = _named_locks[name]
            if users == 1:
                del _named_locks[name]
            else:
                _named_locks[name] = (lock, users - 1)


class Index:
    """Durable index of received instances and the publish state of their studies."""

    def __init__(self, engine: Engine, debounce: DebounceSettings) -> None:
        self._db = IndexDatabase(engine)
        self._ingest = InstanceIngest(self._db, debounce)
        self._snapshots = SnapshotReader(self._db)
        self._publish_states = PublishStates(self._db)
        self.links = LinkIndex(engine)  # what published studies' subject and basedOn reference; the relink queue

    # ---- ingest: index/ingest.py ----------------------------------------------------------------------------

    def record_instance(self, record: InstanceRecord, *, received_at: datetime) -> RecordOutcome:
        """Index one received instance, durably (committed when this returns): ``InstanceIngest.record_instance``."""
        return self._ingest.record_instance(record, received_at=received_at)

    def record_instances(
        self, batch: Sequence[ReceivedInstance], *, take_late_arrivals: TakeLateArrivals | None = None
    ) -> list[RecordOutcome | Exception]:
        """Index several instances in one transaction: ``InstanceIngest.record_instances``."""
        return self._ingest.record_instances(batch, take_late_arrivals=take_late_arrivals)

    def preview_study(self, records: Sequence[InstanceRecord]) -> list[RecordOutcome] | None:
        """What ``record_instances`` would answer for ``records``, instances of one study, read only (for
        ``pacs-bridge backfill --dry-run``); None when the index has no such study (each would be new).

        The same comparison as recording's (``index/changes.py``, ``preview_outcomes``). Not foreseen: an
        instance or series that another study holds (recording refuses it) and instances an IOCM rejection note
        withdrew (recording keeps them out); rejection notes are not previewed.
        """
        if not records:
            return []
        try:
            snapshot = self.load_snapshot(records[0].study.study_uid)
        except UnknownStudyError:
            return None
        return preview_outcomes(snapshot, records)

    def writer_turn(self) -> AbstractContextManager[Any]:
        """The turn of ingest transactions: ``InstanceIngest.writer_turn``."""
        return self._ingest.writer_turn()

    # ---- publishing: index/snapshot.py, index/publish_state.py ----------------------------------------------

    def load_snapshot(self, study_uid: str) -> StudySnapshot:
        """Everything indexed for one study: ``SnapshotReader.load_snapshot``."""
        return self._snapshots.load_snapshot(study_uid)

    def load_snapshots(self, study_uids: Sequence[str]) -> dict[str, StudySnapshot]:
        """A claimed batch's snapshots in one transaction, up to an instance budget:
        ``SnapshotReader.load_snapshots``."""
        return self._snapshots.load_snapshots(study_uids)

    def claim_due_studies(self, now: datetime, *, limit: int, lease: timedelta, claimer: str) -> list[ClaimedStudy]:
        return self._publish_states.claim_due_studies(now, limit=limit, lease=lease, claimer=claimer)

    def record_publish_results(self, results: Sequence[PublishResult]) -> None:
        self._publish_states.record_publish_results(results)

    def mark_published(
        self,
        study_uid: str,
        *,
        change_seq: int,
        content_hash: str,
        now: datetime,
        sent: bool,
        version_id: str | None = None,
    ) -> None:
        self._publish_states.mark_published(
            study_uid, change_seq=change_seq, content_hash=content_hash, now=now, sent=sent, version_id=version_id
        )

    def mark_retry(
        self, study_uid: str, *, error: str, next_attempt_at: datetime, not_before: datetime | None = None
    ) -> int:
        return self._publish_states.mark_retry(
            study_uid, error=error, next_attempt_at=next_attempt_at, not_before=not_before
        )

    def mark_failed(self, study_uid: str, *, change_seq: int, error: str) -> None:
        self._publish_states.mark_failed(study_uid, change_seq=change_seq, error=error)

    def release_claim(self, study_uid: str) -> None:
        self._publish_states.release_claim(study_uid)

    def next_due_at(self) -> datetime | None:
        return self._publish_states.next_due_at()

    def wakeable_count(self, now: datetime) -> int:
        return self._publish_states.wakeable_count(now)

    def wake_backed_off(self, now: datetime) -> int:
        return self._publish_states.wake_backed_off(now)

    def endpoint_hashes(self) -> dict[str, str]:
        return self._publish_states.endpoint_hashes()

    def mark_endpoint_published(self, endpoint_id: str, *, content_hash: str, now: datetime) -> None:
        self._publish_states.mark_endpoint_published(endpoint_id, content_hash=content_hash, now=now)

    def count_by_state(self) -> StateCounts:
        return self._publish_states.count_by_state()

    # ---- operator requests: index/publish_state.py -------------------------------------------------------------

    def studies_in_state(self, state: PublishState, *, limit: int = 100) -> list[StudyStatus]:
        return self._publish_states.studies_in_state(state, limit=limit)

    def study_status(self, study_uid: str) -> StudyStatus | None:
        return self._publish_states.study_status(study_uid)

    def retry_failed(self, now: datetime, *, study_uid: str | None = None) -> list[str]:
        return self._publish_states.retry_failed(now, study_uid=study_uid)

    def republish(
        self, now: datetime, *, study_uid: str | None = None, changed_since: datetime | None = None
    ) -> list[str]:
        return self._publish_states.republish(now, study_uid=study_uid, changed_since=changed_since)

    # ---- the database as a whole --------------------------------------------------------------------------------

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Hold the lock called ``name`` while the block runs, against every bridge sharing this database, for
        work outside the database that must not run twice at once (creating a study's Patient).

        PostgreSQL: a transaction-scoped advisory lock on a 64-bit hash of ``name``, released by the commit
        that ends the block (or when the connection drops). SQLite: a lock in this process, the one that
        publishes from a SQLite index.
        """
        if self._db.dialect != "postgresql":
            with _process_lock(name):
                yield
            return
        key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big", signed=True)
        with self._db.translated_errors(), self._db.engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield

    def check_writable(self) -> str | None:
        """None when a write transaction can be opened now, else why not (for /readyz)."""
        try:
            with self._db.unit_of_work() as session:
                if (
                    self._db.dialect == "postgresql"
                    and session.execute(text("SHOW transaction_read_only")).scalar() == "on"
                ):
                    return "the PostgreSQL database is read-only (a standby?)"
                session.execute(text("SELECT 1"))
        except IndexUnavailableError as exc:
            return str(exc)
        return None
