"""C-STORE results are counted per status and calling AE, however often each pair recurs."""

from __future__ import annotations

from pacs_bridge.metrics import BridgeMetrics
from pacs_bridge.study_queue import StateCounts


def test_store_results_are_counted_per_status_and_calling_ae() -> None:
    metrics = BridgeMetrics(lambda: StateCounts(pending=0, published=0, failed=0))
    for _ in range(3):
        metrics.instance_received(status=0x0000, calling_ae="CT01", size_bytes=100)
    metrics.instance_received(status=0x0000, calling_ae="MR01", size_bytes=100, count=2)
    metrics.instance_received(status=0xA900, calling_ae="CT01", size_bytes=50)
    text = metrics.render().decode()
    assert 'pacs_bridge_cstore_results_total{calling_ae="CT01",status="0x0000"} 3.0' in text
    assert 'pacs_bridge_cstore_results_total{calling_ae="MR01",status="0x0000"} 2.0' in text
    assert 'pacs_bridge_cstore_results_total{calling_ae="CT01",status="0xA900"} 1.0' in text
    assert "pacs_bridge_received_bytes_total 450.0" in text
