"""The operator's decisions, each a pure function of a `ClusterSnapshot` (or what a handler read
of one) and the time: `plan_*` returns every write to make; `handlers.apply` makes them. The rules
themselves live in `services` (a policy), `reports` (a node spec) and `budgets` (a PowerBudget);
a planner only gathers their inputs and collects their results."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from edpilot.contract import HINT_ANNOTATIONS, StoredState, holders_known, states_of
from edpilot.dra import DraHoldings
from edpilot.models import (
    EnergyPolicySpec,
    GPUNodeReportSpec,
    GPUNodeReportStatus,
    PowerBudgetSpec,
    PowerBudgetStatus,
)
from edpilot.optimizer import Tuning
from edpilot.rollout import JsonPatch, OwnerView

from .. import budgets, services
from ..reports import desired_spec
from ..selection import Governance, PodInfo, PolicyRef, governed_by
from .runtime import OperatorConfig, WrittenSpec, WrittenSpecs
from .snapshot import ClusterSnapshot, SeenSpec, dra_holdings

# ---------------------------------------------------------------- node specs


def plan_node_spec(
    snapshot: ClusterSnapshot,
    node: str,
    status: GPUNodeReportStatus | None,
    cfg: OperatorConfig,
    without: str | None = None,
) -> GPUNodeReportSpec:
    """A node's desired spec from its pods, its report `status`, the operator's decisions and the
    budgets' caps; `without` names a policy ("namespace/name") whose pods count as ungoverned
    (one being deleted)."""
    pods = snapshot.node_pods(node)
    rules = snapshot.governed(pods)
    if without is not None:
        rules = {k: r for k, r in rules.items() if r.policy.key != without}
    return desired_spec(
        dra=dra_holdings(pods),
        pods=pods,
        status=status,
        governed=rules,
        lease=cfg.lease,
        timing=cfg.timing,
        budget_caps=snapshot.budget_caps(node),
    )


@dataclass(frozen=True)
class ReportPlan:
    """`spec_patch`: the merge patch of the report's spec (None: it is as desired); `written`: what
    to remember once it is sent (`Runtime.written_specs`); `forget`: drop what was remembered (the
    watch has delivered a newer version)."""

    spec_patch: dict[str, Any] | None = None
    written: WrittenSpec | None = None
    forget: bool = False


def plan_report_spec(
    snapshot: ClusterSnapshot,
    node: str,
    seen: SeenSpec,
    written: WrittenSpec | None,
    now: datetime,
    cfg: OperatorConfig,
) -> ReportPlan:
    """A report's spec write, only when the desired spec differs from the current one: the spec
    last `written` while the watch has not delivered that write yet, else the one it has.

    The report's generation tells which: only spec writes raise it (its status is a subresource),
    so a report seen at the generation a write was composed from, or older, predates that write,
    however many status writes the agent made since (`WrittenSpec.in_flight`)."""
    status = snapshot.report(node)
    if status is not None and not holders_known(status.conditions):
        return ReportPlan()  # its GPUs' pods are unknown, not gone: the caps it has stay
    pending = written is not None and written.in_flight(seen.generation, now)
    current = written.spec if written is not None and pending else seen.spec
    desired = plan_node_spec(snapshot, node, status, cfg)
    if desired == current:
        return ReportPlan(forget=written is not None and not pending)
    patch = desired.model_dump(mode="json", exclude_none=True)
    if seen.spec.lease is not None:
        patch["lease"] = None  # an older operator's per-node lease: operatorLease rules
    return ReportPlan(spec_patch=patch, written=WrittenSpec(seen.generation, desired, now))


@dataclass(frozen=True)
class ReportSweep:
    """Every report's spec write (`writes`, by node, those of nodes with something to enforce
    first) and the nodes whose remembered write is delivered or whose report is gone
    (`forget`)."""

    writes: dict[str, ReportPlan] = field(default_factory=dict)
    forget: list[str] = field(default_factory=list)


def plan_report_sweep(
    snapshot: ClusterSnapshot, written: WrittenSpecs, now: datetime, cfg: OperatorConfig
) -> ReportSweep:
    """One pass over every report: what each node's spec should be, against what it is. Nodes
    whose spec enforces or measures something, or did, go first: an operator started on a fleet
    finds every spec to write, and the write budget lets a few in each sweep; idle nodes need only
    the Lease's name and the slow report interval."""
    writes: dict[str, ReportPlan] = {}
    forget: list[str] = []
    seen_specs = snapshot.seen_specs()
    for node, seen in seen_specs.items():
        plan = plan_report_spec(snapshot, node, seen, written.get(node), now, cfg)
        if plan.spec_patch is not None:
            writes[node] = plan
        elif plan.forget:
            forget.append(node)
    forget.extend(node for node in written if node not in seen_specs)

    def idle(node: str) -> bool:
        desired = writes[node].written
        return not (_enforces(seen_specs[node].spec) or (desired is not None and _enforces(desired.spec)))

    return ReportSweep(writes={node: writes[node] for node in sorted(writes, key=idle)}, forget=forget)


def _enforces(spec: GPUNodeReportSpec) -> bool:
    return bool(spec.powerLimits or spec.lockedClocks or spec.workloads)


# ---------------------------------------------------------------- policies


@dataclass(frozen=True)
class PolicyView:
    """What one policy's reconcile reads, copied out of the snapshot (`policy_view`) so that the
    decision can run in a worker thread while the watches go on updating the indexes."""

    namespace: str
    name: str
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    meta: Mapping[str, Any]
    pods: list[PodInfo]
    governance: Governance
    reports: dict[str, GPUNodeReportStatus]
    holders: DraHoldings
    owners: dict[str, OwnerView]
    stored: list[StoredState]  # the policy's state objects as the watch holds them
    resume: list[StoredState]  # those with the newer states not written yet (`HeldStates`)
    settled: frozenset[str] = frozenset()  # the state objects this operator reconciled before


def policy_view(
    snapshot: ClusterSnapshot,
    namespace: str,
    name: str,
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    meta: Mapping[str, Any],
    held: services.HeldStates | None = None,
) -> PolicyView:
    """`held`: the states computed and not written yet (`services.worth_writing`), resumed from
    instead of the older stored copies they follow."""
    pods = snapshot.with_dra(snapshot.pods_by_namespace.get(namespace, []))
    reports = {p.node: r for p in pods if (r := snapshot.report(p.node)) is not None}
    # Another namespace's pod may hold one of these GPUs through DRA too.
    neighbours = [p for node in reports for p in snapshot.pods_by_node.get(node, [])]
    stored = snapshot.stored_states(f"{namespace}/{name}")
    return PolicyView(
        namespace=namespace,
        name=name,
        spec=dict(spec),
        status=dict(status),
        meta=dict(meta),
        pods=pods,
        governance=snapshot.governance(namespace),
        reports=reports,
        holders=dra_holdings(snapshot.with_dra(neighbours)),
        owners=snapshot.owners(namespace),
        stored=stored,
        resume=held.newest(stored) if held is not None else stored,
        settled=frozenset(held.settled) if held is not None else frozenset(),
    )


@dataclass
class PolicyPlan:
    """`outcome`: the status, pod annotation and owner patches, states and events of the reconcile;
    `states`: which state objects to apply and delete; `event_targets`: the object each pod event is
    about; `rejected`: why the spec was rejected (then only conditions are written);
    `write_status`: False when only the running figures changed, and recently
    (`services.status_worth_writing`)."""

    outcome: services.PolicyOutcome
    states: services.StateWrites = field(default_factory=lambda: services.StateWrites({}, []))
    event_targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: str = ""
    write_status: bool = True


def plan_policy(view: PolicyView, now: datetime, tuning: Tuning) -> PolicyPlan | None:
    """The policy's reconcile (`services.reconcile_policy`); None for a policy being deleted."""
    if view.meta.get("deletionTimestamp"):
        return None
    generation = view.meta.get("generation")
    try:
        policy = PolicyRef(view.namespace, view.name, EnergyPolicySpec.model_validate(dict(view.spec)))
    except ValidationError as exc:
        conditions = services.invalid_spec_conditions(view.status, str(exc), generation, now)
        return PolicyPlan(services.PolicyOutcome(status={"conditions": conditions}), rejected=str(exc))
    outcome = services.reconcile_policy(
        policy=policy,
        status=view.status,
        generation=generation,
        pods=view.pods,
        governance=view.governance,
        reports=view.reports,
        now=now,
        tuning=tuning,
        dra=view.holders,
        owners=view.owners,
        states=states_of(view.resume, view.name),
    )
    uid = str(view.meta.get("uid", ""))
    shown = {str(r.get("name")) for r in view.status.get("workloads") or [] if isinstance(r, Mapping)}
    writes = services.state_writes(
        view.namespace, view.name, uid, view.stored, outcome.states, view.settled, shown
    )
    targets = {e.pod: ref for e in outcome.events if e.pod and (ref := pod_ref(e.pod, view.pods))}
    return PolicyPlan(
        outcome, writes, targets, write_status=services.status_worth_writing(view.status, outcome.status)
    )


def pod_ref(pod_key: str, pods: Collection[PodInfo]) -> dict[str, Any] | None:
    for pod in pods:
        if pod.key == pod_key:
            return {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"namespace": pod.namespace, "name": pod.name, "uid": pod.uid},
            }
    return None


@dataclass(frozen=True)
class ReleasePlan:
    """A deleted policy's writes: its owners' templates restored, its hints removed from its pods
    ("namespace/name" -> annotations, None removes), its nodes' specs recomposed without it."""

    owner_patches: dict[str, JsonPatch]
    pod_annotations: dict[str, dict[str, str | None]]
    report_specs: dict[str, dict[str, Any]]


def plan_release(
    snapshot: ClusterSnapshot,
    namespace: str,
    name: str,
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    cfg: OperatorConfig,
) -> ReleasePlan:
    """Remove the policy's hints and caps: its GPUs go back to their default limits (the specs are
    recomposed now rather than at the next report sweep, so the caps are gone by the time the
    finalizer lets the policy disappear), and the templates it rolled out to what they were."""
    owners = services.release_owners(dict(status), snapshot.owners(namespace), dict(spec))
    released = [p for p in snapshot.pods_by_namespace.get(namespace, []) if governed_by(p, name)]
    specs = {
        node: plan_node_spec(snapshot, node, snapshot.report(node), cfg, without=f"{namespace}/{name}")
        for node in sorted({p.node for p in released})
    }
    return ReleasePlan(
        owner_patches=owners,
        pod_annotations={p.key: dict.fromkeys(HINT_ANNOTATIONS) for p in released},
        report_specs={n: s.model_dump(mode="json", exclude_none=True) for n, s in specs.items()},
    )


# ---------------------------------------------------------------- power budgets


@dataclass(frozen=True)
class BudgetPlan:
    """`status`: the budget's new status (the whole of it); `changed`: a line saying its caps
    changed (else empty); `rejected`: why its spec was rejected (then nothing is written)."""

    status: dict[str, Any] = field(default_factory=dict)
    max_watts: float = 0.0
    changed: str = ""
    rejected: str = ""


def plan_budget(
    snapshot: ClusterSnapshot,
    name: str,
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    meta: Mapping[str, Any],
    node_labels: Mapping[str, Mapping[str, str]],
    now: datetime,
) -> BudgetPlan | None:
    """The budget's allocation (`budgets.reconcile_budget`) over the nodes its selector picks
    from `node_labels` (every node's); None for a budget being deleted."""
    if meta.get("deletionTimestamp"):
        return None
    try:
        budget = PowerBudgetSpec.model_validate(dict(spec))
    except ValidationError as exc:
        return BudgetPlan(rejected=str(exc))
    previous = _budget_status(status)
    nodes = budgets.selected_nodes(budget, node_labels)
    reports = {n: r for n in nodes if (r := snapshot.report(n)) is not None}
    enriched = snapshot.with_dra(p for n in nodes for p in snapshot.pods_by_node.get(n, []))
    pods = {p.key: p for p in enriched}
    rules = snapshot.governed(pods.values())
    new = budgets.reconcile_budget(
        spec=budget,
        generation=meta.get("generation"),
        previous=previous,
        node_labels=node_labels,
        reports=reports,
        pods=pods,
        governed=rules,
        curves=snapshot.curves(reports.values(), rules),
        now=now,
        dra=dra_holdings(enriched),
    )
    changed = previous is None or new.allocations != previous.allocations
    return BudgetPlan(
        new.model_dump(mode="json", exclude_none=True),
        budget.maxWatts,
        _caps_line(new, budget) if changed else "",
    )


def _budget_status(status: Mapping[str, Any]) -> PowerBudgetStatus | None:
    try:
        return PowerBudgetStatus.model_validate(dict(status)) if status else None
    except ValidationError:
        return None  # rewritten whole


def _caps_line(new: PowerBudgetStatus, budget: PowerBudgetSpec) -> str:
    caps = ", ".join(f"{a.gpuUUID}={a.watts:.0f}W" for a in new.allocations) or "none"
    return f"{new.allocatedWatts:.0f} of {budget.maxWatts:.0f} W allocated; caps {caps}"
