"""The desired `GPUNodeReport.spec` of one node, composed from the pods on it. Pure.

A cap comes only from state the operator owns, never from what a pod says about itself (issue 14,
finding 1: a tenant writes its pods' annotations):
- the policy that governs the pod, computed by the operator from labels and the policy's spec
  (`selection.governance`), and the configuration its optimizer decided for the pod's workload
  (the policy's status), re-clamped to that policy's mode and bounds on this GPU;
- the PowerBudgets' allocations (cluster-scoped status only the operator writes).
The spec asks for the lowest of those, never above the GPU's default limit nor below its minimum.
An excluded or ungoverned pod's GPU gets no policy cap, so its agent restores the default limit; a
budget of scope AllGPUs may still bound it. A GPU whose constraints are unknown gets no cap at all,
nor does one that its pod does not hold alone (time-slicing, MPS, a shared DRA claim, a MIG
partition: `edpilot.sharing`): it is measured and reported, never capped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from edpilot.dra import DraHoldings
from edpilot.models import (
    DesiredLockedClock,
    DesiredPowerLimit,
    GPUNodeReportSpec,
    GPUNodeReportStatus,
    GPUStatus,
    LeaseRef,
    MeasuredWorkload,
    PowerCapSpec,
    SmClockSpec,
)
from edpilot.optimizer import Config, MemberInfo, cap_for, clock_for
from edpilot.sharing import NO_DRA, Exclusivity, exclusivity

from .selection import Governed, PodInfo


@dataclass(frozen=True)
class ReportTiming:
    lease_seconds: int = 60
    # While a workload on the node explores, the operator needs fresh windows; otherwise the
    # agent reports rarely so a large fleet does not flood the API server.
    fast_interval_seconds: int = 5
    slow_interval_seconds: int = 60


@dataclass(frozen=True)
class Decided:
    """What a policy's status says its optimizer decided: the workload of each pod (by key), the
    pods whose workloads are exploring, and the configuration targeted for each pod by a state
    still embedded in the status (before its migration; `target_of` reads the state objects)."""

    targets: Mapping[str, Config] = field(default_factory=dict)
    exploring: frozenset[str] = frozenset()
    workloads: Mapping[str, str] = field(default_factory=dict)


def target_of(decision: Decided, pod: str, stored: Callable[[str], Config | None]) -> Config | None:
    """The configuration decided for `pod`: its workload's stored state's target (`stored` looks it
    up by workload name), else the one a not yet migrated status row embeds."""
    workload = decision.workloads.get(pod)
    found = stored(workload) if workload is not None else None
    return found if found is not None else decision.targets.get(pod)


def state_target(state: Mapping[str, Any]) -> Config | None:
    """The target of a stored optimizer state, or None where it is unreadable."""
    target = state.get("target")
    if not isinstance(target, Mapping):
        return None
    try:
        return Config.model_validate(dict(target))
    except ValidationError:
        return None


def decided(namespace: str, status: Mapping[str, Any]) -> Decided:
    """The decisions in a policy's status. Rows naming pods of another namespace are ignored: a
    policy governs only its own namespace, whatever its status says."""
    targets: dict[str, Config] = {}
    exploring: set[str] = set()
    workloads: dict[str, str] = {}
    for row in status.get("workloads") or []:
        if not isinstance(row, Mapping):
            continue
        pods = [p for p in row.get("pods") or [] if isinstance(p, str) and p.startswith(f"{namespace}/")]
        if row.get("phase") in ("Baseline", "Exploring", "Drifted"):
            exploring.update(pods)
        name = row.get("name")
        if isinstance(name, str) and row.get("phase") != "Conflict":
            workloads.update(dict.fromkeys(pods, name))
        # A row an operator before per-workload state objects wrote embeds the state.
        stored = row.get("optimizer")
        target = stored.get("target") if isinstance(stored, Mapping) else None
        if not isinstance(target, Mapping):
            continue
        try:
            config = Config.model_validate(dict(target))
        except ValidationError:
            continue
        targets.update(dict.fromkeys(pods, config))
    return Decided(targets=targets, exploring=frozenset(exploring), workloads=workloads)


def known_limits(gpu: GPUStatus) -> bool:
    """Whether the GPU's power-limit constraints are known and consistent (else it is left alone)."""
    return (
        not gpu.migEnabled
        and gpu.maxLimitWatts > 0
        and gpu.minLimitWatts <= gpu.defaultLimitWatts <= gpu.maxLimitWatts
    )


def gpu_exclusivity(gpu: GPUStatus, dra: DraHoldings = NO_DRA) -> Exclusivity:
    """Which pod holds the GPU alone, from its agent's report and the node's DRA allocations."""
    return exclusivity(gpu.uuid, gpu.pods, mig_enabled=gpu.migEnabled, reported_shared=gpu.shared, dra=dra)


def known_clocks(gpu: GPUStatus) -> bool:
    """Whether the GPU's supported SM clocks are known and consistent (else they are never locked)."""
    return not gpu.migEnabled and 0 < gpu.minSmClockMHz <= gpu.maxSmClockMHz


def member_info(gpu: GPUStatus, pod: str, exclusive: bool = True) -> MemberInfo:
    """The GPU as the optimizer sees it: without limits (left alone) where they are unknown or
    where the pod does not hold it alone, and likewise without supported clocks (never locked)."""
    known = known_limits(gpu) and exclusive
    clocks = known_clocks(gpu) and exclusive
    return MemberInfo(
        member=gpu.uuid,
        pod=pod,
        minWatts=gpu.minLimitWatts if known else None,
        maxWatts=gpu.maxLimitWatts if known else None,
        defaultWatts=gpu.defaultLimitWatts if known else None,
        minClockMHz=gpu.minSmClockMHz if clocks else None,
        maxClockMHz=gpu.maxSmClockMHz if clocks else None,
    )


def planned_cap(power_cap: PowerCapSpec, target: Config | None, gpu: GPUStatus, pod: str) -> float | None:
    """The cap the optimizer's `target` means for this GPU, inside the policy's bounds there (its
    mode included); None before a decision, under mode Off (the limit is left alone) or on an
    unknown GPU."""
    return None if target is None else cap_for(power_cap, member_info(gpu, pod), target)


def planned_clock(sm_clock: SmClockSpec, target: Config | None, gpu: GPUStatus, pod: str) -> float | None:
    """The locked SM clock ceiling the optimizer's `target` means for this GPU, inside its supported
    clocks; None (unlocked) before a decision, under mode Off, for a target that locks nothing and
    on a GPU whose clocks are unknown."""
    return None if target is None else clock_for(sm_clock, member_info(gpu, pod), target)


def clamp_to_board(watts: float, gpu: GPUStatus) -> float:
    """Never above the default limit (a tenant must not win watts), never below the minimum."""
    return max(gpu.minLimitWatts, min(watts, gpu.defaultLimitWatts))


def desired_spec(
    *,
    pods: Iterable[PodInfo],
    status: GPUNodeReportStatus | None,
    governed: Mapping[str, Governed],
    lease: LeaseRef,
    timing: ReportTiming,
    budget_caps: Mapping[str, float] | None = None,
    dra: DraHoldings = NO_DRA,
) -> GPUNodeReportSpec:
    """`governed` maps the key of each governed pod to its policy and decision (pods missing there
    are ungoverned); `lease` names the operator's one Lease (`liveness`), the same in every spec, so
    a spec changes only when what the agent must do changes; `budget_caps` maps GPU UUID to the most its PowerBudgets allow it; `dra` is
    what DRA allocated on the node (who else holds a GPU)."""
    budget_caps = budget_caps or {}
    gpus_of: dict[str, list[GPUStatus]] = {}
    if status is not None:
        for gpu in status.gpus:
            for pod_key in gpu.pods:
                gpus_of.setdefault(pod_key, []).append(gpu)

    limits: list[DesiredPowerLimit] = []
    locks: list[DesiredLockedClock] = []
    measured: list[MeasuredWorkload] = []
    fast = False
    for pod in sorted(pods, key=lambda p: p.key):
        if pod.deleting:
            continue
        rule = governed.get(pod.key)
        if rule is not None:
            measured.append(MeasuredWorkload.of_policy(pod.namespace, pod.name, rule.policy.spec))
            fast = fast or rule.exploring
        for gpu in sorted(gpus_of.get(pod.key, []), key=lambda g: g.uuid):
            if gpu_exclusivity(gpu, dra).holder != pod.key:
                continue
            clock = planned_clock(rule.policy.spec.smClock, rule.target, gpu, pod.key) if rule else None
            if clock is not None:
                locks.append(DesiredLockedClock(gpuUUID=gpu.uuid, maxMHz=clock, pod=pod.key))
            if not known_limits(gpu):
                continue
            policy_cap = planned_cap(rule.policy.spec.powerCap, rule.target, gpu, pod.key) if rule else None
            # A GPU the budget governs gets its share even before the optimizer picks a cap.
            wanted = [w for w in (policy_cap, budget_caps.get(gpu.uuid)) if w is not None]
            if wanted:
                watts = clamp_to_board(min(wanted), gpu)
                limits.append(DesiredPowerLimit(gpuUUID=gpu.uuid, watts=watts, pod=pod.key))

    return GPUNodeReportSpec(
        powerLimits=limits,
        lockedClocks=locks,
        workloads=measured,
        operatorLease=lease,
        reportIntervalSeconds=timing.fast_interval_seconds if fast else timing.slow_interval_seconds,
    )
