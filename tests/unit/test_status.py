"""Unit tests for ``pacs_bridge.dicom.status``: which C-STORE status each error gets, and the ErrorComment text."""

from __future__ import annotations

import pytest

from pacs_bridge.dicom.status import (
    MAX_ERROR_COMMENT_CHARS,
    StoreStatus,
    error_comment,
    status_dataset,
    status_for_error,
)
from pacs_bridge.errors import (
    ConfigError,
    ConflictingInstanceError,
    IndexUnavailableError,
    InvalidInstanceError,
    PublishError,
    SopClassMismatchError,
    UnstorableValueError,
)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # a UID reused under another study/series: refused, first arrival kept (checked before its parent class)
        (ConflictingInstanceError("SOPInstanceUID", "(0008,0018)", "already in study 1.2.3"), 0xC001),
        # a dataset of another SOP class than its request and context: data set does not match SOP class
        (SopClassMismatchError("SOPClassUID", "(0008,0016)", "is MR, not the context's CT"), 0xA900),
        # a missing or malformed required attribute: cannot understand
        (InvalidInstanceError("StudyInstanceUID", "(0020,000D)", "is missing or empty"), 0xC000),
        # an unreadable dataset (no attribute to name) is still "cannot understand"
        (InvalidInstanceError("", "", "dataset cannot be decoded"), 0xC000),
        # the database is down, locked or full: out of resources, the sender retries later
        (IndexUnavailableError(), 0xA700),
        # the database refused a value as data: no retry can store it, so cannot understand, never 0xA7xx
        (UnstorableValueError(), 0xC000),
        # a programming error of ours: processing failure
        (RuntimeError("boom"), 0x0110),
        # errors of ours that do not belong on this path still get the catch-all
        (PublishError("nope", retryable=False), 0x0110),
        (ConfigError("x.yaml", ["bad"]), 0x0110),
        # even BaseException subclasses that are not Exceptions map to a status, never raise
        (KeyboardInterrupt(), 0x0110),
    ],
)
def test_status_for_error_maps_each_error_to_its_c_store_status(error: BaseException, expected: int) -> None:
    """One table decides the status; the most specific error class wins."""
    status = status_for_error(error)

    assert status == expected
    assert isinstance(status, StoreStatus)


@pytest.mark.parametrize(
    "text",
    [
        "StudyInstanceUID (0020,000D): is missing or empty; it is required",  # a typical message, 66 chars
        "x" * 500,  # far too long
        "SOPClassUID (0008,0016): is not a valid UID: '1.2.840.abc'",  # short enough already
        "PatientID: cannot be decoded (b'\\xe9t\\xe9')",  # backslashes from a bytes repr
        "Étude — données invalides ✓",  # non-ASCII letters and symbols
        "line one\nline two\ttabbed",  # newlines and tabs
        "",  # nothing to say
    ],
)
def test_error_comment_keeps_at_most_64_ascii_characters_without_backslash(text: str) -> None:
    """ErrorComment (0000,0902) is LO: at most 64 characters, ASCII here, and no backslash (the VM separator)."""
    comment = error_comment(text)

    assert len(comment) <= MAX_ERROR_COMMENT_CHARS == 64
    assert comment.isascii()
    assert "\\" not in comment
    assert "\n" not in comment and "\t" not in comment


def test_error_comment_keeps_a_short_message_unchanged() -> None:
    """A message that already fits is passed through as is."""
    text = "SOPClassUID (0008,0016): is missing or empty; it is required"

    assert error_comment(text) == text


def test_error_comment_marks_a_truncated_message_with_an_ellipsis() -> None:
    """A cut message ends in '...' so the operator knows there was more; the start (the attribute) is kept."""
    comment = error_comment("StudyInstanceUID (0020,000D): is 80 characters long, over the limit of 64: 1.2.3.4.5")

    assert comment == "StudyInstanceUID (0020,000D): is 80 characters long, over the..."
    assert len(comment) == 64


def test_error_comment_replaces_backslashes_and_non_ascii() -> None:
    """Backslash becomes '/', a non-ASCII character becomes '?', whitespace runs become one space."""
    assert error_comment("b'\\xe9'  Étude\n") == "b'/xe9' ?tude"


def test_error_comment_removes_control_characters() -> None:
    """NUL and other non-whitespace control characters from decoded values never reach the LO element."""
    comment = error_comment("PatientID: bad value 'A\x00B\x07'")

    assert comment.isprintable()


def test_status_dataset_for_a_failure_carries_status_and_error_comment() -> None:
    """A failure response holds the numeric status and the fitted comment."""
    ds = status_dataset(StoreStatus.CANNOT_UNDERSTAND, "SOPClassUID (0008,0016): is missing")

    assert (ds.Status, ds.ErrorComment) == (0xC000, "SOPClassUID (0008,0016): is missing")


def test_status_dataset_for_success_has_no_error_comment() -> None:
    """SUCCESS never carries an ErrorComment, even if a comment is passed."""
    ds = status_dataset(StoreStatus.SUCCESS, "ignored")

    assert ds.Status == 0x0000
    assert "ErrorComment" not in ds
