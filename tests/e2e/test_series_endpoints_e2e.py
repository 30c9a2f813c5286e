"""Series-level endpoint overrides end to end: two senders (DCMTK storescu with their own calling AE titles)
send one study; the ImagingStudy on the real FHIR server references the CARDIO archive from the series
CARDIO sent, the MG archive from the mammography series, and the general PACS from the study, and every
Endpoint it references exists on the server with the payload type of its level."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pacs_bridge.fhir.imaging_study import imaging_study_id
from tests.support.bridge_process import BridgeProcess, wait_for
from tests.support.dcmtk import storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import SeriesSpec, new_study_uid, write_study

pytestmark = [pytest.mark.dcmtk, pytest.mark.fhir_server]

QUIET_SECONDS = 1.0  # BridgeProcess's default debounce

ENDPOINTS = [
    {"id": "pacs-wado-rs", "connection_type": "dicom-wado-rs", "address": "https://pacs.example.org/dicom-web"},
    {
        "id": "cardio-wado-rs",
        "connection_type": "dicom-wado-rs",
        "address": "https://cardio.example.org/rs",
        "series_calling_aets": ["CARDIO"],
    },
    {
        "id": "mg-wado-rs",
        "connection_type": "dicom-wado-rs",
        "address": "https://breast.example.org/rs",
        "series_modalities": ["MG"],
    },
]


@pytest.fixture
def bridge(tmp_path: Path, fresh_fhir_server: FhirTestServer) -> Iterator[BridgeProcess]:
    process = BridgeProcess(
        tmp_path, database_url=f"sqlite:///{tmp_path / 'bridge.db'}", fhir_base_url=fresh_fhir_server.base_url
    )
    config = yaml.safe_load(process.config_path.read_text(encoding="utf-8"))
    process.config_path.write_text(yaml.safe_dump({**config, "endpoints": ENDPOINTS}), encoding="utf-8")
    try:
        yield process.start()
    finally:
        process.close()


def test_series_endpoints_follow_the_sender_and_the_modality(
    bridge: BridgeProcess, fresh_fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    """CT from MODALITY: study endpoint only; XA from CARDIO: the CARDIO archive; MG from MODALITY: the MG one."""
    study_uid = new_study_uid()
    ct, xa, mg = (
        write_study(tmp_path / name, study_uid, [SeriesSpec(modality=modality, instances=2)], first_series_number=n)
        for n, (name, modality) in enumerate([("ct", "CT"), ("xa", "XA"), ("mg", "MG")], start=1)
    )

    for files, calling_ae in ((ct, "MODALITY"), (xa, "CARDIO"), (mg, "MODALITY")):
        sent = storescu(bridge.port, files, calling_ae=calling_ae)
        assert sent.returncode == 0, sent.stdout + sent.stderr

    resource_id = imaging_study_id(study_uid)
    stored = wait_for(
        lambda: (
            (found := fresh_fhir_server.read("ImagingStudy", resource_id)) and found["numberOfInstances"] == 6 and found
        ),
        timeout=60,
        what="the ImagingStudy with all 6 instances",
    )
    assert stored["endpoint"] == [{"reference": "Endpoint/pacs-wado-rs"}]
    by_modality = {
        series["modality"]["code"]: [endpoint["reference"] for endpoint in series.get("endpoint", [])]
        for series in stored["series"]
    }
    assert by_modality == {"CT": [], "XA": ["Endpoint/cardio-wado-rs"], "MG": ["Endpoint/mg-wado-rs"]}
    payload_codes = {
        endpoint["id"]: endpoint["payloadType"][0]["coding"][0]["code"]
        for endpoint_id in ("pacs-wado-rs", "cardio-wado-rs", "mg-wado-rs")
        if (endpoint := fresh_fhir_server.read("Endpoint", endpoint_id))
    }
    assert payload_codes == {"pacs-wado-rs": "113014", "cardio-wado-rs": "113015", "mg-wado-rs": "113015"}


def test_a_later_resend_from_another_ae_keeps_the_series_endpoint_and_writes_nothing(
    bridge: BridgeProcess, fresh_fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    """A PACS forwarding CARDIO's series afterwards does not move it off the CARDIO archive, nor republish."""
    study_uid = new_study_uid()
    xa = write_study(tmp_path / "xa", study_uid, [SeriesSpec(modality="XA", instances=2)])
    assert storescu(bridge.port, xa, calling_ae="CARDIO").returncode == 0
    resource_id = imaging_study_id(study_uid)
    wait_for(lambda: fresh_fhir_server.read("ImagingStudy", resource_id), timeout=60, what="the first ImagingStudy")
    wait_for(
        lambda: (row := bridge.study_row(study_uid)) and row["publish_state"] == "published",
        timeout=30,
        what="the study marked published",
    )

    assert storescu(bridge.port, xa, calling_ae="MAIN_PACS").returncode == 0
    time.sleep(QUIET_SECONDS + 1.0)  # a negative claim needs the debounce window to pass; nothing to poll for

    assert bridge.study_row(study_uid)["publish_state"] == "published"  # type: ignore[index]
    assert fresh_fhir_server.versions("ImagingStudy", resource_id) == 1
    (series,) = fresh_fhir_server.read("ImagingStudy", resource_id)["series"]  # type: ignore[index]
    assert series["endpoint"] == [{"reference": "Endpoint/cardio-wado-rs"}]
