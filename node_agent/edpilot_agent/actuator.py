"""Power-limit decisions (pure) and the thin layer that applies them.

`plan_limits` is a pure function of the spec, the node's GPUs, the pods, the lease and the
current limits. It enforces the safety invariants: limits only inside the GPU's constraints and
never above its default limit, only for GPUs of this node held by a pod that still exists, default limits when the lease is
missing or expired, MIG GPUs never touched, and no cap on a GPU that several pods hold or that was
handed out as a shared device (the operator never asks for one: `edpilot.sharing`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from edpilot.models import DesiredPowerLimit, Lease
from edpilot_agent.backend import GpuBackend, GpuBackendError, GpuInfo

log = logging.getLogger(__name__)

# NVML takes milliwatts and reports the limit it settled on; closer than this is "already there".
LIMIT_TOLERANCE_WATTS = 0.5


@dataclass
class LeaseTracker:
    """Judges the operator's lease on the agent's own monotonic clock since it last saw renewTime
    change, so clock skew between nodes cannot keep a cap alive. The wall-clock bound
    renewTime + leaseSeconds (+ an allowance for skew) also applies: it catches a lease that was
    already stale when the agent started, and it can only err towards restoring defaults."""

    max_clock_skew_seconds: float = 10.0
    _renew_time: datetime | None = None
    _seen_at: float | None = None

    def expired_reason(self, lease: Lease | None, monotonic_now: float, wall_now: datetime) -> str | None:
        """None while the lease holds, else why not (a CamelCase reason)."""
        if lease is None:
            self._renew_time = self._seen_at = None
            return "NoLease"
        if lease.renewTime != self._renew_time or self._seen_at is None:
            self._renew_time, self._seen_at = lease.renewTime, monotonic_now
        if monotonic_now - self._seen_at > lease.leaseSeconds:
            return "LeaseExpired"
        renew = lease.renewTime if lease.renewTime.tzinfo else lease.renewTime.replace(tzinfo=wall_now.tzinfo)
        if wall_now > renew + timedelta(seconds=lease.leaseSeconds + self.max_clock_skew_seconds):
            return "LeaseExpired"
        return None


@dataclass(frozen=True)
class Action:
    uuid: str
    watts: float
    reason: str  # CamelCase: Spec, SpecClamped, NoLease, LeaseExpired, PodGone, NotInSpec, Shutdown
    pod: str = ""


@dataclass(frozen=True)
class Refusal:
    uuid: str
    pod: str
    # CamelCase: UnknownGPU, ForeignPod, GPUNotHeldByPod, GPUShared, MIGEnabled, InvalidWatts, Duplicate
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    targets: dict[str, float]
    reasons: dict[str, str]
    actions: list[Action] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


def plan_limits(
    desired: Sequence[DesiredPowerLimit],
    gpus: Sequence[GpuInfo],
    current: Mapping[str, float],
    pods_on_node: set[str],
    gpu_pods: Mapping[str, set[str]] | None,
    lease_problem: str | None,
    shared: Collection[str] = frozenset(),
) -> Plan:
    """The limit every GPU of the node should have, and the changes to get there.

    `gpu_pods` maps GPU UUID -> pods holding it (None when the node cannot tell, e.g. the kubelet
    API is unreachable: then a cap needs only its pod to exist). `lease_problem` is None while
    the lease holds, otherwise the reason every GPU goes back to its default. `shared` are the
    GPUs handed out as shareable devices (time-slicing or MPS replicas, DRA shares).
    """
    by_uuid = {g.uuid: g for g in gpus}
    targets = {g.uuid: g.default_limit_watts for g in gpus}
    reasons = {g.uuid: lease_problem or "NotInSpec" for g in gpus}
    pods_for_cap: dict[str, str] = {}
    refusals: list[Refusal] = []

    def refuse(entry: DesiredPowerLimit, reason: str, message: str) -> None:
        refusals.append(Refusal(entry.gpuUUID, entry.pod, reason, message))

    if lease_problem is None:
        capped: set[str] = set()
        for entry in desired:
            gpu = by_uuid.get(entry.gpuUUID)
            if gpu is None:
                refuse(entry, "UnknownGPU", f"GPU {entry.gpuUUID} is not on this node; no change")
            elif gpu.mig_enabled:
                refuse(entry, "MIGEnabled", f"GPU {gpu.uuid} has MIG enabled; edpilot never caps it")
            elif not math.isfinite(entry.watts) or entry.watts <= 0:
                refuse(entry, "InvalidWatts", f"{entry.watts} W is not a power limit")
            elif entry.gpuUUID in capped:
                refuse(entry, "Duplicate", f"GPU {gpu.uuid} is listed more than once; the first entry wins")
            elif entry.pod not in pods_on_node:
                reasons[gpu.uuid] = "PodGone"
                refuse(
                    entry,
                    "PodNotOnNode",
                    f"pod {entry.pod} does not exist on this node; GPU {gpu.uuid} keeps its default",
                )
            elif gpu_pods is not None and entry.pod not in gpu_pods.get(gpu.uuid, set()):
                reasons[gpu.uuid] = "PodGone"
                refuse(entry, "GPUNotHeldByPod", f"pod {entry.pod} does not hold GPU {gpu.uuid}; no cap")
            elif gpu.uuid in shared or (gpu_pods is not None and len(gpu_pods.get(gpu.uuid, ())) > 1):
                reasons[gpu.uuid] = "GPUShared"
                refuse(entry, "GPUShared", f"GPU {gpu.uuid} is shared by several pods; no pod's cap applies")
            else:
                capped.add(gpu.uuid)
                targets[gpu.uuid] = gpu.clamp(entry.watts)
                reasons[gpu.uuid] = "Spec" if targets[gpu.uuid] == entry.watts else "SpecClamped"
                pods_for_cap[gpu.uuid] = entry.pod

    actions = [
        Action(uuid, watts, reasons[uuid], pods_for_cap.get(uuid, ""))
        for uuid, watts in targets.items()
        if not by_uuid[uuid].mig_enabled
        and (uuid not in current or abs(current[uuid] - watts) > LIMIT_TOLERANCE_WATTS)
    ]
    return Plan(targets, reasons, actions, refusals)


def restore_defaults(gpus: Sequence[GpuInfo], current: Mapping[str, float], reason: str) -> Plan:
    """Every GPU back to its default limit (shutdown, lost lease)."""
    return plan_limits((), gpus, current, set(), None, reason)


class Applier:
    """Calls the backend's setter for a plan's actions; in dry-run it only logs and counts, and
    remembers what it would have set so one change is counted once."""

    def __init__(self, backend: GpuBackend, node_name: str, dry_run: bool = False) -> None:
        self.backend = backend
        self.node_name = node_name
        self.dry_run = dry_run
        self.would_set: dict[str, float] = {}
        # (gpu uuid, reason, result) -> count; result is applied, dry_run or failed.
        self.counts: Counter[tuple[str, str, str]] = Counter()

    def current_limits(self, enforced: Mapping[str, float]) -> dict[str, float]:
        """The limits to plan against: what the GPU enforces, or in dry-run what we would have set."""
        return {**enforced, **self.would_set} if self.dry_run else dict(enforced)

    def apply(self, plan: Plan) -> list[str]:
        """Apply the plan's actions; returns error messages (never raises for one GPU's failure)."""
        errors: list[str] = []
        for action in plan.actions:
            pod = f" for pod {action.pod}" if action.pod else ""
            if self.dry_run:
                log.info(
                    "dry-run: would set GPU %s on node %s to %.0f W (%s%s)",
                    action.uuid,
                    self.node_name,
                    action.watts,
                    action.reason,
                    pod,
                )
                self.would_set[action.uuid] = action.watts
                self.counts[(action.uuid, action.reason, "dry_run")] += 1
                continue
            try:
                self.backend.set_power_limit(action.uuid, action.watts)
            except (GpuBackendError, ValueError) as exc:
                self.counts[(action.uuid, action.reason, "failed")] += 1
                errors.append(f"GPU {action.uuid}: {exc}")
                log.error(
                    "setting GPU %s on node %s to %.0f W failed: %s",
                    action.uuid,
                    self.node_name,
                    action.watts,
                    exc,
                )
                continue
            self.counts[(action.uuid, action.reason, "applied")] += 1
            log.info(
                "set GPU %s on node %s to %.0f W (%s%s)",
                action.uuid,
                self.node_name,
                action.watts,
                action.reason,
                pod,
            )
        return errors
