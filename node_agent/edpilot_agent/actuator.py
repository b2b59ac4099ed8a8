"""Power-limit and locked-clock decisions (pure) and the thin layer that applies them.

`plan_limits` is a pure function of the spec, the node's GPUs, the pods, the lease and the
current limits; `plan_clocks` decides locked SM clock ceilings under the same checks (`_admit`),
within the GPU's supported clocks, and resets every lock wherever a cap would go back to its
default. They enforce the safety invariants: limits only inside the GPU's constraints and
never above its default limit, only for GPUs of this node held by a pod that still exists, default
limits (and unlocked clocks) when the lease is missing or expired, MIG GPUs never touched, and no
cap or lock on a GPU that several pods hold or that was handed out as a shared device (the
operator never asks for one: `edpilot.sharing`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from edpilot.models import DesiredLockedClock, DesiredPowerLimit, Lease
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


class _Entry(Protocol):
    """A spec entry for one GPU on behalf of one pod (a power limit, a locked clock)."""

    @property
    def gpuUUID(self) -> str: ...

    @property
    def pod(self) -> str: ...


E = TypeVar("E", bound=_Entry)


@dataclass(frozen=True)
class _Words:
    """How refusals name the actuator: "edpilot never caps it", "no cap", "keeps its default"."""

    never: str
    noun: str
    kept: str


_CAP_WORDS = _Words("caps it", "cap", "keeps its default")
_CLOCK_WORDS = _Words("locks its clocks", "clock lock", "keeps unlocked clocks")


def _admit(
    desired: Sequence[E],
    by_uuid: Mapping[str, GpuInfo],
    pods_on_node: set[str],
    gpu_pods: Mapping[str, set[str]] | None,
    shared: Collection[str],
    invalid: Callable[[E, GpuInfo], tuple[str, str] | None],
    words: _Words,
) -> tuple[dict[str, E], dict[str, str], list[Refusal]]:
    """The spec entries any actuator may apply, by GPU: a GPU of this node, without MIG, held by
    the entry's pod (which exists) alone and not handed out as a shared device, listed once, with
    a value `invalid` accepts. Returns them, the reason for GPUs whose entry was refused because
    of their holders (PodGone, GPUShared), and the refusals."""
    admitted: dict[str, E] = {}
    reasons: dict[str, str] = {}
    refusals: list[Refusal] = []

    def refuse(entry: E, reason: str, message: str) -> None:
        refusals.append(Refusal(entry.gpuUUID, entry.pod, reason, message))

    for entry in desired:
        gpu = by_uuid.get(entry.gpuUUID)
        if gpu is None:
            refuse(entry, "UnknownGPU", f"GPU {entry.gpuUUID} is not on this node; no change")
        elif gpu.mig_enabled:
            refuse(entry, "MIGEnabled", f"GPU {gpu.uuid} has MIG enabled; edpilot never {words.never}")
        elif (bad := invalid(entry, gpu)) is not None:
            refuse(entry, *bad)
        elif entry.gpuUUID in admitted:
            refuse(entry, "Duplicate", f"GPU {gpu.uuid} is listed more than once; the first entry wins")
        elif entry.pod not in pods_on_node:
            reasons[gpu.uuid] = "PodGone"
            refuse(
                entry,
                "PodNotOnNode",
                f"pod {entry.pod} does not exist on this node; GPU {gpu.uuid} {words.kept}",
            )
        elif gpu_pods is not None and entry.pod not in gpu_pods.get(gpu.uuid, set()):
            reasons[gpu.uuid] = "PodGone"
            refuse(entry, "GPUNotHeldByPod", f"pod {entry.pod} does not hold GPU {gpu.uuid}; no {words.noun}")
        elif gpu.uuid in shared or (gpu_pods is not None and len(gpu_pods.get(gpu.uuid, ())) > 1):
            reasons[gpu.uuid] = "GPUShared"
            refuse(
                entry,
                "GPUShared",
                f"GPU {gpu.uuid} is shared by several pods; no pod's {words.noun} applies",
            )
        else:
            admitted[gpu.uuid] = entry
    return admitted, reasons, refusals


def _invalid_watts(entry: DesiredPowerLimit, gpu: GpuInfo) -> tuple[str, str] | None:
    if not math.isfinite(entry.watts) or entry.watts <= 0:
        return "InvalidWatts", f"{entry.watts} W is not a power limit"
    return None


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

    if lease_problem is None:
        admitted, held_reasons, refusals = _admit(
            desired, by_uuid, pods_on_node, gpu_pods, shared, _invalid_watts, _CAP_WORDS
        )
        reasons.update(held_reasons)
        for uuid, entry in admitted.items():
            targets[uuid] = by_uuid[uuid].clamp(entry.watts)
            reasons[uuid] = "Spec" if targets[uuid] == entry.watts else "SpecClamped"
            pods_for_cap[uuid] = entry.pod

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


# ---------------------------------------------------------------- locked SM clocks


@dataclass(frozen=True)
class ClockAction:
    uuid: str
    max_mhz: float | None  # the ceiling to lock; None: reset the lock
    reason: str  # as Action's
    pod: str = ""


@dataclass(frozen=True)
class ClockPlan:
    """The SM clock ceiling of every GPU edpilot may lock (None: unlocked), and the changes."""

    targets: dict[str, float | None]
    reasons: dict[str, str]
    actions: list[ClockAction] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


def _invalid_clock(entry: DesiredLockedClock, gpu: GpuInfo) -> tuple[str, str] | None:
    if not gpu.clock_range_known:
        return (
            "ClockRangeUnknown",
            f"NVML does not tell GPU {gpu.uuid}'s supported SM clocks; edpilot never locks them",
        )
    if not math.isfinite(entry.maxMHz) or entry.maxMHz <= 0:
        return "InvalidClock", f"{entry.maxMHz} MHz is not an SM clock"
    return None


def clock_ceiling(gpu: GpuInfo, max_mhz: float) -> float | None:
    """The ceiling to lock for a wish of `max_mhz`: whole MHz (as NVML takes them, never rounded
    up) within the GPU's supported clocks; None (no lock) at or above its highest clock."""
    ceiling = max(float(math.floor(max_mhz)), gpu.min_sm_clock_mhz)
    return None if ceiling >= gpu.max_sm_clock_mhz else ceiling


def plan_clocks(
    desired: Sequence[DesiredLockedClock],
    gpus: Sequence[GpuInfo],
    current: Mapping[str, float | None],
    pods_on_node: set[str],
    gpu_pods: Mapping[str, set[str]] | None,
    lease_problem: str | None,
    shared: Collection[str] = frozenset(),
) -> ClockPlan:
    """The locked SM clock ceiling every lockable GPU should have, and the changes to get there,
    under `plan_limits`' rules. Only GPUs without MIG whose supported clocks NVML reports are
    planned. `current` holds what the agent locked (None: reset); a GPU missing there is in an
    unknown state (NVML cannot read a lock back: the agent's start) and is reset unless locked."""
    lockable = [g for g in gpus if not g.mig_enabled and g.clock_range_known]
    by_uuid = {g.uuid: g for g in gpus}
    targets: dict[str, float | None] = dict.fromkeys((g.uuid for g in lockable), None)
    reasons = {g.uuid: lease_problem or "NotInSpec" for g in lockable}
    pods_for_lock: dict[str, str] = {}
    refusals: list[Refusal] = []

    if lease_problem is None:
        admitted, held_reasons, refusals = _admit(
            desired, by_uuid, pods_on_node, gpu_pods, shared, _invalid_clock, _CLOCK_WORDS
        )
        reasons.update(held_reasons)
        for uuid, entry in admitted.items():
            ceiling = targets[uuid] = clock_ceiling(by_uuid[uuid], entry.maxMHz)
            exact = entry.maxMHz == (by_uuid[uuid].max_sm_clock_mhz if ceiling is None else ceiling)
            reasons[uuid] = "Spec" if exact else "SpecClamped"
            pods_for_lock[uuid] = entry.pod

    actions = [
        ClockAction(uuid, mhz, reasons[uuid], pods_for_lock.get(uuid, ""))
        for uuid, mhz in targets.items()
        if uuid not in current or current[uuid] != mhz
    ]
    return ClockPlan(targets, reasons, actions, refusals)


def restore_clocks(gpus: Sequence[GpuInfo], current: Mapping[str, float | None], reason: str) -> ClockPlan:
    """Every lock reset (shutdown): those the agent made, and every lockable GPU whose state it
    does not know."""
    return plan_clocks((), gpus, current, set(), None, reason)


class Applier:
    """Calls the backend's setters for a plan's actions; in dry-run it only logs and counts, and
    remembers what it would have set so one change is counted once. NVML cannot read a locked
    clock back, so it remembers the locks it made (`locked`) too."""

    def __init__(self, backend: GpuBackend, node_name: str, dry_run: bool = False) -> None:
        self.backend = backend
        self.node_name = node_name
        self.dry_run = dry_run
        self.would_set: dict[str, float] = {}
        # (gpu uuid, reason, result) -> count; result is applied, dry_run or failed.
        self.counts: Counter[tuple[str, str, str]] = Counter()
        # GPU uuid -> the SM clock ceiling locked (None: reset); a GPU missing is in a state
        # not known yet. In dry-run nothing is locked and `would_lock` holds what would be.
        self.locked: dict[str, float | None] = {}
        self.would_lock: dict[str, float | None] = {}
        self.clock_counts: Counter[tuple[str, str, str]] = Counter()

    def current_limits(self, enforced: Mapping[str, float]) -> dict[str, float]:
        """The limits to plan against: what the GPU enforces, or in dry-run what we would have set."""
        return {**enforced, **self.would_set} if self.dry_run else dict(enforced)

    def current_clocks(self) -> dict[str, float | None]:
        """The locks to plan against: those made, or in dry-run those that would have been."""
        return dict(self.would_lock if self.dry_run else self.locked)

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

    def apply_clocks(self, plan: ClockPlan) -> list[str]:
        """Lock or reset SM clocks as the plan says; returns error messages (never raises for one
        GPU's failure). A failed call may still have reached the GPU (a setter that timed out), so
        the GPU's state is forgotten: the next plan locks or resets it again."""
        errors: list[str] = []
        for action in plan.actions:
            what = "reset" if action.max_mhz is None else f"lock at most {action.max_mhz:.0f} MHz"
            pod = f" for pod {action.pod}" if action.pod else ""
            if self.dry_run:
                log.info(
                    "dry-run: would %s on GPU %s of node %s (%s%s)",
                    what,
                    action.uuid,
                    self.node_name,
                    action.reason,
                    pod,
                )
                self.would_lock[action.uuid] = action.max_mhz
                self.clock_counts[(action.uuid, action.reason, "dry_run")] += 1
                continue
            try:
                self.backend.set_locked_sm_clock(action.uuid, action.max_mhz)
            except (GpuBackendError, ValueError) as exc:
                self.clock_counts[(action.uuid, action.reason, "failed")] += 1
                self.locked.pop(action.uuid, None)
                errors.append(f"GPU {action.uuid}: {exc}")
                log.error(
                    "SM clocks of GPU %s on node %s: %s failed: %s", action.uuid, self.node_name, what, exc
                )
                continue
            self.locked[action.uuid] = action.max_mhz
            self.clock_counts[(action.uuid, action.reason, "applied")] += 1
            log.info(
                "SM clocks of GPU %s on node %s: %s (%s%s)",
                action.uuid,
                self.node_name,
                what,
                action.reason,
                pod,
            )
        return errors
