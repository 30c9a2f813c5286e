"""PURE: the business identifiers the bridge sends for a study's patient and order, and how they are searched.

One rule gives the ``Identifier.system`` of a PatientID (IssuerOfPatientID, ``patient.issuers``,
``patient.identifier_system``) and of an AccessionNumber (Issuer of Accession Number Sequence,
``accession.issuers``, ``accession.identifier_system``): ``issued_system``. It never guesses: a configured
system stands for the namespace the operator named, so a value whose dataset names an issuer the configuration
does not map gets no system at all, and an identifier without a system is never searched (``identifier_search``),
linked or created. Putting another issuer's number into our namespace would link the images to whichever
patient of ours happens to carry the same number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pacs_bridge.fhir.resource import FhirResource

# FHIR search escaping (R4 3.1.1.5.7 / R5 3.2.1.5.7): these characters separate parts of a parameter value.
_SEARCH_SPECIAL = ("\\", "|", ",", "$")


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedSystem:
    """The identifier system for a value, and the issuer the configuration did not map (if that is why it has none)."""

    system: str  # "": the identifier carries no system
    unmapped_issuer: str = ""  # the issuer the dataset names when no configured system is its own; "" otherwise


def issued_system(
    issuer_names: Sequence[str], *, identifier_system: str, issuer_systems: Mapping[str, str]
) -> IssuedSystem:
    """The system of an identifier whose dataset names its issuer by ``issuer_names`` (most specific first; empty
    names are ignored).

    - No issuer named: ``identifier_system`` (``""`` when not configured).
    - An issuer named and listed in ``issuer_systems`` (by any of its names, the first listed one winning): its
      system.
    - An issuer named but not listed, with or without a table: no system, and ``unmapped_issuer`` names it.
      ``identifier_system`` never serves a named issuer: it may be another organisation's namespace.
    """
    names = [name for name in issuer_names if name]
    if not names:
        return IssuedSystem(system=identifier_system)
    for name in names:
        system = issuer_systems.get(name)
        if system:
            return IssuedSystem(system=system)
    return IssuedSystem(system="", unmapped_issuer=names[0])


def issued_identifier(value: str, issued: IssuedSystem) -> FhirResource:
    """``{system, value}``; without a system, ``{value, assigner: {display: issuer}}`` when an issuer was named."""
    identifier: FhirResource = {}
    if issued.system:
        identifier["system"] = issued.system
    identifier["value"] = value
    if issued.unmapped_issuer:
        identifier["assigner"] = {"display": issued.unmapped_issuer}  # says whose number it is, with no system
    return identifier


def _escaped(text: str) -> str:
    for character in _SEARCH_SPECIAL:
        text = text.replace(character, "\\" + character)
    return text


def identifier_search(identifier: FhirResource | None) -> str | None:
    """The token for ``?identifier=``: ``system|value``, search-escaped; ``None`` without a system or value.

    Without a system the value could be another issuer's number for another person or order: it is not searched.
    """
    if not identifier or not identifier.get("system") or not identifier.get("value"):
        return None
    return f"{_escaped(identifier['system'])}|{_escaped(identifier['value'])}"
