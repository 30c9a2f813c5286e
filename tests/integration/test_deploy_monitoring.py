"""The alert rules and the Grafana dashboard in deploy/: valid for their tools, and on metrics a running bridge
really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.bridge_process import BridgeProcess, free_port
from tests.support.promql import exported_series_names, metric_names, with_grafana_variables

pytestmark = pytest.mark.dcmtk  # the bridge is started and waited for with echoscu

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "pacs-bridge.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "pacs-bridge.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "pacs-bridge.json"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing; run: apt-get install -y prometheus")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, check=False)


def rule_expressions() -> dict[str, str]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return {rule["alert"]: rule["expr"] for group in document["groups"] for rule in group["rules"]}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def dashboard_queries() -> dict[str, str]:
    """Each panel target's expression, named 'panel title / refId', and the template variables' queries."""
    document = dashboard()
    queries = {
        f"{panel['title']} / {target['refId']}": target["expr"]
        for panel in document["panels"]
        for target in panel.get("targets", [])
    }
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(METRIC, LABEL) is Grafana's, not PromQL: its metric is the query.
            match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["query"]["query"])
            assert match, variable
            queries[f"variable {variable['name']}"] = match[1]
    return queries


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """The series names a freshly started bridge's /metrics declares (no study received: every family is
    declared by its TYPE line even before its first sample)."""
    directory = tmp_path_factory.mktemp("bridge")
    http_port = free_port()
    bridge = BridgeProcess(
        directory,
        database_url=f"sqlite:///{directory / 'index.db'}",
        fhir_base_url="http://127.0.0.1:9/fhir",  # nothing is published
        extra={"http": {"bind": "127.0.0.1", "port": http_port}},
    )
    try:
        bridge.start()
        page = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    finally:
        bridge.close()
    yield exported_series_names(page)


def test_promtool_accepts_the_rules():
    """`promtool check rules` on the shipped rules file."""
    result = run_promtool("check", "rules", str(RULES))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass():
    """`promtool test rules`: each alert fires when it should, with its annotations, and stays quiet otherwise."""
    result = run_promtool("test", "rules", str(RULE_TESTS))

    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_test_case():
    """No rule goes untested: every alert name appears in the rule tests."""
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    }

    assert tested == set(rule_expressions())


def test_every_metric_an_alert_uses_is_exported_by_the_bridge(exported: set[str]):
    """Each rule's metrics, read out of its expression, are series a running bridge's /metrics declares."""
    used = {alert: metric_names(expr) for alert, expr in rule_expressions().items()}

    assert all(used.values()), used  # every rule reads at least one metric
    assert used["PacsBridgeStudyPendingTooLong"] == {
        "pacs_bridge_oldest_pending_study_age_seconds",
        "pacs_bridge_debounce_max_delay_seconds",
    }
    missing = {alert: names - exported for alert, names in used.items() if names - exported}
    assert missing == {}


def test_every_metric_the_dashboard_queries_is_exported_by_the_bridge(exported: set[str]):
    """Each panel's and variable's metrics are series a running bridge's /metrics declares."""
    used = {query: metric_names(expr) for query, expr in dashboard_queries().items()}

    assert all(used.values()), used
    assert {"pacs_bridge_publish_latency_seconds_bucket", "pacs_bridge_fhir_up"} <= set().union(*used.values())
    missing = {query: names - exported for query, names in used.items() if names - exported}
    assert missing == {}


def test_every_dashboard_query_is_valid_promql(tmp_path: Path):
    """promtool parses each panel expression (as a recording rule, Grafana's variables filled in)."""
    rules = [
        {"record": f"dashboard:query_{number}", "expr": with_grafana_variables(expr)}
        for number, (query, expr) in enumerate(dashboard_queries().items())
        if not query.startswith("variable ")
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")

    result = run_promtool("check", "rules", str(path))

    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_panels_use_the_chosen_datasource_and_do_not_overlap():
    """Import-ready: every query panel reads the ${datasource} variable; ids are unique; no two panels share
    a grid cell."""
    panels = dashboard()["panels"]
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
    assert len({panel["id"] for panel in panels}) == len(panels)
