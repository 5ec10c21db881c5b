"""The PromQL in the shipped dashboard and alert rules, for the tests that check it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "grafana" / "vfsd-dashboard.json"
ALERTS = REPO / "deploy" / "vfsd-alerts.yaml"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "histogram_quantile",
    "by", "without", "and", "or", "unless", "on", "ignoring", "bool", "offset", "absent",
    "label_values", "topk", "bottomk", "clamp_min", "clamp_max", "delta", "deriv", "le",
    "group_left", "group_right", "time", "vector", "scalar", "abs", "humanize",
}


def panel_queries(dashboard: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target (rows included)."""
    dash = dashboard if dashboard is not None else json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    return out


def variable_queries(dashboard: dict | None = None) -> list[str]:
    dash = dashboard if dashboard is not None else json.loads(DASHBOARD.read_text())
    out = []
    for v in dash["templating"]["list"]:
        q = v.get("query")
        if v["type"] == "query":
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def alert_rules(path: Path = ALERTS) -> list[dict]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def grafana_to_promql(expr: str, *, rate_interval: str = "1m", range_: str = "5m",
                      instance: str = ".*") -> str:
    """Substitute the Grafana variables the dashboard uses, as Grafana would."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
            .replace("$instance", instance))


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (identifiers outside strings, not PromQL words,
    not label names inside {} or by (...), not durations)."""
    bare = _STRING.sub('""', expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = _GROUPING.sub("", bare)  # by (...) / on (...)
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # range selectors
    names = set()
    for m in _IDENT.finditer(bare):
        word = m.group(0)
        if word in PROMQL_WORDS or bare[m.end():].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def label_names(expr: str) -> set[str]:
    """Label names an expression groups or matches on."""
    labels = set()
    for group in _GROUPING.findall(expr):
        labels |= {w.strip() for w in group.split(",") if w.strip()}
    labels |= set(_MATCHER.findall(expr))
    return labels
