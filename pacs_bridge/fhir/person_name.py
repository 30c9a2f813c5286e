"""Pure rendering of DICOM person names (PN) as readable text for ``Reference.display``.

A PN value is up to three component groups separated by ``=`` (alphabetic, ideographic, phonetic), each of
up to five components separated by ``^``: family, given, middle, prefix, suffix. ``Doe^Jane`` renders as
``Jane Doe``; ideographic names keep the family name first (``山田 太郎``). When both an alphabetic and an
ideographic group are present, the ideographic one follows in parentheses; the phonetic group is a reading
aid and is only used when nothing else is there. A value without ``^`` is free text and is kept as it is.

``human_names`` gives the same value as FHIR HumanName elements (for the Patient the bridge creates), one per
component group, each with its readable ``text``.
"""

from __future__ import annotations

from typing import Any

# ISO 21090 name representation: which DICOM component group a HumanName came from, when there are several.
NAME_REPRESENTATION_URL = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
_REPRESENTATIONS = ("ABC", "IDE", "SYL")  # alphabetic, ideographic, phonetic


def _components(group: str) -> list[str]:
    parts = [" ".join(part.split()) for part in group.split("^")]
    return (parts + [""] * 5)[:5]


def _render_group(group: str, *, family_first: bool) -> str:
    if "^" not in group:
        return " ".join(group.split())
    family, given, middle, prefix, suffix = _components(group)
    ordered = [prefix, family, given, middle] if family_first else [prefix, given, middle, family]
    return " ".join(part for part in [*ordered, suffix] if part)


def render_person_name(value: str) -> str:
    """The person name as display text; empty for an empty name."""
    groups = [*value.split("="), "", ""][:3]
    alphabetic = _render_group(groups[0], family_first=False)
    ideographic = _render_group(groups[1], family_first=True)
    if alphabetic and ideographic and ideographic != alphabetic:
        return f"{alphabetic} ({ideographic})"
    return alphabetic or ideographic or _render_group(groups[2], family_first=True)


def _human_name(group: str, *, family_first: bool) -> dict[str, Any]:
    name: dict[str, Any] = {"text": _render_group(group, family_first=family_first)}
    if "^" not in group:
        return name  # free text: no parts to tell apart
    family, given, middle, prefix, suffix = _components(group)
    if family:
        name["family"] = family
    if given or middle:
        name["given"] = [part for part in (given, middle) if part]
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


def human_names(value: str) -> list[dict[str, Any]]:
    """The person name as FHIR HumanName elements: one per non-empty component group; empty for an empty name.

    ``Doe^Jane^Q^Dr`` gives ``{"text": "Dr Jane Q Doe", "family": "Doe", "given": ["Jane", "Q"], "prefix":
    ["Dr"]}`` (FHIR's ``given`` holds the middle names too). When several groups are present, each name carries
    the ISO 21090 representation extension (``ABC``, ``IDE``, ``SYL``) saying which group it is.
    """
    groups = [*value.split("="), "", ""][:3]
    present = [
        (representation, group)
        for representation, group in zip(_REPRESENTATIONS, groups, strict=True)
        if _render_group(group, family_first=False)
    ]
    names = []
    for representation, group in present:
        name = _human_name(group, family_first=representation != "ABC")
        if len(present) > 1:
            name = {"extension": [{"url": NAME_REPRESENTATION_URL, "valueCode": representation}], **name}
        names.append(name)
    return names
