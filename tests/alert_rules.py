"""The sample alert rules, as docs/operating.md shows them and deploy/k8s/monitoring ships them,
and the metrics each rule's expression reads (for the tests that compare them with a scrape)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "operating.md"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "monitoring" / "prometheusrule.yaml"

# PromQL's words that look like metric names in an expression.
PROMQL_WORDS = {
    *("sum", "min", "max", "avg", "count", "rate", "increase", "irate", "changes"),
    *("histogram_quantile", "absent", "time", "and", "or", "unless", "by", "without"),
    *("on", "ignoring", "group_left", "group_right", "bool", "offset", "le"),
}
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def documented_groups() -> list[dict[str, Any]]:
    """The `groups:` of the guide's "Sample alert rules" block."""
    text = GUIDE.read_text(encoding="utf-8")
    (block,) = re.findall(r"```yaml\n(groups:.*?)```", text, re.DOTALL)
    groups: list[dict[str, Any]] = yaml.safe_load(block)["groups"]
    return groups


def shipped_groups() -> list[dict[str, Any]]:
    """The PrometheusRule's `spec.groups`."""
    groups: list[dict[str, Any]] = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]["groups"]
    return groups


def rules(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for group in groups for rule in group["rules"]]


def metrics_used(expr: str) -> set[str]:
    """The metric names an expression selects (a histogram's family for `_bucket`)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings: label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|on|without|ignoring)\s*\([^)]*\)", "", text)  # groupings
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", text)) - PROMQL_WORDS
    return {HISTOGRAM_SUFFIX.sub("", name) for name in names if not name[0].isdigit()}


def jobs_used(expr: str) -> set[str]:
    """The scrape jobs an expression names (`job="a"`, `job=~"a|b"`)."""
    found = set()
    for value in re.findall(r'job=~?"([^"]*)"', expr):
        found.update(value.split("|"))
    return found
