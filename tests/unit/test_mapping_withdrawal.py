"""Unit tests for the ImagingStudy of a study whose every instance IHE IOCM rejection notes withdrew."""

from __future__ import annotations

import dataclasses

import pytest

from pacs_bridge.fhir.imaging_study import FhirVersion, build_imaging_study, study_status
from pacs_bridge.fhir.validation import resource_problems
from pacs_bridge.records import RejectionReason, StudySnapshot, StudyWithdrawal
from tests.unit.test_mapping_golden import R4_SETTINGS, ct_with_dose_sr_and_presentation_state, snapshot_of
from tests.unit.test_mapping_imr import ENDPOINT_TYPES, IMR

QUALITY = RejectionReason.QUALITY
SAFETY = RejectionReason.PATIENT_SAFETY
WORKLIST = RejectionReason.INCORRECT_WORKLIST_ENTRY
RETENTION = RejectionReason.RETENTION_EXPIRED


def withdrawn(*reasons: RejectionReason) -> StudySnapshot:
    """The CT study after notes with ``reasons`` rejected every instance: no series left."""
    study = snapshot_of(ct_with_dose_sr_and_presentation_state())
    return dataclasses.replace(
        study, series=(), withdrawal=StudyWithdrawal(reasons=tuple(sorted(reasons)), modalities=("CT", "PR", "SR"))
    )


@pytest.mark.parametrize(
    ("reasons", "status"),
    [
        ((), "available"),  # not withdrawn
        ((SAFETY,), "entered-in-error"),  # wrong patient or similar: the record should never have existed
        ((WORKLIST,), "entered-in-error"),  # acquired under the wrong order
        ((QUALITY,), "cancelled"),  # existed, but unusable
        ((RETENTION,), "cancelled"),  # existed, now purged
        ((QUALITY, SAFETY), "entered-in-error"),  # mixed: any entered-in-error reason wins
        ((QUALITY, RETENTION), "cancelled"),  # mixed, both cancelled
    ],
)
def test_status_of_a_withdrawn_study_follows_the_rejection_reasons(
    reasons: tuple[RejectionReason, ...], status: str
) -> None:
    """The status table of docs/mapping.md, reason by reason."""
    withdrawal = StudyWithdrawal(reasons=reasons, modalities=()) if reasons else None

    assert study_status(withdrawal) == status


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_withdrawn_study_has_no_series_keeps_its_modalities_and_validates(version: FhirVersion) -> None:
    """Zero series and instances, the modalities it had (R4: the acquisition ones), the status; valid R4 and R5."""
    settings = dataclasses.replace(R4_SETTINGS, fhir_version=version)

    resource = build_imaging_study(withdrawn(SAFETY), settings)

    assert "series" not in resource
    assert (resource["status"], resource["numberOfSeries"], resource["numberOfInstances"]) == (
        "entered-in-error",
        0,
        0,
    )
    codes = [m["code"] if version == "R4" else m["coding"][0]["code"] for m in resource["modality"]]
    assert codes == (["CT"] if version == "R4" else ["CT", "PR", "SR"])
    assert resource_problems(resource, fhir_version=version) == []


def test_withdrawn_study_still_conforms_to_ihe_imr() -> None:
    """IHE IMR requires modality (1..*): the withdrawn study's modalities keep it conformant."""
    resource = build_imaging_study(withdrawn(QUALITY), IMR)

    assert resource["status"] == "cancelled"
    assert resource_problems(resource, fhir_version="R4", endpoint_types=ENDPOINT_TYPES) == []
