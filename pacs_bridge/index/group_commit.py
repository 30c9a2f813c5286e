"""Group commit: C-STOREs of concurrent associations share one transaction and one fsync.

Every instance is committed before its success status is sent, and each commit holds the study's lock (the
row lock on PostgreSQL, the database's write lock on SQLite) through its fsync. Associations that send parts
of one study at once therefore queue behind each other, one fsync per instance, however many listener threads
or processes there are.

``GroupCommit`` is an ``InstanceSink`` in front of ``Index``, with a leader and followers: an instance that
arrives while no commit is running is committed at once by its own thread, alone (a single association pays
nothing). Instances arriving while a commit runs wait; when it ends, the first of them leads the next commit,
which takes all that are waiting, in one transaction (``Index.record_instances``). Each thread returns only
after the transaction holding its instance has committed, with its own outcome or error, so the rule "success
only after the commit" holds instance by instance. One bad instance makes the batch fall back to one
transaction each; it never fails the others. The leader takes its batch once it holds the index's writer turn,
so that with several listener processes on one SQLite file, what arrives while another process commits joins it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import datetime

from pacs_bridge.index.repository import Index
from pacs_bridge.records import InstanceRecord, RecordOutcome

MAX_BATCH = 64  # instances per transaction at most; the rest lead the next one


class _Waiting:
    __slots__ = ("leads", "outcome", "received_at", "record", "wake")

    def __init__(self, record: InstanceRecord, received_at: datetime) -> None:
        self.record = record
        self.received_at = received_at
        self.wake = threading.Event()
        self.leads = False
        self.outcome: RecordOutcome | Exception | None = None


class GroupCommit:
    """An ``InstanceSink`` committing concurrent instances together (see the module docstring)."""

    def __init__(self, index: Index) -> None:
        self._index = index
        self._lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._committing = False
        self.batches = 0  # transactions committed through record_instances (read by tests and benchmarks)
        self.largest_batch = 0

    def record_instance(self, record: InstanceRecord, *, received_at: datetime) -> RecordOutcome:
        mine = _Waiting(record, received_at)
        with self._lock:
            self._waiting.append(mine)
            leads = not self._committing
            self._committing = True
        if not leads:
            mine.wake.wait()  # set once my batch has committed, or when it is my turn to lead
            leads = mine.leads
        if leads:
            self._commit_batch_and_pass_lead()
        outcome = mine.outcome
        if isinstance(outcome, Exception):
            raise outcome
        assert outcome is not None
        return outcome

    def _commit_batch_and_pass_lead(self) -> None:
        """Commit what is waiting (the leader's own instance first among it), then pass the lead on.

        The batch is taken once the index's writer turn is ours (``Index.writer_turn``): while another listener
        process commits to the same SQLite file, what arrives here joins this commit instead of the next one.
        What arrives while the batch's statements run joins it too, where the index allows it (``take_late_arrivals``).
        """
        batch: list[_Waiting] = []
        outcomes: Sequence[RecordOutcome | Exception] | None = None
        failure: Exception = RuntimeError("the group commit was interrupted")

        def take_late_arrivals(may_join: Callable[[InstanceRecord], bool]) -> list[tuple[InstanceRecord, datetime]]:
            with self._lock:
                joined = [waiting for waiting in self._waiting if may_join(waiting.record)][: MAX_BATCH - len(batch)]
                if joined:
                    self._waiting = [waiting for waiting in self._waiting if waiting not in joined]
            batch.extend(joined)
            return [(waiting.record, waiting.received_at) for waiting in joined]

        try:
            with self._index.writer_turn():
                batch = self._take_batch()
                outcomes = self._index.record_instances(
                    [(w.record, w.received_at) for w in batch], take_late_arrivals=take_late_arrivals
                )
        except Exception as exc:  # record_instances reports per instance; this is only a last resort
            failure = exc
        finally:
            # Whatever happens, every waiter of this batch gets an outcome and is woken: none may wait forever.
            if not batch:  # the turn itself failed: the leader's own instance is still waiting with the others
                batch = self._take_batch()
            if outcomes is None or len(outcomes) != len(batch):
                outcomes = [failure] * len(batch)
            with self._lock:
                if self._waiting:
                    following = self._waiting[0]
                    following.leads = True
                    following.wake.set()
                else:
                    self._committing = False
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            for waiting, outcome in zip(batch, outcomes, strict=True):
                waiting.outcome = outcome
                waiting.wake.set()

    def _take_batch(self) -> list[_Waiting]:
        with self._lock:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
        return batch
