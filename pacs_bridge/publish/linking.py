"""PURE: how a study's subject and basedOn reach the Patient and the ServiceRequest the FHIR server holds.

A ``Lookup`` is what one search by identifier found (``publish/lookup.py`` sends it): the literal reference of
exactly one match, or why there is none.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Lookup:
    """The outcome of looking up a study's Patient or ServiceRequest by its identifier."""

    # The ``system|value`` token searched; None: the identifier was not searched (the mode asks for no search,
    # or the identifier has no system, or there is no identifier).
    search: str | None
    reference: str | None = None  # "Patient/123": exactly one resource matched (or was created)
    # Why there is no reference ("" when there is one, or when the mode asks for none): no_match,
    # several_matches, invalid_id, issuer_not_mapped, no_identifier_system, no_patient_id.
    reason: str = ""
    matches: int | None = None  # how many resources the search found; None when not searched or not known
    issuer: str = ""  # the issuer the configuration does not map (reason issuer_not_mapped)
