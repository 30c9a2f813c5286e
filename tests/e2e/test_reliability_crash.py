"""Crash safety, end to end: kill -9 or SIGTERM the bridge subprocess in the middle of a DCMTK storescu send.

An instance storescu was told "Success" for must be in the index and, after a restart, in the published
ImagingStudy; the modality's re-send completes the study into one resource. The printed figures are quoted
in docs/reliability.md.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.bridge_process import BridgeProcess, listener_events, wait_for
from tests.support.dcmtk import dcmtk_env, require_dcmtk, storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.relay import PacedRelay
from tests.support.studies import SeriesSpec, new_study_uid, write_study

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk]

INSTANCES = 2000  # 4 series of 500, ~9 kB each; a send takes 7-15 s on the 2-core box
KILL_AFTER = 800  # instances indexed before the kill
DRAIN_SECONDS = 1.0  # dicom.shutdown_drain_seconds where the send must outlast the drain
TERM_AFTER = 400  # instances indexed before that SIGTERM
# The send that must outlast the drain goes through a relay passing 1 MB/s: the 1600 instances (~15 MB) still
# to go at the SIGTERM need 15 s however fast the machine, 15 times the drain.
PACED_BYTES_PER_SECOND = 1_000_000


@pytest.fixture(scope="module")
def big_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One 2000-instance study on disk, shared by the tests of this module (each has its own database)."""
    directory = tmp_path_factory.mktemp("big-study")
    study_uid = new_study_uid()
    write_study(directory, study_uid, [SeriesSpec("CT", INSTANCES // 4)] * 4)
    return study_uid, directory


@pytest.fixture
def bridge(tmp_path: Path, database_url: str, fresh_fhir_server: FhirTestServer) -> Iterator[BridgeProcess]:
    running = BridgeProcess(tmp_path, database_url=database_url, fhir_base_url=fresh_fhir_server.base_url)
    try:
        yield running
    finally:
        running.close()


def start_send(port: int, directory: Path, output: Path) -> subprocess.Popen[bytes]:
    """storescu -v of every file in ``directory`` on one association, in the background, logging to ``output``
    (a file, not a pipe: a pipe nobody reads fills up and stalls storescu)."""
    args = [require_dcmtk("storescu"), "-v", "-aec", "PACS_BRIDGE", "-aet", "MODALITY", "+sd", "+r"]
    with output.open("wb") as sink:
        return subprocess.Popen(
            [*args, "127.0.0.1", str(port), str(directory)], stdout=sink, stderr=subprocess.STDOUT, env=dcmtk_env()
        )


def finish(send: subprocess.Popen[bytes], output: Path) -> str:
    """Wait for storescu (killing it if it hangs) and return what it printed."""
    try:
        send.wait(timeout=60)
    finally:
        if send.poll() is None:
            send.kill()
            send.wait()
    return output.read_text(encoding="utf-8", errors="replace")


def acknowledged(output: str) -> set[str]:
    """SOP Instance UIDs (our file names) storescu received a Success response for."""
    acked: set[str] = set()
    sending: str | None = None
    for line in output.splitlines():
        if "Sending file: " in line:
            sending = Path(line.split("Sending file: ", 1)[1].strip()).stem
        elif "Received Store Response (Success)" in line and sending is not None:
            acked.add(sending)
            sending = None
    return acked


def published_instance_uids(resource: dict[str, Any]) -> set[str]:
    return {instance["uid"] for series in resource.get("series", []) for instance in series.get("instance", [])}


def imaging_studies(server: FhirTestServer, study_uid: str) -> list[dict[str, Any]]:
    return server.search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}")


def resend_until_published(
    bridge: BridgeProcess, directory: Path, server: FhirTestServer, study_uid: str
) -> list[dict[str, Any]]:
    """The modality's re-send of the whole study, then the ImagingStudy holding all of it, once published."""
    resent = storescu(bridge.port, directory, timeout=300)
    assert resent.returncode == 0, resent.stdout[-2000:]
    complete = wait_for(
        lambda: [s for s in imaging_studies(server, study_uid) if s["numberOfInstances"] == INSTANCES],
        timeout=60,
        what=f"the ImagingStudy with all {INSTANCES} instances",
    )
    wait_for(
        lambda: (bridge.study_row(study_uid) or {}).get("publish_state") == "published",
        timeout=30,
        what="the study to be published",
    )
    return complete


def test_kill_9_mid_send_loses_no_acknowledged_instance_and_the_resend_completes_one_resource(
    bridge: BridgeProcess, big_study: tuple[str, Path], fresh_fhir_server: FhirTestServer, tmp_path: Path
):
    """SIGKILL after ~800 of 2000 instances: every instance answered Success is indexed and, after a restart,
    in the published ImagingStudy; the full re-send completes it as one resource."""
    study_uid, directory = big_study
    bridge.start()
    started = time.monotonic()
    send = start_send(bridge.port, directory, tmp_path / "storescu.log")
    try:
        wait_for(lambda: bridge.instance_count() >= KILL_AFTER, timeout=120, what=f"{KILL_AFTER} indexed instances")
        bridge.kill()
    finally:
        output = finish(send, tmp_path / "storescu.log")
    rate = KILL_AFTER / (time.monotonic() - started)
    acked = acknowledged(output)
    indexed = bridge.instance_uids(study_uid)
    print(
        f"kill -9: {len(acked)} instances acknowledged, {len(indexed)} indexed at the kill "
        f"(~{rate:.0f} inst/s); storescu exit {send.returncode}"
    )
    assert send.returncode != 0, "storescu should have seen the bridge die mid-send"
    assert len(acked) >= KILL_AFTER * 0.9, "the kill came later than planned: the test proves less"
    assert acked <= indexed, f"acknowledged but not indexed: {sorted(acked - indexed)[:5]}"

    bridge.start()
    first = wait_for(
        lambda: imaging_studies(fresh_fhir_server, study_uid), timeout=60, what="the study published after restart"
    )
    assert len(first) == 1
    assert published_instance_uids(first[0]) == indexed, "published differs from what the index held"
    assert first[0]["numberOfInstances"] == len(indexed)

    complete = resend_until_published(bridge, directory, fresh_fhir_server, study_uid)
    assert len(imaging_studies(fresh_fhir_server, study_uid)) == 1, "a second resource for the same study"
    versions = fresh_fhir_server.versions("ImagingStudy", study_uid)
    counts = fresh_fhir_server.request_counts()
    print(f"after the re-send: 1 resource, {versions} versions, {counts}")
    assert len(published_instance_uids(complete[0])) == INSTANCES
    assert counts["PUT ImagingStudy"] == versions, "a PUT that changed nothing"


def test_sigterm_mid_send_lets_the_association_finish_and_loses_no_acknowledged_instance(
    big_study: tuple[str, Path], tmp_path: Path, fhir_server: FhirTestServer
):
    """SIGTERM after ~800 instances: the listener stops accepting, the open association finishes within the
    drain time, and every instance answered Success is in the index after the exit. (SQLite only: the drain
    is the listener's, whatever the database; the kill -9 test covers both.)"""
    study_uid, directory = big_study
    bridge = BridgeProcess(
        tmp_path, database_url=f"sqlite:///{tmp_path / 'bridge.db'}", fhir_base_url=fhir_server.base_url
    )
    try:
        bridge.start()
        send = start_send(bridge.port, directory, tmp_path / "storescu.log")
        try:
            wait_for(lambda: bridge.instance_count() >= KILL_AFTER, timeout=120, what=f"{KILL_AFTER} indexed instances")
            exit_code = bridge.stop()
        finally:
            output = finish(send, tmp_path / "storescu.log")
        acked = acknowledged(output)
        indexed = bridge.instance_uids(study_uid)
        print(f"SIGTERM: {len(acked)} acknowledged, {len(indexed)} indexed; storescu exit {send.returncode}")
        assert exit_code == 0, bridge.log()
        assert acked <= indexed, f"acknowledged but not indexed: {sorted(acked - indexed)[:5]}"
        assert len(acked) >= KILL_AFTER
    finally:
        bridge.close()


def test_sigterm_when_the_send_outlasts_the_drain_aborts_it_and_loses_no_acknowledged_instance(
    big_study: tuple[str, Path], tmp_path: Path, fresh_fhir_server: FhirTestServer
) -> None:
    """SIGTERM after ~400 of 2000 instances with a 1 s drain, the sender slowed to 1 MB/s by a relay so that
    what is left takes 15 s on any machine: the association, in the middle of a transfer, is aborted once the
    drain is over, the bridge exits 0, every instance answered Success is in the index, and after a restart the
    re-send completes the study into one resource."""
    study_uid, directory = big_study
    bridge = BridgeProcess(
        tmp_path,
        database_url=f"sqlite:///{tmp_path / 'bridge.db'}",
        fhir_base_url=fresh_fhir_server.base_url,
        extra={"dicom": {"shutdown_drain_seconds": DRAIN_SECONDS}},
    )
    try:
        bridge.start()
        with PacedRelay(upstream_port=bridge.port, bytes_per_second=PACED_BYTES_PER_SECOND) as relay:
            send = start_send(relay.port, directory, tmp_path / "storescu.log")
            try:
                wait_for(
                    lambda: bridge.instance_count() >= TERM_AFTER, timeout=120, what=f"{TERM_AFTER} indexed instances"
                )
                signalled = time.monotonic()
                # A bound, not a measurement: the drain, then the rest of the shutdown (scheduler, pools).
                exit_code = bridge.stop(timeout=DRAIN_SECONDS + 30)
                stopped_after = time.monotonic() - signalled
            finally:
                output = finish(send, tmp_path / "storescu.log")
        acked = acknowledged(output)
        indexed = bridge.instance_uids(study_uid)
        stopped = listener_events(bridge.log(), "listener_stopped")
        print(
            f"SIGTERM past a {DRAIN_SECONDS:g} s drain: exit {exit_code} after {stopped_after:.2f} s, "
            f"{len(acked)} acknowledged, {len(indexed)} indexed; storescu exit {send.returncode}"
        )
        assert exit_code == 0, bridge.log()
        assert len(acked) < INSTANCES, "the send finished within the drain: the test proves nothing"
        assert sum(event["aborted_associations"] for event in stopped) == 1, bridge.log()
        # storescu reads the A-ABORT ("Peer Aborted Association") or, caught writing, a broken pipe: either way
        # it reports the send failed.
        assert send.returncode != 0, f"storescu did not report the abort:\n{output[-2000:]}"
        assert stopped_after >= DRAIN_SECONDS, "the association was aborted before the drain time"
        assert acked <= indexed, f"acknowledged but not indexed: {sorted(acked - indexed)[:5]}"

        bridge.start()
        complete = resend_until_published(bridge, directory, fresh_fhir_server, study_uid)
        versions = fresh_fhir_server.versions("ImagingStudy", study_uid)
        counts = fresh_fhir_server.request_counts()
        print(f"after the restart and re-send: {versions} versions, {counts}")
        assert len(imaging_studies(fresh_fhir_server, study_uid)) == 1, "a second resource for the same study"
        assert published_instance_uids(complete[0]) == bridge.instance_uids(study_uid)
        assert counts["PUT ImagingStudy"] == versions, "a PUT that changed nothing"
    finally:
        bridge.close()
