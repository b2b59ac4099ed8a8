"""Finding 7 (MEDIUM) of issue 14, operator part: probe points in an EnergyPolicy's status name GPUs
by UUID, and a tenant may write its own policy's status (where its platform grants that). Another
namespace's status must not shape the curve of a GPU it does not govern, so it cannot make the
budget squeeze that GPU: probe points are keyed by (policy, GPU), and a GPU's curve comes from the
policy that governs its pod.

`curves` below is what the operator's index hands the budget reconcile; `index_curves` builds it
the way the operator's handler does."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from builders import h100_status
from edpilot_operator.budgets import ProbePoint, probe_points, reconcile_budget
from edpilot_operator.selection import Governed, PodInfo, PolicyRef

from edpilot.edp import Metrics
from edpilot.models import EnergyPolicySpec, GPUNodeReportStatus, LabelSelector, PowerBudgetSpec
from edpilot.optimizer import Config, OptimizerState, Probe

NOW = datetime(2026, 11, 27, tzinfo=UTC)
VICTIM_GPU, OTHER_GPU = "GPU-victim", "GPU-other"


def spec() -> EnergyPolicySpec:
    return EnergyPolicySpec.model_validate(
        {
            "selector": {"matchLabels": {"app": "train"}},
            "powerCap": {"minPercent": 40},
            "maxSlowdownPercent": 50,
            "workMetric": {"name": "w"},
        }
    )


VICTIM = PolicyRef("victim", "train", spec())
OTHER = PolicyRef("other", "train", spec())
ATTACKER = PolicyRef("attacker", "greedy", spec())


def status(gpu: str, rate: Mapping[float, float]) -> dict[str, Any]:
    """A policy status whose optimizer measured `gpu` at these caps (units/s by cap)."""
    probes = [
        Probe(
            stage="cap",
            config=Config(capWatts=cap),
            metrics=Metrics(
                joulesPerUnit=1,
                secondsPerUnit=1 / ups,
                unitsPerSecond=ups,
                edp=1,
                objective=1,
                wattsByMember={gpu: cap},
            ),
        )
        for cap, ups in rate.items()
    ]
    state = OptimizerState(phase="Converged", probes=probes)
    return {"state": state.model_dump(mode="json", exclude_none=True)}


STEEP = {300.0: 50.0, 400.0: 70.0, 500.0: 85.0, 600.0: 95.0, 700.0: 100.0}  # compute-bound
FLAT = {300.0: 99.0, 400.0: 99.5, 500.0: 100.0, 600.0: 100.0, 700.0: 100.0}  # memory-bound


def index_curves(statuses: Mapping[str, dict[str, Any]]) -> dict[tuple[str, str], tuple[ProbePoint, ...]]:
    """The operator's probe-point index: every policy's status, keyed by (policy, GPU)."""
    return {
        (policy, uuid): pts
        for policy, body in statuses.items()
        for uuid, pts in probe_points([body["state"]]).items()
    }


def allocation(statuses: Mapping[str, dict[str, Any]]) -> dict[str, float]:
    gpus = [
        h100_status(0, VICTIM_GPU, enforcedLimitWatts=600, powerWatts=590, pods=["victim/a"]),
        h100_status(1, OTHER_GPU, enforcedLimitWatts=600, powerWatts=590, pods=["other/b"]),
    ]
    report = GPUNodeReportStatus(nodeName="n0", agentVersion="t", backend="sim", time=NOW, gpus=gpus)
    pods = {
        "victim/a": PodInfo("victim", "a", "ua", "n0", "Running", 1, {"app": "train"}),
        "other/b": PodInfo("other", "b", "ub", "n0", "Running", 1, {"app": "train"}),
    }
    result = reconcile_budget(
        spec=PowerBudgetSpec(nodeSelector=LabelSelector(), maxWatts=1000),
        generation=1,
        previous=None,
        node_labels={"n0": {}},
        reports={"n0": report},
        pods=pods,
        governed={"victim/a": Governed(VICTIM), "other/b": Governed(OTHER)},
        curves=index_curves(statuses),
        now=NOW,
    )
    return {a.gpuUUID: a.watts for a in result.allocations}


def test_another_namespaces_status_cannot_shape_a_gpus_curve() -> None:
    honest = {VICTIM.key: status(VICTIM_GPU, STEEP), OTHER.key: status(OTHER_GPU, STEEP)}
    fair = allocation(honest)
    # The attacker claims the victim's GPU loses nothing when cut (and lists itself first).
    attacked = allocation({ATTACKER.key: status(VICTIM_GPU, FLAT), **honest})
    assert attacked == fair
    assert fair[VICTIM_GPU] == fair[OTHER_GPU]  # identical workloads share alike
