"""FHIR outages, end to end: the bridge as a subprocess, DCMTK storescu, the real FHIR test server behind a
fault-injecting proxy (tests/support/fault_proxy.py).

The figures printed here (seconds to publish after the outage ends) are quoted in docs/reliability.md.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.bridge_process import BridgeProcess, free_port, log_events, wait_for
from tests.support.dcmtk import storescu
from tests.support.fault_proxy import HttpFaultProxy, Pass, Reset, Respond, Slow
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import SeriesSpec, new_study_uid, write_study

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk]

RETRY_BASE = 0.2
RETRY_MAX = 2.0
FHIR_TIMEOUT = 1.0
PROBE = 0.5


def make_bridge(
    tmp_path: Path, database_url: str, proxy: HttpFaultProxy, *, probe_seconds: float = 1.0, log_level: str = "info"
) -> BridgeProcess:
    return BridgeProcess(
        tmp_path,
        database_url=database_url,
        fhir_base_url=f"{proxy.root_url}/fhir",
        fhir_timeout_seconds=FHIR_TIMEOUT,
        retry_base_seconds=RETRY_BASE,
        retry_max_seconds=RETRY_MAX,
        extra={"publish": {"probe_seconds": probe_seconds}, "logging": {"level": log_level}},
    )


def imaging_studies(server: FhirTestServer, study_uid: str) -> list[dict[str, Any]]:
    return server.search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}")


def test_each_fhir_fault_is_retried_honouring_retry_after_and_writes_one_version(
    tmp_path: Path, proxy: HttpFaultProxy, fresh_fhir_server: FhirTestServer
):
    """503 and 429 with Retry-After, a reset after the server applied the PUT, an answer slower than the
    client timeout and a 500: each is retried, never sooner than Retry-After; after the server-wide faults
    (503, 429, reset, timeout) as soon as a probe finds the server answering, after the 500 (about that request
    alone) at the end of its backoff. The study ends as one ImagingStudy with one version."""
    # PUT by PUT (the probes, GET metadata, pass): PUT Endpoint gets 503 (Retry-After 2), then 429 (Retry-After
    # 1), then passes; the PUT ImagingStudy is applied upstream but its answer is cut, then held beyond the 1 s
    # timeout, then 500.
    proxy.program(
        Respond(503, retry_after="2"),
        Respond(429, retry_after="1"),
        Pass(),
        Reset(),
        Slow(3),
        Respond(500),
        methods={"PUT"},
    )
    bridge = make_bridge(tmp_path, f"sqlite:///{tmp_path / 'bridge.db'}", proxy, probe_seconds=PROBE, log_level="debug")
    study_uid = new_study_uid()
    write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 3)])
    try:
        bridge.start()
        assert storescu(bridge.port, tmp_path / "study").returncode == 0
        wait_for(
            lambda: (bridge.study_row(study_uid) or {}).get("publish_state") == "published",
            timeout=60,
            what="the study to be published through the faults",
        )
        # The slow request reaches the server after the client gave up: wait for it before counting.
        wait_for(
            lambda: fresh_fhir_server.request_counts().get("PUT ImagingStudy") == 3,
            timeout=10,
            what="the held request to reach the server",
        )
        puts = [request for request in proxy.requests if request.method == "PUT"]
        faults = [request.fault for request in puts]
        assert faults == ["503 Retry-After: 2", "429 Retry-After: 1", "passed", "reset", "slow 3 s", "500", "passed"]
        assert [request.path.split("/")[2] for request in puts] == ["Endpoint"] * 3 + ["ImagingStudy"] * 4
        gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(puts)]
        assert gaps[0] >= 2.0, f"came back {gaps[0]:.2f} s after a 503 with Retry-After: 2"
        assert gaps[1] >= 1.0, f"came back {gaps[1]:.2f} s after a 429 with Retry-After: 1"
        assert gaps[3] >= PROBE, "after the reset: once a probe found the server answering"
        assert gaps[4] >= FHIR_TIMEOUT + PROBE, "the client timeout, then the probe"
        assert gaps[5] >= RETRY_MAX, "a 500 is about that request: its backoff, capped at 2 s, runs out"
        print(f"gaps between PUTs: {', '.join(f'{gap:.2f}' for gap in gaps)} s")

        published = imaging_studies(fresh_fhir_server, study_uid)
        assert len(published) == 1 and published[0]["numberOfInstances"] == 3
        assert fresh_fhir_server.versions("ImagingStudy", study_uid) == 1, "identical re-sends made a new version"
        assert fresh_fhir_server.versions("Endpoint", "pacs-wado-rs") == 1
        row = bridge.study_row(study_uid)
        assert row is not None and (row["attempts"], row["last_error"]) == (0, None)
        retries = log_events(bridge.log(), "publish_retry_scheduled")
        assert [(entry["attempt"], entry["http_status"], entry["level"]) for entry in retries] == [
            (1, 503, "debug"),  # server-wide: the outage is logged, not each study's attempt
            (2, 429, "debug"),
            (3, None, "debug"),
            (4, None, "debug"),
            (5, 500, "warning"),
        ]
        # One outage: from the 503 until the 500, the first answer to a whole publish (the Endpoint PUT that
        # passed was followed by the reset of the ImagingStudy PUT).
        outages = log_events(bridge.log(), "fhir_outage_started", "fhir_outage_ended")
        assert [(entry["event"], entry.get("http_status")) for entry in outages] == [
            ("fhir_outage_started", 503),
            ("fhir_outage_ended", None),
        ]
    finally:
        bridge.close()


def test_pending_studies_survive_an_outage_and_a_restart_and_publish_once_when_it_ends(
    tmp_path: Path, database_url: str, proxy: HttpFaultProxy, fresh_fhir_server: FhirTestServer
):
    """Three studies arrive while the server answers 503; the bridge restarts while it refuses connections;
    when it comes back, all three publish without operator action: one resource and one version each."""
    proxy.outage(Respond(503))
    bridge = make_bridge(tmp_path, database_url, proxy)
    study_uids = [new_study_uid() for _ in range(3)]
    for study_uid in study_uids:
        write_study(tmp_path / "studies" / study_uid, study_uid, [SeriesSpec("MR", 2), SeriesSpec("MR", 1)])

    def rows() -> list[dict[str, Any]]:
        return [row for study_uid in study_uids if (row := bridge.study_row(study_uid)) is not None]

    try:
        bridge.start()
        assert storescu(bridge.port, tmp_path / "studies").returncode == 0
        wait_for(
            lambda: len(rows()) == 3 and all(row["attempts"] >= 2 for row in rows()),
            timeout=30,
            what="two failed attempts per study",
        )
        assert bridge.stop() == 0
        assert all(row["publish_state"] == "pending" and row["last_error"].startswith("HTTP 503") for row in rows())

        proxy.refuse()
        attempts_before = {row["study_uid"]: row["attempts"] for row in rows()}
        bridge.start()
        wait_for(
            lambda: all(row["attempts"] > attempts_before[row["study_uid"]] for row in rows()),
            timeout=30,
            what="a failed attempt per study after the restart",
        )
        assert all(row["publish_state"] == "pending" and "cannot reach" in row["last_error"] for row in rows())
        assert fresh_fhir_server.request_counts() == {}, "nothing may reach the server during the outage"

        outage_ended = time.monotonic()
        proxy.restore()
        wait_for(
            lambda: all(row["publish_state"] == "published" for row in rows()),
            timeout=30,
            what="every study to be published after the outage",
        )
        seconds = time.monotonic() - outage_ended
        print(f"all 3 pending studies published {seconds:.2f} s after the outage ended (retry cap {RETRY_MAX} s)")
        assert seconds < RETRY_MAX * 1.2 + 2.0, "longer than the retry cap (+jitter) and a few ticks"

        for study_uid in study_uids:
            published = imaging_studies(fresh_fhir_server, study_uid)
            assert len(published) == 1 and published[0]["numberOfInstances"] == 3
            assert fresh_fhir_server.versions("ImagingStudy", study_uid) == 1
        assert fresh_fhir_server.request_counts() == {"PUT Endpoint": 1, "PUT ImagingStudy": 3}
    finally:
        bridge.close()


def test_a_long_backoff_ends_when_the_server_answers_again_not_when_it_runs_out(
    tmp_path: Path, database_url: str, proxy: HttpFaultProxy, fresh_fhir_server: FhirTestServer
):
    """With a 60 s first backoff, a study that failed while the server refused connections is published soon
    after the server is back: the bridge probes it (GET metadata) every 0.5 s and retries once it answers."""
    proxy.refuse()
    bridge = BridgeProcess(
        tmp_path,
        database_url=database_url,
        fhir_base_url=f"{proxy.root_url}/fhir",
        fhir_timeout_seconds=FHIR_TIMEOUT,
        retry_base_seconds=60,
        retry_max_seconds=600,
        extra={"publish": {"probe_seconds": 0.5}},
    )
    study_uid = new_study_uid()
    write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 3)])
    try:
        bridge.start()
        assert storescu(bridge.port, tmp_path / "study").returncode == 0
        row = wait_for(
            lambda: (found := bridge.study_row(study_uid)) and found["attempts"] >= 1 and found,
            timeout=30,
            what="a failed attempt",
        )
        backoff_seconds = (row["next_attempt_at"] - row["last_change_at"]).total_seconds()
        assert backoff_seconds > 40, "the first retry waits out the 60 s base backoff (jitter 20 %)"

        outage_ended = time.monotonic()
        proxy.restore()
        wait_for(
            lambda: (found := bridge.study_row(study_uid)) and found["publish_state"] == "published",
            timeout=backoff_seconds - 10,
            what="the study published before its backoff ran out",
        )
        seconds = time.monotonic() - outage_ended
        print(f"published {seconds:.2f} s after the outage ended (backoff {backoff_seconds:.0f} s)")
        assert len(log_events(bridge.log(), "fhir_server_answers_again")) == 1
        assert fresh_fhir_server.request_counts() == {"PUT Endpoint": 1, "PUT ImagingStudy": 1}
    finally:
        bridge.close()


def test_a_bridge_started_while_the_fhir_server_is_down_says_so_and_stays_ready(
    tmp_path: Path, proxy: HttpFaultProxy, fresh_fhir_server: FhirTestServer
):
    """Connections refused at start: one warning naming the server and the cause; /readyz stays 200 (instances
    are still taken and kept) and shows the outage under "degraded"; pacs_bridge_fhir_up is 0. When the server
    is back: one line with the studies that waited, no degradation, pacs_bridge_fhir_up 1."""
    proxy.refuse()
    http_port = free_port()
    bridge = BridgeProcess(
        tmp_path,
        database_url=f"sqlite:///{tmp_path / 'bridge.db'}",
        fhir_base_url=f"{proxy.root_url}/fhir",
        fhir_timeout_seconds=FHIR_TIMEOUT,
        extra={"http": {"bind": "127.0.0.1", "port": http_port}},
    )
    study_uid = new_study_uid()
    write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 2)])
    health = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=5, trust_env=False)
    try:
        bridge.start()
        (started,) = wait_for(
            lambda: log_events(bridge.log(), "fhir_outage_started"), timeout=10, what="the start check's warning"
        )
        assert (started["level"], started["detected_by"]) == ("warning", "startup_check")
        assert started["fhir_base_url"] == f"{proxy.root_url}/fhir" and "Connection refused" in started["cause"]
        assert storescu(bridge.port, tmp_path / "study").returncode == 0, "instances are taken during the outage"
        ready = health.get("/readyz")
        assert ready.status_code == 200
        assert "Connection refused" in ready.json()["degraded"]["fhir_server"]
        assert "pacs_bridge_fhir_up 0.0" in health.get("/metrics").text

        proxy.restore()
        wait_for(
            lambda: (bridge.study_row(study_uid) or {}).get("publish_state") == "published",
            timeout=30,
            what="the study to be published once the server is back",
        )
        (ended,) = wait_for(lambda: log_events(bridge.log(), "fhir_outage_ended"), timeout=10, what="the end")
        assert ended["studies_waiting"] == 1
        assert health.get("/readyz").json() == {"status": "ready"}
        assert "pacs_bridge_fhir_up 1.0" in health.get("/metrics").text
        assert len(log_events(bridge.log(), "fhir_outage_started")) == 1
    finally:
        health.close()
        bridge.close()
