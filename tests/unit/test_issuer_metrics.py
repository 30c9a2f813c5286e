"""Studies sent with an identifier issuer the configuration does not map are counted by issuer, with a bounded
number of label values (the issuer comes from received datasets)."""

from __future__ import annotations

from pacs_bridge.metrics import ISSUER_LABEL_CHARACTERS, ISSUER_LABELS, OTHER_ISSUER, BridgeMetrics
from pacs_bridge.study_queue import StateCounts


def metrics() -> BridgeMetrics:
    return BridgeMetrics(lambda: StateCounts(pending=0, published=0, failed=0))


def test_unknown_patient_issuers_are_counted_per_issuer() -> None:
    counted = metrics()
    counted.identifier_issuer_unknown(identifier="patient", issuer="HOSP-B")
    counted.identifier_issuer_unknown(identifier="patient", issuer="HOSP-B")
    counted.identifier_issuer_unknown(identifier="patient", issuer="HOSP-C")

    text = counted.render().decode()

    assert 'pacs_bridge_patient_issuer_unknown_total{issuer="HOSP-B"} 2.0' in text
    assert 'pacs_bridge_patient_issuer_unknown_total{issuer="HOSP-C"} 1.0' in text


def test_issuer_labels_are_bounded_in_number_and_length() -> None:
    """A sender inventing issuers cannot grow the registry: past the bound they share one label; long ones are cut."""
    counted = metrics()
    for n in range(ISSUER_LABELS + 5):
        counted.identifier_issuer_unknown(identifier="patient", issuer=f"ISSUER-{n}")
    counted.identifier_issuer_unknown(identifier="patient", issuer="ISSUER-0")  # known: keeps its own label
    counted.identifier_issuer_unknown(identifier="patient", issuer="X" * 500)

    text = counted.render().decode()

    assert text.count("pacs_bridge_patient_issuer_unknown_total{") == ISSUER_LABELS + 1
    assert f'pacs_bridge_patient_issuer_unknown_total{{issuer="{OTHER_ISSUER}"}} 6.0' in text
    assert 'pacs_bridge_patient_issuer_unknown_total{issuer="ISSUER-0"} 2.0' in text
    assert "X" * (ISSUER_LABEL_CHARACTERS + 1) not in text
