"""The operator's pure services: which pods a policy governs, the node specs composed from pod
annotations, and one policy reconcile from a snapshot — all without a cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from builders import h100_status
from edpilot_operator.reports import ReportTiming, desired_spec
from edpilot_operator.selection import PodInfo, PolicyRef, governing_policy, pod_info, select
from edpilot_operator.services import parse_batch_range, policy_totals, reconcile_policy, snapshot

from edpilot.models import (
    EnergyPolicySpec,
    GPUNodeReportSpec,
    GPUNodeReportStatus,
    Lease,
    WorkloadSample,
    WorkloadStatus,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def policy(
    name: str = "p", priority: int = 0, labels: dict[str, str] | None = None, **spec: Any
) -> PolicyRef:
    body = {
        "selector": {"matchLabels": labels or {"app": "llm"}},
        "priority": priority,
        "workMetric": {"name": "tokens_total"},
        **spec,
    }
    return PolicyRef("ns", name, EnergyPolicySpec.model_validate(body))


def pod(name: str, node: str = "n0", gpus: int = 1, annotations: dict[str, str] | None = None) -> PodInfo:
    labels = {"app": "llm", "job": "j1"}
    return PodInfo("ns", name, f"uid-{name}", node, "Running", gpus, labels, annotations or {}, "img:1")


def test_pod_info_reads_gpus_node_restarts_and_deletion() -> None:
    body = {
        "metadata": {"name": "a", "namespace": "ns", "uid": "u", "deletionTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "nodeName": "n1",
            "containers": [
                {"image": "x:1", "resources": {"limits": {"nvidia.com/gpu": "2"}}},
                {"image": "side:1", "resources": {"requests": {"nvidia.com/gpu": 1}}},
            ],
        },
        "status": {"phase": "Running", "containerStatuses": [{"restartCount": 2}, {"restartCount": 1}]},
    }
    info = pod_info(body)
    assert (info.node, info.gpus, info.restarts, info.image, info.deleting) == ("n1", 3, 3, "x:1", True)


@pytest.mark.parametrize(
    ("policies", "winner"),
    [
        ([policy("a", 1), policy("b", 5)], "b"),  # higher priority wins
        ([policy("b", 5), policy("a", 5)], "a"),  # a tie goes to the smaller name
        ([policy("a", 9, labels={"app": "other"}), policy("b", 0)], "b"),  # only matching selectors count
        ([policy("a", 9, labels={"app": "other"})], None),
    ],
)
def test_the_governing_policy(policies: list[PolicyRef], winner: str | None) -> None:
    chosen = governing_policy(pod("x"), policies)
    assert (chosen.name if chosen else None) == winner


def test_selection_groups_jobs_and_reports_conflicts_and_exclusions() -> None:
    mine = policy("mine", 1, groupByLabel="job")
    stronger = policy("stronger", 9, labels={"team": "x"})
    pods = [
        pod("a"),
        pod("b", node="n1"),
        pod("c", annotations={"edpilot.io/exclude": "true"}),
        pod("cpu-only", gpus=0),
        PodInfo("ns", "taken", "u", "n0", "Running", 1, {"app": "llm", "team": "x"}),
        PodInfo("other-ns", "elsewhere", "u", "n0", "Running", 1, {"app": "llm"}),
        PodInfo("ns", "done", "u", "n0", "Succeeded", 1, {"app": "llm"}),
    ]
    selection = select(mine, pods, [mine, stronger])
    assert [(w.name, [p.name for p in w.pods], w.nodes) for w in selection.workloads] == [
        ("job:j1", ["a", "b"], ("n0", "n1"))
    ]
    assert selection.lost_to == {"ns/taken": "stronger"}
    assert selection.excluded == ("ns/c",)


def report(
    node: str = "n0", pods_on_gpu0: tuple[str, ...] = ("ns/a",), work: float = 100.0
) -> GPUNodeReportStatus:
    gpus = [
        h100_status(
            i,
            f"GPU-{node}-{i}",
            powerWatts=400,
            energyJoules=1000.0,
            pods=list(pods_on_gpu0) if i == 0 else [],
        )
        for i in range(2)
    ]
    workloads = [
        WorkloadSample(namespace="ns", pod=p.split("/")[1], workUnits=work, batchSize=8) for p in pods_on_gpu0
    ]
    return GPUNodeReportStatus(
        nodeName=node, agentVersion="t", backend="sim", time=NOW, gpus=gpus, workloads=workloads
    )


def test_node_spec_takes_caps_from_annotations_of_live_policies_only() -> None:
    pods = [
        pod("a", annotations={"edpilot.io/policy": "p", "edpilot.io/power-cap-watts": "450"}),
        pod("orphan", annotations={"edpilot.io/policy": "gone", "edpilot.io/power-cap-watts": "300"}),
        pod("bad", annotations={"edpilot.io/policy": "p", "edpilot.io/power-cap-watts": "nan"}),
    ]
    status = report(pods_on_gpu0=("ns/a",))
    spec = desired_spec(
        pods=pods,
        status=status,
        policies={"ns/p": policy().spec},
        active_pods={"ns/a"},
        current=GPUNodeReportSpec(),
        holder="op",
        now=NOW,
        timing=ReportTiming(lease_seconds=30, fast_interval_seconds=2, slow_interval_seconds=60),
    )
    assert [(c.gpuUUID, c.watts, c.pod) for c in spec.powerLimits] == [("GPU-n0-0", 450.0, "ns/a")]
    assert sorted(w.pod for w in spec.workloads) == ["a", "bad"]  # measured, but a NaN cap is no cap
    assert spec.reportIntervalSeconds == 2  # a workload here explores
    assert spec.lease is not None and spec.lease.renewTime == NOW and spec.lease.leaseSeconds == 30


@pytest.mark.parametrize(("age", "renewed"), [(5, False), (11, True)])
def test_the_lease_is_renewed_after_a_third_of_its_length(age: int, renewed: bool) -> None:
    current = GPUNodeReportSpec(
        lease=Lease(holderIdentity="op", renewTime=NOW - timedelta(seconds=age), leaseSeconds=30)
    )
    spec = desired_spec(
        pods=[],
        status=None,
        policies={},
        active_pods=set(),
        current=current,
        holder="op",
        now=NOW,
        timing=ReportTiming(lease_seconds=30),
    )
    assert spec.lease is not None and (spec.lease.renewTime == NOW) is renewed
    assert spec.reportIntervalSeconds == ReportTiming().slow_interval_seconds


@pytest.mark.parametrize(
    ("text", "expected"), [("8-512", (8, 512)), ("16..64", (16, 64)), ("64-8", None), ("x", None)]
)
def test_batch_size_range_annotation(text: str, expected: tuple[int, int] | None) -> None:
    assert parse_batch_range(text) == expected


def test_reconcile_waits_for_the_agent_and_claims_the_pod() -> None:
    outcome = reconcile_policy(
        policy=policy(), status={}, generation=3, pods=[pod("a")], policies=[policy()], reports={}, now=NOW
    )
    rows = outcome.status["workloads"]
    assert rows[0]["phase"] == "Pending" and "no GPUNodeReport" in rows[0]["message"]
    assert outcome.pod_annotations == {"ns/a": {"edpilot.io/policy": "p"}}
    conditions = {c["type"]: c for c in outcome.status["conditions"]}
    assert conditions["Ready"]["status"] == "True" and conditions["Ready"]["observedGeneration"] == 3
    assert conditions["Converged"]["status"] == "False"


def test_reconcile_measures_a_baseline_and_keeps_condition_transition_times() -> None:
    mine = policy(powerCap={"mode": "Auto", "minPercent": 50, "maxPercent": 100})
    claimed = pod("a", annotations={"edpilot.io/policy": "p"})
    first = reconcile_policy(
        policy=mine,
        status={},
        generation=1,
        pods=[claimed],
        policies=[mine],
        reports={"n0": report()},
        now=NOW,
    )
    row = first.status["workloads"][0]
    assert row["phase"] == "Baseline" and row["gpus"] == 1 and row["optimizer"]["phase"] == "Baseline"
    later = NOW + timedelta(seconds=10)
    second = reconcile_policy(
        policy=mine,
        status=first.status,
        generation=1,
        pods=[claimed],
        policies=[mine],
        reports={"n0": report(work=1e6).model_copy(update={"time": later})},
        now=later,
    )
    kept = {c["type"]: c["lastTransitionTime"] for c in second.status["conditions"]}
    assert kept == {c["type"]: c["lastTransitionTime"] for c in first.status["conditions"]}
    # A null in a merge patch deletes a key, so the stored state carries none.
    assert not has_none(second.status["workloads"][0]["optimizer"])


def has_none(value: object) -> bool:
    if isinstance(value, dict):
        return any(has_none(v) for v in value.values())
    if isinstance(value, list):
        return any(has_none(v) for v in value)
    return value is None


def test_a_pod_another_policy_wins_is_reported_as_a_conflict() -> None:
    mine, stronger = policy("mine", 0), policy("stronger", 10)
    outcome = reconcile_policy(
        policy=mine, status={}, generation=1, pods=[pod("a")], policies=[mine, stronger], reports={}, now=NOW
    )
    (row,) = outcome.status["workloads"]
    assert row["phase"] == "Conflict" and "stronger" in row["message"]
    assert outcome.pod_annotations == {}
    assert outcome.status["totals"]["workloads"] == 0


def test_totals_round_what_people_read_and_keep_the_joules_exact() -> None:
    rows = [
        WorkloadStatus(name="a", gpus=8, edpReductionPercent=98.21224683513371, energySavedJoules=2.6e7),
        WorkloadStatus(name="b", gpus=1, edpReductionPercent=53.9, energySavedJoules=572953.2147699),
        WorkloadStatus(name="c", gpus=2, phase="Conflict", edpReductionPercent=10.0, energySavedJoules=9e9),
    ]
    totals = policy_totals(rows)
    assert (totals.workloads, totals.gpus) == (2, 9)
    assert totals.averageEdpReductionPercent == 76.1  # (98.21... + 53.9) / 2 = 76.056...
    assert totals.energySavedJoules == 2.6e7 + 572953.2147699  # for machines: metrics, reports
    assert totals.energySavedKWh == 7.38  # 26572953.2 J = 7.3814 kWh, to three significant digits
    assert '"averageEdpReductionPercent":76.1' in totals.model_dump_json()
    assert '"energySavedKWh":7.38' in totals.model_dump_json()


@pytest.mark.parametrize(
    ("joules", "kwh"),
    [(0.0, 0.0), (1000.0, 0.0), (3600.0, 0.001), (50_000.0, 0.014), (3.6e6, 1.0), (4.4444e9, 1230.0)],
)
def test_energy_saved_in_kwh_has_three_significant_digits_and_no_less_than_a_watt_hour(
    joules: float, kwh: float
) -> None:
    totals = policy_totals([WorkloadStatus(name="a", gpus=1, energySavedJoules=joules)])
    assert totals.energySavedKWh == kwh
    assert totals.averageEdpReductionPercent is None  # no measurement yet: no average


def test_windows_run_on_a_simulated_nodes_clock_not_on_its_wall_clock_stamp() -> None:
    mine = policy()
    (workload,) = select(mine, [pod("a", annotations={"edpilot.io/policy": "p"})], [mine]).workloads
    ahead = NOW + timedelta(seconds=200)
    simulated = report().model_copy(update={"simulatedTime": ahead})
    observed = snapshot(workload, {"n0": simulated}).observation
    assert observed is not None and observed.time == ahead.timestamp()
    observed = snapshot(workload, {"n0": report()}).observation  # a real node: its read time
    assert observed is not None and observed.time == NOW.timestamp()
