"""The health and metrics HTTP server, on a real socket."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from pacs_bridge.http import HealthServer
from pacs_bridge.index.repository import Index
from pacs_bridge.metrics import BridgeMetrics


@pytest.fixture
def checks() -> dict[str, str | None]:
    """What the scheduler and FHIR server checks answer; a test sets a reason to make one fail."""
    return {"scheduler": None, "fhir_server": None}


@pytest.fixture
def server(checks: dict[str, str | None], index: Index) -> Iterator[HealthServer]:
    metrics = BridgeMetrics(index.count_by_state)
    metrics.instance_received(status=0x0000, calling_ae="CT01", size_bytes=9700)
    running = HealthServer(
        bind="127.0.0.1",
        port=0,
        readiness_checks={
            "database": index.check_writable,
            "scheduler": lambda: checks["scheduler"],
        },
        degradation_checks={"fhir_server": lambda: checks["fhir_server"]},
        render_metrics=metrics.render,
    )
    running.start()
    yield running
    running.stop()


def test_healthz_and_readyz_answer_200_when_all_is_well(server: HealthServer):
    """Alive and ready: the index is writable and every check passes."""
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}") as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


def test_readyz_answers_503_naming_the_part_that_is_down(server: HealthServer, checks: dict[str, str | None]):
    """A failing check turns readiness to 503 with its reason; liveness stays 200."""
    checks["scheduler"] = "no publishing pass for 300 s"
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}") as client:
        ready = client.get("/readyz")
        alive = client.get("/healthz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "not ready", "problems": {"scheduler": "no publishing pass for 300 s"}}
    assert alive.status_code == 200


def test_a_fhir_outage_leaves_the_bridge_ready_and_says_so_in_the_body(
    server: HealthServer, checks: dict[str, str | None]
):
    """The FHIR server down: still 200 (instances are taken and kept; a load balancer must not drop the bridge),
    the outage under "degraded"; with a part really down as well, 503 names that part and still shows it."""
    checks["fhir_server"] = "no answer since 2024-03-15T09:00:00+00:00: HTTP 503: down"
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}") as client:
        degraded = client.get("/readyz")
        checks["scheduler"] = "no publishing pass for 300 s"
        down = client.get("/readyz")

    assert (degraded.status_code, degraded.json()) == (
        200,
        {"status": "ready", "degraded": {"fhir_server": checks["fhir_server"]}},
    )
    assert down.status_code == 503
    assert down.json()["degraded"] == {"fhir_server": checks["fhir_server"]}


def test_metrics_are_prometheus_text_with_study_counts_from_the_index(server: HealthServer):
    """/metrics exposes pacs_bridge_ series, study counts read from the database at scrape time."""
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}") as client:
        response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'pacs_bridge_cstore_results_total{calling_ae="CT01",status="0x0000"} 1.0' in text
    assert "pacs_bridge_received_bytes_total 9700.0" in text
    assert 'pacs_bridge_studies{state="pending"} 0.0' in text
