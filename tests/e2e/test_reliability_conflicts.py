"""Conflicting UIDs, end to end: an instance or series already indexed under another study is refused
(first arrival kept), and neither study is touched. Bridge subprocess, DCMTK storescu, real FHIR server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.bridge_process import BridgeProcess, wait_for
from tests.support.dcmtk import storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import make_dataset, new_study_uid, write_file

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk]


def statuses(output: str) -> list[str]:
    return re.findall(r"Received Store Response \((.*)\)", output)


def test_instance_or_series_reused_under_another_study_is_refused_and_the_first_study_stays_intact(
    tmp_path: Path, fresh_fhir_server: FhirTestServer
):
    """The SOP Instance UID of study A's instance sent under study B, and A's Series UID under study C, each
    get a failure naming the conflict; A keeps its two instances and is published once; B and C do not exist."""
    bridge = BridgeProcess(
        tmp_path, database_url=f"sqlite:///{tmp_path / 'bridge.db'}", fhir_base_url=fresh_fhir_server.base_url
    )
    study_a, study_b, study_c = new_study_uid(), new_study_uid(), new_study_uid()
    series_a = f"{study_a}.1"
    first = [
        write_file(
            make_dataset(StudyInstanceUID=study_a, SeriesInstanceUID=series_a, SOPInstanceUID=f"{series_a}.{n}"),
            tmp_path / "a" / f"{n}.dcm",
        )
        for n in (1, 2)
    ]
    same_instance_other_study = write_file(
        make_dataset(StudyInstanceUID=study_b, SeriesInstanceUID=f"{study_b}.1", SOPInstanceUID=f"{series_a}.1"),
        tmp_path / "b.dcm",
    )
    same_series_other_study = write_file(
        make_dataset(StudyInstanceUID=study_c, SeriesInstanceUID=series_a, SOPInstanceUID=f"{study_c}.1.1"),
        tmp_path / "c.dcm",
    )
    try:
        bridge.start()
        assert storescu(bridge.port, first).returncode == 0
        conflicting = storescu(bridge.port, [same_instance_other_study, same_series_other_study], extra_args=("-nh",))
        answers = statuses(conflicting.stdout + conflicting.stderr)
        print(f"storescu saw: {answers}")
        assert answers == ["Error: CannotUnderstand"] * 2, answers  # how DCMTK names the 0xC0xx range

        wait_for(
            lambda: (bridge.study_row(study_a) or {}).get("publish_state") == "published",
            timeout=30,
            what="study A to be published",
        )
        assert bridge.instance_uids(study_a) == {f"{series_a}.1", f"{series_a}.2"}
        assert bridge.study_row(study_b) is None and bridge.study_row(study_c) is None
        found = fresh_fhir_server.search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_a}")
        assert len(found) == 1 and found[0]["numberOfInstances"] == 2
        assert fresh_fhir_server.search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_b}") == []
        assert fresh_fhir_server.request_counts().get("PUT ImagingStudy") == 1
        log = bridge.log()
        assert "already indexed in another series" in log and "already indexed in another study" in log
        assert log.count('"status": "0xC001"') == 2, "each conflict answered 0xC001"
    finally:
        bridge.close()
