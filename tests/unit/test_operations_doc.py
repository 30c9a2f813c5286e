"""docs/operations.md names log events and configuration keys that exist in the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from pacs_bridge.config import Config

REPO = Path(__file__).resolve().parents[2]
OPERATIONS = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
SOURCE = "\n".join(path.read_text(encoding="utf-8") for path in (REPO / "pacs_bridge").rglob("*.py"))


def section(title: str) -> str:
    start = OPERATIONS.index(f"## {title}\n")
    end = OPERATIONS.find("\n## ", start + 1)
    return OPERATIONS[start : end if end != -1 else None]


def documented_events() -> set[str]:
    """Events of the Logs table (its first column) and of Troubleshooting ("event `name`")."""
    logs = {
        name
        for row in section("Logs").splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])
    }
    return logs | set(re.findall(r"event `([a-z_]+)`", section("Troubleshooting")))


@pytest.mark.parametrize("event", sorted(documented_events()))
def test_each_documented_event_is_logged_by_the_bridge(event: str) -> None:
    """A log event the operator is told to look for is one the code emits (as a quoted event name)."""
    assert re.search(rf"[\"']{event}[\"']", SOURCE), f"docs/operations.md names {event}, which nothing logs"


def _config_keys() -> set[str]:
    keys: set[str] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            keys.add(prefix + name)
            for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    walk(candidate, f"{prefix}{name}.")

    walk(Config, "")
    return keys


def test_each_key_the_troubleshooting_table_names_exists() -> None:
    """`dicom.port`, `database.url`… in Troubleshooting are real configuration keys."""
    named = set(
        re.findall(
            r"`((?:dicom|database|fhir|debounce|publish|http|patient|logging)\.[a-z_.]+)`", section("Troubleshooting")
        )
    )

    assert named, "the table names configuration keys"
    assert named - _config_keys() == set()
