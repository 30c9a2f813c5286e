"""Unit tests for ``pacs_bridge.logs``: the processors that keep patient data and passwords out of the logs."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from pacs_bridge.logs import (
    PATIENT_DATA_KEYS,
    configure_logging,
    drop_patient_data,
    log_thread_exception,
    redact_secrets,
)


def test_drop_patient_data_removes_patient_keys_and_keeps_the_rest() -> None:
    """Patient name, ID, birth date and sex go; the event, UIDs and other context stay untouched."""
    event: dict[str, Any] = {
        "event": "instance_stored",
        "level": "info",
        "study_uid": "1.2.826.0.1.3680043.10.1482.1",
        "calling_ae": "MODALITY1",
        "attempt": 2,
        "patient_name": "Doe^Jane",
        "patient_id": "PAT-0001",
        "patient_birth_date": "19700101",
        "birth_date": "19700101",
        "patient_sex": "F",
    }

    result = drop_patient_data(None, "info", event)

    assert result == {
        "event": "instance_stored",
        "level": "info",
        "study_uid": "1.2.826.0.1.3680043.10.1482.1",
        "calling_ae": "MODALITY1",
        "attempt": 2,
    }


PATIENT_KEY_ROWS = [
    "patient_name",  # PatientName (0010,0010)
    "patient_id",  # PatientID (0010,0020)
    "patient_birth_date",  # PatientBirthDate (0010,0030)
    "birth_date",  # the same under a shorter name
    "patient_sex",  # PatientSex (0010,0040)
]


@pytest.mark.parametrize("key", PATIENT_KEY_ROWS)
def test_drop_patient_data_removes_each_patient_key(key: str) -> None:
    """Each key in PATIENT_DATA_KEYS is removed on its own, whatever its value."""
    assert drop_patient_data(None, "warning", {"event": "x", key: "secret"}) == {"event": "x"}


def test_the_table_covers_every_patient_data_key() -> None:
    """A key added to PATIENT_DATA_KEYS must get a row in the table above, and the table holds no other."""
    assert set(PATIENT_KEY_ROWS) == PATIENT_DATA_KEYS


def test_drop_patient_data_leaves_an_event_without_patient_keys_unchanged() -> None:
    """Nothing to drop: the same mapping comes back with the same content."""
    event: dict[str, Any] = {"event": "study_published", "study_uid": "1.2.3", "http_status": 201}

    result = drop_patient_data(None, "info", dict(event))

    assert result == event


def test_drop_patient_data_returns_the_mapping_it_was_given() -> None:
    """Like other structlog processors it edits and returns the event dict, so the chain continues with it."""
    event: dict[str, Any] = {"event": "x", "patient_id": "PAT-0001"}

    assert drop_patient_data(None, "info", event) is event


def test_redact_secrets_hides_url_passwords_in_every_string_value() -> None:
    """The event text (a library's message) and our own keys lose the userinfo of their URLs; the rest stays."""
    event: dict[str, Any] = {
        "event": "HTTP Request: GET http://user:s3cret@fhir.example.org/fhir/metadata 200",
        "fhir_base_url": "http://user:s3cret@fhir.example.org/fhir",
        "attempt": 2,
    }

    result = redact_secrets(None, "info", event)

    assert result == {
        "event": "HTTP Request: GET http://***@fhir.example.org/fhir/metadata 200",
        "fhir_base_url": "http://***@fhir.example.org/fhir",
        "attempt": 2,
    }


def test_configured_logging_hides_url_passwords_in_library_lines_and_tracebacks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through the configured pipeline, a stdlib logger's line and a logged exception's traceback show no password."""
    structlog_config = structlog.get_config()
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    try:
        configure_logging("info", "json")
        logging.getLogger("httpx").warning("GET %s failed", "http://user:s3cret@fhir.example.org/fhir")
        try:
            raise ValueError("cannot parse postgresql://bridge:s3cret@db/pacs")
        except ValueError:
            structlog.get_logger("pacs_bridge.test").exception("startup_failed")
    finally:
        structlog.configure(**structlog_config)
        root.handlers[:], root.level = root_handlers, root_level
    output = capsys.readouterr().out
    assert "http://***@fhir.example.org/fhir" in output and "postgresql://***@db/pacs" in output
    assert "s3cret" not in output


def run_thread_that_fails(target: Any) -> None:
    thread = threading.Thread(target=target, name="failing-thread")
    thread.start()
    thread.join()


def a_peer_protocol_error() -> None:
    """What pynetdicom raises on a request with an even presentation context ID (QA finding F2)."""
    from pynetdicom.presentation import PresentationContext

    PresentationContext().context_id = 2


def a_bridge_defect() -> None:
    raise KeyError("a defect of the bridge's own")


@pytest.fixture
def logging_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The test may configure logging as the bridge's processes do, thread hook included; the previous set-up
    comes back afterwards. pytest's own thread hook, which ``configure_logging`` leaves in place, is swapped out
    for Python's default meanwhile."""
    structlog_config = structlog.get_config()
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    try:
        yield
    finally:
        structlog.configure(**structlog_config)
        root.handlers[:], root.level = root_handlers, root_level


def test_an_exception_ending_a_thread_in_pynetdicom_is_one_json_warning_without_a_traceback(
    logging_restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """QA finding F3: Python's default hook printed a multi-line plain-text traceback, which a JSON-lines
    consumer cannot parse; a peer's protocol error is a warning, not an error with a traceback."""
    configure_logging("info", "json")
    assert threading.excepthook is log_thread_exception
    run_thread_that_fails(a_peer_protocol_error)
    captured = capsys.readouterr()
    (line,) = captured.out.splitlines()
    event = json.loads(line)
    assert (event["event"], event["level"], event["thread"]) == (
        "association_thread_failed",
        "warning",
        "failing-thread",
    )
    assert event["error"].startswith("ValueError: 'context_id' must be an odd integer")
    assert "exception" not in event and captured.err == ""


def test_an_exception_ending_a_thread_in_the_bridges_code_is_one_json_error_with_its_traceback(
    logging_restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "json")
    run_thread_that_fails(a_bridge_defect)
    captured = capsys.readouterr()
    (line,) = captured.out.splitlines()
    event = json.loads(line)
    assert (event["event"], event["level"]) == ("thread_failed", "error")
    assert 'KeyError: "a defect of the bridge\'s own"' in event["exception"]
    assert captured.err == ""


def test_pynetdicoms_warning_for_each_unknown_transfer_syntax_is_held_back(
    logging_restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """QA finding F4: one request proposing 2,560 unknown transfer syntax UIDs wrote 2,560 lines; the front door
    logs one line per request instead (unknown_transfer_syntaxes_proposed)."""
    from pynetdicom.presentation import PresentationContext

    configure_logging("info", "json")
    context = PresentationContext()
    for number in range(50):
        context.add_transfer_syntax(f"1.2.840.10008.1.2.4.{300 + number}")  # DICOM root, not a transfer syntax
    logging.getLogger("pynetdicom").warning("a line pynetdicom's other loggers still write")
    assert capsys.readouterr().out.count("\n") == 1
