"""Issue 3's "done when", end to end: each golden study, sent by DCMTK storescu to a running bridge, lands in
the real FHIR test server exactly as its hand-reviewed R4 golden; and the same indexed study, mapped for R5,
is exactly its R5 golden and valid against the R5 models."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.endpoint import Endpoint as EndpointR5
from fhir.resources.imagingstudy import ImagingStudy as ImagingStudyR5
from pydicom.dataset import Dataset

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.fhir.imaging_study import build_imaging_study
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.repository import Index
from tests.conftest import MAX_DELAY, QUIET
from tests.support.bridge_process import BridgeProcess, wait_for
from tests.support.dcmtk import storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import write_file
from tests.unit.test_mapping_golden import CASES, R4_SETTINGS, load, settings_for

pytestmark = [pytest.mark.dcmtk, pytest.mark.fhir_server]


def golden_bridge(directory: Path, server: FhirTestServer, version: str) -> BridgeProcess:
    """A bridge configured like the goldens' mapping settings, for FHIR ``version``, on SQLite."""
    return BridgeProcess(
        directory,
        database_url=f"sqlite:///{directory / 'bridge.db'}",
        fhir_base_url=server.base_url,
        extra={
            "fhir": {"version": version},
            "patient": {"identifier_system": R4_SETTINGS.patient_identifier_system},
            "accession": {"identifier_system": R4_SETTINGS.accession_identifier_system},
            "site": {"timezone": "Europe/Paris", "location": R4_SETTINGS.location_reference},
        },
    )


@pytest.fixture
def bridge(tmp_path: Path, fresh_fhir_server: FhirTestServer) -> Iterator[BridgeProcess]:
    """A bridge configured like the goldens' mapping settings (R4), on SQLite."""
    process = golden_bridge(tmp_path, fresh_fhir_server, "R4")
    try:
        yield process.start()
    finally:
        process.close()


@pytest.fixture
def fresh_fhir_server_r5(fhir_server_r5: FhirTestServer) -> FhirTestServer:
    fhir_server_r5.reset()
    return fhir_server_r5


def without_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in resource.items() if key != "meta"}


@pytest.mark.parametrize(("name", "study"), CASES, ids=[name for name, _study in CASES])
def test_study_sent_by_storescu_lands_as_its_golden_r4_and_maps_to_its_golden_r5(
    bridge: BridgeProcess,
    fresh_fhir_server: FhirTestServer,
    tmp_path: Path,
    name: str,
    study: Callable[[], list[Dataset]],
) -> None:
    """storescu -> listener -> index -> validated R4 PUT equals the R4 golden; the index maps to the R5 golden."""
    files = [write_file(ds, tmp_path / "study" / f"{ds.SOPInstanceUID}.dcm") for ds in study()]
    golden = load(name, "R4")

    sent = storescu(bridge.port, files)

    assert sent.returncode == 0, sent.stdout + sent.stderr
    stored = wait_for(
        lambda: (
            (found := fresh_fhir_server.read("ImagingStudy", golden["id"]))
            and found["numberOfInstances"] == golden["numberOfInstances"]
            and found
        ),
        timeout=60,
        what=f"ImagingStudy/{golden['id']} with all {golden['numberOfInstances']} instances",
    )
    assert without_meta(stored) == golden
    engine = make_engine(bridge.database_url)
    try:
        snapshot = Index(engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY)).load_snapshot(
            golden["identifier"][0]["value"].removeprefix("urn:oid:")
        )
    finally:
        engine.dispose()
    r5 = build_imaging_study(snapshot, settings_for("R5"))
    assert r5 == load(name, "R5")
    ImagingStudyR5.model_validate(r5)


def test_the_bridge_configured_for_r5_publishes_each_golden_study_as_its_valid_r5_golden(
    fresh_fhir_server_r5: FhirTestServer, tmp_path: Path
) -> None:
    """fhir.version R5, the whole path: storescu -> listener -> index -> R5 builder -> the bridge's own R5
    validation -> PUT. What the server stored is each R5 golden and passes the R5 models, Endpoint included."""
    bridge = golden_bridge(tmp_path, fresh_fhir_server_r5, "R5").start()
    try:
        for name, study in CASES:
            files = [write_file(ds, tmp_path / name / f"{ds.SOPInstanceUID}.dcm") for ds in study()]
            golden = load(name, "R5")
            sent = storescu(bridge.port, files)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            stored = wait_for(
                lambda golden=golden: (
                    (found := fresh_fhir_server_r5.read("ImagingStudy", golden["id"]))
                    and found["numberOfInstances"] == golden["numberOfInstances"]
                    and found
                ),
                timeout=60,
                what=f"R5 ImagingStudy/{golden['id']}",
            )
            assert without_meta(stored) == golden, name
            ImagingStudyR5.model_validate(stored)
        endpoint = fresh_fhir_server_r5.read("Endpoint", "pacs-wado-rs")
        assert endpoint is not None and endpoint["connectionType"][0]["coding"][0]["code"] == "dicom-wado-rs"
        EndpointR5.model_validate(endpoint)
    finally:
        bridge.close()
