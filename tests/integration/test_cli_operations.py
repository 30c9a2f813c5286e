"""Operator commands against a real index (SQLite and PostgreSQL): status, retry, republish."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from pacs_bridge.cli import main
from pacs_bridge.index.repository import Index
from pacs_bridge.publish.linking import search_key
from pacs_bridge.records import InstanceRecord, Link, SeriesAttributes, StudyAttributes, StudyLinks
from tests.conftest import QUIET, FakeClock
from tests.support.studies import uid

LEASE = timedelta(minutes=1)


def record(study: str) -> InstanceRecord:
    return InstanceRecord(
        study=StudyAttributes(study_uid=uid(study)),
        series=SeriesAttributes(series_uid=uid(f"{study}.1"), modality="CT"),
        sop_instance_uid=uid(f"{study}.1.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )


@pytest.fixture
def config_path(tmp_path: Path, database_url: str) -> str:
    path = tmp_path / "pacs-bridge.yaml"
    config = {"database": {"url": database_url}, "fhir": {"base_url": "http://127.0.0.1:9/fhir"}}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


@pytest.fixture
def populated(index: Index, clock: FakeClock) -> Index:
    """Study 1 published, study 2 failed with a reason, study 3 pending."""
    for study in ("1", "2", "3"):
        index.record_instance(record(study), received_at=clock())
    clock.advance(QUIET)
    index.claim_due_studies(clock(), limit=2, lease=LEASE, claimer="t")
    index.mark_published(uid("1"), change_seq=1, content_hash="h", now=clock(), sent=True)
    index.mark_failed(uid("2"), change_seq=1, error="HTTP 400: ImagingStudy.subject missing")
    return index


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_status_json_counts_states_and_lists_failures_with_reasons(
    populated: Index, config_path: str, capsys: pytest.CaptureFixture[str]
):
    """status --json is one document: counts, the oldest pending study, each failed one with its reason."""
    code, out, _ = run(capsys, "status", "--json", "--config", config_path)
    document = json.loads(out)
    assert code == 0
    assert document["counts"] == {"pending": 1, "published": 1, "failed": 1}
    assert document["oldest_pending"]["study_uid"] == uid("3")
    assert [(f["study_uid"], f["last_error"]) for f in document["failed"]] == [
        (uid("2"), "HTTP 400: ImagingStudy.subject missing")
    ]


def test_status_for_people_says_what_failed_and_why(
    populated: Index, config_path: str, capsys: pytest.CaptureFixture[str]
):
    """The readable status names counts, the oldest pending study and each failure's reason."""
    code, out, _ = run(capsys, "status", "--config", config_path)
    assert code == 0
    assert "studies: 1 pending, 1 published, 1 failed" in out
    assert f"oldest pending: {uid('3')}" in out
    assert f"{uid('2')}  attempts=1  HTTP 400: ImagingStudy.subject missing" in out


def test_retry_failed_makes_failed_studies_due_now(
    populated: Index, config_path: str, capsys: pytest.CaptureFixture[str], clock: FakeClock
):
    """retry --failed turns every failed study pending and claimable at once."""
    code, out, _ = run(capsys, "retry", "--failed", "--config", config_path)
    assert code == 0 and uid("2") in out
    assert populated.count_by_state().failed == 0
    status = populated.study_status(uid("2"))
    assert status is not None and (status.publish_state, status.attempts) == ("pending", 0)


def test_retry_of_an_unknown_study_fails_naming_it(
    populated: Index, config_path: str, capsys: pytest.CaptureFixture[str]
):
    """Retrying a UID that is not a failed study exits 1 and says so."""
    code, _, err = run(capsys, "retry", uid("1"), "--config", config_path)
    assert code == 1
    assert f"no failed study {uid('1')} in the index" in err


def test_republish_forgets_the_published_hash_so_the_study_is_sent_again(
    populated: Index, config_path: str, capsys: pytest.CaptureFixture[str]
):
    """republish STUDY_UID makes a published study pending, due now, with no hash to match."""
    code, _, _ = run(capsys, "republish", uid("1"), "--config", config_path)
    assert code == 0
    assert populated.load_snapshot(uid("1")).published_hash is None
    status = populated.study_status(uid("1"))
    assert status is not None and status.publish_state == "pending"


def test_republish_since_a_date_takes_every_study_changed_since(
    populated: Index, config_path: str, capsys: pytest.CaptureFixture[str]
):
    """republish --since 2024-03-15 covers the three studies received that day; a later date none."""
    code, out, _ = run(capsys, "republish", "--since", "2024-03-15", "--config", config_path)
    assert code == 0 and out.startswith("3 study(s)")
    code, out, _ = run(capsys, "republish", "--since", "2024-03-16", "--config", config_path)
    assert code == 0 and out.startswith("0 study(s)")


def test_status_shows_the_relink_queue(
    populated: Index, config_path: str, capsys: pytest.CaptureFixture[str], clock: FakeClock
):
    """Published studies whose Patient or ServiceRequest is still looked for, and how many lookups are due now."""
    waiting_patient, waiting_order = Link(key=search_key("urn:oid:1.2.3|P")), Link(key=search_key("urn:acc|A"))
    populated.links.record(uid("1"), StudyLinks(patient=waiting_patient, order=waiting_order, relink_at=clock()))

    code, out, _ = run(capsys, "status", "--json", "--config", config_path)
    assert code == 0
    assert json.loads(out)["relink"] == {
        "enabled": True,
        "patient_waiting": 1,
        "order_waiting": 1,
        "due": 1,
        "next_at": clock().isoformat(),
    }
    code, out, _ = run(capsys, "status", "--config", config_path)
    assert code == 0
    assert (
        "relink: 1 published studies wait for their Patient, 1 for their ServiceRequest; 1 due now, next lookup "
        f"{clock().isoformat()}"
    ) in out
