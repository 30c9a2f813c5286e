"""The calling-AE allow-list on a real listener, probed by DCMTK's echoscu and storescu."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from pynetdicom import AE, acse, association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_bridge.dicom.access import CallingAeRule, parse_network
from pacs_bridge.dicom.received import open_receive_files
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.repository import Index
from pacs_bridge.logs import configure_logging
from pacs_bridge.observe import NullObserver
from tests.integration.conftest import listener_settings
from tests.support.associations import wait_for_associations_to_end
from tests.support.bridge_process import wait_for
from tests.support.dcmtk import dcmtk_env, require_dcmtk, storescu
from tests.support.studies import make_dataset, uid, write_file

pytestmark = pytest.mark.dcmtk

RULES = (
    CallingAeRule(ae_title="CT01"),
    CallingAeRule(ae_title="MR_LOCAL", networks=(parse_network("127.0.0.0/8"),)),
    CallingAeRule(ae_title="MR_REMOTE", networks=(parse_network("10.20.1.0/24"),)),
)


@pytest.fixture
def listener(index: Index, receive_path: str) -> Iterator[DicomListener]:
    settings = listener_settings(receive_path, allowed_calling_aets=RULES)
    running = DicomListener(settings, index, clock=lambda: datetime.now(UTC))
    running.start()
    yield running
    running.stop(drain_timeout_seconds=5)


def echo_as(port: int, calling_ae: str, called_ae: str = "PACS_BRIDGE") -> subprocess.CompletedProcess[str]:
    args = [require_dcmtk("echoscu"), "-v", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)]
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


Logged = Callable[[str], dict[str, Any]]


def failing_abort(self: association.Association) -> None:
    raise RuntimeError("abort is broken")


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[Logged]:
    """The bridge's logging as `run` sets it up, its events captured; ``logged(name)`` waits for the listener's
    thread to log the event ``name`` and returns it. The previous set-up is restored afterwards."""
    structlog_config = structlog.get_config()
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    configure_logging("info", "json")
    caplog.set_level(logging.INFO, logger="pacs_bridge.dicom")

    def event(name: str) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            events = [record.msg for record in caplog.records if isinstance(record.msg, dict)]
            return next((event for event in events if event["event"] == name), None)

        return wait_for(found, timeout=10, what=f"{name} logged")

    yield event
    structlog.configure(**structlog_config)
    root.handlers[:], root.level = root_handlers, root_level


def test_rejection_for_another_called_ae_names_both_titles_and_the_key(listener: DicomListener, logged: Logged):
    """A sender calling 'PACS' instead of 'PACS_BRIDGE': association_rejected says which title it asked for, who
    asked, and which key to match."""
    result = echo_as(listener.port, "CT01", called_ae="PACS")
    event = logged("association_rejected")

    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    assert event["called_ae"] == "PACS"
    assert event["calling_ae"] == "CT01"
    assert event["reason"] == (
        "called AE title 'PACS' is not this bridge's ('PACS_BRIDGE', dicom.ae_title); set the sender's called AE "
        "title to PACS_BRIDGE"
    )


def test_rejection_of_an_unlisted_calling_ae_names_the_allow_list(listener: DicomListener, logged: Logged):
    """An AE title missing from dicom.allowed_calling_aets: the rejection says so, with the title."""
    echo_as(listener.port, "INTRUDER")
    event = logged("association_rejected")

    assert (event["called_ae"], event["calling_ae"]) == ("PACS_BRIDGE", "INTRUDER")
    assert event["reason"].startswith("calling AE title 'INTRUDER' is not in dicom.allowed_calling_aets")


def test_rejection_when_every_association_is_taken_names_the_limit(index: Index, logged: Logged):
    """With dicom.max_associations 1 held by one sender, a second is rejected naming the limit."""
    settings = listener_settings(max_associations=1)
    listener = DicomListener(settings, index, clock=lambda: datetime.now(UTC))
    listener.start()
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    try:
        first = holder.associate("127.0.0.1", listener.port, ae_title="PACS_BRIDGE")
        assert first.is_established
        echo_as(listener.port, "SECOND")
        event = logged("association_rejected")
        first.release()
    finally:
        listener.stop(drain_timeout_seconds=5)

    assert event["calling_ae"] == "SECOND"
    assert event["reason"].startswith("the limit of 1 open associations (dicom.max_associations) is reached")


class FailingMetrics(NullObserver):
    """Metrics that fail when an association opens (a bug, or a full disk under a metrics library)."""

    def association_opened(self) -> None:
        raise RuntimeError("metrics are broken")


def test_address_refusal_holds_even_when_metrics_fail(index: Index, tmp_path: Path, logged: Logged):
    """The access check does not depend on metrics: with association_opened raising, MR_REMOTE calling from
    127.0.0.1 is still aborted and nothing is indexed (the check used to sit behind the metrics call)."""
    settings = listener_settings(allowed_calling_aets=RULES)
    listener = DicomListener(settings, index, clock=lambda: datetime.now(UTC), observer=FailingMetrics())
    listener.start()
    path = write_file(make_dataset(), tmp_path / "one.dcm")
    try:
        result = storescu(listener.port, [path], calling_ae="MR_REMOTE")
        refused = logged("association_refused")
        metrics_failure = logged("metrics_failed")
    finally:
        listener.stop(drain_timeout_seconds=5)

    assert result.returncode != 0
    assert refused["reason"] == "calling AE title 'MR_REMOTE' is not allowed from 127.0.0.1"
    assert metrics_failure["level"] == "error"
    assert index.study_status(uid("1")) is None


def test_a_refused_association_whose_abort_fails_is_cut_off(
    listener: DicomListener, index: Index, tmp_path: Path, logged: Logged, monkeypatch: pytest.MonkeyPatch
):
    """When pynetdicom's abort raises, the refusal still holds: the listener cuts the connection, the sender's
    store fails and nothing is indexed. (Inside an event handler, pynetdicom 3.0 binds ``assoc.abort`` to
    ``_abort_nonblocking``: that is the abort the listener calls there.)"""

    path = write_file(make_dataset(), tmp_path / "one.dcm")
    with monkeypatch.context() as patched:
        patched.setattr(association.Association, "_abort_nonblocking", failing_abort)
        result = storescu(listener.port, [path], calling_ae="MR_REMOTE")
        abort_failure = logged("association_abort_failed")
        refused = logged("association_refused")

    assert result.returncode != 0
    assert abort_failure["level"] == "error"
    assert refused["reason"] == "calling AE title 'MR_REMOTE' is not allowed from 127.0.0.1"
    assert index.study_status(uid("1")) is None


@pytest.fixture
def c_store_arrives_before_the_access_check(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """pynetdicom made to send each A-ASSOCIATE-AC, then wait (up to 30 s) until the peer's first DIMSE message
    is whole in its queue before it goes on to EVT_ESTABLISHED, where the listener's access check runs: the order
    a fast sender on a loaded machine can bring about. The list says, for each association, whether it did."""
    arrived: list[bool] = []
    send_accept = acse.ACSE.send_accept

    def send_accept_then_wait_for_the_peer(self: acse.ACSE) -> None:
        send_accept(self)
        deadline = time.monotonic() + 30
        while self.assoc.dimse.msg_queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        arrived.append(not self.assoc.dimse.msg_queue.empty())

    monkeypatch.setattr(acse.ACSE, "send_accept", send_accept_then_wait_for_the_peer)
    return arrived


@pytest.mark.parametrize("abort", ["works", "fails"])
def test_a_refused_association_stores_nothing_it_sent_before_the_refusal(
    listener: DicomListener,
    index: Index,
    tmp_path: Path,
    abort: str,
    c_store_arrives_before_the_access_check: list[bool],
    monkeypatch: pytest.MonkeyPatch,
):
    """MR_REMOTE calling from 127.0.0.1, its C-STORE already received when the access check refuses the
    association: that C-STORE is not indexed either, whether pynetdicom's abort works or raises (the connection
    is cut then), and the file pynetdicom received it into does not stay open."""
    if abort == "fails":
        monkeypatch.setattr(association.Association, "_abort_nonblocking", failing_abort)
    path = write_file(make_dataset(), tmp_path / "one.dcm")
    result = storescu(listener.port, [path], calling_ae="MR_REMOTE")
    wait_for_associations_to_end(listener)

    assert c_store_arrives_before_the_access_check == [True]
    assert result.returncode != 0
    assert index.study_status(uid("1")) is None
    wait_for(lambda: not open_receive_files(), timeout=30, what="the refused C-STORE's file to be closed")
