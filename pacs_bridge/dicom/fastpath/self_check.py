"""The fast path's start-up check: one real association over loopback, served the way the listener serves one.

A pynetdicom requestor of this process associates with a pynetdicom acceptor of this process, through a
``GuardedSocket`` handed to an ``AdoptingAssociationServer`` as the listener hands its connections, with the
pieces prepared and let in at the same events. It sends a C-ECHO and a C-STORE of a one-element data set. The check
passes when both are answered Success and each piece did its part: the association thread was woken for the
C-ECHO (``wakeups``), the C-STORE was read whole and served inline, its plain response encoded to the bytes
pynetdicom's own DIMSE message would send (``inline_store``).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification  # type: ignore[attr-defined]

from pacs_bridge.dicom.association_server import AdoptingAssociationServer
from pacs_bridge.dicom.connection import ConnectionLimits, GuardedSocket

_AE_TITLE = "FAST_PATH_CHECK"
_TIMEOUT_SECONDS = 10.0
_SOP_INSTANCE_UID = "2.25.1"


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = _SOP_INSTANCE_UID
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _response_matches_pynetdicom() -> bool:
    from pacs_bridge.dicom.fastpath.inline_store import plain_response_pdv

    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = SecondaryCaptureImageStorage
    primitive.AffectedSOPInstanceUID = _SOP_INSTANCE_UID
    primitive.Status = 0x0000
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    theirs = [pdv for pdata in message.encode_msg(1, 16382) for _, pdv in pdata.presentation_data_value_list]
    ours = plain_response_pdv(
        message_id=7,
        sop_class_uid=SecondaryCaptureImageStorage,
        sop_instance_uid=_SOP_INSTANCE_UID,
        status=0,
        max_pdu=16382,
    )
    return [ours] == theirs


def run_self_check(fast: Any) -> str | None:
    """None when ``fast``'s pieces work on a real association, else what did not."""
    from pacs_bridge.dicom.fastpath import inline_store, wakeups

    if "inline_store" in fast.pieces and not _response_matches_pynetdicom():
        return "a plain C-STORE response does not encode as pynetdicom encodes it"
    acceptors: list[Any] = []
    stores: list[int] = []

    def opened(event: Any) -> None:
        acceptors.append(event.assoc)
        fast.prepare(event.assoc)

    def store(_event: Any) -> int:
        stores.append(1)
        return 0x0000

    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, opened),
        (evt.EVT_ESTABLISHED, lambda event: fast.let_in(event.assoc)),
        (evt.EVT_CONN_CLOSE, lambda event: fast.connection_closed(event.assoc)),
        (evt.EVT_C_STORE, store),
    ]
    acceptor_ae = AE(ae_title=_AE_TITLE)
    acceptor_ae.add_supported_context(Verification)
    acceptor_ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    for timed in ("acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(acceptor_ae, timed, _TIMEOUT_SECONDS)
    server: Any = acceptor_ae.make_server(
        ("127.0.0.1", 0),
        contexts=fast.contexts(acceptor_ae.supported_contexts),
        evt_handlers=handlers,
        server_class=AdoptingAssociationServer,
    )
    listening = socket.create_server(("127.0.0.1", 0))
    listening.settimeout(_TIMEOUT_SECONDS)

    def accept_one() -> None:
        try:
            connection, address = listening.accept()
        except OSError:
            return
        server.process_request(GuardedSocket.adopt(connection, ConnectionLimits(), peer="self-check"), address)

    accepter = threading.Thread(target=accept_one, name="pacs-bridge-fast-path-check", daemon=True)
    accepter.start()
    association_time = wakeups.patch() if "wakeups" in fast.pieces else None
    woken_before = association_time.woken if association_time is not None else 0
    requestor_ae = AE(ae_title=_AE_TITLE)
    requestor_ae.add_requested_context(Verification)
    requestor_ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    for timed in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(requestor_ae, timed, _TIMEOUT_SECONDS)
    try:
        assoc = requestor_ae.associate("127.0.0.1", listening.getsockname()[1], ae_title=_AE_TITLE)
        if not assoc.is_established:
            return "the check association was not established"
        try:
            echo = assoc.send_c_echo()
            stored = assoc.send_c_store(_dataset())
        finally:
            assoc.release()
        if getattr(echo, "Status", None) != 0x0000 or getattr(stored, "Status", None) != 0x0000:
            return "the check's C-ECHO or C-STORE was not answered Success"
        if not acceptors or stores != [1]:
            return "the check's C-STORE did not reach the handler once"
        if association_time is not None and association_time.woken == woken_before:
            return "the association thread was not woken by the check's C-ECHO"
        if "inline_store" in fast.pieces:
            served = inline_store.inline_store_of(acceptors[0])
            if served is None or served.served != 1 or served.pdus_read < 1:
                return "the check's C-STORE was not read whole and served inline"
        return None
    finally:
        listening.close()
        accepter.join(_TIMEOUT_SECONDS)
        deadline = time.monotonic() + _TIMEOUT_SECONDS
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.005)
        server.server_close()
