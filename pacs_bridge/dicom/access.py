"""Pure access rules for calling AE titles: which AEs may associate, optionally only from given addresses."""

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
