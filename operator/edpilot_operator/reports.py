"""The desired `GPUNodeReport.spec` of one node, composed from the pods on it. Pure.

Pod annotations are the single source of the caps: the policy reconciler writes
`edpilot.io/power-cap-watts` on the pods it governs, and this module turns the pods of one node
into that node's spec (caps per GPU UUID, pods to measure, lease). A cap whose policy is gone is
dropped, so the agent restores the GPU's default limit. A PowerBudget's allocation bounds the cap of
every GPU it governs: the spec asks for the lower of the two.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from edpilot.models import (
    ANNOTATION_POLICY,
    ANNOTATION_POWER_CAP,
    DesiredPowerLimit,
    EnergyPolicySpec,
    GPUNodeReportSpec,
    GPUNodeReportStatus,
    Lease,
    MeasuredWorkload,
)

from .selection import PodInfo


@dataclass(frozen=True)
class ReportTiming:
    lease_seconds: int = 60
    # While a workload on the node explores, the operator needs fresh windows; otherwise the
    # agent reports rarely so a large fleet does not flood the API server.
    fast_interval_seconds: int = 5
    slow_interval_seconds: int = 60


def desired_spec(
    *,
    pods: Iterable[PodInfo],
    status: GPUNodeReportStatus | None,
    policies: Mapping[str, EnergyPolicySpec],
    active_pods: set[str],
    current: GPUNodeReportSpec,
    holder: str,
    now: datetime,
    timing: ReportTiming,
    budget_caps: Mapping[str, float] | None = None,
) -> GPUNodeReportSpec:
    """`policies` maps "namespace/name" to spec; `active_pods` are pods whose workload explores;
    `budget_caps` maps GPU UUID to the most its PowerBudgets allow it."""
    budget_caps = budget_caps or {}
    gpus_of: dict[str, list[str]] = {}
    if status is not None:
        for gpu in status.gpus:
            for pod_key in gpu.pods:
                gpus_of.setdefault(pod_key, []).append(gpu.uuid)

    limits: list[DesiredPowerLimit] = []
    measured: list[MeasuredWorkload] = []
    fast = False
    for pod in sorted(pods, key=lambda p: p.key):
        policy_name = pod.annotations.get(ANNOTATION_POLICY)
        spec = policies.get(f"{pod.namespace}/{policy_name}") if policy_name else None
        if spec is None or pod.deleting:
            continue
        measured.append(MeasuredWorkload.of_policy(pod.namespace, pod.name, spec))
        fast = fast or pod.key in active_pods
        policy_cap = parse_cap(pod.annotations.get(ANNOTATION_POWER_CAP))
        for uuid in sorted(gpus_of.get(pod.key, [])):
            # A GPU the budget governs gets its share even before the optimizer picks a cap.
            wanted = [w for w in (policy_cap, budget_caps.get(uuid)) if w is not None]
            if wanted:
                limits.append(DesiredPowerLimit(gpuUUID=uuid, watts=min(wanted), pod=pod.key))

    lease = current.lease
    if (
        lease is None
        or lease.holderIdentity != holder
        or now - lease.renewTime >= timedelta(seconds=timing.lease_seconds / 3)
    ):
        lease = Lease(holderIdentity=holder, renewTime=now, leaseSeconds=timing.lease_seconds)
    return GPUNodeReportSpec(
        powerLimits=limits,
        workloads=measured,
        lease=lease,
        reportIntervalSeconds=timing.fast_interval_seconds if fast else timing.slow_interval_seconds,
    )


def parse_cap(value: str | None) -> float | None:
    """The watts of an `edpilot.io/power-cap-watts` annotation; None when absent or not a limit."""
    if value is None:
        return None
    try:
        watts = float(value)
    except ValueError:
        return None
    return watts if math.isfinite(watts) and watts > 0 else None
