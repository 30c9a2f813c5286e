"""Database outage, end to end: PostgreSQL goes away in the middle of a DCMTK send to the bridge subprocess.

The outage is made by a TCP relay between the bridge and PostgreSQL (tests/support/fault_proxy.py) that resets
every open connection and refuses new ones, which is what a client sees when its server stops. The shared
PostgreSQL server itself is not stopped: other suites on the same machine use it at the same time.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.support.bridge_process import BridgeProcess, IndexReader, wait_for
from tests.support.dcmtk import dcmtk_env, require_dcmtk, storescu
from tests.support.fault_proxy import TcpFaultProxy
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import SeriesSpec, new_study_uid, write_study

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk, pytest.mark.postgresql]

INSTANCES = 400
OUTAGE_AFTER = 100  # instances indexed when PostgreSQL goes away


@pytest.fixture
def database_proxy(postgres_schema_url: str) -> Iterator[tuple[TcpFaultProxy, str]]:
    """A relay to the test PostgreSQL server, and the schema's URL through it."""
    direct = make_url(postgres_schema_url)
    with TcpFaultProxy(upstream_port=direct.port or 5432, upstream_host=direct.host or "127.0.0.1") as proxy:
        yield proxy, direct.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


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


def test_postgresql_outage_mid_send_answers_out_of_resources_and_ingest_resumes_without_restart(
    tmp_path: Path,
    postgres_schema_url: str,
    database_proxy: tuple[TcpFaultProxy, str],
    fresh_fhir_server: FhirTestServer,
):
    """While the database is unreachable every C-STORE gets 0xA700, never Success; every Success is indexed;
    once it is back the same bridge process indexes the re-send and publishes the whole study once."""
    proxy, through_proxy = database_proxy
    study_uid = new_study_uid()
    write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", INSTANCES // 4)] * 4)
    bridge = BridgeProcess(tmp_path, database_url=through_proxy, fhir_base_url=fresh_fhir_server.base_url)
    outside = IndexReader(postgres_schema_url)  # straight to PostgreSQL, not through the relay
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
            wait_for(lambda: outside.instance_count() >= OUTAGE_AFTER, timeout=60, what="the first instances")
            proxy.refuse()
            send.wait(timeout=120)
        finally:
            if send.poll() is None:
                send.kill()
                send.wait()
        answered = responses(storescu_log.read_text(encoding="utf-8", errors="replace"))
        succeeded = {uid for uid, status in answered if status == "Success"}
        refused = [status for _, status in answered if status != "Success"]
        indexed = outside.instance_uids(study_uid)
        print(f"PostgreSQL outage mid-send: {len(succeeded)} Success, {len(refused)} refused: {sorted(set(refused))}")
        assert len(answered) == INSTANCES, "storescu did not get an answer for every file"
        assert refused, "the outage came after the send"
        assert set(refused) == {"Refused: OutOfResources"}, "a failure other than 0xA700 (out of resources)"
        assert succeeded <= indexed, f"Success answered but not indexed: {sorted(succeeded - indexed)[:5]}"
        assert OUTAGE_AFTER <= len(succeeded) < INSTANCES

        proxy.restore()
        resent = storescu(bridge.port, tmp_path / "study")
        assert resent.returncode == 0, resent.stdout[-2000:]
        assert "OutOfResources" not in resent.stdout + resent.stderr
        assert bridge.process is not None and bridge.process.poll() is None, "the bridge had to be restarted"
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
        assert len(published) == 1
        assert len(outside.instance_uids(study_uid)) == INSTANCES
    finally:
        bridge.close()
        outside.close()
