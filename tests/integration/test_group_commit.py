"""Group commit (index/group_commit.py) on the real index: instances waiting behind a commit share the next one."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.errors import ConflictingInstanceError, IndexUnavailableError
from pacs_bridge.index.engine import make_engine, writer_queue
from pacs_bridge.index.group_commit import GroupCommit
from pacs_bridge.index.ingest import TakeLateArrivals
from pacs_bridge.index.repository import Index
from pacs_bridge.index.schema import prepare_schema
from pacs_bridge.records import InstanceRecord, RecordOutcome
from tests.conftest import MAX_DELAY, QUIET, FakeClock
from tests.integration.test_index import record, study_row
from tests.support.bridge_process import wait_for
from tests.support.studies import uid

Outcome = RecordOutcome | Exception


class HeldIndex:
    """The index, with its first ``record_instances`` call held until ``release``: the others pile up meanwhile.
    That first commit takes no one else in (as if its statements had run before the others arrived)."""

    def __init__(self, index: Index) -> None:
        self._index = index
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def writer_turn(self) -> AbstractContextManager[Any]:
        return self._index.writer_turn()

    def record_instances(
        self, batch: Sequence[tuple[InstanceRecord, datetime]], *, take_late_arrivals: TakeLateArrivals
    ) -> list[Outcome]:
        self.batches.append(len(batch))
        if len(self.batches) == 1:
            self.entered.set()
            self.release.wait(30)
            return self._index.record_instances(batch)
        return self._index.record_instances(batch, take_late_arrivals=take_late_arrivals)


def run_concurrently(
    group: GroupCommit, held: HeldIndex, first: InstanceRecord, others: list[InstanceRecord], clock: FakeClock
) -> tuple[Outcome, list[Outcome]]:
    """``first`` leads a commit that is held; ``others`` arrive meanwhile; then the commit is let go."""
    results: dict[int, Outcome] = {}

    def send(number: int, item: InstanceRecord) -> Callable[[], None]:
        def run() -> None:
            try:
                results[number] = group.record_instance(item, received_at=clock())
            except Exception as exc:
                results[number] = exc

        return run

    threads = [threading.Thread(target=send(0, first))]
    threads[0].start()
    assert held.entered.wait(30)
    for number, item in enumerate(others, start=1):
        threads.append(threading.Thread(target=send(number, item)))
        threads[-1].start()
    wait_for(lambda: len(group._waiting) == len(others), timeout=30, what="the others to wait behind the commit")
    held.release.set()
    for thread in threads:
        thread.join(30)
    return results[0], [results[number] for number in range(1, len(others) + 1)]


def test_instances_arriving_during_a_commit_share_the_next_transaction(
    index: Index, engine: Engine, clock: FakeClock
) -> None:
    """One commit runs while three instances arrive: those three are committed together, each is NEW, and the
    study counts one change per instance, as if each had been committed alone."""
    held = HeldIndex(index)
    group = GroupCommit(held)  # type: ignore[arg-type]
    others = [record(instance=f"1.1.{number}", number=number) for number in (2, 3, 4)]
    first, rest = run_concurrently(group, held, record(instance="1.1.1"), others, clock)
    assert first is RecordOutcome.NEW
    assert rest == [RecordOutcome.NEW] * 3
    assert held.batches == [1, 3]
    assert (group.batches, group.largest_batch) == (2, 3)
    assert study_row(engine).change_seq == 4
    # A single caller commits alone, at once, without any other thread.
    assert group.record_instance(record(instance="1.1.5", number=5), received_at=clock()) is RecordOutcome.NEW
    assert held.batches == [1, 3, 1]


def test_instances_arriving_while_another_process_commits_join_the_waiting_leaders_batch(tmp_path: Path) -> None:
    """On an SQLite file shared by listener processes, a leader that waits for the writer turn another process
    holds takes its batch only once the turn is its own: the two instances that arrived meanwhile are committed
    with its own, in one transaction, not in the next."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    this_engine, other_engine = make_engine(url), make_engine(url)
    try:
        prepare_schema(this_engine, upgrade=True)
        index = Index(this_engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
        group = GroupCommit(index)
        other_process = writer_queue(other_engine)
        assert other_process is not None
        outcomes: list[Outcome] = []

        def send(number: int) -> threading.Thread:
            item = record(instance=f"1.1.{number}", number=number)
            thread = threading.Thread(
                target=lambda: outcomes.append(group.record_instance(item, received_at=datetime.now(UTC)))
            )
            thread.start()
            return thread

        with other_process.turn():
            senders = [send(1)]
            wait_for(lambda: group._committing, timeout=30, what="the first instance to lead a commit")
            senders += [send(2), send(3)]
            wait_for(lambda: len(group._waiting) == 3, timeout=30, what="all three to wait for the turn")
        for sender in senders:
            sender.join(30)
        assert outcomes == [RecordOutcome.NEW] * 3
        assert (group.batches, group.largest_batch) == (1, 3)
    finally:
        this_engine.dispose()
        other_engine.dispose()


def test_one_bad_instance_in_a_batch_fails_alone(index: Index, engine: Engine, clock: FakeClock) -> None:
    """An instance whose UID is already indexed in another series is refused; the two beside it in its batch
    are indexed all the same."""
    index.record_instance(record(series="1.9", instance="1.9.1"), received_at=clock())
    held = HeldIndex(index)
    group = GroupCommit(held)  # type: ignore[arg-type]
    others = [record(instance="1.1.2", number=2), record(instance="1.9.1"), record(instance="1.1.3", number=3)]
    first, rest = run_concurrently(group, held, record(instance="1.1.1"), others, clock)
    assert first is RecordOutcome.NEW
    assert rest[0] is RecordOutcome.NEW and rest[2] is RecordOutcome.NEW
    assert isinstance(rest[1], ConflictingInstanceError)
    assert held.batches == [1, 3]
    assert study_row(engine).change_seq == 4  # 1.9.1, then 1.1.1, 1.1.2, 1.1.3


def test_many_threads_at_once_index_every_instance_once(index: Index, engine: Engine, clock: FakeClock) -> None:
    """Eight threads recording 20 instances each through one GroupCommit: all 160 indexed, none twice."""
    group = GroupCommit(index)
    failures: list[BaseException] = []
    threads = 8

    def send(thread: int) -> None:
        try:
            for number in range(1, 21):
                item = record(series=f"1.{thread + 1}", instance=f"1.{thread + 1}.{number}", number=number)
                assert group.record_instance(item, received_at=clock()) is RecordOutcome.NEW
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=send, args=(thread,)) for thread in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert failures == []
    assert study_row(engine).change_seq == threads * 20


def test_a_failing_database_fails_the_whole_batch_at_once(database_url: str, tmp_path: Path, clock: FakeClock) -> None:
    """When the database cannot be written, every instance of a batch gets the same IndexUnavailableError: the
    batch is not retried instance by instance (on SQLite each retry could wait out the busy timeout again)."""
    if database_url.startswith("sqlite"):
        broken_url = f"sqlite:///{tmp_path / 'missing-dir' / 'index.db'}"
    else:
        broken_url = "postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2"
    broken = make_engine(broken_url)
    try:
        outcomes = Index(broken, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY)).record_instances(
            [(record(instance="1.1.1"), clock()), (record(instance="1.1.2", number=2), clock())]
        )
    finally:
        broken.dispose()
    assert isinstance(outcomes[0], IndexUnavailableError)
    assert outcomes[1] is outcomes[0]


class JoinWatchingIndex:
    """The index; when its first transaction asks who joins, it first lets ``arrive`` send more instances."""

    def __init__(self, index: Index, arrive: Callable[[], None]) -> None:
        self._index = index
        self._arrive = arrive

    def writer_turn(self) -> AbstractContextManager[Any]:
        return self._index.writer_turn()

    def record_instances(
        self, batch: Sequence[tuple[InstanceRecord, datetime]], *, take_late_arrivals: TakeLateArrivals
    ) -> list[Outcome]:
        def taking_after_arrivals(
            may_join: Callable[[InstanceRecord], bool],
        ) -> Sequence[tuple[InstanceRecord, datetime]]:
            arrive, self._arrive = self._arrive, lambda: None
            arrive()
            return take_late_arrivals(may_join)

        return self._index.record_instances(batch, take_late_arrivals=taking_after_arrivals)


@pytest.mark.postgresql
def test_on_postgresql_instances_arriving_during_the_statements_join_the_commit(
    postgres_schema_url: str, clock: FakeClock
) -> None:
    """A bridge on PostgreSQL records its batch (its study locked); two instances of that study arriving before
    the commit join it: one transaction, three instances, each NEW."""
    engine = make_engine(postgres_schema_url)
    prepare_schema(engine)
    senders: list[threading.Thread] = []
    outcomes: list[Outcome] = []

    def send(number: int) -> None:
        item = record(instance=f"1.1.{number}", number=number)
        senders.append(
            threading.Thread(target=lambda: outcomes.append(group.record_instance(item, received_at=clock())))
        )
        senders[-1].start()

    def two_arrive() -> None:
        send(2)
        send(3)
        wait_for(lambda: len(group._waiting) == 2, timeout=30, what="two instances to wait for the commit")

    try:
        index = Index(engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
        group = GroupCommit(JoinWatchingIndex(index, two_arrive))  # type: ignore[arg-type]
        assert group.record_instance(record(instance="1.1.1"), received_at=clock()) is RecordOutcome.NEW
        for sender in senders:
            sender.join(30)
        assert outcomes == [RecordOutcome.NEW] * 2
        assert (group.batches, group.largest_batch) == (1, 3)
        assert index.load_snapshot(uid("1")).number_of_instances == 3
    finally:
        engine.dispose()
