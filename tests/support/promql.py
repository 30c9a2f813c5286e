"""Read metric names out of PromQL expressions and out of a /metrics page, to hold the alert rules and the
dashboard to what the bridge exports.

    metric_names('sum by (status) (rate(pacs_bridge_cstore_results_total{status!="0x0000"}[5m]))')
    == {"pacs_bridge_cstore_results_total"}

Only what these files use is handled: label matchers, range and offset durations, grouping clauses, function
calls, Grafana's $variables. ``promtool check rules`` checks the syntax itself.
"""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()")
_KEYWORDS = frozenset({"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool"})
_KEYWORDS |= {"offset", "inf", "nan", "Inf", "NaN"}
# Grafana's variables, as a query sees them once Grafana has filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}

# The series names each metric type exposes (prometheus_client's text format, _created included).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "unknown": ("",),
}


def with_grafana_variables(expr: str) -> str:
    """``expr`` with Grafana's built-in interval variables replaced (``$instance`` stays inside its matcher)."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = _STRING.sub('""', with_grafana_variables(expr))
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name not in _KEYWORDS}


def exported_series_names(exposition: str) -> set[str]:
    """Every series name a /metrics page exports or declares (a labelled family without children yet still
    declares its names through its TYPE line)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names
