"""End to end, issue 15: DCMTK storescu -> `pacs-bridge run` (subprocess; index on SQLite and PostgreSQL) -> the
real FHIR test server, then every search of the FHIR server guide with the count it must give; and a study
published before its Patient and ServiceRequest exist, linked by the relink pass once they do."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.bridge_process import BridgeProcess, free_port, wait_for
from tests.support.dcmtk import storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.orders import ACCESSION_SYSTEM, seed_service_request, service_request_resource
from tests.support.patients import SYSTEM, patient_resource, seed_patient
from tests.support.studies import SeriesSpec, new_study_uid, study_datasets, write_file

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk]

DCM = "http://dicom.nema.org/resources/ontology/DCM"
LOOKUP_MODES = {
    "patient": {"mode": "lookup"},  # BridgeProcess configures patient.identifier_system: SYSTEM
    "accession": {"mode": "lookup", "identifier_system": ACCESSION_SYSTEM},
}


@pytest.fixture
def start_bridge(tmp_path: Path, database_url: str, fresh_fhir_server: FhirTestServer) -> Iterator[Any]:
    """Starts a bridge in patient.mode and accession.mode lookup on the parametrized database."""
    started: list[BridgeProcess] = []

    def start(**extra: dict[str, Any]) -> BridgeProcess:
        bridge = BridgeProcess(
            tmp_path,
            database_url=database_url,
            fhir_base_url=fresh_fhir_server.base_url,
            extra={**LOOKUP_MODES, **extra},
        )
        started.append(bridge)
        return bridge.start()

    yield start
    for bridge in started:
        bridge.close()


def send_study(
    bridge: BridgeProcess,
    directory: Path,
    series: list[SeriesSpec],
    *,
    patient_id: str,
    accession: str,
    **attributes: str,
) -> str:
    """storescu one generated study with these attributes; returns its Study Instance UID."""
    study_uid = new_study_uid()
    for ds in study_datasets(study_uid, series, patient_id=patient_id, accession=accession):
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        write_file(ds, directory / study_uid / f"{ds.SOPInstanceUID}.dcm")
    sent = storescu(bridge.port, directory / study_uid)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    return study_uid


def wait_published(bridge: BridgeProcess, *study_uids: str) -> None:
    for study_uid in study_uids:
        wait_for(
            lambda uid=study_uid: (bridge.study_row(uid) or {}).get("publish_state") == "published",  # type: ignore[misc]
            timeout=60,
            what=f"study {study_uid} to be published",
        )


def test_every_search_of_the_fhir_server_guide_finds_what_it_should(
    start_bridge: Any, fresh_fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    """Three studies of two patients, two of them with an order on the server: identifier (accession and Study
    UID), patient, subject, status, modality, started, basedon, referrer and endpoint each give their count."""
    patient_id = seed_patient(fresh_fhir_server, "PAT-F-1")  # PAT-F-2 has no Patient on the server
    order_1 = seed_service_request(fresh_fhir_server, "ACC-F-1")
    order_3 = seed_service_request(fresh_fhir_server, "ACC-F-3")  # ACC-F-2 has no order on the server
    bridge = start_bridge()
    ct = send_study(
        bridge,
        tmp_path,
        [SeriesSpec("CT", 2)],
        patient_id="PAT-F-1",
        accession="ACC-F-1",
        ReferringPhysicianName="Doe^John",
    )
    mr = send_study(
        bridge, tmp_path, [SeriesSpec("MR", 1)], patient_id="PAT-F-1", accession="ACC-F-2", StudyDate="20230601"
    )
    ct_sr = send_study(
        bridge,
        tmp_path,
        [SeriesSpec("CT", 1), SeriesSpec("SR", 1)],
        patient_id="PAT-F-2",
        accession="ACC-F-3",
        StudyDate="20240701",
    )
    wait_published(bridge, ct, mr, ct_sr)

    def found(**search: str) -> list[str]:
        return sorted(resource["id"] for resource in fresh_fhir_server.search("ImagingStudy", **search))

    expected: list[tuple[dict[str, str], list[str]]] = [
        # identifier: the Study Instance UID, with and without its system
        ({"identifier": f"urn:dicom:uid|urn:oid:{ct}"}, [ct]),
        ({"identifier": f"urn:oid:{mr}"}, [mr]),
        # identifier: the accession number, bare (the guide's own example) and with its system
        ({"identifier": "ACC-F-1"}, [ct]),
        ({"identifier": f"{ACCESSION_SYSTEM}|ACC-F-3"}, [ct_sr]),
        ({"identifier": "urn:oid:9.9.9|ACC-F-3"}, []),  # another issuer's number: not ours
        # patient and subject: the one Patient the server holds (PAT-F-2 has none: not findable this way)
        ({"patient": f"Patient/{patient_id}"}, sorted([ct, mr])),
        ({"patient": patient_id}, sorted([ct, mr])),
        ({"subject": f"Patient/{patient_id}"}, sorted([ct, mr])),
        # status
        ({"status": "available"}, sorted([ct, mr, ct_sr])),
        ({"status": "cancelled"}, []),
        # modality: the search parameter reads series.modality (R4 and R5), so SR finds the study with an SR
        # series, although its R4 study-level modality lists acquisition modalities only (CT)
        ({"modality": "CT"}, sorted([ct, ct_sr])),
        ({"modality": f"{DCM}|MR"}, [mr]),
        ({"modality": "SR"}, [ct_sr]),
        ({"modality": "US"}, []),
        # started
        ({"started": "ge2024-01-01"}, sorted([ct, ct_sr])),
        ({"started": "lt2024-01-01"}, [mr]),
        ({"started": "2024-03-15"}, [ct]),
        # basedon: the orders the server holds (ACC-F-2 has none)
        ({"basedon": f"ServiceRequest/{order_1}"}, [ct]),
        ({"basedon": f"ServiceRequest/{order_3}"}, [ct_sr]),
        # referrer: a name only, no Practitioner resource; present or not
        ({"referrer:missing": "false"}, [ct]),
        ({"referrer": "Practitioner/doe-john"}, []),
        # endpoint: the configured WADO-RS Endpoint, referenced by every study
        ({"endpoint": "Endpoint/pacs-wado-rs"}, sorted([ct, mr, ct_sr])),
    ]
    assert [(search, found(**search)) for search, _ in expected] == expected
    unlinked = fresh_fhir_server.read("ImagingStudy", ct_sr)
    assert unlinked is not None
    assert unlinked["subject"] == {"type": "Patient", "identifier": {"system": SYSTEM, "value": "PAT-F-2"}}
    assert unlinked["modality"] == [{"system": DCM, "code": "CT"}], "R4: acquisition modalities only"
    log = bridge.log()
    assert "PAT-F-1" not in log and "PAT-F-2" not in log, "patient IDs in the log"


def metric(port: int, line_start: str) -> float:
    """The value of the first /metrics line starting with ``line_start``; 0 when absent."""
    with httpx.Client(timeout=10, trust_env=False) as http:
        text = http.get(f"http://127.0.0.1:{port}/metrics").text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def status(bridge: BridgeProcess) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "pacs_bridge", "status", "--json", "--config", str(bridge.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def test_a_patient_and_an_order_created_after_publishing_are_linked_by_the_relink_pass(
    start_bridge: Any, fresh_fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    """Published by identifier only; status and metrics show it waiting. Once the EHR creates the Patient and the
    RIS the ServiceRequest, the running bridge republishes the study once with both literal references (version
    2), patient= and basedon= find it, and nothing waits any more."""
    http_port = free_port()
    bridge = start_bridge(publish={"relink_seconds": 1}, http={"bind": "127.0.0.1", "port": http_port})
    study_uid = send_study(bridge, tmp_path, [SeriesSpec("CT", 2)], patient_id="PAT-R-1", accession="ACC-R-1")
    wait_published(bridge, study_uid)
    first = fresh_fhir_server.read("ImagingStudy", study_uid)
    assert first is not None and "reference" not in first["subject"] and "reference" not in first["basedOn"][0]
    waiting = status(bridge)["relink"]
    assert (waiting["enabled"], waiting["patient_waiting"], waiting["order_waiting"]) == (True, 1, 1)
    assert metric(http_port, 'pacs_bridge_relink_waiting_studies{link="patient"}') == 1.0

    # Both appear at once, so the one republish links both: a republish between two separate creates would link
    # the first alone, and a second republish the other.
    patient_id, order_id = fresh_fhir_server.create_together(
        patient_resource("PAT-R-1"), service_request_resource("ACC-R-1")
    )

    def linked() -> dict[str, Any] | None:
        study = fresh_fhir_server.read("ImagingStudy", study_uid)
        return study if study and "reference" in study["subject"] and "reference" in study["basedOn"][0] else None

    study = wait_for(linked, timeout=90, what="the study to be republished with its Patient and ServiceRequest")
    assert study["subject"]["reference"] == f"Patient/{patient_id}"
    assert study["basedOn"][0]["reference"] == f"ServiceRequest/{order_id}"
    assert study["meta"]["versionId"] == "2"
    wait_published(bridge, study_uid)
    assert [s["id"] for s in fresh_fhir_server.search("ImagingStudy", patient=f"Patient/{patient_id}")] == [study_uid]
    assert [s["id"] for s in fresh_fhir_server.search("ImagingStudy", basedon=f"ServiceRequest/{order_id}")] == [
        study_uid
    ]
    settled = status(bridge)["relink"]
    assert (settled["patient_waiting"], settled["order_waiting"], settled["next_at"]) == (0, 0, None)
    # A relink pass found at least one of them and made the study due; the republish looks both up itself, so a
    # pass whose Patient search ran just before the creation and its ServiceRequest search just after (or the
    # reverse) counts one link, and the republish links the other.
    linked_by_relink = [
        metric(http_port, f'pacs_bridge_relink_lookups_total{{link="{link}",outcome="linked"}}')
        for link in ("patient", "order")
    ]
    assert sum(linked_by_relink) >= 1.0 and max(linked_by_relink) == 1.0, linked_by_relink
    assert fresh_fhir_server.request_counts()["PUT ImagingStudy"] == 2
    log = bridge.log()
    assert '"event": "study_relinked"' in log
    assert "PAT-R-1" not in log, "patient IDs in the log"
