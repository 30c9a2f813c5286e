"""Unit tests for ``pacs_bridge.logs.drop_patient_data``, the processor that keeps patient data out of the logs."""

from __future__ import annotations

from typing import Any

import pytest

from pacs_bridge.logs import PATIENT_DATA_KEYS, drop_patient_data


def test_drop_patient_data_removes_patient_keys_and_keeps_the_rest() -> None:
    """Patient name, ID, birth date and sex go; the event, UIDs and other context stay untouched."""
    event: dict[str, Any] = {
        "event": "instance_stored",
        "level": "info",
        "study_uid": "1.2.826.0.1.3680043.10.1482.1",
        "calling_ae": "MODALITY1",
        "attempt": 2,
        "patient_name": "Doe^Jane",
        "patient_id": "PAT-0001",
        "patient_birth_date": "19700101",
        "birth_date": "19700101",
        "patient_sex": "F",
    }

    result = drop_patient_data(None, "info", event)

    assert result == {
        "event": "instance_stored",
        "level": "info",
        "study_uid": "1.2.826.0.1.3680043.10.1482.1",
        "calling_ae": "MODALITY1",
        "attempt": 2,
    }


PATIENT_KEY_ROWS = [
    "patient_name",  # PatientName (0010,0010)
    "patient_id",  # PatientID (0010,0020)
    "patient_birth_date",  # PatientBirthDate (0010,0030)
    "birth_date",  # the same under a shorter name
    "patient_sex",  # PatientSex (0010,0040)
]


@pytest.mark.parametrize("key", PATIENT_KEY_ROWS)
def test_drop_patient_data_removes_each_patient_key(key: str) -> None:
    """Each key in PATIENT_DATA_KEYS is removed on its own, whatever its value."""
    assert drop_patient_data(None, "warning", {"event": "x", key: "secret"}) == {"event": "x"}


def test_the_table_covers_every_patient_data_key() -> None:
    """A key added to PATIENT_DATA_KEYS must get a row in the table above, and the table holds no other."""
    assert set(PATIENT_KEY_ROWS) == PATIENT_DATA_KEYS


def test_drop_patient_data_leaves_an_event_without_patient_keys_unchanged() -> None:
    """Nothing to drop: the same mapping comes back with the same content."""
    event: dict[str, Any] = {"event": "study_published", "study_uid": "1.2.3", "http_status": 201}

    result = drop_patient_data(None, "info", dict(event))

    assert result == event


def test_drop_patient_data_returns_the_mapping_it_was_given() -> None:
    """Like other structlog processors it edits and returns the event dict, so the chain continues with it."""
    event: dict[str, Any] = {"event": "x", "patient_id": "PAT-0001"}

    assert drop_patient_data(None, "info", event) is event
