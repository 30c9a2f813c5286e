"""The test harness's own promise (tests/conftest.py): a record pynetdicom logs with its exception, kept by pytest
until the test ends, does not keep the frames of that exception alive."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest


class Association:
    """Stands for what a pynetdicom frame holds: the association, its queue and the files in it."""


def log_an_exception_while_holding(held: Association) -> None:
    try:
        raise OSError(9, "Bad file descriptor")
    except OSError as exc:
        logging.getLogger("pynetdicom.dul").exception(exc)  # as pynetdicom's DUL logs a failed read


def test_a_captured_pynetdicom_exception_keeps_its_text_and_not_its_frames(caplog: pytest.LogCaptureFixture):
    association = Association()
    alive = weakref.ref(association)

    log_an_exception_while_holding(association)
    del association
    gc.collect()

    assert alive() is None
    [record] = [record for record in caplog.records if record.name == "pynetdicom.dul"]
    assert record.getMessage() == "[Errno 9] Bad file descriptor"
    assert "OSError: [Errno 9] Bad file descriptor" in (record.exc_text or "")
    assert "log_an_exception_while_holding" in (record.exc_text or "")
