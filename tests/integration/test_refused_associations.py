"""Refused associations free their thread and ``max_associations`` slot at once, however their peer goes on
(dicom/final_answer.py, dicom/connection.py), and are counted by reason, against a real listener on both receive
paths and both databases: a flood of refused requests whose peers hold their connections open and send one byte
more never keeps storescu out, and threads and file descriptors come back."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pacs_bridge.dicom.access import CallingAeRule, parse_network
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.repository import Index, StateCounts
from pacs_bridge.metrics import BridgeMetrics
from pacs_bridge.observe import ASSOCIATION_REFUSAL_REASONS
from tests.integration.conftest import listener_settings
from tests.support.association_requests import associate_rq, p_data_tf, read_pdu, user_information
from tests.support.associations import wait_for_associations_to_end
from tests.support.dcmtk import storescu
from tests.support.resources import Resources, back_to
from tests.support.studies import SeriesSpec, new_study_uid, write_study

pytestmark = pytest.mark.dcmtk

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT = 0x02, 0x03, 0x07
MAX_ASSOCIATIONS = 4
FLOOD_SECONDS = 20.0  # beyond max_associations refused peers each holding a slot until a 30 s timeout
FLOOD_INTERVAL_SECONDS = 0.2
STORESCU_EVERY_SECONDS = 3.0
ANSWER_SECONDS = 5.0
ONE_MORE_BYTE = b"\x04"  # the first byte of a P-DATA-TF PDU that never comes whole


@pytest.fixture
def metrics() -> BridgeMetrics:
    return BridgeMetrics(lambda: StateCounts(pending=0, published=0, failed=0))


@pytest.fixture
def listener(index: Index, receive_path: str, metrics: BridgeMetrics) -> Iterator[DicomListener]:
    """A listener with the default timeouts (30 s), a few association slots, and an allow-list that lets MODALITY
    in from anywhere and HOSTILE only from an address the tests do not have (refused once established)."""
    allowed = (
        CallingAeRule(ae_title="MODALITY"),
        CallingAeRule(ae_title="HOSTILE", networks=(parse_network("192.0.2.0/24"),)),
    )
    running = DicomListener(
        listener_settings(receive_path, max_associations=MAX_ASSOCIATIONS, allowed_calling_aets=allowed),
        index,
        clock=lambda: datetime.now(UTC),
        observer=metrics,
    )
    running.start()
    yield running
    running.stop(drain_timeout_seconds=5)


NO_ANSWER = -1  # nothing within ANSWER_SECONDS


def answer_to(connection: socket.socket) -> int | None:
    """The type of the next PDU the bridge sends, None when it closes the connection first, or NO_ANSWER."""
    try:
        pdu = read_pdu(connection, timeout=ANSWER_SECONDS)
    except TimeoutError:
        return NO_ANSWER
    return None if pdu is None else pdu[0]


def connect(port: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def byte_before_the_answer(port: int) -> tuple[socket.socket, int | None]:
    """A request to a called AE title not the bridge's, followed at once by one byte more."""
    connection = connect(port)
    connection.sendall(associate_rq(called="NOT_THE_BRIDGE") + ONE_MORE_BYTE)
    return connection, answer_to(connection)


def byte_after_the_rejection(port: int) -> tuple[socket.socket, int | None]:
    """A request to a called AE title not the bridge's; once it is rejected, one byte more."""
    connection = connect(port)
    connection.sendall(associate_rq(called="NOT_THE_BRIDGE"))
    answer = answer_to(connection)
    _send_quietly(connection, ONE_MORE_BYTE)
    return connection, answer


def byte_after_the_abort(port: int) -> tuple[socket.socket, int | None]:
    """A request from an AE title not allowed from this address: accepted, then aborted; then one byte more."""
    connection = connect(port)
    connection.sendall(associate_rq(calling="HOSTILE"))
    answer = answer_to(connection)
    if answer == A_ASSOCIATE_AC:
        answer = answer_to(connection)
    _send_quietly(connection, ONE_MORE_BYTE)
    return connection, answer


def _send_quietly(connection: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the bridge closed first: what this peer does next does not matter
        connection.sendall(data)


ATTACKS = (byte_before_the_answer, byte_after_the_rejection, byte_after_the_abort)


def test_refused_peers_holding_their_connections_never_keep_a_sender_out(
    listener: DicomListener, metrics: BridgeMetrics, tmp_path: Path
) -> None:
    warm_up = tmp_path / "warm-up"
    write_study(warm_up, new_study_uid(), [SeriesSpec("CT", 1)])
    assert storescu(listener.port, warm_up, timeout=60).returncode == 0
    wait_for_associations_to_end(listener)
    baseline = Resources.of()

    held: list[socket.socket] = []
    answers: Counter[tuple[str, int | None]] = Counter()
    stop = threading.Event()

    def flood() -> None:
        attacks = 0
        while not stop.is_set():
            attack = ATTACKS[attacks % len(ATTACKS)]
            connection, answer = attack(listener.port)
            held.append(connection)
            answers[(attack.__name__, answer)] += 1
            attacks += 1
            stop.wait(FLOOD_INTERVAL_SECONDS)

    flooding = threading.Thread(target=flood, name="refused-flood", daemon=True)
    flooding.start()
    results = []
    try:
        started = time.monotonic()
        while time.monotonic() - started < FLOOD_SECONDS:
            time.sleep(STORESCU_EVERY_SECONDS)
            directory = tmp_path / f"send-{len(results)}"
            write_study(directory, new_study_uid(), [SeriesSpec("CT", 1)])
            result = storescu(listener.port, directory, timeout=60)
            results.append(result)
            assert result.returncode == 0, result.stdout + result.stderr
    finally:
        stop.set()
        flooding.join(timeout=30)
        held_during_flood = len(held)
        for connection in held:
            connection.close()

    assert len(results) >= 5
    assert held_during_flood > 3 * MAX_ASSOCIATIONS
    # Every peer got its refusal, or an A-ABORT, or at least a closed connection: none was left waiting.
    for (attack, answer), _count in answers.items():
        if attack == "byte_before_the_answer":
            assert answer in (A_ABORT, None), answers
        elif attack == "byte_after_the_rejection":
            assert answer == A_ASSOCIATE_RJ, answers
        else:  # an association refused once established: pynetdicom may close before its A-ABORT goes out
            assert answer in (A_ABORT, None), answers
    wait_for_associations_to_end(listener)
    assert listener.associations == []
    # An association ended without its event is counted closed by the listener's next look (at least 1/s).
    deadline = time.monotonic() + ANSWER_SECONDS
    while open_associations(metrics) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_associations(metrics) == 0
    back_to(baseline)


def open_associations(metrics: BridgeMetrics) -> float | None:
    return metrics.registry.get_sample_value("pacs_bridge_open_associations")


def refused(metrics: BridgeMetrics) -> dict[str, float]:
    return {
        reason: metrics.registry.get_sample_value("pacs_bridge_associations_refused_total", {"reason": reason}) or 0.0
        for reason in ASSOCIATION_REFUSAL_REASONS
    }


def test_each_refusal_is_counted_by_its_reason(listener: DicomListener, metrics: BridgeMetrics) -> None:
    assert set(refused(metrics).values()) == {0.0}  # every reason exported from the start
    requests = {
        "malformed_request": p_data_tf(1, 0x03, b"\0" * 8),  # not an association request
        "request_not_served": associate_rq(user_info=user_information(maximum_length=16)),
        "called_ae_title": associate_rq(called="NOT_THE_BRIDGE"),
        "calling_ae_title": associate_rq(calling="NOBODY"),
        "address_not_allowed": associate_rq(calling="HOSTILE"),
    }
    for request in requests.values():
        with connect(listener.port) as connection:
            connection.sendall(request)
            answer = answer_to(connection)
            if answer == A_ASSOCIATE_AC:
                answer = answer_to(connection)
            assert answer in (A_ASSOCIATE_RJ, A_ABORT, None)
    open_ones = []
    try:
        for _slot in range(MAX_ASSOCIATIONS):
            connection = connect(listener.port)
            open_ones.append(connection)
            connection.sendall(associate_rq(calling="MODALITY"))
            assert answer_to(connection) == A_ASSOCIATE_AC
        with connect(listener.port) as connection:
            connection.sendall(associate_rq(calling="MODALITY"))
            assert answer_to(connection) == A_ASSOCIATE_RJ
    finally:
        for connection in open_ones:
            connection.close()

    deadline = time.monotonic() + ANSWER_SECONDS
    expected = {reason: 1.0 for reason in [*requests, "too_many_associations"]} | {"other": 0.0}
    while refused(metrics) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused(metrics) == expected
