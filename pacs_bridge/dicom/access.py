"""Pure access rules for calling AE titles: which AEs may associate, optionally only from given addresses, and
why an association request was rejected."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True, kw_only=True)
class CallingAeRule:
    """One allowed calling AE title; ``networks`` empty means from any address."""

    ae_title: str
    networks: tuple[IpNetwork, ...] = ()


def parse_network(text: str) -> IpNetwork:
    """An address (``10.0.0.5``) or network (``10.0.1.0/24``); raises ValueError naming the bad value."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        raise ValueError(f"expected an IP address or network such as 10.0.1.0/24, got {text!r}") from exc


def refusal_reason(rules: Sequence[CallingAeRule], ae_title: str, address: str) -> str | None:
    """Why an association from ``ae_title`` at ``address`` is not allowed, or None when it is.

    No rules at all means any AE from anywhere. An AE listed more than once is allowed from the union of its
    networks.
    """
    if not rules:
        return None
    title = ae_title.strip()
    matching = [rule for rule in rules if rule.ae_title == title]
    if not matching:
        return f"calling AE title {title!r} is not in dicom.allowed_calling_aets"
    if any(not rule.networks for rule in matching):
        return None
    try:
        peer = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"calling AE title {title!r} connected from an unparsable address {address!r}"
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    for rule in matching:
        if any(peer in network for network in rule.networks):
            return None
    return f"calling AE title {title!r} is not allowed from {peer}"


def rejection_label(*, result_source: int, diagnostic: int) -> str:
    """The refusal counter's reason (observe.ASSOCIATION_REFUSAL_REASONS) for an A-ASSOCIATE-RJ pynetdicom sent."""
    return _REJECTION_LABELS.get((result_source, diagnostic), "other")


_REJECTION_LABELS = {(1, 7): "called_ae_title", (1, 3): "calling_ae_title", (3, 2): "too_many_associations"}


def rejection_reason(
    *,
    result_source: int,
    diagnostic: int,
    called_ae: str,
    calling_ae: str,
    our_ae: str,
    max_associations: int,
) -> str:
    """Why the listener answered an association request with A-ASSOCIATE-RJ (PS3.8 9.3.4: Result Source and
    Diagnostic), in terms of the configuration key involved and what to do."""
    called, calling = called_ae.strip(), calling_ae.strip()
    if (result_source, diagnostic) == (1, 7):
        return (
            f"called AE title {called!r} is not this bridge's ({our_ae!r}, dicom.ae_title); set the sender's "
            f"called AE title to {our_ae}"
        )
    if (result_source, diagnostic) == (1, 3):
        return (
            f"calling AE title {calling!r} is not in dicom.allowed_calling_aets; add it there, or have the sender "
            "use a listed AE title"
        )
    if (result_source, diagnostic) == (3, 2):
        return (
            f"the limit of {max_associations} open associations (dicom.max_associations) is reached; the sender may "
            "try again later, or raise the limit"
        )
    if (result_source, diagnostic) == (2, 2):
        return "the sender's DICOM upper layer protocol version is not supported"
    if (result_source, diagnostic) == (1, 2):
        return "the sender's application context name is not DICOM's (1.2.840.10008.3.1.1.1)"
    return f"rejected with result source {result_source}, diagnostic {diagnostic}"
