"""ImagingStudy.modality as each release defines it (issue 15 item 6): R4 and IHE IMR list the acquisition
modalities (DICOM CID 29) only; R5 all distinct series modalities."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydicom.sr.codedict import codes

from pacs_bridge.fhir.imaging_study import ACQUISITION_MODALITIES, build_imaging_study
from pacs_bridge.fhir.validation import resource_problems
from pacs_bridge.records import InstanceSnapshot, SeriesAttributes, SeriesSnapshot, StudySnapshot
from tests.unit.test_imaging_study import SETTINGS, ct_one_series_snapshot
from tests.unit.test_mapping_imr import ENDPOINT_TYPES, IMR

R4 = SETTINGS
R5 = dataclasses.replace(SETTINGS, fhir_version="R5")


def test_the_acquisition_modalities_are_dicom_cid_29() -> None:
    """The table is CID 29 "Acquisition Modality" as pydicom ships it, code for code."""
    cid29 = {getattr(codes.cid29, keyword).value for keyword in codes.cid29.dir()}

    assert cid29 == ACQUISITION_MODALITIES
    assert not {"SR", "PR", "KO", "SEG", "OT", "DOC", "REG"} & ACQUISITION_MODALITIES


def study_of(*modalities: str) -> StudySnapshot:
    base = ct_one_series_snapshot()
    series = tuple(
        SeriesSnapshot(
            attributes=SeriesAttributes(series_uid=f"{base.study_uid}.{n}", modality=modality, series_number=n),
            instances=(InstanceSnapshot(sop_instance_uid=f"{base.study_uid}.{n}.1", sop_class_uid="1.2.3"),),
        )
        for n, modality in enumerate(modalities, start=1)
    )
    return dataclasses.replace(base, series=series)


def study_modality_codes(resource: dict[str, Any]) -> list[str] | None:
    if "modality" not in resource:
        return None
    return [entry["code"] if "code" in entry else entry["coding"][0]["code"] for entry in resource["modality"]]


@pytest.mark.parametrize(
    ("series", "settings", "expected"),
    [
        # R4: acquisition modalities only, so modality=SR does not find a CT study (issue 15)
        (("CT", "SR", "PR", "CT"), R4, ["CT"]),
        (("MR", "CT", "KO"), R4, ["MR", "CT"]),  # in series order
        # R4, none acquired (a lone SR, a secondary capture without modality): no modality (0..*)
        (("SR",), R4, None),
        (("OT",), R4, None),
        # IHE IMR needs 1..*: without an acquisition modality the series' own, the extensible binding admits them
        (("CT", "SR"), IMR, ["CT"]),
        (("SR", "PR"), IMR, ["SR", "PR"]),
        # R5: all distinct series modalities
        (("CT", "SR", "PR", "CT"), R5, ["CT", "SR", "PR"]),
        (("SR",), R5, ["SR"]),
    ],
)
def test_study_modality_follows_the_release(series: tuple[str, ...], settings: Any, expected: list[str] | None) -> None:
    assert study_modality_codes(build_imaging_study(study_of(*series), settings)) == expected


def test_series_keep_their_own_modality_in_r4() -> None:
    """series.modality is each series' Modality, acquisition or not: only the study's summary is filtered."""
    resource = build_imaging_study(study_of("CT", "SR"), R4)

    assert [series["modality"]["code"] for series in resource["series"]] == ["CT", "SR"]


@pytest.mark.parametrize(("settings", "version"), [(R4, "R4"), (IMR, "R4"), (R5, "R5")])
def test_a_lone_sr_study_is_valid_in_every_mode(settings: Any, version: str) -> None:
    """R4 without modality, IMR with SR (its 1..* met), R5 with SR: each valid for what it claims."""
    resource = build_imaging_study(study_of("SR"), settings)

    assert resource_problems(resource, fhir_version=version, endpoint_types=ENDPOINT_TYPES) == []
