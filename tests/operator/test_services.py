"""The operator's pure services: which pods a policy governs, the node specs composed from the
operator's own decisions, and one policy reconcile from a snapshot — all without a cluster."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from builders import h100_status
from edpilot_operator.reports import ReportTiming, decided, desired_spec, state_target, target_of
from edpilot_operator.selection import (
    Governed,
    PodInfo,
    PolicyRef,
    governance,
    governing_policy,
    pod_info,
    select,
)
from edpilot_operator.services import (
    STATE_CHECKPOINT_SECONDS,
    HeldStates,
    StateWrites,
    keep_embedded,
    policy_totals,
    reconcile_policy,
    row_figures,
    snapshot,
    state_writes,
)

from edpilot.contract import StoredState, parse_batch_range, policy_label, state_name
from edpilot.models import (
    EnergyPolicySpec,
    GPUNodeReportSpec,
    GPUNodeReportStatus,
    LeaseRef,
    WorkloadSample,
    WorkloadStatus,
)
from edpilot.optimizer import Config

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
    shared = governance([pod("x")], policies).of(pod("x"))
    assert shared == chosen  # the namespace-wide computation decides the same


def test_governance_ignores_what_annotations_claim_and_other_namespaces() -> None:
    mine = policy("mine")
    claimed = pod("x", annotations={"edpilot.io/policy": "other", "edpilot.io/power-cap-watts": "9"})
    opted_out = pod("y", annotations={"edpilot.io/exclude": "true"})
    elsewhere = PodInfo("other-ns", "z", "u", "n0", "Running", 1, {"app": "llm"})
    result = governance([claimed, opted_out, elsewhere], [mine])
    assert result.of(claimed) == mine
    assert result.of(opted_out) is None and result.selected_by["ns/y"] == frozenset({"mine"})
    assert result.of(elsewhere) is None


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
    selection = select(mine, pods, governance(pods, [mine, stronger]))
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


def spec_of(pods: list[PodInfo], rules: dict[str, Governed], **kwargs: Any) -> GPUNodeReportSpec:
    return desired_spec(
        pods=pods,
        status=report(pods_on_gpu0=("ns/a",)),
        governed=rules,
        lease=LeaseRef(namespace="edpilot", name="op"),
        timing=ReportTiming(lease_seconds=30, fast_interval_seconds=2, slow_interval_seconds=60),
        **kwargs,
    )


def test_node_spec_takes_caps_from_the_operators_decisions_only() -> None:
    """Annotations claim 99,999 W; the spec asks for what the optimizer decided, inside the bounds."""
    forged = {"edpilot.io/policy": "p", "edpilot.io/power-cap-watts": "99999"}
    rules = {"ns/a": Governed(policy(), Config(capWatts=450), exploring=True)}
    spec = spec_of([pod("a", annotations=forged)], rules)
    assert [(c.gpuUUID, c.watts, c.pod) for c in spec.powerLimits] == [("GPU-n0-0", 450.0, "ns/a")]
    assert [w.pod for w in spec.workloads] == ["a"]
    assert spec.reportIntervalSeconds == 2  # a workload here explores
    assert spec.operatorLease == LeaseRef(namespace="edpilot", name="op") and spec.lease is None


@pytest.mark.parametrize(
    ("power_cap", "target", "expected"),
    [
        ({"mode": "Auto", "minPercent": 50, "maxPercent": 60}, Config(capWatts=99999), 420.0),  # re-clamped
        ({"mode": "Auto", "minPercent": 50}, Config(capWatts=1), 350.0),
        ({"mode": "Auto", "minPercent": 50}, Config(), 700.0),  # the baseline: the default limit
        ({"mode": "Off"}, Config(capWatts=200), None),  # Off: no cap asked for, whatever the state says
        ({"mode": "Fixed", "watts": 300}, Config(capWatts=650), 300.0),
        ({"mode": "Auto"}, Config(memberCaps={"GPU-n0-0": 9000.0}), 700.0),
    ],
)
def test_a_decided_cap_is_clamped_to_the_policy_mode_and_bounds(
    power_cap: dict[str, Any], target: Config, expected: float | None
) -> None:
    rules = {"ns/a": Governed(policy(powerCap=power_cap), target)}
    limits = spec_of([pod("a")], rules).powerLimits
    assert [limit.watts for limit in limits] == ([] if expected is None else [expected])


def test_excluded_ungoverned_and_undecided_pods_get_no_cap_unless_a_budget_bounds_them() -> None:
    spec = spec_of([pod("a")], {})  # ungoverned (excluded or unselected): the default limit
    assert spec.powerLimits == [] and spec.workloads == []
    undecided = spec_of([pod("a")], {"ns/a": Governed(policy(), None)})
    assert undecided.powerLimits == [] and [w.pod for w in undecided.workloads] == ["a"]
    budgeted = spec_of([pod("a")], {}, budget_caps={"GPU-n0-0": 9000.0, "GPU-n0-1": 300.0})
    # A budget allocation is clamped to the board too; an idle GPU (held by no pod) gets nothing.
    assert [(c.gpuUUID, c.watts) for c in budgeted.powerLimits] == [("GPU-n0-0", 700.0)]


def test_a_gpu_with_unknown_constraints_gets_no_cap() -> None:
    status = report(pods_on_gpu0=("ns/a",))
    status.gpus[0] = status.gpus[0].model_copy(update={"maxLimitWatts": 0.0})
    spec = desired_spec(
        pods=[pod("a")],
        status=status,
        governed={"ns/a": Governed(policy(), Config(capWatts=400))},
        lease=LeaseRef(namespace="edpilot", name="op"),
        timing=ReportTiming(),
        budget_caps={"GPU-n0-0": 300.0},
    )
    assert spec.powerLimits == []


def test_decisions_are_read_from_the_status_rows_of_the_policys_own_namespace() -> None:
    target = Config(capWatts=333).model_dump(mode="json")
    status = {
        "workloads": [
            {
                "name": "a",
                "pods": ["ns/a", "elsewhere/b"],
                "phase": "Exploring",
            },
            {"name": "c", "pods": ["ns/c"], "phase": "Converged"},
            # A row an operator before per-workload state objects wrote: its target is in its state.
            {"name": "d", "pods": ["ns/d"], "phase": "Converged", "optimizer": {"target": target}},
            {"name": "e", "pods": ["ns/e"], "phase": "Converged", "optimizer": {"target": {"capWatts": "x"}}},
            "not a row",
        ]
    }
    found = decided("ns", status)
    stored = {"a": state_target({"target": target}), "c": state_target({"target": {"capWatts": "x"}})}
    targets = {p: target_of(found, p, stored.get) for p in ("ns/a", "elsewhere/b", "ns/c", "ns/d", "ns/e")}
    # From the state objects, else (not migrated yet) from the row; an unreadable one gives none.
    assert targets == {
        "ns/a": Config(capWatts=333),
        "elsewhere/b": None,
        "ns/c": None,
        "ns/d": Config(capWatts=333),
        "ns/e": None,
    }
    assert found.exploring == frozenset({"ns/a"})


def test_a_steady_nodes_spec_is_the_same_at_every_cycle() -> None:
    """Nothing in the spec changes with time alone (the operator's liveness is its one Lease), so
    the report sweep writes a node's spec only when what its agent must do changes."""
    rules = {"ns/a": Governed(policy(), Config(capWatts=450), exploring=False)}
    specs = [
        desired_spec(
            pods=[pod("a")],
            status=report(pods_on_gpu0=("ns/a",)).model_copy(update={"time": NOW + timedelta(seconds=t)}),
            governed=rules,
            lease=LeaseRef(namespace="edpilot", name="op"),
            timing=ReportTiming(lease_seconds=30),
        )
        for t in (0, 11, 3600)
    ]
    assert specs[0] == specs[1] == specs[2]
    assert specs[0].reportIntervalSeconds == ReportTiming().slow_interval_seconds


@pytest.mark.parametrize(
    ("text", "expected"), [("8-512", (8, 512)), ("16..64", (16, 64)), ("64-8", None), ("x", None)]
)
def test_batch_size_range_annotation(text: str, expected: tuple[int, int] | None) -> None:
    assert parse_batch_range(text) == expected


def test_reconcile_waits_for_the_agent_and_claims_the_pod() -> None:
    outcome = reconcile_policy(
        policy=policy(),
        status={},
        generation=3,
        pods=[pod("a")],
        governance=governance([pod("a")], [policy()]),
        reports={},
        now=NOW,
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
        governance=governance([claimed], [mine]),
        reports={"n0": report()},
        now=NOW,
    )
    row = first.status["workloads"][0]
    assert row["phase"] == "Baseline" and row["gpus"] == 1 and first.states["a"]["phase"] == "Baseline"
    assert "optimizer" not in row and "target" not in row
    later = NOW + timedelta(seconds=10)
    second = reconcile_policy(
        policy=mine,
        status=first.status,
        states=first.states,
        generation=1,
        pods=[claimed],
        governance=governance([claimed], [mine]),
        reports={"n0": report(work=1e6).model_copy(update={"time": later})},
        now=later,
    )
    kept = {c["type"]: c["lastTransitionTime"] for c in second.status["conditions"]}
    assert kept == {c["type"]: c["lastTransitionTime"] for c in first.status["conditions"]}
    # A null in a merge patch deletes a key, so the stored state carries none.
    assert not has_none(second.states["a"])


def has_none(value: object) -> bool:
    if isinstance(value, dict):
        return any(has_none(v) for v in value.values())
    if isinstance(value, list):
        return any(has_none(v) for v in value)
    return value is None


def test_a_pod_another_policy_wins_is_reported_as_a_conflict() -> None:
    mine, stronger = policy("mine", 0), policy("stronger", 10)
    outcome = reconcile_policy(
        policy=mine,
        status={},
        generation=1,
        pods=[pod("a")],
        governance=governance([pod("a")], [mine, stronger]),
        reports={},
        now=NOW,
    )
    (row,) = outcome.status["workloads"]
    assert row["phase"] == "Conflict" and "stronger" in row["message"]
    assert outcome.pod_annotations == {}
    assert outcome.status["totals"]["workloads"] == 0


def test_the_governance_cache_recomputes_only_when_governance_may_have_changed() -> None:
    from edpilot_operator.selection import GovernanceCache, PolicyEntry

    now = [0.0]
    cache = GovernanceCache(max_age=5, clock=lambda: now[0])
    pods, entries = [pod("a")], [PolicyEntry(policy("p"))]
    first = cache.get("ns", pods, entries)
    cache.note("ns", "policy/p", ("uid", 1, False, False))
    second = cache.get("ns", pods, entries)
    assert second is not first  # a policy seen for the first time
    cache.note("ns", "policy/p", ("uid", 1, False, False))  # a status write: same uid and generation
    assert cache.get("ns", pods, entries) is second
    assert cache.get("ns", [*pods, pod("b")], entries) is not second  # a pod more (or one gone)
    third = cache.get("ns", pods, entries)
    cache.note("ns", "pod/a", ("uid-a", (("app", "other"),), False))  # relabelled
    assert cache.get("ns", pods, entries) is not third
    fourth = cache.get("ns", pods, entries)
    now[0] = 5.0
    assert cache.get("ns", pods, entries) is not fourth  # at least once per max_age
    cache.note("ns", "pod/gone", ("uid-g", (), False))
    fifth = cache.get("ns", pods, entries)  # pod "gone" is not in the index: its note is dropped
    cache.note("ns", "pod/gone", ("uid-g", (), False))  # so the same note counts as new
    assert cache.get("ns", pods, entries) is not fifth


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


def test_windows_run_on_a_nodes_counter_clock_not_on_its_wall_clock_stamp() -> None:
    mine = policy()
    pods = [pod("a")]
    (workload,) = select(mine, pods, governance(pods, [mine])).workloads
    ahead = NOW + timedelta(seconds=200)
    simulated = report().model_copy(update={"counterTime": ahead})
    observed = snapshot(workload, {"n0": simulated}).observation
    assert observed is not None and observed.time == ahead.timestamp()
    observed = snapshot(workload, {"n0": report()}).observation  # an older agent: its read time
    assert observed is not None and observed.time == NOW.timestamp()


def reconcile_twice(stored: Any, embedded: bool = False) -> tuple[dict[str, Any], Any]:
    """A first reconcile measures a baseline; `stored(optimizer, row)` rewrites the state it stored
    before the second reads it back, as another operator version would have written it: in its
    WorkloadOptimizerState, or with `embedded` in the status row (operators before those objects).
    Returns the row with the state it held under "optimizer", and the second outcome."""
    mine = policy(powerCap={"mode": "Auto", "minPercent": 50, "maxPercent": 100})
    claimed = pod("a", annotations={"edpilot.io/policy": "p"})
    first = reconcile_policy(
        policy=mine,
        status={},
        generation=1,
        pods=[claimed],
        governance=governance([claimed], [mine]),
        reports={"n0": report()},
        now=NOW,
    )
    row = first.status["workloads"][0]
    state = stored(first.states["a"], row)
    if embedded:
        row["optimizer"] = state
    later = NOW + timedelta(seconds=10)
    second = reconcile_policy(
        policy=mine,
        status=first.status,
        states={} if embedded else {"a": state},
        generation=1,
        pods=[claimed],
        governance=governance([claimed], [mine]),
        reports={"n0": report(work=1e6).model_copy(update={"time": later})},
        now=later,
    )
    return {**row, "optimizer": state}, second


def test_a_state_without_a_schema_version_is_migrated_and_resumed() -> None:
    row, second = reconcile_twice(lambda o, _: {k: v for k, v in o.items() if k != "schemaVersion"})
    _, labelled = reconcile_twice(lambda o, _: o)
    assert "schemaVersion" not in row["optimizer"]
    assert not any(e.reason in ("StateDiscarded", "StateTooNew") for e in second.events), second.events
    resumed = second.states["a"]
    # What the first reconcile started goes on exactly as from the state it would store now.
    assert resumed["schemaVersion"] == 1 and resumed["last"] is not None
    assert resumed == labelled.states["a"]


def test_a_state_from_a_newer_operator_is_kept_untouched_and_not_optimized() -> None:
    record = {"owner": "Deployment/llm", "config": "batch=16", "previous": "batch=8"}

    def newer(optimizer: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
        row["rollout"] = record  # the newer operator had rolled the owner out
        return {**optimizer, "schemaVersion": 99, "fieldOfTheFuture": {"x": 1}}

    row, second = reconcile_twice(newer)
    kept = second.status["workloads"][0]
    assert second.states["a"] == row["optimizer"]  # byte for byte what the newer operator stored
    assert "optimizer" not in kept
    assert record.items() <= kept["rollout"].items()  # so its owner's template is not put back either
    assert kept["phase"] == row["phase"] and "schemaVersion 99" in kept["message"]
    assert [e.reason for e in second.events] == ["StateTooNew"]
    assert second.pod_annotations == {}  # no hints written for it


def test_a_state_embedded_in_the_status_row_is_migrated_to_its_object_and_resumed() -> None:
    """A policy status written before WorkloadOptimizerState objects (the state in the row, no
    object): the state is read once, resumed exactly as from its object, and leaves the row."""
    row, migrated = reconcile_twice(lambda o, _: o, embedded=True)
    _, from_object = reconcile_twice(lambda o, _: o)
    assert row["optimizer"]["phase"] == "Baseline"
    assert not any(e.reason == "StateDiscarded" for e in migrated.events), migrated.events
    assert migrated.states["a"] == from_object.states["a"]  # resumed, not restarted
    assert migrated.states["a"]["last"] is not None
    assert "optimizer" not in migrated.status["workloads"][0]
    assert migrated.status["workloads"][0] == from_object.status["workloads"][0]


HOSTILE_STATES: list[Any] = [
    {"schemaVersion": 1, "phase": "Nonsense"},
    {"schemaVersion": "1", "phase": "Converged"},
    {"schemaVersion": True},
    {"schemaVersion": -4},
    {"schemaVersion": 1, "probes": "every one of them"},
    {"schemaVersion": 1, "target": {"capWatts": "99999"}, "unexpected": 1},
    {"schemaVersion": 1, "phase": "Converged", "target": [1, 2, 3]},
    {"schemaVersion": 1, "acc": {"windows": {"nested": [None]}}},
]


@pytest.mark.parametrize("hostile", HOSTILE_STATES, ids=range(len(HOSTILE_STATES)))
def test_a_hostile_state_object_restarts_the_exploration_with_a_warning(hostile: Any) -> None:
    """Whatever a tenant allowed to edit its namespace's WorkloadOptimizerStates writes: no crash,
    a StateDiscarded warning naming the workload, and a fresh exploration (a new baseline) whose
    state replaces the hostile one."""
    _, fresh = reconcile_twice(lambda o, _: o)
    row, second = reconcile_twice(lambda o, _: hostile)
    assert row["optimizer"] == hostile
    discarded = [e for e in second.events if e.reason == "StateDiscarded"]
    assert len(discarded) == 1 and discarded[0].type == "Warning" and discarded[0].message.startswith("a: ")
    assert second.states["a"]["phase"] == "Baseline" and second.states["a"]["probes"] == []
    # A fresh baseline, not the one the first reconcile started (its window starts over).
    assert second.states["a"] != fresh.states["a"]
    assert second.status["workloads"][0]["phase"] == "Baseline"


def test_a_well_formed_hostile_state_cannot_move_a_cap_outside_the_policy_bounds() -> None:
    """A state that validates but asks for 99,999 W on one GPU and 5 W on the others, converged:
    the caps the operator writes (the pod's annotation, the node spec) stay within the policy's
    bounds (50-100 % of a 700 W H100)."""

    def hostile(state: dict[str, Any], _: Any) -> dict[str, Any]:
        target = {"capWatts": 5.0, "memberCaps": {"GPU-n0-0": 99999.0}, "batchSize": 8}
        return {**state, "phase": "Converged", "target": target, "convergedAt": 0.0}

    _, second = reconcile_twice(hostile)
    row = second.status["workloads"][0]
    cap = second.pod_annotations.get("ns/a", {}).get("edpilot.io/power-cap")
    assert cap is None or 350 <= float(cap) <= 700, cap
    rules = {"ns/a": Governed(policy(powerCap={"mode": "Auto", "minPercent": 50, "maxPercent": 100}))}
    target = target_of(
        decided("ns", {"workloads": [row]}), "ns/a", {"a": state_target(second.states["a"])}.get
    )
    assert target is not None and target.memberCaps == {"GPU-n0-0": 99999.0}  # as the tenant wrote it
    rules["ns/a"] = Governed(rules["ns/a"].policy, target, False)
    limits = spec_of([pod("a")], rules).powerLimits
    assert limits and all(350 <= p.watts <= 700 for p in limits), limits


# ---------------------------------------------------------------- scale: 2,000 workloads


ETCD_LIMIT = 1.5 * 1024 * 1024  # bytes: etcd's default request size limit, an object's ceiling


def test_a_policy_with_2000_converged_workloads_fits_etcd_and_each_state_object_is_small() -> None:
    """The status of a policy with 2,000 converged decode workloads (rows as the reconcile writes
    them, from a state the optimizer really converged on) stays well below etcd's object limit
    once the states live in their own objects; with the states embedded it would not fit."""
    import json

    from builders import drive

    from edpilot import gpusim
    from edpilot.contract import state_object
    from edpilot.models import BatchSizeSpec, EnergyPolicyStatus, QuantizationSpec
    from edpilot.simulate import DECODE_ACCURACY, SimWorkloadSpec

    pol = policy(
        batchSize=BatchSizeSpec(mode="Auto", min=8, max=1024).model_dump(),
        quantization=QuantizationSpec(
            mode="Auto", allowed=["bf16", "fp8", "int8"], maxAccuracyDropPercent=1
        ).model_dump(),
    ).spec
    spec = SimWorkloadSpec("decode", gpusim.llm_decode(), 8, "bf16", pol, DECODE_ACCURACY)
    _, decisions = drive(spec, seconds=2400)
    decision = decisions[-1]
    assert decision.phase == "Converged"
    state = decision.state.model_dump(mode="json", exclude_none=True)
    rows = []
    for i in range(2000):
        name = f"llm-decode-{i:04d}-7d9f8c6b5d-x2k4z"
        figures = row_figures(decision.figures.model_dump())
        rows.append(
            WorkloadStatus.model_validate(
                {
                    **figures,
                    "name": name,
                    "pods": [f"inference-team/{name}"],
                    "nodes": [f"gpu-node-{i // 8:04d}"],
                    "gpus": 1,
                }
            )
        )
    status = EnergyPolicyStatus(workloads=rows).model_dump(mode="json", exclude_none=True)
    status_bytes = len(json.dumps(status, separators=(",", ":")))
    row_bytes = status_bytes / 2000
    obj = state_object("inference-team", "decode", "0" * 36, rows[0].name, state)
    state_bytes = len(json.dumps(obj, separators=(",", ":")))
    embedded = {**status, "workloads": [{**r, "optimizer": state} for r in status["workloads"]]}
    embedded_bytes = len(json.dumps(embedded, separators=(",", ":")))
    print(
        f"2,000 converged rows: status {status_bytes / 1024:.0f} KiB ({row_bytes:.0f} B/row); "
        f"state object {state_bytes} B; with states embedded {embedded_bytes / 1024:.0f} KiB"
    )
    # A fifth of the limit spare: room for messages (about 60 characters more on every row).
    assert status_bytes < ETCD_LIMIT * 0.8, status_bytes
    assert state_bytes < 16 * 1024, state_bytes
    assert embedded_bytes > ETCD_LIMIT  # why the states moved out


# ---------------------------------------------------------------- state objects: what to write


def stored_objects(*entries: tuple[str, str, dict[str, Any], str]) -> list[StoredState]:
    """(policy, workload, state, owner UID) as the operator's index holds them."""
    return [StoredState(state_name(p, w), p, w, s, uid) for p, w, s, uid in entries]


def test_only_new_changed_or_reowned_states_are_written_and_orphans_deleted() -> None:
    same: dict[str, Any] = {"schemaVersion": 1, "phase": "Converged"}
    old: dict[str, Any] = {"schemaVersion": 1}
    new: dict[str, Any] = {"schemaVersion": 1, "x": 2}
    stored = [
        *stored_objects(
            ("p", "kept", same, "uid-1"),
            ("p", "changed", old, "uid-1"),
            ("p", "left", same, "uid-1"),  # its workload left the policy
            ("p", "reowned", same, "uid-0"),  # written for an earlier policy of the same name
        ),
        StoredState("a-copy-under-another-name", "p", "kept", same, "uid-1"),
    ]
    states: dict[str, dict[str, Any]] = {"kept": same, "changed": new, "reowned": same, "fresh": new}
    writes = state_writes("ns", "p", "uid-1", stored, states)
    assert sorted(writes.apply) == ["changed", "fresh", "reowned"]
    assert writes.delete == sorted(["a-copy-under-another-name", state_name("p", "left")])
    body = writes.apply["fresh"]
    assert body["metadata"]["name"] == state_name("p", "fresh") and body["metadata"]["namespace"] == "ns"
    assert body["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert body["spec"] == {"policy": "p", "workload": "fresh", "state": new}
    # Nothing changed: nothing written, nothing deleted.
    again = [s for s in stored_objects(*((("p", w, b, "uid-1") for w, b in states.items())))]
    assert state_writes("ns", "p", "uid-1", again, states) == StateWrites(apply={}, delete=[])


def converged_at(t: float, **changes: Any) -> dict[str, Any]:
    """A converged state whose running figures were last updated by the observation at `t`."""
    base: dict[str, Any] = {
        "schemaVersion": 1,
        "phase": "Converged",
        "target": {"capWatts": 300.0},
        "last": {"time": t, "members": []},
        "acc": {"windows": int(t)},
        "energySavedJoules": 10.0 * t,
        "recentLoads": [t],
    }
    return {**base, **changes}


@pytest.mark.parametrize(
    ("now", "changes", "written"),
    [
        (1010.0, {}, False),  # only the running figures moved: the stored copy still serves
        (1000.0 + STATE_CHECKPOINT_SECONDS - 1, {}, False),
        (1000.0 + STATE_CHECKPOINT_SECONDS, {}, True),  # a checkpoint every few minutes
        (1010.0, {"target": {"capWatts": 280.0}}, True),  # a decision: written at once
        (1010.0, {"phase": "Drifted"}, True),
        (1010.0, {"driftStreak": 1}, True),
    ],
)
def test_a_converged_state_is_written_on_decisions_and_checkpoints_not_at_every_window(
    now: float, changes: dict[str, Any], written: bool
) -> None:
    stored = stored_objects(("p", "w", converged_at(1000.0), "uid-1"))
    settled = {state_name("p", "w")}
    writes = state_writes("ns", "p", "uid-1", stored, {"w": converged_at(now, **changes)}, settled)
    assert sorted(writes.apply) == (["w"] if written else [])


def test_the_first_decision_after_a_restart_is_written() -> None:
    """A state this operator has not reconciled before (it just started) is written on any change:
    the stored copy then shows the operator resumed from it."""
    stored = stored_objects(("p", "w", converged_at(1000.0), "uid-1"))
    writes = state_writes("ns", "p", "uid-1", stored, {"w": converged_at(1010.0)})
    assert sorted(writes.apply) == ["w"]


def test_an_exploring_state_is_written_at_every_window() -> None:
    stored = stored_objects(("p", "w", converged_at(1000.0, phase="Exploring"), "uid-1"))
    writes = state_writes("ns", "p", "uid-1", stored, {"w": converged_at(1005.0, phase="Exploring")})
    assert sorted(writes.apply) == ["w"]


def test_the_next_reconcile_goes_on_from_the_state_held_back_not_the_older_copy() -> None:
    held = HeldStates(settled={state_name("p", "w"), state_name("p", "x")})
    stored = stored_objects(
        ("p", "w", converged_at(1000.0), "uid-1"), ("p", "x", converged_at(1000.0), "uid-1")
    )
    states = {"w": converged_at(1010.0), "x": converged_at(1010.0, phase="Drifted")}
    held.remember(stored, states, state_writes("ns", "p", "uid-1", stored, states, held.settled))
    # w was held back, x written: the next reconcile sees w's newer state and x as read back.
    assert [s.state for s in held.newest(stored)] == [converged_at(1010.0), converged_at(1000.0)]
    # Once w's stored copy changes (a checkpoint, another writer), that copy rules.
    rewritten = stored_objects(("p", "w", converged_at(1300.0), "uid-1"))
    assert [s.state for s in held.newest(rewritten)] == [converged_at(1300.0)]
    assert held.newest(stored)[0].state == converged_at(1000.0)  # and the held one is gone
    # A state written at last is no longer held.
    states = {"w": converged_at(1000.0 + STATE_CHECKPOINT_SECONDS)}
    held.remember(stored, {"w": converged_at(1010.0)}, StateWrites(apply={}, delete=[]))
    held.remember(stored, states, state_writes("ns", "p", "uid-1", stored, states, held.settled))
    assert held.newest(stored)[0].state == converged_at(1000.0)


def test_a_state_becomes_settled_once_reconciled() -> None:
    held = HeldStates()
    stored = stored_objects(("p", "w", converged_at(1000.0), "uid-1"))
    states = {"w": converged_at(1010.0)}
    writes = state_writes("ns", "p", "uid-1", stored, states, held.settled)
    assert sorted(writes.apply) == ["w"]  # just started: written
    held.remember(stored, states, writes)
    again = stored_objects(("p", "w", converged_at(1010.0), "uid-1"))
    assert state_writes("ns", "p", "uid-1", again, {"w": converged_at(1020.0)}, held.settled).apply == {}


def test_a_state_that_could_not_be_stored_stays_in_its_row_with_a_warning() -> None:
    _, outcome = reconcile_twice(lambda o, _: o)
    keep_embedded(outcome, {"a": "403 forbidden"})
    (row,) = outcome.status["workloads"]
    assert row["optimizer"] == outcome.states["a"]
    assert outcome.events[-1].reason == "StateNotStored" and "403 forbidden" in outcome.events[-1].message
    assert [e.reason for e in outcome.events].count("StateNotStored") == 1


@pytest.mark.parametrize(
    ("policy_name", "workload"),
    [("decode", "decode-a"), ("a-b", "c"), ("a", "b-c"), ("p" * 253, "w" * 253), ("Odd.Name", "x_y")],
)
def test_state_object_names_are_valid_bounded_and_distinct(policy_name: str, workload: str) -> None:
    name = state_name(policy_name, workload)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 100
    assert name == state_name(policy_name, workload)
    assert state_name("a-b", "c") != state_name("a", "b-c")
    assert len(policy_label(policy_name)) <= 63
