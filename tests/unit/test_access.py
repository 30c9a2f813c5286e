"""Which calling AEs may associate, from where."""

from __future__ import annotations

import pytest

from pacs_bridge.config import parse_config
from pacs_bridge.dicom.access import CallingAeRule, parse_network, refusal_reason, rejection_reason
from pacs_bridge.errors import ConfigError

CT = CallingAeRule(ae_title="CT01")
MR_PINNED = CallingAeRule(ae_title="MR01", networks=(parse_network("10.20.1.0/24"), parse_network("10.9.9.9")))


@pytest.mark.parametrize(
    ("rules", "ae_title", "address", "allowed"),
    [
        ((), "ANYONE", "192.0.2.1", True),  # no rules: any AE from anywhere
        ((CT,), "CT01", "192.0.2.1", True),  # listed, not pinned: from anywhere
        ((CT,), "CT01  ", "192.0.2.1", True),  # AE title padding does not matter
        ((CT,), "CT02", "192.0.2.1", False),  # not listed
        ((CT,), "ct01", "192.0.2.1", False),  # AE titles are case-sensitive
        ((MR_PINNED,), "MR01", "10.20.1.77", True),  # inside the pinned network
        ((MR_PINNED,), "MR01", "10.9.9.9", True),  # the pinned single address
        ((MR_PINNED,), "MR01", "10.20.2.1", False),  # outside every pinned network
        ((MR_PINNED,), "MR01", "::ffff:10.20.1.5", True),  # IPv4-mapped IPv6 peer
        ((MR_PINNED, CallingAeRule(ae_title="MR01")), "MR01", "192.0.2.1", True),  # an unpinned entry wins
        ((MR_PINNED,), "MR01", "not-an-address", False),  # unparsable peer address
    ],
)
def test_refusal_reason_table(rules: tuple[CallingAeRule, ...], ae_title: str, address: str, allowed: bool):
    """refusal_reason is None exactly when the AE may associate from that address."""
    assert (refusal_reason(rules, ae_title, address) is None) == allowed


def test_refusal_reason_names_the_ae_and_the_address():
    """The reason says which AE and which address, for the log."""
    assert refusal_reason((MR_PINNED,), "MR01", "10.20.2.1") == "calling AE title 'MR01' is not allowed from 10.20.2.1"
    assert refusal_reason((CT,), "XA01", "10.0.0.1") == ("calling AE title 'XA01' is not in dicom.allowed_calling_aets")


def test_config_accepts_titles_and_pinned_entries_and_rejects_bad_addresses():
    """Plain titles and {ae_title, addresses} entries parse into rules; a bad address is named by key path."""
    config = parse_config(
        {
            "fhir": {"base_url": "https://fhir.example.org"},
            "dicom": {"allowed_calling_aets": ["CT01", {"ae_title": "MR01", "addresses": ["10.20.1.0/24"]}]},
        },
        path="c.yaml",
    )
    assert config.dicom.calling_ae_rules() == (
        CallingAeRule(ae_title="CT01"),
        CallingAeRule(ae_title="MR01", networks=(parse_network("10.20.1.0/24"),)),
    )
    with pytest.raises(ConfigError) as refused:
        parse_config(
            {
                "fhir": {"base_url": "https://fhir.example.org"},
                "dicom": {"allowed_calling_aets": [{"ae_title": "MR01", "addresses": ["10.20.1.0/33"]}]},
            },
            path="c.yaml",
        )
    assert any(
        "dicom.allowed_calling_aets[0]" in problem and "10.20.1.0/33" in problem for problem in refused.value.problems
    ), refused.value.problems


@pytest.mark.parametrize(
    ("result_source", "diagnostic", "expected"),
    [
        # the sender asked for another AE title than ours
        (
            1,
            7,
            "called AE title 'PACS' is not this bridge's ('PACS_BRIDGE', dicom.ae_title); set the sender's "
            "called AE title to PACS_BRIDGE",
        ),
        # the sender's own title is not on the allow-list
        (
            1,
            3,
            "calling AE title 'CT99' is not in dicom.allowed_calling_aets; add it there, or have the sender use "
            "a listed AE title",
        ),
        # every association slot taken
        (
            3,
            2,
            "the limit of 16 open associations (dicom.max_associations) is reached; the sender may try again "
            "later, or raise the limit",
        ),
        # protocol and application context: nothing to configure, but named
        (2, 2, "the sender's DICOM upper layer protocol version is not supported"),
        (1, 2, "the sender's application context name is not DICOM's (1.2.840.10008.3.1.1.1)"),
        # anything else: the codes themselves
        (2, 1, "rejected with result source 2, diagnostic 1"),
    ],
)
def test_rejection_reason_names_the_key_and_what_to_do(result_source: int, diagnostic: int, expected: str):
    """Each A-ASSOCIATE-RJ reason (PS3.8 9.3.4) in the operator's terms."""
    reason = rejection_reason(
        result_source=result_source,
        diagnostic=diagnostic,
        called_ae="PACS            ",
        calling_ae="CT99",
        our_ae="PACS_BRIDGE",
        max_associations=16,
    )

    assert reason == expected
