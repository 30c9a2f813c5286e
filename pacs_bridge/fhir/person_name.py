"""Pure rendering of DICOM person names (PN) as readable text for ``Reference.display``.

A PN value is up to three component groups separated by ``=`` (alphabetic, ideographic, phonetic), each of
up to five components separated by ``^``: family, given, middle, prefix, suffix. ``Doe^Jane`` renders as
``Jane Doe``; ideographic names keep the family name first (``山田 太郎``). When both an alphabetic and an
ideographic group are present, the ideographic one follows in parentheses; the phonetic group is a reading
aid and is only used when nothing else is there. A value without ``^`` is free text and is kept as it is.
"""

from __future__ import annotations


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
