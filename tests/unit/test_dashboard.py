"""The Grafana dashboard queries only metrics the code exports, with labels the code sets.

The exported names and labels are introspected from the collectors the agent, operator and
extender create (fed with one sample of everything), and each PromQL expression is tokenized to
find its metric names, label matchers and grouping labels."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from builders import h100_status
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from edpilot.models import GPUNodeReportStatus, WorkloadSample

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "edpilot" / "dashboards" / "edpilot.json"
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
      |(?P<range>\[[^\]]*\])
      |(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
      |(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){},])
      |(?P<space>\s+)""",
    re.VERBOSE,
)


# ---------------------------------------------------------------- what the code exports


def _agent_samples() -> list[tuple[str, dict[str, str]]]:
    from edpilot_agent.metrics import AgentCollector

    status = GPUNodeReportStatus(
        nodeName="n",
        agentVersion="t",
        backend="sim",
        time=datetime(2026, 1, 1, tzinfo=UTC),
        gpus=[h100_status(model="H100", powerWatts=300, energyJoules=1, pods=["ns/p"])],
        workloads=[WorkloadSample(namespace="ns", pod="p", workUnits=1)],
    )
    collector = AgentCollector("n", lambda: status, lambda: Counter({("GPU-0", "lease", "applied"): 1}))
    return [(s.name, s.labels) for family in collector.collect() for s in family.samples]


def _operator_samples() -> list[tuple[str, dict[str, str]]]:
    from edpilot_operator.metrics import OperatorCollector

    collector = OperatorCollector()
    measurement = {"joulesPerUnit": 1, "secondsPerUnit": 1, "edp": 1, "unitsPerSecond": 1}
    collector.publish_policy(
        "ns",
        "pol",
        {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Ok",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
            "workloads": [
                {
                    "name": "w",
                    "phase": "Converged",
                    "powerCapWatts": 400,
                    "batchSize": 8,
                    "baseline": measurement,
                    "current": measurement,
                    "edpReductionPercent": 10,
                    "slowdownPercent": 1,
                }
            ],
            "totals": {"workloads": 1, "gpus": 1, "energySavedJoules": 5},
        },
    )
    collector.publish_budget(
        "rack", 1000, {"allocatedWatts": 800, "measuredWatts": 500, "headroomWatts": 200}
    )
    return [(s.name, s.labels) for family in collector.collect() for s in family.samples]


def _extender_samples() -> list[tuple[str, dict[str, str]]]:
    from edpilot_operator.extender import Metrics

    metrics = Metrics()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            metric.labels(**dict.fromkeys(metric._labelnames, "x"))
    registry: CollectorRegistry = metrics.registry
    return [(s.name, s.labels) for family in registry.collect() for s in family.samples]


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Sample name -> label names, over every collector the code creates."""
    names: dict[str, set[str]] = {}
    for name, labels in [*_agent_samples(), *_operator_samples(), *_extender_samples()]:
        names.setdefault(name, set()).update(labels)
    return names


# ---------------------------------------------------------------- PromQL


@dataclass
class Parsed:
    metrics: list[str] = field(default_factory=list)
    matchers: list[tuple[str, str]] = field(default_factory=list)  # (metric, label)
    grouping: list[str] = field(default_factory=list)


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None:
            raise AssertionError(f"cannot tokenize {expr[pos:]!r} in {expr!r}")
        kind = m.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, m.group()))
        pos = m.end()
    return out


def parse(expr: str) -> Parsed:
    toks = tokens(expr)
    parsed = Parsed()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident" and text in GROUPING and following == "(":
            i += 2
            while toks[i][1] != ")":
                if toks[i][0] == "ident":
                    parsed.grouping.append(toks[i][1])
                i += 1
        elif kind == "ident" and (following in ("(", "by", "without") or text in KEYWORDS):
            pass  # a function, aggregation (also `sum by (...) (...)`) or operator keyword
        elif kind == "ident":
            parsed.metrics.append(text)
            if following == "{":
                i += 2
                while toks[i][1] != "}":
                    label, op, value = toks[i], toks[i + 1], toks[i + 2]
                    assert label[0] == "ident" and op[0] == "op" and value[0] == "string", expr
                    parsed.matchers.append((text, label[1]))
                    i += 3
                    if toks[i][1] == ",":
                        i += 1
        elif text == "{":
            raise AssertionError(f"selector without a metric name in {expr!r}")
        i += 1
    return parsed


def test_tokenizer_finds_names_matchers_and_grouping() -> None:
    p = parse('sum by (node) (rate(a_total{x="1", y=~"$v"}[$__rate_interval])) / on (node) b > 3.6e6 and c')
    assert p.metrics == ["a_total", "b", "c"]
    assert p.matchers == [("a_total", "x"), ("a_total", "y")]
    assert p.grouping == ["node", "node"]


# ---------------------------------------------------------------- the dashboard


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]


def test_dashboard_is_a_grafana_dashboard() -> None:
    d = _dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in _panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in _panels(d):
        assert set(p["gridPos"]) == {"h", "w", "x", "y"}
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]
    variables = {v["name"] for v in d["templating"]["list"]}
    for expr in _expressions(d):
        for var in re.findall(r"\$(\w+)", expr):
            assert var.startswith("__") or var in variables, f"{expr} uses undefined ${var}"


def test_every_query_uses_exported_metrics_and_labels(exported: dict[str, set[str]]) -> None:
    expressions = _expressions(_dashboard())
    assert len(expressions) >= 20
    for expr in expressions:
        p = parse(expr)
        assert p.metrics, f"{expr} reads no metric"
        for metric in p.metrics:
            assert metric in exported, f"{expr}: no collector exports {metric}"
        for metric, label in p.matchers:
            assert label in exported[metric] | TARGET_LABELS, f"{expr}: {metric} has no label {label}"
        available = set().union(*(exported[m] for m in p.metrics)) | TARGET_LABELS
        for label in p.grouping:
            assert label in available, f"{expr}: groups by {label}, which none of its metrics has"


def test_template_variables_read_exported_labels(exported: dict[str, set[str]]) -> None:
    for var in _dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
        assert m, var["definition"]
        assert m.group(2) in exported[m.group(1)], var["definition"]


def test_dashboard_covers_the_issue_topics(exported: dict[str, set[str]]) -> None:
    used = {m for e in _expressions(_dashboard()) for m in parse(e).metrics}
    for wanted in (
        "edpilot_gpu_power_watts",
        "edpilot_gpu_power_limit_watts",
        "edpilot_gpu_energy_joules_total",
        "edpilot_workload_work_units_total",
        "edpilot_workload_joules_per_unit",
        "edpilot_workload_edp_reduction_ratio",
        "edpilot_budget_max_watts",
        "edpilot_budget_headroom_watts",
    ):
        assert wanted in used


def test_a_wrong_label_is_caught(exported: dict[str, set[str]]) -> None:
    p = parse('sum by (gpu) (edpilot_gpu_power_watts{nodename="x"})')
    assert ("edpilot_gpu_power_watts", "nodename") in p.matchers
    assert "nodename" not in exported["edpilot_gpu_power_watts"]
    assert "gpu" not in exported["edpilot_gpu_power_watts"]


def test_operator_metrics_follow_the_published_status() -> None:
    from edpilot_operator.metrics import OperatorCollector

    collector = OperatorCollector()

    def values() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value for f in collector.collect() for s in f.samples
        }

    row = {"name": "w", "phase": "Exploring", "edpReductionPercent": 12.5, "energySavedJoules": 9.0}
    collector.publish_policy("ns", "pol", {"workloads": [row], "totals": {"energySavedJoules": 9.0}})
    labels = (("namespace", "ns"), ("policy", "pol"), ("workload", "w"))
    got = values()
    assert got[("edpilot_workload_edp_reduction_ratio", labels)] == 0.125
    assert got[("edpilot_workload_phase", tuple(sorted((*labels, ("phase", "Exploring")))))] == 1.0
    assert got[("edpilot_workload_phase", tuple(sorted((*labels, ("phase", "Converged")))))] == 0.0
    assert ("edpilot_workload_slowdown_ratio", labels) not in got  # no figure yet, no series
    collector.publish_policy("ns", "pol", {"workloads": [{"phase": "Nonsense"}]})  # unreadable: kept
    assert values()[("edpilot_workload_edp_reduction_ratio", labels)] == 0.125
    collector.forget_policy("ns", "pol")
    assert not any(name.startswith(("edpilot_workload", "edpilot_policy")) for name, _ in values())
