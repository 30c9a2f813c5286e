"""What a DICOM listener (dicom/scp.py) is configured with, and its TLS context."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from pacs_bridge.dicom.access import CallingAeRule
from pacs_bridge.dicom.header import DEFAULT_MAX_INFLATED_BYTES


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerSettings:
    ae_title: str
    bind: str
    port: int
    max_associations: int = 16
    network_timeout_seconds: float = 60.0
    acse_timeout_seconds: float = 30.0
    dimse_timeout_seconds: float = 60.0
    association_request_timeout_seconds: float = 30.0  # ARTIM: the whole A-ASSOCIATE-RQ (and TLS) within this
    pdu_timeout_seconds: float = 30.0  # each PDU whole within this from its first byte
    max_pending_connections: int = 256  # connections whose association request is not yet whole
    max_pdu_bytes: int = 256 * 1024  # the maximum length announced; a longer P-DATA-TF aborts the association
    max_instance_bytes: int = 4 * 1024**3  # a longer data set is read, dropped and refused
    fast_path: bool = True  # the pieces of dicom/fastpath when pynetdicom is a supported release
    message_screen: bool = True  # dicom/message_screen when pynetdicom is a supported release
    allowed_calling_aets: tuple[CallingAeRule, ...] = ()  # empty: any
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES  # a deflated dataset inflating to more is refused
    tls: ssl.SSLContext | None = None  # DICOM TLS when set (see server_tls_context)


def server_tls_context(certificate: str, private_key: str, client_ca: str = "") -> ssl.SSLContext:
    """The listener's TLS context: TLS 1.2 or later (BCP 195), our certificate, and when ``client_ca`` is given
    only senders presenting a certificate issued by it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    if client_ca:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
