"""Unit tests for ``pacs_bridge.dicom.negotiation``: which A-ASSOCIATE-RQs pass to pynetdicom, and what answers
the others (PS3.8 9.3.2, PS3.7 annex D)."""

from __future__ import annotations

import struct

import pytest
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import build_context
from pynetdicom.transport import AddressInformation

from pacs_bridge.dicom.negotiation import (
    MAX_TRANSFER_SYNTAXES_PER_CONTEXT,
    MIN_PEER_MAXIMUM_LENGTH,
    QUOTED_CHARS,
    RequestRefusal,
    RequestSummary,
    check_association_request,
)
from tests.support.association_requests import (
    CT_IMAGE_STORAGE,
    IMPLICIT_VR_LITTLE_ENDIAN,
    associate_rq,
    item,
    presentation_context,
    user_information,
)

# A-ABORT, source 2 (service provider), reason 6 (invalid PDU parameter value) or 4 (unrecognised parameter)
ABORT_INVALID = bytes.fromhex("07000000000400000206")
ABORT_UNRECOGNIZED = bytes.fromhex("07000000000400000204")
# A-ASSOCIATE-RJ, permanent: (source, reason)
REJECT_ACSE_NO_REASON = bytes.fromhex("03000000000400010201")
REJECT_LOCAL_LIMIT = bytes.fromhex("03000000000400010302")
REJECT_CALLED_AE = bytes.fromhex("03000000000400010107")
REJECT_CALLING_AE = bytes.fromhex("03000000000400010103")


def pynetdicom_request(contexts: list[object], *extra_user_information: object, maximum_length: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ as pynetdicom encodes it for a sender."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "SENDER"
    primitive.called_ae_title = "PACS_BRIDGE"
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 11112)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 104)
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = maximum_length
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"
    primitive.user_information = [maximum, implementation, *extra_user_information]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def numbered(contexts: list[object]) -> list[object]:
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1  # type: ignore[attr-defined]
    return contexts


def test_pynetdicom_proposing_128_storage_classes_with_every_transfer_syntax_passes() -> None:
    """128 contexts of 45 transfer syntaxes each, all of them DICOM's: a legitimate sender's largest request."""
    classes = [context.abstract_syntax for context in AllStoragePresentationContexts][:128]
    contexts = numbered([build_context(abstract_syntax, ALL_TRANSFER_SYNTAXES) for abstract_syntax in classes])
    summary = check_association_request(pynetdicom_request(contexts))
    assert summary == RequestSummary(
        presentation_contexts=128,
        transfer_syntaxes=128 * len(ALL_TRANSFER_SYNTAXES),
        unknown_transfer_syntaxes=0,
        first_unknown_transfer_syntax="",
    )


def test_pynetdicom_with_role_selection_user_identity_and_version_name_passes() -> None:
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CT_IMAGE_STORAGE.decode()
    role.scu_role, role.scp_role = True, False
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field, identity.secondary_field = b"user", b"secret"
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "PYNETDICOM_304"
    request = pynetdicom_request(numbered([build_context(CT_IMAGE_STORAGE.decode())]), role, identity, version)
    assert isinstance(check_association_request(request), RequestSummary)


def test_a_maximum_length_of_zero_means_no_limit_and_passes() -> None:
    assert isinstance(check_association_request(associate_rq(user_info=user_information(0))), RequestSummary)


def test_unknown_transfer_syntaxes_are_counted_and_the_first_quoted() -> None:
    private = [f"1.2.3.4.{n}".encode() for n in range(45)]
    contexts = [
        presentation_context(2 * n + 1, CT_IMAGE_STORAGE, [*private, IMPLICIT_VR_LITTLE_ENDIAN]) for n in range(3)
    ]
    summary = check_association_request(associate_rq(contexts))
    assert summary == RequestSummary(3, 3 * 46, 3 * 45, "1.2.3.4.0")


LONG_UID = b"1." * 30000  # 60 kB


REFUSED = {
    "a context without a transfer syntax": (
        associate_rq([presentation_context(1, CT_IMAGE_STORAGE, ())]),
        "invalid_presentation_context",
        ABORT_INVALID,
    ),
    "a context without an abstract syntax": (
        associate_rq([presentation_context(1, None)]),
        "invalid_presentation_context",
        ABORT_INVALID,
    ),
    "a context with two abstract syntaxes": (
        associate_rq([item(0x20, b"\x01\0\0\0" + item(0x30, CT_IMAGE_STORAGE) * 2 + item(0x40, b"1.2.840.10008.1.2"))]),
        "invalid_presentation_context",
        ABORT_INVALID,
    ),
    "context ID 0": (associate_rq([presentation_context(0)]), "invalid_presentation_context", ABORT_INVALID),
    "context ID 2": (associate_rq([presentation_context(2)]), "invalid_presentation_context", ABORT_INVALID),
    "a context ID twice": (
        associate_rq([presentation_context(1), presentation_context(1)]),
        "invalid_presentation_context",
        ABORT_INVALID,
    ),
    "300 contexts (IDs repeat)": (
        associate_rq([presentation_context((2 * n + 1) % 256) for n in range(300)]),
        "invalid_presentation_context",
        ABORT_INVALID,
    ),
    "no presentation context": (associate_rq([]), "invalid_request", ABORT_INVALID),
    "no user information": (associate_rq(user_info=b""), "invalid_request", ABORT_INVALID),
    "two user information items": (
        associate_rq(user_info=user_information() * 2),
        "invalid_request",
        ABORT_INVALID,
    ),
    "an item running past the request": (associate_rq()[:-3], "invalid_request", ABORT_INVALID),
    "a sub-item running past its item": (
        associate_rq([item(0x20, b"\x01\0\0\0" + item(0x30, CT_IMAGE_STORAGE)[:-2])]),
        "invalid_item",
        ABORT_INVALID,
    ),
    "an item type PS3.8 does not define": (
        associate_rq([presentation_context(1), item(0x99, b"Z" * 3000)]),
        "unknown_item",
        ABORT_UNRECOGNIZED,
    ),
    "an abstract syntax with letters": (
        associate_rq([presentation_context(1, b"1.2.840.abc")]),
        "invalid_uid",
        ABORT_INVALID,
    ),
    "an empty transfer syntax": (
        associate_rq([presentation_context(1, CT_IMAGE_STORAGE, (b"",))]),
        "invalid_uid",
        ABORT_INVALID,
    ),
    "an implementation class UID of 60 kB": (
        associate_rq(user_info=user_information(implementation_class_uid=LONG_UID)),
        "invalid_uid",
        ABORT_INVALID,
    ),
    "a maximum length sub-item of 2 bytes": (
        associate_rq(user_info=item(0x50, item(0x51, b"\0\1") + item(0x52, b"1.2.3"))),
        "invalid_user_information",
        ABORT_INVALID,
    ),
    "a user identity whose lengths overrun it": (
        associate_rq(user_info=user_information(extra=item(0x58, struct.pack(">BBH", 2, 1, 60000) + b"A" * 10))),
        "invalid_user_information",
        ABORT_INVALID,
    ),
    "a role selection without its roles": (
        associate_rq(user_info=user_information(extra=item(0x54, struct.pack(">H", 25) + CT_IMAGE_STORAGE))),
        "invalid_user_information",
        ABORT_INVALID,
    ),
    "a maximum length of 1": (
        associate_rq(user_info=user_information(1)),
        "maximum_length_too_small",
        REJECT_ACSE_NO_REASON,
    ),
    "a maximum length of 6": (
        associate_rq(user_info=user_information(6)),
        "maximum_length_too_small",
        REJECT_ACSE_NO_REASON,
    ),
    f"a maximum length of {MIN_PEER_MAXIMUM_LENGTH - 1}": (
        associate_rq(user_info=user_information(MIN_PEER_MAXIMUM_LENGTH - 1)),
        "maximum_length_too_small",
        REJECT_ACSE_NO_REASON,
    ),
    f"{MAX_TRANSFER_SYNTAXES_PER_CONTEXT + 1} transfer syntaxes in a context": (
        associate_rq(
            [
                presentation_context(
                    1, CT_IMAGE_STORAGE, [IMPLICIT_VR_LITTLE_ENDIAN] * (MAX_TRANSFER_SYNTAXES_PER_CONTEXT + 1)
                )
            ]
        ),
        "too_many_transfer_syntaxes",
        REJECT_LOCAL_LIMIT,
    ),
    "1500 role selection sub-items": (
        associate_rq(
            user_info=user_information(
                extra=item(0x54, struct.pack(">H", len(CT_IMAGE_STORAGE)) + CT_IMAGE_STORAGE + b"\1\1") * 1500
            )
        ),
        "too_many_negotiation_items",
        REJECT_LOCAL_LIMIT,
    ),
    "a blank called AE title": (associate_rq(called=""), "invalid_called_ae_title", REJECT_CALLED_AE),
    "a calling AE title with a control character": (
        associate_rq(calling="BAD\x1bAE"),
        "invalid_calling_ae_title",
        REJECT_CALLING_AE,
    ),
}


@pytest.mark.parametrize(("request_pdu", "reason", "answer"), list(REFUSED.values()), ids=list(REFUSED))
def test_a_request_pynetdicom_would_choke_on_or_the_bridge_cannot_serve_is_refused(
    request_pdu: bytes, reason: str, answer: bytes
) -> None:
    refusal = check_association_request(request_pdu)
    assert isinstance(refusal, RequestRefusal), refusal
    assert (refusal.reason, refusal.answer) == (reason, answer), refusal.detail


def test_a_refusal_quotes_at_most_64_characters_of_what_the_peer_sent() -> None:
    refusal = check_association_request(associate_rq(user_info=user_information(implementation_class_uid=LONG_UID)))
    assert isinstance(refusal, RequestRefusal)
    assert "1." * (QUOTED_CHARS // 2) in refusal.detail and "(60000 bytes)" in refusal.detail
    assert len(refusal.detail) < 200


def test_a_maximum_length_of_at_least_the_floor_passes() -> None:
    request = associate_rq(user_info=user_information(MIN_PEER_MAXIMUM_LENGTH))
    assert isinstance(check_association_request(request), RequestSummary)
