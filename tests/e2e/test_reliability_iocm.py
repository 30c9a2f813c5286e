"""IHE IOCM rejection notes, end to end: storescu (DCMTK) sends a study, then rejection notes (Key Object
Selection Documents) for part of it and for the rest; the bridge runs as a subprocess and publishes to the real
FHIR test server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pacs_bridge.fhir.imaging_study import imaging_study_id
from tests.support.bridge_process import BridgeProcess, wait_for
from tests.support.dcmtk import storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.rejection_notes import make_rejection_note
from tests.support.studies import SeriesSpec, new_study_uid, write_file, write_study

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk]


def store_responses(output: str) -> list[str]:
    return re.findall(r"Received Store Response \((.*)\)", output)


def send(bridge: BridgeProcess, files: list[Path]) -> list[str]:
    """Send with storescu; every file must be answered, and the answers are returned."""
    result = storescu(bridge.port, files)
    answers = store_responses(result.stdout + result.stderr)
    assert result.returncode == 0 and len(answers) == len(files), result.stdout + result.stderr
    return answers


def published_after(bridge: BridgeProcess, study_uid: str, change_seq: int) -> dict[str, Any]:
    """Wait until the study's change after ``change_seq`` is published; its studies row."""

    def done() -> dict[str, Any] | None:
        row = bridge.study_row(study_uid)
        if row and row["change_seq"] > change_seq and row["published_seq"] == row["change_seq"]:
            return row if row["publish_state"] == "published" else None
        return None

    row = wait_for(done, timeout=60, what=f"study {study_uid} to be published after {change_seq}")
    assert row is not None
    return row


def listed_instances(resource: dict[str, Any]) -> set[str]:
    return {instance["uid"] for series in resource.get("series", []) for instance in series.get("instance", [])}


@pytest.mark.parametrize(
    ("title", "final_status"),
    [
        ("113037", "entered-in-error"),  # Rejected for Patient Safety Reasons
        ("113001", "cancelled"),  # Rejected for Quality Reasons
    ],
)
def test_rejection_notes_withdraw_instances_then_the_whole_study_and_resends_stay_out(
    tmp_path: Path, fresh_fhir_server: FhirTestServer, title: str, final_status: str
) -> None:
    """A note for series 1 removes it from the ImagingStudy (one more version); a re-send of a rejected instance
    is answered Success and changes nothing; a note for the rest publishes the study once more, with no series
    and status entered-in-error (patient safety) or cancelled (quality). No note is ever listed."""
    bridge = BridgeProcess(
        tmp_path, database_url=f"sqlite:///{tmp_path / 'bridge.db'}", fhir_base_url=fresh_fhir_server.base_url
    )
    study_uid = new_study_uid()
    resource_id = imaging_study_id(study_uid)
    files = write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 2), SeriesSpec("CT", 2)])
    series_1, series_2 = f"{study_uid}.1", f"{study_uid}.2"
    first_note = write_file(
        make_rejection_note(
            [(study_uid, series_1, f"{series_1}.{n}") for n in (1, 2)],
            title=title,
            note_uid=f"{study_uid}.99.1",
            note_series_uid=f"{study_uid}.99",
        ),
        tmp_path / "note-1.dcm",
    )
    second_note = write_file(
        make_rejection_note(
            [(study_uid, series_2, f"{series_2}.{n}") for n in (1, 2)],
            title=title,
            note_uid=f"{study_uid}.99.2",
            note_series_uid=f"{study_uid}.99",
        ),
        tmp_path / "note-2.dcm",
    )
    try:
        bridge.start()
        assert send(bridge, files) == ["Success"] * 4
        row = published_after(bridge, study_uid, 0)
        assert fresh_fhir_server.versions("ImagingStudy", resource_id) == 1

        # 1. A note rejecting series 1: those instances and the series leave the index and the ImagingStudy.
        assert send(bridge, [first_note]) == ["Success"]
        row = published_after(bridge, study_uid, row["change_seq"])
        resource = fresh_fhir_server.read("ImagingStudy", resource_id)
        assert resource is not None
        assert listed_instances(resource) == {f"{series_2}.1", f"{series_2}.2"}
        assert (resource["status"], resource["numberOfSeries"], resource["numberOfInstances"]) == ("available", 1, 2)
        assert fresh_fhir_server.versions("ImagingStudy", resource_id) == 2

        # 2. A rejected instance sent again: Success for the sender, nothing indexed, nothing to publish.
        assert send(bridge, [files[0]]) == ["Success"]
        assert bridge.instance_uids(study_uid) == {f"{series_2}.1", f"{series_2}.2"}
        unchanged = bridge.study_row(study_uid)
        assert unchanged is not None
        assert (unchanged["change_seq"], unchanged["publish_state"]) == (row["change_seq"], "published")
        assert '"event": "rejected_instance_received"' in bridge.log()

        # 3. A note rejecting the rest: the study is published once more, withdrawn.
        assert send(bridge, [second_note]) == ["Success"]
        published_after(bridge, study_uid, row["change_seq"])
        resource = fresh_fhir_server.read("ImagingStudy", resource_id)
        assert resource is not None
        assert (resource["status"], resource["numberOfSeries"], resource["numberOfInstances"]) == (
            final_status,
            0,
            0,
        )
        assert "series" not in resource and [m["code"] for m in resource["modality"]] == ["CT"]
        assert fresh_fhir_server.versions("ImagingStudy", resource_id) == 3
        assert bridge.instance_uids(study_uid) == set()
        assert bridge.log().count('"event": "rejection_note_applied"') == 2
        print(f"versions written: 3 (initial, partial rejection, withdrawn as {final_status})")
    finally:
        bridge.close()
