"""The calling-AE allow-list on a real listener, probed by DCMTK's echoscu and storescu."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pacs_bridge.dicom.access import CallingAeRule, parse_network
from pacs_bridge.dicom.scp import DicomListener, ListenerSettings
from pacs_bridge.index.repository import Index
from tests.support.dcmtk import dcmtk_env, require_dcmtk, storescu
from tests.support.studies import make_dataset, uid, write_file

pytestmark = pytest.mark.dcmtk

RULES = (
    CallingAeRule(ae_title="CT01"),
    CallingAeRule(ae_title="MR_LOCAL", networks=(parse_network("127.0.0.0/8"),)),
    CallingAeRule(ae_title="MR_REMOTE", networks=(parse_network("10.20.1.0/24"),)),
)


@pytest.fixture
def listener(index: Index) -> Iterator[DicomListener]:
    settings = ListenerSettings(ae_title="PACS_BRIDGE", bind="127.0.0.1", port=0, allowed_calling_aets=RULES)
    running = DicomListener(settings, index, clock=lambda: datetime.now(UTC))
    running.start()
    yield running
    running.stop(drain_timeout_seconds=5)


def echo_as(port: int, calling_ae: str) -> subprocess.CompletedProcess[str]:
    args = [require_dcmtk("echoscu"), "-v", "-aet", calling_ae, "-aec", "PACS_BRIDGE", "127.0.0.1", str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=30, env=dcmtk_env(), check=False)


@pytest.mark.parametrize("calling_ae", ["CT01", "MR_LOCAL"])
def test_listed_ae_from_an_allowed_address_is_served(listener: DicomListener, calling_ae: str):
    """An AE on the list (unpinned, or pinned to the loopback network it calls from) gets its C-ECHO."""
    result = echo_as(listener.port, calling_ae)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unknown_ae_is_rejected_at_association(listener: DicomListener):
    """An AE title not on the list gets A-ASSOCIATE-RJ: calling AE title not recognised."""
    result = echo_as(listener.port, "INTRUDER")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Association Rejected" in output
    assert "Calling AE Title Not Recognized" in output


def test_listed_ae_from_another_address_is_aborted_and_stores_nothing(
    listener: DicomListener, index: Index, tmp_path: Path
):
    """MR_REMOTE is pinned to 10.20.1.0/24: calling from 127.0.0.1 its association is aborted, nothing indexed."""
    path = write_file(make_dataset(), tmp_path / "one.dcm")
    result = storescu(listener.port, [path], calling_ae="MR_REMOTE")
    assert result.returncode != 0
    assert index.count_by_state().pending == 0
    assert index.study_status(uid("1")) is None
