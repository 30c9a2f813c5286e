"""What the listener and the publisher report as they work, for metrics (stdlib only).

The listener and publisher call an observer passed in by ``service``; ``NullObserver`` is the default, so
tests and tools that need no metrics pass nothing. ``metrics.BridgeMetrics`` is the Prometheus one.
"""

from __future__ import annotations

from typing import Protocol

ASSOCIATION_REFUSAL_REASONS = (
    "malformed_request",  # not an A-ASSOCIATE-RQ, too large, or malformed: A-ABORT at the front door
    "request_not_served",  # well-formed but not servable (dicom/negotiation.py): A-ASSOCIATE-RJ at the front door
    "called_ae_title",  # A-ASSOCIATE-RJ: not dicom.ae_title
    "calling_ae_title",  # A-ASSOCIATE-RJ: not in dicom.allowed_calling_aets
    "address_not_allowed",  # aborted once established: the calling AE title is not allowed from its address
    "too_many_associations",  # A-ASSOCIATE-RJ: dicom.max_associations reached
    "other",  # any other A-ASSOCIATE-RJ (protocol version, application context name)
)
"""Why the listener refused an association request: the bounded label set of the refusal counter."""


class BridgeObserver(Protocol):
    def association_opened(self) -> None: ...

    def association_closed(self) -> None: ...

    def association_refused(self, *, reason: str) -> None:
        """An association request was refused; ``reason`` is one of ``ASSOCIATION_REFUSAL_REASONS``."""
        ...

    def instance_received(self, *, status: int, calling_ae: str, size_bytes: int, count: int = 1) -> None:
        """``count`` instances with this status from this AE, ``size_bytes`` in all (a listener process reports
        its instances in batches)."""
        ...

    def publish_attempted(self, *, http_status: int | None, outcome: str) -> None: ...

    def study_published(self, *, seconds_since_last_change: float) -> None: ...

    def publish_pass_completed(self) -> None: ...

    def identifier_issuer_unknown(self, *, identifier: str, issuer: str) -> None:
        """An ImagingStudy was sent with its ``identifier`` ("patient", "accession") lacking a system, because the
        study names an ``issuer`` the configuration does not map."""
        ...

    def relink_looked_up(self, *, link: str, outcome: str) -> None:
        """The relink pass looked up a published study's waiting ``link`` ("patient", "order") again: ``outcome``
        is linked, no_match, several_matches, invalid_id, not_searchable, refused or unavailable."""
        ...

    def fhir_outage_started(self) -> None:
        """The FHIR server stopped answering (``publish/outage.py`` says what counts)."""
        ...

    def fhir_outage_ended(self, *, seconds: float) -> None: ...


class NullObserver:
    """Observes nothing."""

    def association_opened(self) -> None:
        pass

    def association_closed(self) -> None:
        pass

    def association_refused(self, *, reason: str) -> None:
        pass

    def instance_received(self, *, status: int, calling_ae: str, size_bytes: int, count: int = 1) -> None:
        pass

    def publish_attempted(self, *, http_status: int | None, outcome: str) -> None:
        pass

    def study_published(self, *, seconds_since_last_change: float) -> None:
        pass

    def publish_pass_completed(self) -> None:
        pass

    def identifier_issuer_unknown(self, *, identifier: str, issuer: str) -> None:
        pass

    def relink_looked_up(self, *, link: str, outcome: str) -> None:
        pass

    def fhir_outage_started(self) -> None:
        pass

    def fhir_outage_ended(self, *, seconds: float) -> None:
        pass
