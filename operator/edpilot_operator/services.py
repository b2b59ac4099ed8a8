"""One policy's reconcile: snapshot (pods, reports, stored state) -> core decisions -> what to write.

Pure: the kopf handler passes in what the watches hold and writes back what this returns.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final

from pydantic import ValidationError

from edpilot.contract import (
    ANNOTATION_BATCH_SIZE,
    ANNOTATION_BATCH_SIZE_RANGE,
    ANNOTATION_POLICY,
    ANNOTATION_POWER_CAP,
    ANNOTATION_QUANTIZATION,
    ANNOTATION_QUANTIZATION_ACCURACY,
    StoredState,
    encode_batch_size,
    encode_power_cap,
    parse_accuracy,
    parse_batch_range,
    state_object,
    transition,
)
from edpilot.dra import DraHoldings
from edpilot.edp import MemberSample
from edpilot.models import (
    Condition,
    ConditionStatus,
    EnergyPolicySpec,
    EnergyPolicyStatus,
    GPUNodeReportStatus,
    PolicyTotals,
    Profile,
    RolloutStatus,
    WorkloadStatus,
)
from edpilot.optimizer import (
    DEFAULT_TUNING,
    Decision,
    MemberInfo,
    Observation,
    OptimizerState,
    StateTooNew,
    Tuning,
    WorkloadInfo,
    load_state,
    step,
)
from edpilot.rollout import JsonPatch, OwnerView, RolloutConfig
from edpilot.sharing import NO_DRA

from . import rollouts
from .reports import gpu_exclusivity, member_info
from .selection import Governance, PodInfo, PolicyRef, Workload, select

JOULES_PER_KWH: Final = 3.6e6
# How a status row begins whose GPUs get no cap because they are shared or partitioned.
REPORT_ONLY: Final = "report-only, no power cap"


@dataclass(frozen=True)
class PolicyEvent:
    type: str
    reason: str
    message: str
    pod: str | None = None  # "namespace/name"; None: the event is about the policy


@dataclass
class PolicyOutcome:
    status: dict[str, Any]
    pod_annotations: dict[str, dict[str, str | None]] = field(default_factory=dict)
    events: list[PolicyEvent] = field(default_factory=list)
    # Delivery Rollout: JSON patches of owners' templates, by "Kind/name" in the policy's namespace.
    owner_patches: dict[str, JsonPatch] = field(default_factory=dict)
    # Workload name -> the optimizer state to store (its own WorkloadOptimizerState object): one
    # per workload that has a state; a stored object of any other workload is deleted.
    states: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """A workload's inputs to the core, or why there are none yet."""

    info: WorkloadInfo | None
    observation: Observation | None
    waiting_for: str = ""
    warnings: tuple[str, ...] = ()
    # Why GPUs of the workload get no cap: shared or partitioned (`edpilot.sharing`).
    report_only: tuple[str, ...] = ()


def snapshot(
    workload: Workload,
    reports: Mapping[str, GPUNodeReportStatus],
    dra: DraHoldings = NO_DRA,
    configs: Mapping[str, RolloutConfig] | None = None,
) -> Snapshot:
    """`dra` is what DRA allocated on the workload's nodes: another holder of one of its GPUs.
    `configs`: delivery Rollout, the configuration each pod's template gave it, which it runs
    whether or not it reports one (an engine exports no info metric of its start-up arguments)."""
    members: list[MemberInfo] = []
    report_only: list[str] = []
    samples: list[MemberSample] = []
    times: list[float] = []
    warnings: list[str] = []
    first = workload.pods[0]
    starting_batch: int | None = None
    starting_quantization: Profile | None = None
    for pod in workload.pods:
        report = reports.get(pod.node)
        if report is None:
            return Snapshot(None, None, f"no GPUNodeReport from the agent on node {pod.node}")
        gpus = [g for g in report.gpus if pod.key in g.pods]
        if not gpus:
            return Snapshot(None, None, f"the agent on {pod.node} has not reported the GPUs of pod {pod.key}")
        work = next((w for w in report.workloads if w.namespace == pod.namespace and w.pod == pod.name), None)
        if work is None:
            return Snapshot(
                None, None, f"the agent on {pod.node} has not reported the work counter of {pod.key}"
            )
        if not work.healthy:
            warnings.append(f"{pod.key}: {work.message or 'work counter unhealthy'}")
        given = (configs or {}).get(pod.key)
        if given is not None:
            work = work.model_copy(
                update={
                    "batchSize": given.batchSize or work.batchSize,
                    "quantization": given.quantization or work.quantization,
                }
            )
        starting_batch = starting_batch or work.batchSize
        starting_quantization = starting_quantization or work.quantization
        # A simulated node's counters advance on its simulated clock (faster than the wall clock
        # its `time` is), so its windows are measured in that clock.
        times.append((report.counterTime or report.time).timestamp())
        for gpu in gpus:
            held = gpu_exclusivity(gpu, dra)
            if held.holder != pod.key:
                report_only.append(f"GPU {gpu.uuid}: {held.reason}")
            # A GPU it does not hold alone is measured, never capped: the optimizer sees no limits.
            members.append(member_info(gpu, pod.key, exclusive=held.holder == pod.key))
            samples.append(
                MemberSample(
                    member=gpu.uuid,
                    energyJoules=gpu.energyJoules,
                    workUnits=work.workUnits,
                    powerWatts=gpu.powerWatts,
                    capWatts=gpu.enforcedLimitWatts,
                    smClockMHz=gpu.smClockMHz or None,
                    lockedClockMHz=gpu.lockedSmClockMHz,
                    batchSize=work.batchSize,
                    quantization=work.quantization,
                    latencySeconds=work.latencySeconds,
                    firstTokenSeconds=work.firstTokenSeconds,
                    requestsRunning=work.requestsRunning,
                    requestsWaiting=work.requestsWaiting,
                    requestsFinished=work.requestsFinished,
                    counterResets=work.counterResets,
                    healthy=work.healthy,
                )
            )
    accuracy: dict[Profile, float] = {}
    if ANNOTATION_QUANTIZATION_ACCURACY in first.annotations:
        try:
            accuracy = parse_accuracy(first.annotations[ANNOTATION_QUANTIZATION_ACCURACY])
        except ValueError as exc:
            warnings.append(f"{first.key}: {exc}; quantization is not explored")
    batch_range = None
    if ANNOTATION_BATCH_SIZE_RANGE in first.annotations:
        batch_range = parse_batch_range(first.annotations[ANNOTATION_BATCH_SIZE_RANGE])
        if batch_range is None:
            warnings.append(
                f"{first.key}: annotation {ANNOTATION_BATCH_SIZE_RANGE} must look like '8-512'; it is ignored"
            )
    info = WorkloadInfo(
        name=workload.name,
        members=tuple(members),
        accuracy=accuracy,
        batchSize=starting_batch,
        quantization=starting_quantization,
        batchRange=batch_range,
        image=first.image,
        restarts=sum(p.restarts for p in workload.pods),
    )
    # Members on several nodes are read at their nodes' report times; the latest one stands for
    # all, and the optimizer's windows are long against the spread between reports.
    return Snapshot(
        info,
        Observation(time=max(times), members=tuple(samples)),
        warnings=tuple(warnings),
        report_only=tuple(report_only),
    )


def reconcile_policy(
    *,
    policy: PolicyRef,
    status: Mapping[str, Any],
    generation: int | None,
    pods: Sequence[PodInfo],
    governance: Governance,
    reports: Mapping[str, GPUNodeReportStatus],
    now: datetime,
    tuning: Tuning = DEFAULT_TUNING,
    dra: DraHoldings = NO_DRA,
    owners: Mapping[str, OwnerView] | None = None,
    states: Mapping[str, Mapping[str, Any]] | None = None,
) -> PolicyOutcome:
    """`governance` is the namespace's (`selection.GovernanceCache`), shared by all its policies;
    `dra` what DRA allocated on the nodes of its pods; `owners` the namespace's Deployments and
    StatefulSets by "Kind/name" (delivery Rollout); `states` the stored optimizer states by
    workload name (`contract.states_of`). A state still embedded in a status row (where operators
    before per-workload state objects kept it) is read once when no object holds one, moves to
    `outcome.states` and leaves the row."""
    owners = owners or {}
    states = states or {}
    selection = select(policy, pods, governance)
    previous_rows = {
        row.get("name"): row for row in status.get("workloads") or [] if isinstance(row, Mapping)
    }
    outcome = PolicyOutcome(status={})
    rows: list[WorkloadStatus] = []
    for workload in selection.workloads:
        row = _reconcile_one(
            policy,
            workload,
            previous_rows.get(workload.name),
            states.get(workload.name),
            reports,
            now,
            tuning,
            outcome,
            dra,
            owners,
        )
        # The row keeps the figures; the state (the target the node-spec composer enforces among
        # it) lives in its own object.
        body, row.optimizer = row.optimizer, None
        if body:
            outcome.states[workload.name] = body
        rows.append(row)
    # Owners this policy rolled out and no longer does get their templates back.
    rolled = {rec.owner: rec for row in previous_rows.values() if (rec := _rollout_record(row)) is not None}
    kept = {r.rollout.owner for r in rows if r.rollout is not None}
    outcome.owner_patches.update(rollouts.restores(rolled, kept, owners, policy.spec))
    for pod_key, winner in sorted(selection.lost_to.items()):
        rows.append(
            WorkloadStatus(
                name=pod_key.split("/", 1)[1],
                pods=[pod_key],
                phase="Conflict",
                message=f"also selected by EnergyPolicy {winner}, whose priority wins",
            )
        )
    previous = _previous_status(status)
    new_status = EnergyPolicyStatus(
        observedGeneration=generation,
        workloads=rows,
        totals=policy_totals(rows),
        conditions=_conditions(policy, rows, previous.conditions, generation, now),
        figuresTime=now,
    )
    outcome.status = new_status.model_dump(mode="json", exclude_none=True)
    # Lists are replaced whole by a merge patch, but `totals` is merged: an absent average would
    # leave a stale one behind, so it is deleted explicitly.
    outcome.status["totals"].setdefault("averageEdpReductionPercent", None)
    return outcome


def _reconcile_one(
    policy: PolicyRef,
    workload: Workload,
    previous_row: Mapping[str, Any] | None,
    stored: Mapping[str, Any] | None,
    reports: Mapping[str, GPUNodeReportStatus],
    now: datetime,
    tuning: Tuning,
    outcome: PolicyOutcome,
    dra: DraHoldings,
    owners: Mapping[str, OwnerView],
) -> WorkloadStatus:
    row = WorkloadStatus(
        name=workload.name,
        pods=[p.key for p in workload.pods],
        nodes=list(workload.nodes),
        gpus=workload.gpus,
    )
    for pod in workload.pods:
        if pod.annotations.get(ANNOTATION_POLICY) != policy.name:
            outcome.pod_annotations.setdefault(pod.key, {})[ANNOTATION_POLICY] = policy.name
    spec = policy.spec
    try:
        body = _stored_body(stored, previous_row)
        state = _stored_state(body, outcome, workload.name)
    except StateTooNew as exc:
        assert body is not None
        return _untouched(row, previous_row, body, outcome, workload.name, exc)
    plan: rollouts.RolloutPlan | None = None
    measured, configs = workload, None
    if spec.delivery.mode == "Rollout":
        plan = rollouts.plan(spec, workload, owners, _rollout_record(previous_row), now)
        row.rollout = plan.record
        if plan.problem:
            spec = rollouts.caps_only(spec)
        else:
            assert plan.owner is not None
            owner = plan.owner
            measured = Workload(workload.name, plan.measured)
            configs = {
                p.key: c
                for p in plan.measured
                if (c := rollouts.pod_config(p, owner, plan.template)) is not None
            }
        if plan.completed and state is not None:
            state = state.model_copy(update={"last": None})  # no window spans the old pods and the new
        if plan.in_flight:
            return _held(row, previous_row, state, plan.message)
        if plan.timed_out and state is not None:
            # The new template's pods never came up: the ones that still serve give the members.
            serving = Workload(workload.name, tuple(p for p in workload.pods if p.ready))
            info = snapshot(serving, reports, dra).info or WorkloadInfo(name=workload.name, members=())
            decision, patch = rollouts.rolled_back(spec, info, state, plan, now)
            if patch is not None and plan.owner is not None:
                outcome.owner_patches[plan.owner.key] = patch
            for event in decision.events:
                outcome.events.append(
                    PolicyEvent(event.type, event.reason, f"{workload.name}: {event.message}")
                )
            row.rollout = plan.record
            return _held(row, previous_row, decision.state, plan.message + "; rolled back")
    snap = snapshot(measured, reports, dra, configs)
    report_only = f"{REPORT_ONLY}: {'; '.join(snap.report_only)}" if snap.report_only else ""
    for warning in snap.warnings:
        outcome.events.append(PolicyEvent("Warning", "WorkloadInput", warning))
    if snap.info is None or snap.observation is None:
        kept = WorkloadStatus.model_validate(dict(previous_row)) if previous_row else None
        row.phase = kept.phase if kept else "Pending"
        row.message = _joined(report_only, plan.problem if plan else "", snap.waiting_for)
        row.optimizer = state.model_dump(mode="json", exclude_none=True) if state else None
        row.rollouts = state.rollouts if state else 0
        return row
    decision = step(spec, snap.info, state, snap.observation, now.timestamp(), tuning)
    _write_hints(workload, snap.info, decision, outcome, live=plan is None)
    rolling = ""
    if plan is not None and not plan.problem:
        patch, rolling = rollouts.start(spec, plan, rollouts.wanted(decision, plan.template), now)
        if patch is not None and plan.owner is not None:
            outcome.owner_patches[plan.owner.key] = patch
            outcome.events.append(PolicyEvent("Normal", "RolloutStarted", f"{workload.name}: {rolling}"))
        row.rollout = plan.record
    for event in decision.events:
        outcome.events.append(PolicyEvent(event.type, event.reason, f"{workload.name}: {event.message}"))
    # Figures are named like the status row's fields.
    figures = row_figures(decision.figures.model_dump())
    row = WorkloadStatus.model_validate({**row.model_dump(), **figures})
    row.rollouts = decision.state.rollouts
    row.message = _joined(
        report_only,
        plan.problem if plan else "",
        rolling,
        decision.badData.value if decision.badData else decision.figures.message,
    )
    # No nulls: a JSON merge patch reads null as "delete this key".
    row.optimizer = decision.state.model_dump(mode="json", exclude_none=True)
    return row


def _held(
    row: WorkloadStatus, previous_row: Mapping[str, Any] | None, state: OptimizerState | None, message: str
) -> WorkloadStatus:
    """A row while a rollout is in flight: nothing measured, the figures as they were."""
    try:
        kept = WorkloadStatus.model_validate(dict(previous_row)) if previous_row else None
    except ValidationError:
        kept = None
    held = (kept or row).model_copy(
        update={
            "pods": row.pods,
            "nodes": row.nodes,
            "gpus": row.gpus,
            "rollout": row.rollout,
            "message": message,
        }
    )
    held.optimizer = state.model_dump(mode="json", exclude_none=True) if state else None
    held.rollouts = state.rollouts if state else 0
    return held


def _untouched(
    row: WorkloadStatus,
    previous_row: Mapping[str, Any] | None,
    body: Mapping[str, Any],
    outcome: PolicyOutcome,
    name: str,
    exc: StateTooNew,
) -> WorkloadStatus:
    """A state a newer optimizer wrote (a rolling downgrade): kept byte for byte and the workload
    not optimized, its hints and caps left as the newer operator set them, until an operator that
    reads that version runs again (docs/architecture.md)."""
    message = f"{exc}: left untouched, this workload is not optimized until a newer operator runs"
    outcome.events.append(PolicyEvent("Warning", "StateTooNew", f"{name}: {message}"))
    held = _held(row, previous_row, None, message)
    held.optimizer = dict(body)
    # Its rollout record too: an owner no row records is one whose template is put back.
    held.rollout = _rollout_record(previous_row)
    rollouts_spent = previous_row.get("rollouts") if previous_row else None
    held.rollouts = rollouts_spent if isinstance(rollouts_spent, int) else 0
    return held


# A converged state changes at every window only in its running figures (the last counters, the
# window being summed, the energy saved, the recent loads). Resumed from a copy up to this old
# (after a restart), nothing is lost: the counters are cumulative, so the first window spans the gap.
STATE_CHECKPOINT_SECONDS: Final = 300.0
RUNNING_FIGURES: Final = frozenset({"last", "acc", "energySavedJoules", "recentLoads"})


def worth_writing(stored: Mapping[str, Any], state: Mapping[str, Any]) -> bool:
    """Whether `state` must replace the `stored` copy now: any change but a converged state's
    running figures at once, those once per checkpoint interval. A fleet of converged workloads
    then writes one object per workload every few minutes, not at every report."""
    if stored == state:
        return False
    if stored.get("phase") != "Converged" or state.get("phase") != "Converged":
        return True
    if any(stored.get(k) != state.get(k) for k in (stored.keys() | state.keys()) - RUNNING_FIGURES):
        return True
    return _observed_at(state) - _observed_at(stored) >= STATE_CHECKPOINT_SECONDS


# A status's figures that move with every report while nothing else does. Patched at every
# reconcile, a converged fleet's 50 policies wrote 10 statuses a second (`bench.operator_scale`'s
# steady state); they are written once per STATUS_FIGURES_SECONDS instead, and at once with any
# other change of the status. The operator's metrics carry them at every reconcile.
STATUS_FIGURES_SECONDS: Final = 60.0
ROW_RUNNING_FIGURES: Final = frozenset(
    {"current", "edpReductionPercent", "slowdownPercent", "energySavedJoules"}
)
TOTALS_RUNNING_FIGURES: Final = frozenset(
    {"energySavedJoules", "energySavedKWh", "averageEdpReductionPercent"}
)


def status_worth_writing(stored: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    """Whether the reconciled `status` (stamped with its `figuresTime`) must be written over the
    `stored` one now: any change but the running figures' at once, those once they are
    STATUS_FIGURES_SECONDS older than the new ones. A figure that appears or goes is a change."""
    keys = set(status) - {"figuresTime"}
    if any(_comparable(k, stored.get(k), True) != _comparable(k, status[k], True) for k in keys):
        return True
    if all(_comparable(k, stored.get(k), False) == _comparable(k, status[k], False) for k in keys):
        return False
    try:
        age = datetime.fromisoformat(status["figuresTime"]) - datetime.fromisoformat(stored["figuresTime"])
    except (KeyError, TypeError, ValueError):
        return True
    return age.total_seconds() >= STATUS_FIGURES_SECONDS


def _comparable(key: str, value: Any, mask_figures: bool) -> Any:
    """The status's `key` as stored: without the None entries a merge patch deletes, and with each
    running figure masked when `mask_figures` (its presence still counts)."""
    if key == "totals" and isinstance(value, Mapping):
        return _entries(value, TOTALS_RUNNING_FIGURES if mask_figures else frozenset())
    if key == "workloads" and isinstance(value, list):
        running = ROW_RUNNING_FIGURES if mask_figures else frozenset()
        return [_entries(row, running) if isinstance(row, Mapping) else row for row in value]
    return value


def _entries(item: Mapping[str, Any], masked: frozenset[str]) -> dict[str, Any]:
    return {k: ("figure" if k in masked else v) for k, v in item.items() if v is not None}


def _observed_at(state: Mapping[str, Any]) -> float:
    last = state.get("last")
    return float(last.get("time", 0.0)) if isinstance(last, Mapping) else 0.0


@dataclass
class HeldStates:
    """The states the operator computed but did not write (`worth_writing`), by object name, each
    with the stored copy it follows: the next reconcile goes on from them, not from that older
    copy. Lost on a restart, which then resumes from the stored copy."""

    held: dict[str, tuple[Mapping[str, Any], StoredState]] = field(default_factory=dict)
    # The objects this process has reconciled: only theirs may wait for a checkpoint, so the first
    # decision after a (re)start is written and shows that the operator resumed.
    settled: set[str] = field(default_factory=set)

    def newest(self, stored: Collection[StoredState]) -> list[StoredState]:
        """`stored` with each held state in place of the copy it follows; a held state whose copy
        changed since (another writer, a checkpoint) is dropped."""
        out = []
        for s in stored:
            kept = self.held.get(s.name)
            if kept is not None and kept[0] == s.state:
                out.append(kept[1])
            else:
                self.held.pop(s.name, None)
                out.append(s)
        return out

    def remember(
        self, stored: Collection[StoredState], states: Mapping[str, Mapping[str, Any]], writes: StateWrites
    ) -> None:
        """After a reconcile of one policy from `stored` (as read from the API, not `newest`):
        hold what `writes` left out, forget what it wrote or deleted."""
        self.settled.update(s.name for s in stored if s.name not in writes.delete)
        for s in stored:
            state = states.get(s.workload)
            if s.workload in writes.apply or s.name in writes.delete or state is None or state == s.state:
                self.held.pop(s.name, None)
            else:
                self.held[s.name] = (s.state, replace(s, state=state))


@dataclass(frozen=True)
class StateWrites:
    """What to write of a policy's optimizer states: the objects to apply by workload (new, changed,
    or owned by another policy of that name) and the names of objects to delete."""

    apply: dict[str, dict[str, Any]]
    delete: list[str]


def state_writes(
    namespace: str,
    policy: str,
    uid: str,
    stored: Collection[StoredState],
    states: Mapping[str, Mapping[str, Any]],
    settled: Collection[str] = (),
    shown: Collection[str] = (),
) -> StateWrites:
    """`stored`: the objects that name `policy` (its index entry); `states`: `PolicyOutcome.states`;
    `settled`: the objects this operator reconciled before (`HeldStates.settled`), whose converged
    running figures may wait for a checkpoint (`worth_writing`); any other change is written.
    An object no workload of the policy owns under its name any more (a workload that left, a copy
    under another name) is deleted, except a left workload's while the stored status still shows
    its row (`shown`): the status is written after the states, so a reader of the status and then
    the states would find the row without its state. The next reconcile deletes it."""
    wanted = {w: state_object(namespace, policy, uid, w, body) for w, body in states.items()}
    current = {s.name: s for s in stored}
    apply = {}
    for workload, body in wanted.items():
        seen = current.get(body["metadata"]["name"])
        state = body["spec"]["state"]
        changed = (
            worth_writing(seen.state, state)
            if seen and seen.name in settled
            else seen is None or seen.state != state
        )
        if seen is None or seen.owner != uid or changed:
            apply[workload] = body
    names = {b["metadata"]["name"] for b in wanted.values()}
    orphans = set(current) - names
    return StateWrites(
        apply=apply,
        delete=sorted(
            n for n in orphans if current[n].workload in states or current[n].workload not in shown
        ),
    )


def keep_embedded(outcome: PolicyOutcome, failed: Mapping[str, str]) -> None:
    """States whose objects could not be written (`failed`: workload -> why) stay in their status
    rows, where the next reconcile migrates them again, with a Warning event: never lost."""
    for row in outcome.status.get("workloads") or []:
        name = row.get("name")
        if name in failed and name in outcome.states:
            row["optimizer"] = outcome.states[name]
            outcome.events.append(
                PolicyEvent(
                    "Warning",
                    "StateNotStored",
                    f"{name}: optimizer state kept in the status row: {failed[name]}",
                )
            )


def not_started(status: dict[str, Any], owner_key: str) -> None:
    """The owner's patch was refused (it changed since it was read): no rollout is in flight, and
    the next reconcile starts it again on fresh data."""
    for row in status.get("workloads") or []:
        rollout = row.get("rollout") if isinstance(row, dict) else None
        if isinstance(rollout, dict) and rollout.get("owner") == owner_key:
            rollout.pop("startedAt", None)
            rollout["config"] = rollout.get("previous", "")


def release_owners(
    status: Mapping[str, Any], owners: Mapping[str, OwnerView], spec: Mapping[str, Any]
) -> dict[str, JsonPatch]:
    """A deleted policy's owners: every template it rolled out goes back to what it was."""
    try:
        policy: EnergyPolicySpec | None = EnergyPolicySpec.model_validate(dict(spec))
    except ValidationError:
        policy = None
    rows = status.get("workloads") or []
    rolled = {rec.owner: rec for row in rows if isinstance(row, Mapping) and (rec := _rollout_record(row))}
    return rollouts.restores(rolled, set(), owners, policy)


def _rollout_record(row: Mapping[str, Any] | None) -> RolloutStatus | None:
    stored = row.get("rollout") if row else None
    if not isinstance(stored, Mapping):
        return None
    try:
        return RolloutStatus.model_validate(dict(stored))
    except ValidationError:
        return None


def _joined(*parts: str) -> str:
    return " | ".join(p for p in parts if p)


def _stored_body(stored: Mapping[str, Any] | None, row: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The workload's stored state: its own object's, else (migration) the one an older operator
    embedded in the status row."""
    if stored is not None:
        return stored
    embedded = row.get("optimizer") if row else None
    return embedded if isinstance(embedded, Mapping) else None


def _stored_state(
    stored: Mapping[str, Any] | None, outcome: PolicyOutcome, name: str
) -> OptimizerState | None:
    """The state to resume from; None (a fresh exploration, and a StateDiscarded warning) for one
    that is unreadable. A tenant allowed to edit its namespace's state objects gets no further: every
    decision from a state is clamped to the policy's bounds again by the optimizer."""
    if not stored:
        return None
    try:
        return load_state(stored)
    except StateTooNew:
        raise
    except (ValueError, TypeError) as exc:
        outcome.events.append(
            PolicyEvent(
                "Warning",
                "StateDiscarded",
                f"{name}: stored optimizer state unreadable, starting over: {exc}",
            )
        )
        return None


def _write_hints(
    workload: Workload, info: WorkloadInfo, decision: Decision, outcome: PolicyOutcome, live: bool = True
) -> None:
    """The hint annotations; with `live` False (delivery Rollout) only the cap's, which says what
    the agent enforces: the template carries the rest."""
    pod_of = {m.member: m.pod for m in info.members}
    for pod in workload.pods:
        # One annotation per pod: its GPUs' caps differ only for straggler members of one pod,
        # where the highest keeps the pod from slowing the job.
        caps = [
            c for member, c in decision.capWatts.items() if c is not None and pod_of.get(member) == pod.key
        ]
        wanted: dict[str, str | None] = {
            ANNOTATION_POWER_CAP: encode_power_cap(max(caps) if caps else None),
            ANNOTATION_BATCH_SIZE: encode_batch_size(decision.batchSize if live else None),
            ANNOTATION_QUANTIZATION: decision.quantization if live else None,
        }
        changes = {k: v for k, v in wanted.items() if pod.annotations.get(k) != v}
        if changes:
            outcome.pod_annotations.setdefault(pod.key, {}).update(changes)
            shown = ", ".join(
                f"{k.split('/', 1)[1]}={v if v is not None else '(removed)'}" for k, v in changes.items()
            )
            outcome.events.append(PolicyEvent("Normal", "HintsUpdated", shown, pod=pod.key))


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


FIGURE_DIGITS: Final = 4  # significant digits of a status figure: more than a measurement can tell


def _significant(value: float | None) -> float | None:
    value = _finite(value)
    return float(f"{value:.{FIGURE_DIGITS}g}") if value else value


def row_figures(figures: dict[str, Any]) -> dict[str, Any]:
    """The figures as the status row shows them: four significant digits (the exact values stay in
    the workload's state object), so that 2,000 rows fit one policy's status; the joules saved to
    the joule, as totals sum them."""
    for key in ("edpReductionPercent", "slowdownPercent", "noiseMarginPercent"):
        figures[key] = _significant(figures[key])
    for key in ("baseline", "current"):
        if isinstance(figures.get(key), dict):
            figures[key] = {k: _significant(v) if math.isfinite(v) else v for k, v in figures[key].items()}
    figures["energySavedJoules"] = float(round(figures["energySavedJoules"]))
    return figures


def _previous_status(status: Mapping[str, Any]) -> EnergyPolicyStatus:
    try:
        conditions = [Condition.model_validate(c) for c in status.get("conditions") or []]
    except ValidationError:
        conditions = []
    return EnergyPolicyStatus(conditions=conditions)


def policy_totals(rows: Sequence[WorkloadStatus]) -> PolicyTotals:
    """Sums over the workloads the policy governs. The figures `kubectl get` shows are rounded
    to what a measurement can tell: the average EDP reduction to 0.1 points, the energy saved to
    three significant kWh (no finer than a watt-hour); the exact joules stay for machines."""
    governed = [r for r in rows if r.phase != "Conflict"]
    reductions = [r.edpReductionPercent for r in governed if r.edpReductionPercent is not None]
    saved = sum(r.energySavedJoules for r in governed)
    return PolicyTotals(
        workloads=len(governed),
        gpus=sum(r.gpus for r in governed),
        energySavedJoules=saved,
        energySavedKWh=round(float(f"{saved / JOULES_PER_KWH:.3g}"), 3),
        averageEdpReductionPercent=round(sum(reductions) / len(reductions), 1) if reductions else None,
    )


def _conditions(
    policy: PolicyRef,
    rows: Sequence[WorkloadStatus],
    previous: Sequence[Condition],
    generation: int | None,
    now: datetime,
) -> list[Condition]:
    governed = [r for r in rows if r.phase != "Conflict"]
    converged = [r for r in governed if r.phase == "Converged"]
    degraded = [r for r in governed if r.phase == "Degraded"]
    conflicts = [r for r in rows if r.phase == "Conflict"]
    wanted: list[tuple[str, ConditionStatus, str, str]] = [
        (
            "Ready",
            "True",
            "Reconciled",
            f"{len(governed)} workloads governed, {len(conflicts)} lost to other policies",
        ),
        (
            "Converged",
            "True" if governed and len(converged) == len(governed) else "False",
            "AllConverged"
            if governed and len(converged) == len(governed)
            else ("Exploring" if governed else "NoWorkloads"),
            f"{len(converged)} of {len(governed)} workloads converged",
        ),
        (
            "Degraded",
            "True" if degraded else "False",
            "BadMeasurements" if degraded else "MeasurementsHealthy",
            "; ".join(f"{r.name}: {r.message}" for r in degraded) or "every workload is measured cleanly",
        ),
        _target_condition(policy, governed),
        _exclusive_condition(governed),
    ]
    return [transition(previous, t, s, r, m, now, generation) for t, s, r, m in wanted]


def _exclusive_condition(rows: Sequence[WorkloadStatus]) -> tuple[str, ConditionStatus, str, str]:
    """Whether every workload holds its GPUs alone, so that its policy may cap them."""
    if not rows:
        return ("ExclusiveGPUs", "Unknown", "NoWorkloads", "the policy governs no workload")
    shared = [r for r in rows if r.message.startswith(REPORT_ONLY)]
    if shared:
        listed = "; ".join(f"{r.name}: {r.message.split(' | ', 1)[0]}" for r in shared)
        return ("ExclusiveGPUs", "False", "SharedGPUs", listed)
    return ("ExclusiveGPUs", "True", "ExclusiveGPUs", f"{len(rows)} workloads hold their GPUs alone")


def _target_condition(
    policy: PolicyRef, rows: Sequence[WorkloadStatus]
) -> tuple[str, ConditionStatus, str, str]:
    target = policy.spec.target
    if target is None:
        return ("TargetMet", "Unknown", "NoTarget", "the policy sets no target")
    measured = [r for r in rows if r.current is not None and r.edpReductionPercent is not None]
    if not measured:
        return ("TargetMet", "Unknown", "NotMeasuredYet", "no workload has a measured configuration yet")
    misses: list[str] = []
    for r in measured:
        assert r.current is not None and r.edpReductionPercent is not None
        if target.edpReductionPercent is not None and r.edpReductionPercent < target.edpReductionPercent:
            misses.append(f"{r.name}: EDP -{r.edpReductionPercent:.1f}% < -{target.edpReductionPercent:g}%")
        if target.joulesPerUnit is not None and r.current.joulesPerUnit > target.joulesPerUnit:
            misses.append(f"{r.name}: {r.current.joulesPerUnit:.4g} J/unit > {target.joulesPerUnit:g}")
    if misses:
        return ("TargetMet", "False", "TargetMissed", "; ".join(misses))
    return ("TargetMet", "True", "TargetMet", f"{len(measured)} workloads meet the target")


def invalid_spec_conditions(
    status: Mapping[str, Any], error: str, generation: int | None, now: datetime
) -> list[dict[str, Any]]:
    """A spec the API server accepted but edpilot cannot use: say so, decide nothing."""
    previous = _previous_status(status).conditions
    checks: tuple[tuple[str, ConditionStatus, str], ...] = (
        ("Ready", "False", "InvalidSpec"),
        ("Degraded", "True", "InvalidSpec"),
    )
    return [
        transition(previous, t, value, reason, error, now, generation).model_dump(
            mode="json", exclude_none=True
        )
        for t, value, reason in checks
    ]
