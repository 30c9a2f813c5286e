"""Unit tests for ``pacs_bridge.dicom.conformance``: a C-STORE request and its dataset must name the same
instance of the same SOP class as the presentation context."""

from __future__ import annotations

import pytest

from pacs_bridge.dicom.conformance import check_request_matches_dataset
from pacs_bridge.dicom.status import StoreStatus, status_for_error
from pacs_bridge.errors import InvalidInstanceError, SopClassMismatchError
from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
RECORD = InstanceRecord(
    study=StudyAttributes(study_uid="1.2.3"),
    series=SeriesAttributes(series_uid="1.2.3.4", modality="CT"),
    sop_instance_uid="1.2.3.4.5",
    sop_class_uid=CT,
)


def test_a_request_naming_the_dataset_on_its_own_context_passes() -> None:
    check_request_matches_dataset(
        RECORD, affected_sop_class_uid=CT, affected_sop_instance_uid="1.2.3.4.5", context_sop_class_uid=CT
    )


@pytest.mark.parametrize(
    ("request_class", "context_class", "names"),
    [
        (CT, MR, "not the context's 1.2.840.10008.5.1.4.1.1.4"),  # a CT dataset on an MR context
        (MR, CT, "not the request's 1.2.840.10008.5.1.4.1.1.4"),  # the request names MR
        (MR, MR, "not the context's 1.2.840.10008.5.1.4.1.1.4"),  # both say MR: the context is named first
    ],
)
def test_another_sop_class_is_data_set_does_not_match_sop_class(request_class: str, context_class: str, names: str):
    """SopClassMismatchError naming SOPClassUID and what it should have been; the listener answers 0xA900."""
    with pytest.raises(SopClassMismatchError) as refused:
        check_request_matches_dataset(
            RECORD,
            affected_sop_class_uid=request_class,
            affected_sop_instance_uid="1.2.3.4.5",
            context_sop_class_uid=context_class,
        )
    assert str(refused.value).startswith(f"SOPClassUID (0008,0016): is {CT}, {names}")
    assert status_for_error(refused.value) is StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS == 0xA900


def test_another_instance_is_cannot_understand_naming_sop_instance_uid() -> None:
    with pytest.raises(InvalidInstanceError) as refused:
        check_request_matches_dataset(
            RECORD, affected_sop_class_uid=CT, affected_sop_instance_uid="1.2.3.4.6", context_sop_class_uid=CT
        )
    assert str(refused.value) == (
        "SOPInstanceUID (0008,0018): is 1.2.3.4.5, not the request's Affected SOP Instance UID 1.2.3.4.6"
    )
    assert status_for_error(refused.value) is StoreStatus.CANNOT_UNDERSTAND
