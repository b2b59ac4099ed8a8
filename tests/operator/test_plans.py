"""The operator's planners (`edpilot_operator.handlers.plans`), each a pure function of a
`ClusterSnapshot` and the time, without a cluster: given what the watches hold, the writes."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import kopf
import pytest
from builders import h100_status
from edpilot_operator import services
from edpilot_operator.handlers import OperatorConfig, Runtime
from edpilot_operator.handlers.apply import apply_report_sweep
from edpilot_operator.handlers.plans import (
    ReportPlan,
    ReportSweep,
    plan_budget,
    plan_node_spec,
    plan_policy,
    plan_release,
    plan_report_spec,
    plan_report_sweep,
    policy_view,
)
from edpilot_operator.handlers.runtime import (
    WRITE_IN_FLIGHT_SECONDS,
    NodeLabels,
    WriteBudget,
    WrittenSpec,
)
from edpilot_operator.handlers.snapshot import ClusterSnapshot, SeenSpec
from edpilot_operator.kube import Kube
from edpilot_operator.main import parse_args
from edpilot_operator.reports import decided
from edpilot_operator.selection import PodInfo, PolicyEntry, PolicyRef
from edpilot_operator.services import HeldStates

from edpilot.contract import ANNOTATION_POLICY, HINT_ANNOTATIONS, HOLDERS_UNKNOWN, StoredState, state_name
from edpilot.models import (
    Condition,
    EnergyPolicySpec,
    GPUNodeReportSpec,
    GPUNodeReportStatus,
    LeaseRef,
    WorkloadSample,
)
from edpilot.optimizer import Config

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
CFG = OperatorConfig(lease_namespace="edpilot", lease_name="op", fast_report_interval=2)
LEASE = LeaseRef(namespace="edpilot", name="op")
SPEC = {"selector": {"matchLabels": {"app": "llm"}}, "workMetric": {"name": "tokens_total"}}


def pod(name: str, node: str = "n0", namespace: str = "ns", claimed_by: str | None = None) -> PodInfo:
    annotations = {ANNOTATION_POLICY: claimed_by} if claimed_by else {}
    labels = {"app": "llm"}
    return PodInfo(namespace, name, f"uid-{name}", node, "Running", 1, labels, annotations, "img:1")


def report(node: str, pods: Sequence[str]) -> GPUNodeReportStatus:
    """One H100 per pod (limits 200-700 W), each pod reporting its work counter."""
    gpus = [h100_status(i, f"GPU-{node}-{i}", powerWatts=400, pods=[p]) for i, p in enumerate(pods)]
    work = [WorkloadSample(namespace=p.split("/")[0], pod=p.split("/")[1], workUnits=100.0) for p in pods]
    return GPUNodeReportStatus(
        nodeName=node, agentVersion="t", backend="sim", time=NOW, gpus=gpus, workloads=work
    )


def policy_entry(name: str = "p", **spec: Any) -> PolicyEntry:
    return PolicyEntry(PolicyRef("ns", name, EnergyPolicySpec.model_validate({**SPEC, **spec})))


def snapshot(
    pods: Sequence[PodInfo] = (),
    policies: Sequence[PolicyEntry] = (),
    rows: Sequence[dict[str, Any]] = (),
    targets: dict[tuple[str, str], Config] | None = None,
    reports: Sequence[GPUNodeReportStatus] = (),
    extra: dict[str, Any] | None = None,
) -> ClusterSnapshot:
    """The indexes as kopf holds them: key -> a collection of values."""
    by_namespace: dict[str, list[PodInfo]] = {}
    by_node: dict[str, list[PodInfo]] = {}
    for p in pods:
        by_namespace.setdefault(p.namespace, []).append(p)
        by_node.setdefault(p.node, []).append(p)
    indexes: dict[str, Any] = {
        "pods_by_namespace": by_namespace,
        "pods_by_node": by_node,
        "policies_by_namespace": {"ns": list(policies)},
        "decisions_by_policy": {"ns/p": [decided("ns", {"workloads": list(rows)})]},
        "targets_by_workload": {k: [v] for k, v in (targets or {}).items()},
        "reports_by_node": {r.nodeName: [r] for r in reports},
        "report_specs": {r.nodeName: [SeenSpec(1, GPUNodeReportSpec())] for r in reports},
        **(extra or {}),
    }
    return ClusterSnapshot.of(indexes)


EXPLORING_A = {"name": "a", "pods": ["ns/a"], "phase": "Exploring"}
DECIDED_A = {("ns/p", "a"): Config(capWatts=450)}


def test_a_snapshot_reads_the_indexes_by_name_and_governs_pods_from_the_operators_decisions() -> None:
    snap = snapshot([pod("a"), pod("b")], [policy_entry()], [EXPLORING_A], DECIDED_A)
    assert snap.claims_by_pod is None and snap.budget_caps_by_node == {}  # DRA off, no budgets
    rules = snap.governed(snap.node_pods("n0"))
    assert {k: (r.policy.key, r.target, r.exploring) for k, r in rules.items()} == {
        "ns/a": ("ns/p", Config(capWatts=450), True),
        "ns/b": ("ns/p", None, False),  # governed, not decided yet
    }


# ---------------------------------------------------------------- report specs


def governed_snapshot(status: GPUNodeReportStatus) -> ClusterSnapshot:
    """Pod a on n0, governed by policy p, which explores and targets 450 W for it."""
    return snapshot([pod("a")], [policy_entry()], [EXPLORING_A], DECIDED_A, [status])


CAPPED = GPUNodeReportSpec.model_validate(
    {
        "powerLimits": [{"gpuUUID": "GPU-n0-0", "watts": 450.0, "pod": "ns/a"}],
        "workloads": [{"namespace": "ns", "pod": "a", "metricName": "tokens_total"}],
        "operatorLease": {"namespace": "edpilot", "name": "op"},
        "reportIntervalSeconds": 2,
    }
)


def test_the_node_spec_caps_the_decided_pod_and_reports_fast_while_it_explores() -> None:
    snap = governed_snapshot(report("n0", ["ns/a"]))
    spec = plan_node_spec(snap, "n0", report("n0", ["ns/a"]), CFG)
    assert spec.model_dump(exclude_none=True) == CAPPED.model_dump(exclude_none=True)
    assert plan_node_spec(snap, "n0", report("n0", ["ns/a"]), CFG, without="ns/p").powerLimits == []


CAPPED_BODY = CAPPED.model_dump(mode="json", exclude_none=True)
LEGACY = GPUNodeReportSpec.model_validate(
    {**CAPPED_BODY, "lease": {"holderIdentity": "op", "renewTime": "2026-12-06T11:59:00Z"}}
)
OLD = GPUNodeReportSpec()


def written_at(generation: int, seconds_ago: float = 1.0) -> WrittenSpec:
    return WrittenSpec(generation, CAPPED, NOW - timedelta(seconds=seconds_ago))


def writes(generation: int, body: dict[str, Any] = CAPPED_BODY) -> ReportPlan:
    return ReportPlan(spec_patch=body, written=WrittenSpec(generation, CAPPED, NOW))


@pytest.mark.parametrize(
    ("seen", "generation", "written", "expected"),
    [
        # Nothing written yet, the report's spec is old: write the desired spec, remember it.
        (OLD, 3, None, writes(3)),
        # The report already has it: nothing.
        (CAPPED, 3, None, ReportPlan()),
        # Written from this very generation, the watch has not delivered it: not again.
        (OLD, 3, written_at(3), ReportPlan()),
        # The watch delivered the write (a higher generation): forget it.
        (CAPPED, 4, written_at(3), ReportPlan(forget=True)),
        # A later spec write (not ours) changed it since: write again.
        (OLD, 5, written_at(3), writes(5)),
        # Written long ago and never delivered: lost, write again.
        (OLD, 3, written_at(3, WRITE_IN_FLIGHT_SECONDS), writes(3)),
        # An older operator's per-node lease is removed with the next write.
        (LEGACY, 3, None, writes(3, {**CAPPED_BODY, "lease": None})),
    ],
)
def test_a_report_spec_is_written_only_when_it_differs_from_the_current_one(
    seen: GPUNodeReportSpec, generation: int, written: WrittenSpec | None, expected: ReportPlan
) -> None:
    snap = governed_snapshot(report("n0", ["ns/a"]))
    assert plan_report_spec(snap, "n0", SeenSpec(generation, seen), written, NOW, CFG) == expected


def test_a_report_that_cannot_name_its_gpus_holders_leaves_the_spec_as_it_is() -> None:
    """A restarted agent's first report, before its pods are listed, names no holder: that is not
    a pod gone, and the node keeps the caps its spec has."""
    status = report("n0", [])
    unknown = Condition(
        type="Ready", status="False", reason=HOLDERS_UNKNOWN, message="", lastTransitionTime=NOW
    )
    snap = governed_snapshot(status.model_copy(update={"conditions": [unknown]}))
    assert plan_report_spec(snap, "n0", SeenSpec(3, CAPPED), None, NOW, CFG) == ReportPlan()
    assert plan_report_spec(governed_snapshot(status), "n0", SeenSpec(3, CAPPED), None, NOW, CFG).spec_patch


def test_a_status_write_racing_the_spec_write_does_not_write_the_spec_again() -> None:
    """The agent's status write lands after the operator's spec write, and the watch delivers it
    before that spec write (a lagging watch at 2,000 nodes): the report has a new resourceVersion
    and still the old spec. Only the generation says the spec write is still on its way; judged by
    resourceVersion, every status write in that gap wrote the spec once more."""
    snap = governed_snapshot(report("n0", ["ns/a"]))
    first = plan_report_spec(snap, "n0", SeenSpec(3, OLD), None, NOW, CFG)
    assert first.written == WrittenSpec(3, CAPPED, NOW)
    racing = plan_report_spec(snap, "n0", SeenSpec(3, OLD), first.written, NOW + timedelta(seconds=9), CFG)
    assert racing == ReportPlan()


def test_one_sweep_composes_every_report_and_forgets_delivered_and_deleted_ones() -> None:
    """n0 needs its cap, n1 (idle) has the spec it needs, n2's remembered write was delivered,
    and a report that was written to is gone."""
    n0, n1, n2 = report("n0", ["ns/a"]), report("n1", []), report("n2", [])
    idle = plan_node_spec(governed_snapshot(n0), "n1", n1, CFG)
    seen = {"n0": SeenSpec(3, OLD), "n1": SeenSpec(1, idle), "n2": SeenSpec(5, idle)}
    extra = {"report_specs": {node: [s] for node, s in seen.items()}}
    snap = snapshot([pod("a")], [policy_entry()], [EXPLORING_A], DECIDED_A, [n0, n1, n2], extra)
    remembered = {"n2": WrittenSpec(4, idle, NOW), "gone": written_at(2)}
    sweep = plan_report_sweep(snap, remembered, NOW, CFG)
    assert sweep == ReportSweep(writes={"n0": writes(3)}, forget=["n2", "gone"])


class SpecWrites:
    """Records the report spec writes the sweep sends, in place of the API server's client."""

    def __init__(self, failing: Sequence[str] = ()) -> None:
        self.sent: list[str] = []
        self.failing = failing

    async def patch_report_spec(self, node: str, spec: dict[str, Any]) -> None:
        if node in self.failing:
            raise kopf.TemporaryError("API server answered 503", delay=2)
        self.sent.append(node)


def test_report_spec_writes_keep_to_the_write_budget_and_to_what_one_interval_allows() -> None:
    """An operator started on 2,000 running reports found every spec to write at once: 96-135
    PATCH/s reached the reports, the API server fell behind and the operator grew to 1.5 GB. The
    sweep paces its writes (a burst of twice the rate, then the rate) and sends no more than one
    report interval allows; the rest, and writes that fail, wait for the next sweep, which
    composes them afresh. Nothing unsent is remembered as written."""
    ticks, waits = [0.0], []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        ticks[0] += seconds

    cfg = replace(CFG, report_writes_per_second=2.0)  # and a 5 s report interval: 10 a sweep
    kube = SpecWrites(failing=["n1"])
    budget = WriteBudget.of(cfg, lambda: ticks[0])
    runtime = replace(Runtime.of(cfg), kube=cast(Kube, kube), spec_writes=budget)
    sweep = ReportSweep(writes={f"n{i}": writes(1) for i in range(12)}, forget=["gone"])
    runtime.written_specs["gone"] = written_at(1)
    asyncio.run(apply_report_sweep(sweep, runtime, logging.getLogger("test"), sleep))
    assert waits == [0.0] * 4 + [0.5] * 6
    assert sorted(kube.sent) == sorted(f"n{i}" for i in range(10) if i != 1)
    assert sorted(runtime.written_specs) == sorted(kube.sent)  # not n1, n10, n11 or the gone one


def test_a_write_that_breaks_unexpectedly_does_not_stall_the_sweep() -> None:
    """Every write holds one of a few slots; a slot must come back whatever the write raised, or
    the sweep would wait forever for one, and no later sweep (nor Lease renewal) would start."""

    class Broken(SpecWrites):
        async def patch_report_spec(self, node: str, spec: dict[str, Any]) -> None:
            raise RuntimeError("a bug")

    runtime = replace(Runtime.of(CFG), kube=cast(Kube, Broken()))
    sweep = ReportSweep(writes={f"n{i}": writes(1) for i in range(8)})

    async def sweep_within_a_second() -> None:
        await asyncio.wait_for(apply_report_sweep(sweep, runtime, logging.getLogger("test")), 1.0)

    with pytest.raises(RuntimeError, match="a bug"):
        asyncio.run(sweep_within_a_second())
    assert runtime.written_specs == {}


def test_nodes_with_something_to_enforce_are_written_first() -> None:
    """n0..n2 are idle and need only the Lease's name; n3 runs a governed pod."""
    statuses = [report(f"n{i}", ["ns/a"] if i == 3 else []) for i in range(4)]
    extra = {"report_specs": {s.nodeName: [SeenSpec(1, OLD)] for s in statuses}}
    snap = snapshot([pod("a", node="n3")], [policy_entry()], [EXPLORING_A], DECIDED_A, statuses, extra)
    assert list(plan_report_sweep(snap, {}, NOW, CFG).writes) == ["n3", "n0", "n1", "n2"]


def test_the_sweep_runs_once_per_report_interval_whichever_timer_asks() -> None:
    clock = [NOW]
    runtime = replace(Runtime.of(CFG), clock=lambda: clock[0])
    assert runtime.sweep_due(NOW) and not runtime.sweep_due(NOW)
    clock[0] += timedelta(seconds=CFG.report_interval)
    assert runtime.sweep_due(clock[0])


# ---------------------------------------------------------------- policies


def view(snap: ClusterSnapshot, spec: dict[str, Any] | None = None, **meta: Any) -> Any:
    meta = {"generation": 2, "uid": "uid-p", **meta}
    return policy_view(snap, "ns", "p", SPEC if spec is None else spec, {}, meta)


def test_a_policy_being_deleted_gets_no_plan() -> None:
    assert plan_policy(view(snapshot(), deletionTimestamp="2026-12-06T12:00:00Z"), NOW, CFG.tuning) is None


def test_a_rejected_spec_writes_only_its_conditions() -> None:
    plan = plan_policy(view(snapshot(), {"selector": {}, "workMetric": {}}), NOW, CFG.tuning)
    assert plan is not None and "workMetric" in plan.rejected
    assert list(plan.outcome.status) == ["conditions"]
    assert {(c["type"], c["status"], c["reason"]) for c in plan.outcome.status["conditions"]} == {
        ("Ready", "False", "InvalidSpec"),
        ("Degraded", "True", "InvalidSpec"),
    }
    assert not plan.outcome.pod_annotations and not plan.states.apply and not plan.states.delete


def test_a_policy_plan_claims_its_pods_measures_them_and_deletes_orphaned_states() -> None:
    orphan = StoredState(state_name("p", "left"), "p", "left", {"schemaVersion": 1}, "uid-p")
    states = {"states_by_policy": {"ns/p": [orphan]}}
    snap = snapshot(
        [pod("a"), pod("b", "n1")], [policy_entry()], reports=[report("n0", ["ns/a"])], extra=states
    )
    plan = plan_policy(view(snap), NOW, CFG.tuning)
    assert plan is not None and not plan.rejected
    rows = {r["name"]: r for r in plan.outcome.status["workloads"]}
    assert rows["a"]["phase"] == "Baseline" and rows["b"]["phase"] == "Pending"
    assert "no GPUNodeReport from the agent on node n1" in rows["b"]["message"]
    assert plan.outcome.pod_annotations["ns/b"] == {ANNOTATION_POLICY: "p"}
    assert list(plan.states.apply) == ["a"] and plan.states.delete == [orphan.name]
    assert plan.states.apply["a"]["metadata"]["ownerReferences"][0]["uid"] == "uid-p"
    pod_events = {e.pod for e in plan.outcome.events if e.pod}
    assert set(plan.event_targets) == pod_events
    for key, target in plan.event_targets.items():
        assert target["kind"] == "Pod" and key == f"ns/{target['metadata']['name']}"


def test_a_left_workloads_state_outlives_the_status_row_that_shows_it() -> None:
    """Its state object is deleted only once a status without its row is stored: a reader of the
    status and then the states (`edpilot report`) never finds a row whose state is gone."""
    orphan = StoredState(state_name("p", "left"), "p", "left", {"schemaVersion": 1}, "uid-p")
    snap = snapshot([pod("a")], [policy_entry()], reports=[report("n0", ["ns/a"])],
                    extra={"states_by_policy": {"ns/p": [orphan]}})  # fmt: skip
    shown = {"workloads": [{"name": "a"}, {"name": "left"}]}
    meta = {"generation": 2, "uid": "uid-p"}
    plan = plan_policy(policy_view(snap, "ns", "p", SPEC, shown, meta), NOW, CFG.tuning)
    assert plan is not None and [r["name"] for r in plan.outcome.status["workloads"]] == ["a"]
    assert plan.states.delete == []
    gone = {"workloads": [{"name": "a"}]}
    plan = plan_policy(policy_view(snap, "ns", "p", SPEC, gone, meta), NOW, CFG.tuning)
    assert plan is not None and plan.states.delete == [orphan.name]


def test_a_policy_resumes_from_the_states_held_back_and_writes_against_the_stored_copies() -> None:
    """A state computed but not written (`services.worth_writing`) is what the next reconcile
    resumes from; what to write is still decided against the stored copy."""
    stored = StoredState(state_name("p", "a"), "p", "a", {"schemaVersion": 1, "phase": "Baseline"}, "uid-p")
    newer = replace(stored, state={"schemaVersion": 99})  # from a newer operator: left untouched
    held = HeldStates({stored.name: (stored.state, newer)})
    snap = snapshot(
        [pod("a")],
        [policy_entry()],
        reports=[report("n0", ["ns/a"])],
        extra={"states_by_policy": {"ns/p": [stored]}},
    )
    v = policy_view(snap, "ns", "p", SPEC, {}, {"generation": 2, "uid": "uid-p"}, held)
    assert v.stored == [stored] and v.resume == [newer]
    plan = plan_policy(v, NOW, CFG.tuning)
    assert plan is not None and [e.reason for e in plan.outcome.events] == ["StateTooNew"]
    assert plan.states.apply["a"]["spec"]["state"] == {"schemaVersion": 99}  # differs from the stored copy
    no_held = plan_policy(
        policy_view(snap, "ns", "p", SPEC, {}, {"generation": 2, "uid": "uid-p"}), NOW, CFG.tuning
    )
    assert no_held is not None and "StateTooNew" not in [e.reason for e in no_held.outcome.events]


def test_a_released_policy_removes_its_hints_and_its_nodes_caps() -> None:
    pods = [pod("a", claimed_by="p"), pod("c", "n1", claimed_by="other")]
    snap = snapshot(pods, [policy_entry()], [EXPLORING_A], DECIDED_A, reports=[report("n0", ["ns/a"])])
    plan = plan_release(snap, "ns", "p", SPEC, {}, CFG)
    assert plan.pod_annotations == {"ns/a": dict.fromkeys(HINT_ANNOTATIONS)}
    assert plan.owner_patches == {}
    # n0 only (n1's pod is another policy's), recomposed as if the policy were gone: no cap.
    assert list(plan.report_specs) == ["n0"]
    assert plan.report_specs["n0"]["powerLimits"] == [] and plan.report_specs["n0"]["workloads"] == []


# ---------------------------------------------------------------- power budgets

BUDGET = {"nodeSelector": {"matchLabels": {"rack": "r1"}}, "maxWatts": 1000}


NODE_LABELS = {"n0": {"rack": "r1"}, "n1": {"rack": "r2"}}


def budget_snapshot() -> ClusterSnapshot:
    return snapshot([pod("a"), pod("b")], [policy_entry()], reports=[report("n0", ["ns/a", "ns/b"])])


@pytest.mark.parametrize(
    ("spec", "meta", "rejected"),
    [({"maxWatts": -1}, {}, "nodeSelector"), (BUDGET, {"deletionTimestamp": "now"}, None)],
)
def test_a_deleted_or_rejected_budget_writes_nothing(
    spec: dict[str, Any], meta: dict[str, Any], rejected: str | None
) -> None:
    plan = plan_budget(budget_snapshot(), "b", spec, {}, meta, NODE_LABELS, NOW)
    if rejected is None:
        assert plan is None
    else:
        assert plan is not None and rejected in plan.rejected and plan.status == {}


def test_a_budget_splits_its_watts_over_the_governed_gpus_of_its_nodes() -> None:
    plan = plan_budget(budget_snapshot(), "b", BUDGET, {}, {"generation": 4}, NODE_LABELS, NOW)
    assert plan is not None and not plan.rejected and plan.max_watts == 1000
    allocations = plan.status["allocations"]
    assert {a["gpuUUID"] for a in allocations} == {"GPU-n0-0", "GPU-n0-1"}
    assert sum(a["watts"] for a in allocations) <= 1000 and plan.status["observedGeneration"] == 4
    assert plan.changed.endswith("W") and "GPU-n0-0=" in plan.changed
    again = plan_budget(budget_snapshot(), "b", BUDGET, plan.status, {"generation": 4}, NODE_LABELS, NOW)
    assert again is not None and again.changed == ""  # the same caps: nothing to log


def test_node_labels_are_listed_once_per_max_age_for_all_budgets() -> None:
    clock = [0.0]
    lists: list[float] = []

    async def fetch() -> dict[str, dict[str, str]]:
        lists.append(clock[0])
        return {"n0": {"rack": f"r{len(lists)}"}}

    nodes = NodeLabels(max_age=5.0, monotonic=lambda: clock[0])

    async def budgets_due_together() -> list[dict[str, dict[str, str]]]:
        return list(await asyncio.gather(nodes.get(fetch), nodes.get(fetch), nodes.get(fetch)))

    assert asyncio.run(budgets_due_together()) == [{"n0": {"rack": "r1"}}] * 3
    clock[0] = 4.9
    assert asyncio.run(nodes.get(fetch)) == {"n0": {"rack": "r1"}}  # not older than max_age
    clock[0] = 5.0
    assert asyncio.run(nodes.get(fetch)) == {"n0": {"rack": "r2"}}  # a relabelled node is seen
    assert lists == [0.0, 5.0]


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_a_write_budget_that_would_stop_every_spec_write_is_refused(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args([f"--report-writes-per-second={value}"])
    assert "--report-writes-per-second must be above 0" in capsys.readouterr().err
    assert parse_args(["--report-writes-per-second=50"]).report_writes_per_second == 50.0


def as_stored(status: dict[str, Any]) -> dict[str, Any]:
    """`status` as the API server keeps it after a merge patch: None entries deleted."""

    def pruned(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: pruned(v) for k, v in value.items() if v is not None}
        return [pruned(v) for v in value] if isinstance(value, list) else value

    return cast(dict[str, Any], pruned(json.loads(json.dumps(status))))


def converged_status(at: datetime, **changes: Any) -> dict[str, Any]:
    row = {
        "name": "a",
        "pods": ["ns/a"],
        "phase": "Converged",
        "powerCapWatts": 450.0,
        "current": {"joulesPerUnit": 1.0, "secondsPerUnit": 0.1, "edp": 0.1, "unitsPerSecond": 10.0},
        "edpReductionPercent": 21.5,
        "energySavedJoules": 1000.0,
        **changes,
    }
    return {
        "observedGeneration": 2,
        "conditions": [{"type": "Ready", "status": "True", "reason": "AllConverged"}],
        "workloads": [{k: v for k, v in row.items() if v is not None}],
        "totals": {
            "workloads": 1,
            "energySavedJoules": row["energySavedJoules"],
            "averageEdpReductionPercent": None,
        },
        "figuresTime": at.isoformat(),
    }


@pytest.mark.parametrize(
    ("seconds_later", "changes", "written"),
    [
        (10, {}, False),  # nothing changed
        (600, {}, False),
        (10, {"energySavedJoules": 1500.0, "edpReductionPercent": 21.7}, False),  # only running figures
        (59, {"energySavedJoules": 1500.0}, False),
        (60, {"energySavedJoules": 1500.0}, True),  # their minute is up
        (10, {"phase": "Drifted"}, True),
        (10, {"powerCapWatts": 400.0}, True),
        (10, {"slowdownPercent": 3.0}, True),  # a figure that appears
        (10, {"current": None}, True),  # or goes
    ],
)
def test_a_status_whose_running_figures_alone_changed_is_written_once_a_minute(
    seconds_later: float, changes: dict[str, Any], written: bool
) -> None:
    """A converged fleet's policies rewrote their statuses at every reconcile (5 s) because the
    energy saved grows with every report: 10 status patches a second for 50 policies."""
    stored = as_stored(converged_status(NOW))
    new = converged_status(NOW + timedelta(seconds=seconds_later), **changes)
    assert services.status_worth_writing(stored, new) is written


def test_a_status_of_an_older_operator_or_with_other_changes_is_written_at_once() -> None:
    stored = as_stored(converged_status(NOW))
    later = NOW + timedelta(seconds=5)
    del stored["figuresTime"]
    assert services.status_worth_writing(stored, converged_status(later, energySavedJoules=2.0))
    stored = as_stored(converged_status(NOW))
    new = converged_status(later)
    new["conditions"] = [{"type": "Ready", "status": "False", "reason": "Exploring"}]
    assert services.status_worth_writing(stored, new)


def test_a_reconcile_that_changes_nothing_does_not_patch_the_status() -> None:
    snap = snapshot([pod("a")], [policy_entry()], reports=[report("n0", ["ns/a"])])
    first = plan_policy(view(snap), NOW, CFG.tuning)
    assert first is not None and first.write_status
    stored = as_stored(first.outcome.status)
    meta = {"generation": 2, "uid": "uid-p"}
    again = plan_policy(
        policy_view(snap, "ns", "p", SPEC, stored, meta), NOW + timedelta(seconds=5), CFG.tuning
    )
    assert again is not None and not again.write_status
