"""C-STORE responses the inline store encodes in one step (dicom/fastpath/inline_store.py): byte for byte what
pynetdicom sends."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from pacs_bridge.dicom.fastpath.inline_store import plain_response_pdv

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def pynetdicom_pdvs(sop_instance_uid: str, status: int, message_id: int, max_pdu: int = 16382) -> list[bytes]:
    """The presentation data values pynetdicom's own DIMSE message would send for that response."""
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = CT_IMAGE_STORAGE
    primitive.AffectedSOPInstanceUID = sop_instance_uid
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return [pdv for pdata in message.encode_msg(1, max_pdu) for _, pdv in pdata.presentation_data_value_list]


def ours(sop_instance_uid: str, status: int, message_id: int, max_pdu: int = 16382) -> bytes | None:
    return plain_response_pdv(
        message_id=message_id,
        sop_class_uid=CT_IMAGE_STORAGE,
        sop_instance_uid=sop_instance_uid,
        status=status,
        max_pdu=max_pdu,
    )


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3", "1.2.34", "2.25.329800735698586629295641978511506172918"])
@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xC000])
@pytest.mark.parametrize("message_id", [1, 258, 65535])
def test_a_plain_response_is_the_bytes_pynetdicom_would_send(sop_instance_uid: str, status: int, message_id: int):
    """Odd and even UID lengths (padded with NUL), success, warning and failure statuses, any message ID."""
    assert [ours(sop_instance_uid, status, message_id)] == pynetdicom_pdvs(sop_instance_uid, status, message_id)


def test_a_response_too_large_for_the_peers_pdu_or_that_does_not_encode_is_left_to_pynetdicom():
    assert ours("1.2.3", 0x0000, 1, max_pdu=64) is None  # pynetdicom would fragment it
    assert ours("1.2.3", 0x0000, 1, max_pdu=0) is not None  # 0: no limit
    assert ours("1.2.3", 0x0000, 70000) is None  # a message ID US cannot hold: pynetdicom reports it
    assert ours("1.2.\u00e9", 0x0000, 1) is None  # not ASCII
