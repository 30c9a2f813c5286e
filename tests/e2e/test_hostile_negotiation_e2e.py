"""A running bridge (``pacs-bridge run``, both receive paths, both databases) against the association requests
and protocol errors of the QA pass on issue 14: its output stays JSON lines, one line per refused request, and
the open-associations gauge comes back to 0."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import UID

from tests.e2e.test_listener_processes import metric_value
from tests.support.association_requests import (
    CT_IMAGE_STORAGE,
    IMPLICIT_VR_LITTLE_ENDIAN,
    RELEASE_RQ,
    associate_rq,
    c_store_command,
    closed_by_peer,
    p_data_tf,
    presentation_context,
    read_pdu,
    user_information,
)
from tests.support.bridge_process import BridgeProcess, free_port, log_events, wait_for
from tests.support.dcmtk import storescu
from tests.support.studies import SeriesSpec, new_study_uid, uid, write_study

pytestmark = [pytest.mark.dcmtk]

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_RELEASE_RP, A_ABORT = 0x02, 0x03, 0x06, 0x07
MALFORMED = 20
LARGE = 4
# QA's request of 157 kB: 128 contexts of 46 transfer syntaxes, UIDs 1.2.840.10008.1.2.4.50 to .94 (of which
# only some are transfer syntaxes) and Implicit VR Little Endian.
PROPOSED_TRANSFER_SYNTAXES = [f"1.2.840.10008.1.2.4.{n}".encode() for n in range(50, 95)]
UNKNOWN_PER_CONTEXT = sum(UID(uid.decode()).type != "Transfer Syntax" for uid in PROPOSED_TRANSFER_SYNTAXES)
LARGE_REQUEST = associate_rq(
    [
        presentation_context(
            2 * n + 1,
            CT_IMAGE_STORAGE if n == 0 else f"1.2.840.10008.5.1.4.1.1.{n + 1000}".encode(),
            [*PROPOSED_TRANSFER_SYNTAXES, IMPLICIT_VR_LITTLE_ENDIAN],
        )
        for n in range(128)
    ]
)


@pytest.fixture
def http_port() -> int:
    return free_port()


@pytest.fixture
def bridge(tmp_path: Path, database_url: str, http_port: int) -> Iterator[BridgeProcess]:
    """A bridge whose FHIR server is a closed port (nothing becomes due) with its metrics on ``http_port``."""
    process = BridgeProcess(
        tmp_path,
        database_url=database_url,
        fhir_base_url=f"http://127.0.0.1:{free_port()}/fhir",
        quiet_seconds=3600,
        max_delay_seconds=3600,
        extra={"http": {"bind": "127.0.0.1", "port": http_port}},
    )
    try:
        yield process.start()
    finally:
        process.close()


def connect(port: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def answer_to(port: int, request: bytes) -> int | None:
    """The type of the PDU answering ``request`` (released again when it is an A-ASSOCIATE-AC)."""
    with connect(port) as connection:
        connection.sendall(request)
        answer = read_pdu(connection, timeout=30)
        if answer is not None and answer[0] == A_ASSOCIATE_AC:
            connection.sendall(RELEASE_RQ)
            read_pdu(connection, timeout=30)
        return None if answer is None else answer[0]


def test_hostile_requests_get_their_answers_and_the_log_stays_one_json_object_a_line(
    bridge: BridgeProcess, http_port: int, tmp_path: Path
) -> None:
    """QA findings F1 to F5 against one bridge: 20 requests with a context lacking its transfer syntax
    (A-ABORT each), a maximum length of 6 (A-ASSOCIATE-RJ), 4 requests of 157 kB with thousands of unknown transfer
    syntax UIDs each (accepted: one summarising line each instead of 2,560 warnings), a second A-RELEASE-RQ
    after the first (pynetdicom's thread dies: one warning line, not a plain-text traceback), a command set
    without its Affected SOP Instance UID (an abort, its end line, the gauge back to 0). storescu then stores a
    study, and every line the bridge wrote is a JSON object."""
    port = bridge.port
    no_transfer_syntax = associate_rq([presentation_context(1, CT_IMAGE_STORAGE, ())])
    assert [answer_to(port, no_transfer_syntax) for _ in range(MALFORMED)] == [A_ABORT] * MALFORMED
    assert answer_to(port, associate_rq(user_info=user_information(6))) == A_ASSOCIATE_RJ
    assert [answer_to(port, LARGE_REQUEST) for _ in range(LARGE)] == [A_ASSOCIATE_AC] * LARGE

    with connect(port) as connection:  # a release asked twice
        connection.sendall(associate_rq())
        assert read_pdu(connection, timeout=30) is not None
        connection.sendall(RELEASE_RQ + RELEASE_RQ)
        answer = read_pdu(connection, timeout=30)  # the release, or an abort for the second request
        assert answer is not None and answer[0] in (A_RELEASE_RP, A_ABORT)
        assert closed_by_peer(connection, timeout=30)

    with connect(port) as connection:  # a command set pynetdicom cannot decode
        connection.sendall(associate_rq([presentation_context(1, CT_IMAGE_STORAGE, (IMPLICIT_VR_LITTLE_ENDIAN,))]))
        assert read_pdu(connection, timeout=30) is not None
        connection.sendall(p_data_tf(1, 0x03, c_store_command(uid("9.3").encode(), leave_out=(0x1000,))))
        assert closed_by_peer(connection, timeout=30)

    study_uid = new_study_uid()
    write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 2)])
    result = storescu(port, tmp_path / "study")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(
        lambda: metric_value(http_port, "pacs_bridge_open_associations") == 0,
        timeout=30,
        what="/metrics to show no open association",
    )
    assert bridge.stop() == 0

    output = bridge.log()
    not_json = [line for line in output.splitlines() if not isinstance(_json_object(line), dict)]
    assert not_json == [], "\n".join(not_json[:20])
    lines = [json.loads(line) for line in output.splitlines()]
    refused = log_events(output, "association_request_refused")
    assert [event["reason"] for event in refused] == ["invalid_presentation_context"] * MALFORMED + [
        "maximum_length_too_small"
    ]
    summaries = log_events(output, "unknown_transfer_syntaxes_proposed")
    assert [event["unknown_transfer_syntaxes"] for event in summaries] == [128 * UNKNOWN_PER_CONTEXT] * LARGE
    assert not [line for line in lines if line.get("logger") == "pynetdicom.presentation"]
    assert len(lines) < 200, f"{len(lines)} lines"
    ended = log_events(output, "association_released", "association_aborted")
    established = log_events(output, "association_established")
    assert len(ended) == len(established)


def _json_object(line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
