"""What dicom/message_screen.py does with each DIMSE message, and which pynetdicom releases it serves."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog
import structlog.testing
from pynetdicom.dimse_primitives import (
    C_CANCEL,
    C_ECHO,
    C_FIND,
    C_STORE,
    N_ACTION,
    N_EVENT_REPORT,
)

from pacs_bridge.dicom import message_screen
from pacs_bridge.dicom.message_screen import Ignore, Refuse

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"


def store_request() -> C_STORE:
    primitive = C_STORE()
    primitive.MessageID, primitive.Priority = 1, 2
    primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = CT, "1.2.3"
    return primitive


def store_response() -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo, primitive.Status = 1, 0x0000
    return primitive


def echo(sop_class: str) -> C_ECHO:
    primitive = C_ECHO()
    primitive.MessageID, primitive.AffectedSOPClassUID = 1, sop_class
    return primitive


def find() -> C_FIND:
    primitive = C_FIND()
    primitive.MessageID, primitive.AffectedSOPClassUID = 9, CT
    return primitive


def action() -> N_ACTION:
    primitive = N_ACTION()
    primitive.MessageID, primitive.ActionTypeID = 5, 1
    primitive.RequestedSOPClassUID, primitive.RequestedSOPInstanceUID = CT, "1.2.3"
    return primitive


def event_report_response() -> N_EVENT_REPORT:
    primitive = N_EVENT_REPORT()
    primitive.MessageIDBeingRespondedTo, primitive.Status = 5, 0x0000
    return primitive


def cancel() -> C_CANCEL:
    primitive = C_CANCEL()
    primitive.MessageIDBeingRespondedTo = 1
    return primitive


@pytest.mark.parametrize(
    ("message", "name", "expected"),
    [
        (store_request(), "C-STORE-RQ", None),  # what the bridge is for: pynetdicom's (the C-STORE handler)
        (echo(VERIFICATION), "C-ECHO-RQ", None),  # Verification: pynetdicom's, Success
        (echo(CT), "C-ECHO-RQ", Refuse),  # a C-ECHO naming a storage SOP class
        (find(), "C-FIND-RQ", Refuse),  # no query service
        (action(), "N-ACTION-RQ", Refuse),  # no DIMSE-N service at all
        (store_response(), "C-STORE-RSP", Ignore),  # the bridge sends no requests: every response is stray
        (event_report_response(), "N-EVENT-REPORT-RSP", Ignore),
        (cancel(), "C-CANCEL-RQ", Ignore),  # C-CANCEL has no response, and nothing is pending
    ],
)
def test_each_message_is_served_refused_or_ignored(message: Any, name: str, expected: type | None) -> None:
    answer = message_screen.verdict(message, context_sop_class=CT)
    assert message_screen.message_name(message) == name
    assert (type(answer) if answer is not None else None) is expected


@pytest.mark.parametrize(
    ("request_class", "context_class", "expected"),
    [
        (CT, CT, None),  # pynetdicom's Storage SCP serves it
        ("1.2.840.10008.5.1.4.1.1.4", CT, None),  # MR on a CT context: the Storage SCP too (the handler: 0xA900)
        ("31", CT, message_screen.ServeAsStorage),  # pynetdicom has no service for "31": it would abort
        ("1.2.3.4.5", CT, message_screen.ServeAsStorage),  # nor for an unknown UID
        (VERIFICATION, CT, message_screen.ServeAsStorage),  # its Verification SCP cannot serve a C-STORE
        ("31", VERIFICATION, None),  # not a storage context: pynetdicom's own answer
    ],
)
def test_a_c_store_naming_no_storage_sop_class_on_a_storage_context_goes_to_the_storage_scp(
    request_class: str, context_class: str, expected: type | None
) -> None:
    request = store_request()
    request.AffectedSOPClassUID = request_class
    answer = message_screen.verdict(request, context_sop_class=context_class)
    assert (type(answer) if answer is not None else None) is expected


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (find(), {"AffectedSOPClassUID": CT}),  # DIMSE-C: the SOP class
        (action(), {"AffectedSOPClassUID": CT, "AffectedSOPInstanceUID": "1.2.3"}),  # DIMSE-N: and the instance
    ],
)
def test_a_refusal_is_the_requests_own_response_with_0x0211(request_: Any, fields: dict[str, str]) -> None:
    response = message_screen.refusal(request_)
    assert type(response) is type(request_)
    assert (response.MessageIDBeingRespondedTo, response.Status) == (request_.MessageID, 0x0211)
    assert {name: str(getattr(response, name)) for name in fields} == fields
    assert response.is_valid_response


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("3.0.4", True),  # the release _serve_request was read in
        ("3.0.0", True),  # any 3.0.x
        ("3.1.0", False),  # the next minor release may change any internal
        ("2.1.1", False),
    ],
)
def test_only_the_releases_the_screen_was_written_for_are_supported(version: str, supported: bool) -> None:
    assert message_screen.is_supported(version) is supported


def test_an_unsupported_release_leaves_pynetdicom_to_dispatch_and_says_why() -> None:
    result = message_screen.enable(version="3.1.0")
    assert isinstance(result, message_screen.MessageScreenUnavailable)
    assert "pynetdicom 3.1.0" in result.reason and "3.0.x" in result.reason
    assert result.log_fields() == {"message_screen": "off", "message_screen_reason": result.reason}


def test_off_in_the_configuration_leaves_pynetdicom_to_dispatch() -> None:
    assert message_screen.enable(wanted=False) == message_screen.MessageScreenUnavailable("dicom.message_screen is off")


def test_the_installed_pynetdicom_passes_the_self_check() -> None:
    assert message_screen.self_check() is None
    assert message_screen.enable() == message_screen.MessageScreen()


def unconnected_association(sent: list[Any], served: list[Any]) -> Any:
    """A pynetdicom acceptor association without a connection, one CT context accepted, screened; what it sends
    and what it passes on to pynetdicom's dispatch go into ``sent`` and ``served``."""
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

    assoc: Any = Association(AE(), "acceptor")
    context = PresentationContext()
    context.context_id, context.abstract_syntax, context.transfer_syntax = 1, CT, ["1.2.840.10008.1.2"]
    assoc._accepted_cx = {1: context}
    assoc._serve_request = lambda message, context_id: served.append(message)
    assoc.dimse.send_msg = lambda primitive, context_id: sent.append(primitive)
    message_screen.MessageScreen().install(assoc)
    return assoc


@pytest.fixture
def screen_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """What the screen logs. Its module logger is swapped for a fresh one: a logger first used under an earlier
    test's ``configure_logging`` (``cache_logger_on_first_use``) keeps that configuration's processors, which
    ``capture_logs`` no longer sees once another configuration replaced them."""
    monkeypatch.setattr(message_screen, "log", structlog.get_logger("pacs_bridge.dicom"))
    with structlog.testing.capture_logs() as entries:
        yield entries


def test_c_cancels_kept_aside_are_logged_once_at_the_next_message_and_forgotten(
    screen_logs: list[dict[str, Any]],
) -> None:
    sent: list[Any] = []
    served: list[Any] = []
    assoc = unconnected_association(sent, served)
    assoc.dimse.cancel_req = {1: cancel(), 2: cancel()}
    request = store_request()
    assoc._serve_request(request, 1)
    message_screen.MessageScreen().association_ended(assoc)
    assert (sent, served, assoc.dimse.cancel_req) == ([], [request], {})
    assert [(entry["event"], entry["message"], entry["count"]) for entry in screen_logs] == [
        ("dimse_message_ignored", "C-CANCEL-RQ", 2)
    ]


def test_a_fault_of_the_screen_aborts_the_association_and_never_raises_into_pynetdicom(
    screen_logs: list[dict[str, Any]],
) -> None:
    """pynetdicom's association thread would stop on an exception: the screen logs it and aborts instead."""
    served: list[Any] = []
    assoc = unconnected_association([], served)
    aborted: list[bool] = []
    assoc.abort = lambda: aborted.append(True)

    def broken(primitive: Any, context_id: int) -> None:
        raise OSError("the connection went away")

    assoc.dimse.send_msg = broken
    assoc._serve_request(action(), 1)
    assert (aborted, served) == ([True], [])
    assert [entry["event"] for entry in screen_logs] == ["dimse_message_refused", "message_screen_failed"]
