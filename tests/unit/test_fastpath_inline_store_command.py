"""The command sets of received C-STORE requests and the items of P-DATA-TF PDUs, read in one step
(dicom/fastpath/inline_store.py): what pynetdicom's own decoding makes of them, or None where pynetdicom should
judge."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem

from pacs_bridge.dicom.fastpath.inline_store import command_elements, presentation_data_values, store_request

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def encoded_command(primitive: C_STORE | C_ECHO) -> bytes:
    """The command set pynetdicom's SCU sends for ``primitive`` (implicit VR little endian)."""
    message = C_STORE_RQ() if isinstance(primitive, C_STORE) else C_ECHO_RQ()
    message.primitive_to_message(primitive)
    command = b""
    for pdata in message.encode_msg(1, 0):
        for _, pdv in pdata.presentation_data_value_list:
            if pdv[0] & 0x01:
                command += pdv[1:]
    return command


def store(sop_instance_uid: str = "1.2.3.4", message_id: int = 7, **optional: object) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = CT_IMAGE_STORAGE
    primitive.AffectedSOPInstanceUID = sop_instance_uid
    primitive.Priority = 2
    primitive.DataSet = BytesIO(b"\x08\x00\x18\x00")
    for name, value in optional.items():
        setattr(primitive, name, value)
    return primitive


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3", "1.2.34", "2.25.329800735698586629295641978511506172918"])
@pytest.mark.parametrize("message_id", [1, 258, 65535])
def test_a_store_request_reads_as_pynetdicom_reads_it(sop_instance_uid: str, message_id: int) -> None:
    """Odd and even UID lengths (padded with NUL), any message ID."""
    request = store_request(command_elements(encoded_command(store(sop_instance_uid, message_id))))
    assert request is not None
    assert (request.MessageID, request.Priority) == (message_id, 2)
    assert (request.AffectedSOPClassUID, request.AffectedSOPInstanceUID) == (CT_IMAGE_STORAGE, sop_instance_uid)
    assert request.MoveOriginatorApplicationEntityTitle is None and request.MoveOriginatorMessageID is None


def test_a_store_request_holds_what_pynetdicoms_setters_would_store() -> None:
    """Conformant UIDs are stored without the setters' validation, in the attributes the setters write
    (pynetdicom 3.0): the request is indistinguishable from one built through them."""
    request = store_request(command_elements(encoded_command(store("1.2.3.0.45"))))
    assert request is not None
    assert vars(request) == vars(store("1.2.3.0.45", DataSet=None))
    assert type(request.AffectedSOPInstanceUID) is UID and type(request.AffectedSOPClassUID) is UID


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom's, as the setter validates
@pytest.mark.parametrize("non_conformant", ["1.02.3", "01.2.3", "1.2.3a", "1..2"])
def test_a_non_conformant_uid_is_judged_by_pynetdicoms_setter(non_conformant: str) -> None:
    """Leading zeros, a letter, an empty component: pynetdicom's setter accepts the UID with a warning, and the
    request carries it as a request pynetdicom decoded would."""
    elements = command_elements(encoded_command(store()))
    elements[0x1000] = non_conformant.encode() + b"\x00" * (len(non_conformant) % 2)
    request = store_request(elements)
    assert request is not None and request.AffectedSOPInstanceUID == non_conformant


@pytest.mark.filterwarnings("ignore:The value length")  # pydicom's, as the setter validates
def test_a_uid_over_64_characters_is_left_to_pynetdicom() -> None:
    """The setter refuses it, so pynetdicom answers the request."""
    elements = command_elements(encoded_command(store()))
    elements[0x1000] = b"1." * 32 + b"1\x00"
    assert store_request(elements) is None


def test_a_store_request_of_a_c_move_carries_its_originator() -> None:
    sent = store(MoveOriginatorApplicationEntityTitle="MOVE_SCU", MoveOriginatorMessageID=12)
    request = store_request(command_elements(encoded_command(sent)))
    assert request is not None
    assert (request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID) == ("MOVE_SCU", 12)


def test_any_other_message_is_left_to_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageID = 3
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    assert store_request(command_elements(encoded_command(echo))) is None


@pytest.mark.parametrize("missing", [0x0110, 0x0002, 0x1000, 0x0700, 0x0800])
def test_a_store_request_missing_a_required_field_is_left_to_pynetdicom(missing: int) -> None:
    """Message ID, SOP class and instance, priority, data set type: pynetdicom decides what to answer."""
    elements = command_elements(encoded_command(store()))
    del elements[missing]
    assert store_request(elements) is None


def test_a_store_request_announcing_no_data_set_is_left_to_pynetdicom() -> None:
    elements = command_elements(encoded_command(store()))
    elements[0x0800] = b"\x01\x01"
    assert store_request(elements) is None


def test_a_uid_that_is_not_ascii_is_left_to_pynetdicom() -> None:
    elements = command_elements(encoded_command(store()))
    elements[0x1000] = b"1.2.\xff\x00"
    assert store_request(elements) is None


@pytest.mark.parametrize("cut", [1, 7, 20])
def test_a_command_set_cut_short_is_refused(cut: int) -> None:
    with pytest.raises(ValueError, match="command"):
        command_elements(encoded_command(store())[:-cut])


def test_an_element_outside_the_command_group_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(0008,0018\)"):
        command_elements(b"\x08\x00\x18\x00\x02\x00\x00\x001\x00")


def p_data_tf_body(*items: tuple[int, bytes]) -> memoryview:
    """The body of a P-DATA-TF (after its 6-byte header) as pynetdicom's SCU encodes these items."""
    pdu = P_DATA_TF()
    for context_id, value in items:
        item = PresentationDataValueItem()
        item.presentation_context_id, item.presentation_data_value = context_id, value
        pdu.presentation_data_value_items.append(item)
    return memoryview(pdu.encode())[6:]


def test_the_items_of_a_p_data_tf_read_as_pynetdicom_encodes_them() -> None:
    body = p_data_tf_body((1, b"\x03" + b"command"), (3, b"\x00" + bytes(300)), (3, b"\x02"))
    items = presentation_data_values(body)
    assert items is not None
    assert [(context_id, bytes(value)) for context_id, value in items] == [
        (1, b"\x03command"),
        (3, b"\x00" + bytes(300)),
        (3, b"\x02"),
    ]


@pytest.mark.parametrize("cut", [1, 4, 5, 9])
def test_a_p_data_tf_cut_inside_an_item_is_refused(cut: int) -> None:
    body = p_data_tf_body((1, b"\x03" + b"command"))
    assert presentation_data_values(body[: len(body) - cut]) is None


def test_an_item_too_short_to_hold_its_context_id_is_refused() -> None:
    assert presentation_data_values(memoryview(b"\x00\x00\x00\x00\x01")) is None
