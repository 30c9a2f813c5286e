"""The C-STORE statuses pacs-bridge answers, and which error gets which.

PS3.4 GG.4.2 / PS3.7 C: 0xA7xx tells the sender we are out of resources (try again later); 0xC0xx that we
cannot understand the dataset (sending it again unchanged will not help). pynetdicom reserves 0xC210-0xC212
for failures of its own; we answer before it has to.
"""

from __future__ import annotations

import enum

from pydicom.dataset import Dataset

from pacs_bridge.errors import (
    AssociationRefusedError,
    ConflictingInstanceError,
    IndexUnavailableError,
    InstanceTooLargeError,
    InvalidInstanceError,
    SopClassMismatchError,
    UnstorableValueError,
)

MAX_ERROR_COMMENT_CHARS = 64  # ErrorComment (0000,0902) is LO


class StoreStatus(enum.IntEnum):
    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # the index cannot be written now; the sender should retry
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # the dataset's SOP class is not the request's or its context's
    CANNOT_UNDERSTAND = 0xC000  # an attribute is missing, malformed, undecodable or a value the index cannot hold
    CONFLICTS_WITH_INDEX = 0xC001  # a UID reused under another study or series; first arrival kept
    INSTANCE_TOO_LARGE = 0xC002  # over dicom.max_instance_bytes; read and dropped, a re-send cannot succeed
    PROCESSING_FAILURE = 0x0110  # a failure of ours that no table entry covers; logged with traceback
    NOT_AUTHORIZED = 0x0124  # PS3.7 C: "Refused: Not authorized"; the access check refused the association


# Most specific first: the first entry the error is an instance of decides.
_STATUS_BY_ERROR: tuple[tuple[type[BaseException], StoreStatus], ...] = (
    (ConflictingInstanceError, StoreStatus.CONFLICTS_WITH_INDEX),
    (SopClassMismatchError, StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
    (InstanceTooLargeError, StoreStatus.INSTANCE_TOO_LARGE),
    (InvalidInstanceError, StoreStatus.CANNOT_UNDERSTAND),
    (UnstorableValueError, StoreStatus.CANNOT_UNDERSTAND),  # the database refused a value; a retry cannot help
    (IndexUnavailableError, StoreStatus.OUT_OF_RESOURCES),
    (AssociationRefusedError, StoreStatus.NOT_AUTHORIZED),
)


def status_for_error(error: BaseException) -> StoreStatus:
    """The status to answer for an exception raised while storing an instance."""
    for error_type, status in _STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return status
    return StoreStatus.PROCESSING_FAILURE


def error_comment(text: str) -> str:
    """``text`` fitted into an ErrorComment: ASCII, no backslash, at most 64 characters."""
    cleaned = text.encode("ascii", "replace").decode("ascii").replace("\\", "/")
    cleaned = " ".join(cleaned.split())
    cleaned = "".join(char if char.isprintable() else "?" for char in cleaned)  # LO allows no control chars
    if len(cleaned) > MAX_ERROR_COMMENT_CHARS:
        cleaned = cleaned[: MAX_ERROR_COMMENT_CHARS - 3] + "..."
    return cleaned


def status_dataset(status: StoreStatus, comment: str = "") -> Dataset:
    """The status as a C-STORE response dataset, with an ErrorComment for failures."""
    ds = Dataset()
    ds.Status = int(status)
    if comment and status != StoreStatus.SUCCESS:
        ds.ErrorComment = error_comment(comment)
    return ds
