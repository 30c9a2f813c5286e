"""Database outage, end to end: PostgreSQL is stopped in the middle of a DCMTK send to the bridge subprocess.

The PostgreSQL server is the test's own cluster (tests/support/private_postgres.py), so it can really be
stopped: ``pg_ctl stop -m fast`` is an administrative shutdown, every session gets FATAL 57P01 (terminating
connection due to administrator command) and new connections are refused until the cluster starts again.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.bridge_process import BridgeProcess, wait_for
from tests.support.dcmtk import dcmtk_env, require_dcmtk, storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.private_postgres import PrivatePostgres
from tests.support.studies import SeriesSpec, new_study_uid, write_study

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk, pytest.mark.postgresql]

INSTANCES = 600
OUTAGE_AFTER = 100  # instances indexed when PostgreSQL is stopped


def responses(output: str) -> list[tuple[str, str]]:
    """(SOP Instance UID, storescu's status text) for every file storescu got a C-STORE response for."""
    answered = []
    sending = None
    for line in output.splitlines():
        if "Sending file: " in line:
            sending = Path(line.split("Sending file: ", 1)[1].strip()).stem
        elif (match := re.search(r"Received Store Response \((.*)\)", line)) and sending is not None:
            answered.append((sending, match.group(1)))
            sending = None
    return answered


def test_postgresql_stopped_mid_send_answers_out_of_resources_and_ingest_resumes_without_restart(
    tmp_path: Path, private_postgres: PrivatePostgres, fresh_fhir_server: FhirTestServer
) -> None:
    """While PostgreSQL is shut down every C-STORE gets 0xA700, never Success; every Success is indexed;
    once it is started again the same bridge process indexes the re-send and publishes the whole study once."""
    study_uid = new_study_uid()
    write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", INSTANCES // 4)] * 4)
    bridge = BridgeProcess(tmp_path, database_url=private_postgres.url, fhir_base_url=fresh_fhir_server.base_url)
    try:
        bridge.start()
        storescu_log = tmp_path / "storescu.log"
        # --no-halt: go on after a failed C-STORE, so every instance sent during the outage gets its answer.
        args = [require_dcmtk("storescu"), "-v", "--no-halt", "-aec", "PACS_BRIDGE", "-aet", "MODALITY", "+sd", "+r"]
        with storescu_log.open("wb") as sink:
            send = subprocess.Popen(
                [*args, "127.0.0.1", str(bridge.port), str(tmp_path / "study")],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=dcmtk_env(),
            )
        try:
            wait_for(lambda: bridge.instance_count() >= OUTAGE_AFTER, timeout=60, what="the first instances")
            private_postgres.stop(mode="fast")
            send.wait(timeout=120)
        finally:
            if send.poll() is None:
                send.kill()
                send.wait()
        answered = responses(storescu_log.read_text(encoding="utf-8", errors="replace"))
        succeeded = {uid for uid, status in answered if status == "Success"}
        refused = [status for _, status in answered if status != "Success"]
        assert "fast shutdown request" in private_postgres.log(), "PostgreSQL was not shut down administratively"

        private_postgres.start()
        back_at = time.monotonic()
        indexed = bridge.instance_uids(study_uid)
        print(
            f"PostgreSQL stopped mid-send: {len(succeeded)} Success, {len(refused)} refused: "
            f"{sorted(set(refused))}; {len(indexed)} indexed"
        )
        assert len(answered) == INSTANCES, "storescu did not get an answer for every file"
        assert refused, "the outage came after the send"
        assert set(refused) == {"Refused: OutOfResources"}, "a failure other than 0xA700 (out of resources)"
        assert succeeded <= indexed, f"Success answered but not indexed: {sorted(succeeded - indexed)[:5]}"
        assert OUTAGE_AFTER <= len(succeeded) < INSTANCES

        resent = storescu(bridge.port, tmp_path / "study")
        assert resent.returncode == 0, resent.stdout[-2000:]
        assert "OutOfResources" not in resent.stdout + resent.stderr
        assert bridge.process is not None and bridge.process.poll() is None, "the bridge had to be restarted"
        assert bridge.runs == 1
        published = wait_for(
            lambda: [
                resource
                for resource in fresh_fhir_server.search(
                    "ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}"
                )
                if resource["numberOfInstances"] == INSTANCES
            ],
            timeout=60,
            what=f"the ImagingStudy with all {INSTANCES} instances",
        )
        print(f"re-send indexed and the complete study published {time.monotonic() - back_at:.1f} s after restart")
        assert len(published) == 1
        assert len(bridge.instance_uids(study_uid)) == INSTANCES
    finally:
        bridge.close()
