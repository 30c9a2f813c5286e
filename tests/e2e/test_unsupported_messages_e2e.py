"""DIMSE messages the bridge does not serve, end to end: ``pacs-bridge run`` (a subprocess, SQLite, on both receive
paths) gets each from a real pynetdicom requestor that builds the primitive by hand and sends it on the CT Image
Storage context; each request gets its response with 0x0211, a response or C-CANCEL gets nothing; never a
traceback; one warning line naming the peer and the message; the same association then stores a C-STORE; nothing
else is indexed. storescu gets in afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import (
    C_CANCEL,
    C_ECHO,
    C_FIND,
    C_GET,
    C_MOVE,
    C_STORE,
    N_ACTION,
    N_CREATE,
    N_DELETE,
    N_EVENT_REPORT,
    N_GET,
    N_SET,
)
from pynetdicom.dsutils import encode

from tests.support.bridge_process import BridgeProcess, log_events, wait_for
from tests.support.dcmtk import storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import make_dataset, new_study_uid, write_file

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk]

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
MPPS = "1.2.840.10008.3.1.2.3.3"
STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET = (f"1.2.840.10008.5.1.4.1.2.2.{n}" for n in (1, 2, 3))
INSTANCE = "1.2.826.0.1.3680043.8.498.1"
MESSAGE_ID = 7
UNRECOGNIZED_OPERATION = 0x0211
WAIT_SECONDS = 20.0  # for an answer that comes at once; a failing case waits this long, a passing one does not


@pytest.fixture(scope="module")
def bridge(
    tmp_path_factory: pytest.TempPathFactory, fhir_server: FhirTestServer, bridges_receive_both_ways: str
) -> Iterator[BridgeProcess]:
    """One bridge for the module and receive path (SQLite)."""
    directory = tmp_path_factory.mktemp("unsupported-messages")
    running = BridgeProcess(
        directory, database_url=f"sqlite:///{directory / 'bridge.db'}", fhir_base_url=fhir_server.base_url
    )
    try:
        yield running.start()
    finally:
        running.close()


def identifier() -> BytesIO:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    return BytesIO(encode(ds, True, True))


def request(kind: str, sop_class: str) -> Any:
    """The ``kind`` request primitive naming ``sop_class``, as a peer would build it."""
    primitive: Any
    if kind in ("C-FIND", "C-GET", "C-MOVE"):
        primitive = {"C-FIND": C_FIND, "C-GET": C_GET, "C-MOVE": C_MOVE}[kind]()
        primitive.Priority, primitive.Identifier = 2, identifier()
        if kind == "C-MOVE":
            primitive.MoveDestination = "ELSEWHERE"
    else:
        primitive = {
            "C-ECHO": C_ECHO,
            "N-ACTION": N_ACTION,
            "N-SET": N_SET,
            "N-GET": N_GET,
            "N-CREATE": N_CREATE,
            "N-DELETE": N_DELETE,
            "N-EVENT-REPORT": N_EVENT_REPORT,
        }[kind]()
    primitive.MessageID = MESSAGE_ID
    if kind in ("N-ACTION", "N-SET", "N-GET", "N-DELETE"):
        primitive.RequestedSOPClassUID, primitive.RequestedSOPInstanceUID = sop_class, INSTANCE
    else:
        primitive.AffectedSOPClassUID = sop_class
    if kind in ("N-CREATE", "N-EVENT-REPORT"):
        primitive.AffectedSOPInstanceUID = INSTANCE
    if kind == "N-ACTION":
        primitive.ActionTypeID = 1
    if kind == "N-EVENT-REPORT":
        primitive.EventTypeID = 1
    if kind == "N-SET":
        primitive.ModificationList = identifier()
    return primitive


def stray_store_response() -> C_STORE:
    response = C_STORE()
    response.MessageIDBeingRespondedTo, response.Status = MESSAGE_ID, 0x0000
    response.AffectedSOPClassUID, response.AffectedSOPInstanceUID = CT, INSTANCE
    return response


def cancel() -> C_CANCEL:
    primitive = C_CANCEL()
    primitive.MessageIDBeingRespondedTo = MESSAGE_ID
    return primitive


class Probe:
    """One association on the CT Image Storage context; the command sets it receives, seen as they arrive
    (EVT_DIMSE_RECV: the requestor's own reactor takes messages off its queue). Its log lines are those naming
    its peer address after it connected: the bridge serves the whole module, and a later probe may get the
    same local port as an earlier one."""

    def __init__(self, bridge: BridgeProcess) -> None:
        self.bridge = bridge
        self.log_start = len(bridge.log())  # the log only grows
        port = bridge.port
        self.received: list[Dataset] = []
        ae = AE(ae_title="PROBE")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.add_requested_context(CT, ImplicitVRLittleEndian)
        self.assoc = ae.associate(
            "127.0.0.1",
            port,
            ae_title="PACS_BRIDGE",
            evt_handlers=[(evt.EVT_DIMSE_RECV, lambda event: self.received.append(event.message.command_set))],
        )
        assert self.assoc.is_established
        (self.context,) = self.assoc.accepted_contexts
        self.peer = f"127.0.0.1:{self.assoc.dul.socket.socket.getsockname()[1]}"

    def send(self, primitive: Any) -> None:
        self.assoc.dimse.send_msg(primitive, self.context.context_id)

    def answer(self) -> Dataset:
        deadline = time.monotonic() + WAIT_SECONDS
        while not self.received and self.assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.received, "no answer came"
        return self.received.pop(0)

    def store(self) -> str:
        """A fresh CT instance sent on the same association; its study UID, once it was answered Success."""
        study_uid = new_study_uid()
        ds = make_dataset(
            StudyInstanceUID=study_uid, SeriesInstanceUID=f"{study_uid}.1", SOPInstanceUID=f"{study_uid}.1.1"
        )
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        status = self.assoc.send_c_store(ds)
        assert status is not None and status.Status == 0x0000, status
        return study_uid

    def release(self) -> None:
        self.assoc.release()

    def logged(self, event: str) -> list[dict[str, Any]]:
        """This association's ``event`` lines."""
        since = self.bridge.log()[self.log_start :]
        return [entry for entry in log_events(since, event) if entry.get("peer") == self.peer]


def assert_logged_once(bridge: BridgeProcess, event: str, probe: Probe, message: str) -> dict[str, Any]:
    entries = wait_for(lambda: probe.logged(event), timeout=WAIT_SECONDS, what=f"{event} for {probe.peer}")
    (entry,) = entries
    assert (entry["level"], entry["message"], entry["calling_ae"]) == ("warning", message, "PROBE")
    assert "Traceback" not in bridge.log()
    return entry


REQUESTS = [
    ("N-ACTION", CT, 0x8130),  # the context's own SOP class: pynetdicom picked the Storage SCP (C-STORE-RSP 0x0110)
    ("N-ACTION", STORAGE_COMMITMENT, 0x8130),  # its own SOP class: no EVT_N_ACTION handler, a traceback
    ("N-SET", CT, 0x8120),
    ("N-GET", CT, 0x8110),
    ("N-CREATE", CT, 0x8140),
    ("N-CREATE", MPPS, 0x8140),
    ("N-DELETE", CT, 0x8150),
    ("N-EVENT-REPORT", CT, 0x8100),  # pynetdicom serves it on a thread of its own
    ("C-FIND", CT, 0x8020),  # the Storage SCP raised on it: a traceback and an A-ABORT
    ("C-FIND", STUDY_ROOT_FIND, 0x8020),  # the Query/Retrieve SCP refused the CT context: a traceback, an A-ABORT
    ("C-GET", CT, 0x8010),
    ("C-GET", STUDY_ROOT_GET, 0x8010),
    ("C-MOVE", CT, 0x8021),
    ("C-MOVE", STUDY_ROOT_MOVE, 0x8021),
    ("C-ECHO", CT, 0x8030),  # C-ECHO naming a storage SOP class: the Storage SCP raised on it
]


@pytest.mark.parametrize(("kind", "sop_class", "response_field"), REQUESTS)
def test_a_request_the_bridge_does_not_serve_gets_its_response_with_0x0211_and_the_association_goes_on(
    bridge: BridgeProcess, kind: str, sop_class: str, response_field: int
) -> None:
    """A request other than C-STORE (and C-ECHO naming Verification) on the CT context: its own response, status
    0x0211 naming the request's SOP class, one warning line, no traceback; then a C-STORE on the same association
    is stored, and nothing else is."""
    before = bridge.instance_count()
    probe = Probe(bridge)
    try:
        probe.send(request(kind, sop_class))
        answer = probe.answer()
        study_uid = probe.store()
    finally:
        probe.release()

    assert (answer.CommandField, answer.Status, answer.MessageIDBeingRespondedTo) == (
        response_field,
        UNRECOGNIZED_OPERATION,
        MESSAGE_ID,
    )
    assert answer.AffectedSOPClassUID == sop_class
    entry = assert_logged_once(bridge, "dimse_message_refused", probe, f"{kind}-RQ")
    assert (entry["status"], entry["sop_class_uid"], entry["context_sop_class_uid"]) == ("0x0211", sop_class, CT)
    assert bridge.instance_uids(study_uid) == {f"{study_uid}.1.1"}
    assert bridge.instance_count() == before + 1


@pytest.mark.parametrize(("name", "message"), [("C-STORE-RSP", stray_store_response), ("C-CANCEL-RQ", cancel)])
def test_a_response_or_a_cancel_gets_no_answer_and_the_association_goes_on(
    bridge: BridgeProcess, name: str, message: Any
) -> None:
    """A stray C-STORE response, and a C-CANCEL with nothing to cancel: nothing is sent back (nothing answers a
    response; C-CANCEL has no response), one warning line, no traceback; the next C-STORE is answered (the only
    answer the requestor receives) and stored."""
    before = bridge.instance_count()
    probe = Probe(bridge)
    try:
        probe.send(message())
        study_uid = probe.store()
    finally:
        probe.release()

    assert [answer.CommandField for answer in probe.received] == [0x8001]  # the C-STORE's response only
    assert_logged_once(bridge, "dimse_message_ignored", probe, name)
    assert bridge.instance_uids(study_uid) == {f"{study_uid}.1.1"}
    assert bridge.instance_count() == before + 1


def test_c_echo_naming_verification_on_the_storage_context_is_still_answered_success(bridge: BridgeProcess) -> None:
    """The one request besides C-STORE the bridge serves: Success, nothing logged as refused."""
    probe = Probe(bridge)
    try:
        probe.send(request("C-ECHO", VERIFICATION))
        answer = probe.answer()
    finally:
        probe.release()
    assert (answer.CommandField, answer.Status) == (0x8030, 0x0000)
    assert not probe.logged("dimse_message_refused")


def test_storescu_gets_in_after_every_unsupported_message(
    bridge: BridgeProcess, tmp_path: Path, bridges_receive_both_ways: str
) -> None:
    """After the cases above (module order), DCMTK's storescu still stores an instance, and the log of the whole
    run, on the receive path of this run, with the screen on, holds no traceback."""
    fast_path = "on" if bridges_receive_both_ways == "fast_path" else "off"
    # The start line of each process that serves associations (listener_ready, with listener processes).
    started = [line for line in log_events(bridge.log(), "listener_started", "listener_ready") if "fast_path" in line]
    assert started
    assert {(line["fast_path"], line["message_screen"]) for line in started} == {(fast_path, "on")}
    study_uid = new_study_uid()
    ds = make_dataset(StudyInstanceUID=study_uid, SeriesInstanceUID=f"{study_uid}.1", SOPInstanceUID=f"{study_uid}.1.1")
    sent = storescu(bridge.port, write_file(ds, tmp_path / "after.dcm"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert bridge.instance_uids(study_uid) == {f"{study_uid}.1.1"}
    assert "Traceback" not in bridge.log()
