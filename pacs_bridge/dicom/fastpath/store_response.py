"""Fast path piece ``store_response``: C-STORE responses encoded in one step, instead of through pynetdicom's
generic DIMSE message.

pynetdicom sends every response by building a ``DIMSEMessage``: a pydicom ``Dataset`` of the command set
whose elements are each validated and set one by one, encoded twice with pydicom (once only to measure the
Command Group Length) and cut into P-DATA fragments. For the ~150 bytes of a C-STORE-RSP that is about
0.25 ms of CPU under the GIL, an eighth of everything the bridge does per instance.

``install`` wraps ``DIMSEServiceProvider.send_msg``: on an association ``attach`` prepared, a C-STORE response
holding only the fields every response has (no ErrorComment, no OffendingElement) is encoded by
``encode_store_response``, byte for byte as pynetdicom encodes it (``tests/unit/test_store_response.py``
compares the two), and queued as the single P-DATA-TF pynetdicom would queue. Anything else (requests, other
responses, a failure with a comment, a peer whose maximum PDU is too small for one fragment), any association
with an EVT_DIMSE_SENT handler bound and any association not attached go pynetdicom's way. The
``inline_store`` piece writes its plain responses with ``plain_response_pdv`` itself.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom.dimse_primitives import C_STORE

_C_STORE_RSP = 0x8001  # CommandField
_NO_DATA_SET = 0x0101  # CommandDataSetType
_LAST_COMMAND_FRAGMENT = b"\x03"  # message control header: command, last fragment
_PDV_OVERHEAD = 6  # PDV item length (4) + context ID (1) + message control header (1)
_INSTALLED = "_pacs_bridge_store_response"
_ATTACHED = "_pacs_bridge_store_response_attached"


def _element(element: int, value: bytes) -> bytes:
    """One command-group element, implicit VR little endian."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    encoded = value.encode("ascii")
    return encoded + b"\x00" if len(encoded) % 2 else encoded


def encode_store_response(*, message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int) -> bytes:
    """The command set of a C-STORE-RSP without optional fields (PS3.7 9.3.1.2), implicit VR little endian."""
    body = b"".join(
        (
            _element(0x0002, _uid(sop_class_uid)),
            _element(0x0100, struct.pack("<H", _C_STORE_RSP)),
            _element(0x0120, struct.pack("<H", message_id)),
            _element(0x0800, struct.pack("<H", _NO_DATA_SET)),
            _element(0x0900, struct.pack("<H", status)),
            _element(0x1000, _uid(sop_instance_uid)),
        )
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


def plain_response_pdv(
    *, message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int, max_pdu: int
) -> bytes | None:
    """The one presentation data value (message control header and command set) of a C-STORE response without
    optional fields, or None to leave it to pynetdicom: a value that does not encode (pynetdicom validates and
    reports), or too large for the peer's maximum PDU (0: no limit; pynetdicom fragments it)."""
    try:
        encoded = encode_store_response(
            message_id=message_id, sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid, status=status
        )
    except (UnicodeEncodeError, struct.error):
        return None
    if max_pdu and len(encoded) + _PDV_OVERHEAD > max_pdu:
        return None
    return _LAST_COMMAND_FRAGMENT + encoded


def store_response_pdv(primitive: Any, *, max_pdu: int, observed: bool) -> bytes | None:
    """``plain_response_pdv`` for ``primitive``, or None to leave it to pynetdicom: not a C-STORE response,
    one with ErrorComment or OffendingElement, or ``observed`` (an EVT_DIMSE_SENT handler expects pynetdicom's
    message object)."""
    if observed or type(primitive) is not C_STORE:
        return None
    message_id, status = primitive.MessageIDBeingRespondedTo, primitive.Status
    sop_class_uid, sop_instance_uid = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    if message_id is None or status is None or sop_class_uid is None or sop_instance_uid is None:
        return None
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    return plain_response_pdv(
        message_id=message_id,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        status=status,
        max_pdu=max_pdu,
    )


def install() -> None:
    """Send the plain C-STORE responses of attached associations through ``encode_store_response``
    (idempotent)."""
    from pynetdicom import evt
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.pdu_primitives import P_DATA

    provider: Any = DIMSEServiceProvider
    if getattr(provider.send_msg, _INSTALLED, False):
        return
    original = provider.send_msg

    def send_msg(self: Any, primitive: Any, context_id: int) -> None:
        if not getattr(self.assoc, _ATTACHED, False):
            original(self, primitive, context_id)
            return
        pdv = store_response_pdv(
            primitive, max_pdu=self.maximum_pdu_size, observed=bool(self.assoc.get_handlers(evt.EVT_DIMSE_SENT))
        )
        if pdv is None:
            original(self, primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, pdv))
        self.dul.send_pdu(pdata)

    setattr(send_msg, _INSTALLED, True)
    send_msg.original = original  # type: ignore[attr-defined]
    provider.send_msg = send_msg


def uninstall() -> None:
    """Give pynetdicom's DIMSE provider its own ``send_msg`` back."""
    from pynetdicom.dimse import DIMSEServiceProvider

    provider: Any = DIMSEServiceProvider
    original = getattr(provider.send_msg, "original", None)
    if original is not None:
        provider.send_msg = original


def attach(assoc: Any) -> None:
    """Send ``assoc``'s plain C-STORE responses in one step."""
    setattr(assoc, _ATTACHED, True)
