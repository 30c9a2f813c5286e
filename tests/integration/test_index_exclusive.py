"""Index.exclusive: a named lock held across every bridge sharing the database (two engines stand for two
bridges), used to create a study's Patient once when two bridges publish studies of one new patient at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.fhir.client import CreateResult
from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.fhir.resource import FhirResource
from pacs_bridge.index import repository
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.repository import Index
from pacs_bridge.publish.patients import PatientResolver
from pacs_bridge.records import StudyAttributes
from tests.conftest import MAX_DELAY, QUIET

CREATE_SECONDS = 0.3  # long enough for the two creates to overlap if nothing keeps them apart


class SlowServer:
    """Stands in for the FHIR client: each conditional create takes CREATE_SECONDS; it records how many ran at
    once. (Whether a real server makes If-None-Exist atomic varies; what is tested here is our lock.)"""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self.running = 0
        self.most_at_once = 0

    def create(self, resource: FhirResource, *, if_none_exist: str | None = None) -> CreateResult:
        with self._guard:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(CREATE_SECONDS)
        with self._guard:
            self.running -= 1
        return CreateResult(http_status=200, resource_id="p1")


@pytest.fixture
def second_index(database_url: str, engine: Engine) -> Iterator[Index]:
    """Another bridge on the same database: its own engine, its own connections."""
    other = make_engine(database_url)
    yield Index(other, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
    other.dispose()


def create_at_once(indexes: list[Index | None], server: SlowServer) -> list[str | None]:
    mapping = MappingSettings(patient_identifier_system="urn:oid:1.2.3.4", patient_mode="create")
    study = StudyAttributes(study_uid="1.2.3", patient_id="PAT-NEW", patient_name="Doe^Jane")
    results: list[str | None] = [None] * len(indexes)
    start = threading.Barrier(len(indexes))

    def publish(position: int, index: Index | None) -> None:
        resolver = PatientResolver(server, mapping, exclusive=index.exclusive if index else None)  # type: ignore[arg-type]
        start.wait()
        results[position] = resolver.reference(study)

    threads = [threading.Thread(target=publish, args=(n, index)) for n, index in enumerate(indexes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_two_bridges_never_create_the_same_patient_at_once(index: Index, second_index: Index) -> None:
    """Both publish a study of one new patient at the same moment: the second create waits for the first."""
    server = SlowServer()

    assert create_at_once([index, second_index], server) == ["Patient/p1", "Patient/p1"]
    assert server.most_at_once == 1


def test_without_the_lock_the_creates_overlap() -> None:
    """The control: the same two publishers without Index.exclusive create at the same time."""
    server = SlowServer()

    create_at_once([None, None], server)

    assert server.most_at_once == 2


def test_locks_of_different_names_do_not_wait_for_each_other(index: Index, second_index: Index) -> None:
    """One bridge holds the lock for one patient; the other takes another patient's lock meanwhile."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with index.exclusive("create Patient a|1"):
            held.set()
            release.wait(timeout=30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(timeout=30)
    try:
        with second_index.exclusive("create Patient a|2"):
            pass  # would block until release if the names shared one lock
        assert holder.is_alive(), "the first lock is still held"
    finally:
        release.set()
        holder.join()


def test_no_lock_name_is_kept_once_released(index: Index, second_index: Index) -> None:
    """Lock names carry PatientIDs: once nobody holds or waits for a lock, the process forgets its name."""
    create_at_once([index, second_index], SlowServer())

    assert repository._named_locks == {}
