"""PS3.4 B.2.3 / PS3.7 9.1.1: a C-STORE request names the instance its dataset is, and the two must agree.

The request's Affected SOP Class UID is the SOP class the presentation context was negotiated for and the
dataset claims to be; its Affected SOP Instance UID is the instance being stored. A dataset that is another
SOP class (an MR image on a CT Image Storage context) is refused with 0xA900, "Data Set does not match SOP
Class", rather than indexed as what it says it is; one that is another instance with 0xC000: the sender's
bookkeeping (what it was acknowledged for) and the index would disagree on what was stored.
"""

from __future__ import annotations

from pacs_bridge.errors import InvalidInstanceError, SopClassMismatchError
from pacs_bridge.records import InstanceRecord


def check_request_matches_dataset(
    record: InstanceRecord, *, affected_sop_class_uid: str, affected_sop_instance_uid: str, context_sop_class_uid: str
) -> None:
    """Raise ``SopClassMismatchError`` when the dataset's SOP Class UID differs from the request's Affected SOP Class
    UID or its presentation context's abstract syntax, ``InvalidInstanceError`` naming SOPInstanceUID when its SOP
    Instance UID differs from the request's Affected SOP Instance UID."""
    for source, expected in (("context", context_sop_class_uid), ("request", affected_sop_class_uid)):
        if record.sop_class_uid != expected:
            raise SopClassMismatchError(
                "SOPClassUID", "(0008,0016)", f"is {record.sop_class_uid}, not the {source}'s {expected}"
            )
    if record.sop_instance_uid != affected_sop_instance_uid:
        raise InvalidInstanceError(
            "SOPInstanceUID",
            "(0008,0018)",
            f"is {record.sop_instance_uid}, not the request's Affected SOP Instance UID {affected_sop_instance_uid}",
        )
