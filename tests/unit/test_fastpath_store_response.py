"""C-STORE responses encoded in one step (dicom/fastpath/store_response.py): byte for byte what pynetdicom sends."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from pacs_bridge.dicom.fastpath.store_response import store_response_pdv

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def store_response(sop_instance_uid: str, status: int, message_id: int, **optional: object) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = CT_IMAGE_STORAGE
    primitive.AffectedSOPInstanceUID = sop_instance_uid
    primitive.Status = status
    for name, value in optional.items():
        setattr(primitive, name, value)
    return primitive


def pynetdicom_pdvs(primitive: C_STORE, max_pdu: int = 16382) -> list[bytes]:
    """The presentation data values pynetdicom's own DIMSE message would send for ``primitive``."""
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return [pdv for pdata in message.encode_msg(1, max_pdu) for _, pdv in pdata.presentation_data_value_list]


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3", "1.2.34", "2.25.329800735698586629295641978511506172918"])
@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xC000])
@pytest.mark.parametrize("message_id", [1, 258, 65535])
def test_a_plain_response_is_the_bytes_pynetdicom_would_send(sop_instance_uid: str, status: int, message_id: int):
    """Odd and even UID lengths (padded with NUL), success, warning and failure statuses, any message ID."""
    primitive = store_response(sop_instance_uid, status, message_id)
    assert [store_response_pdv(primitive, max_pdu=16382, observed=False)] == pynetdicom_pdvs(primitive)


@pytest.mark.parametrize(
    "optional", [{"ErrorComment": "dataset cannot be decoded"}, {"OffendingElement": [0x00100020]}]
)
def test_a_response_with_optional_fields_is_left_to_pynetdicom(optional: dict[str, object]):
    primitive = store_response("1.2.3", 0xC000, 1, **optional)
    assert store_response_pdv(primitive, max_pdu=16382, observed=False) is None


def test_other_messages_an_observed_association_and_a_tiny_pdu_are_left_to_pynetdicom():
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo, echo.Status = 1, 0x0000
    assert store_response_pdv(echo, max_pdu=16382, observed=False) is None
    primitive = store_response("1.2.3", 0x0000, 1)
    assert store_response_pdv(primitive, max_pdu=16382, observed=True) is None
    assert store_response_pdv(primitive, max_pdu=64, observed=False) is None  # pynetdicom would fragment it
    assert store_response_pdv(primitive, max_pdu=0, observed=False) is not None  # 0: no limit
