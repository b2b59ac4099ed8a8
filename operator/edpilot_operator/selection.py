"""Which pods a policy governs, and how they form workloads. Pure: plain data in, plain data out.

A pod is governed by the policy of highest `priority` (ties: the smallest name) among the policies
of its namespace whose selector matches it, unless it opts out with `edpilot.io/exclude: "true"`.
Pods that share the policy's `groupByLabel` value form one workload (a job); otherwise each pod is
its own workload.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edpilot.models import ANNOTATION_EXCLUDE, ANNOTATION_POLICY, EnergyPolicySpec

GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class PodInfo:
    """What the operator needs to know of a pod, cut from its body once (kept in a kopf index)."""

    namespace: str
    name: str
    uid: str
    node: str
    phase: str
    gpus: int
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    image: str = ""
    restarts: int = 0
    deleting: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def excluded(self) -> bool:
        return self.annotations.get(ANNOTATION_EXCLUDE, "").lower() == "true"


def gpu_request(pod_spec: Mapping[str, Any]) -> int:
    """GPUs a pod holds: the sum over its containers (init containers run before, not beside)."""
    total = 0
    for container in pod_spec.get("containers") or []:
        resources = container.get("resources") or {}
        amount = (resources.get("limits") or {}).get(GPU_RESOURCE) or (resources.get("requests") or {}).get(
            GPU_RESOURCE
        )
        if amount is not None:
            try:
                total += int(str(amount))
            except ValueError:
                continue
    return total


def pod_info(body: Mapping[str, Any]) -> PodInfo:
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    containers = spec.get("containers") or [{}]
    restarts = sum(int(cs.get("restartCount") or 0) for cs in status.get("containerStatuses") or [])
    return PodInfo(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        node=str(spec.get("nodeName") or ""),
        phase=str(status.get("phase") or "Pending"),
        gpus=gpu_request(spec),
        labels=dict(meta.get("labels") or {}),
        annotations=dict(meta.get("annotations") or {}),
        image=str(containers[0].get("image") or ""),
        restarts=restarts,
        deleting=meta.get("deletionTimestamp") is not None,
    )


@dataclass(frozen=True)
class PolicyRef:
    namespace: str
    name: str
    spec: EnergyPolicySpec

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def governing_policy(pod: PodInfo, policies: Iterable[PolicyRef]) -> PolicyRef | None:
    """The policy that wins this pod, or None when none selects it or it opts out."""
    if pod.excluded:
        return None
    candidates = [
        p for p in policies if p.namespace == pod.namespace and p.spec.selector.matches(dict(pod.labels))
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda p: (-p.spec.priority, p.name))


@dataclass(frozen=True)
class Workload:
    """Pods optimised as one: one pod, or the pods of a job grouped by the policy's label."""

    name: str
    pods: tuple[PodInfo, ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(sorted({p.node for p in self.pods}))

    @property
    def gpus(self) -> int:
        return sum(p.gpus for p in self.pods)


@dataclass(frozen=True)
class Selection:
    workloads: tuple[Workload, ...]
    # Pods this policy selects but another policy of higher priority governs: pod key -> winner.
    lost_to: Mapping[str, str]
    excluded: tuple[str, ...]


def select(policy: PolicyRef, pods: Iterable[PodInfo], policies: Sequence[PolicyRef]) -> Selection:
    """Workloads the policy governs among running GPU pods of its namespace."""
    grouped: dict[str, list[PodInfo]] = {}
    lost_to: dict[str, str] = {}
    excluded: list[str] = []
    for pod in pods:
        if pod.namespace != policy.namespace or pod.gpus <= 0 or not pod.node or pod.deleting:
            continue
        if pod.phase not in ("Running", "Pending"):
            continue
        if not policy.spec.selector.matches(dict(pod.labels)):
            continue
        if pod.excluded:
            excluded.append(pod.key)
            continue
        winner = governing_policy(pod, policies)
        if winner is not None and winner.key != policy.key:
            lost_to[pod.key] = winner.name
            continue
        group_label = policy.spec.groupByLabel
        group = pod.labels.get(group_label) if group_label else None
        grouped.setdefault(f"job:{group}" if group else pod.name, []).append(pod)
    workloads = tuple(
        Workload(name=name, pods=tuple(sorted(members, key=lambda p: p.name)))
        for name, members in sorted(grouped.items())
    )
    return Selection(workloads=workloads, lost_to=lost_to, excluded=tuple(sorted(excluded)))


def governed_by(pod: PodInfo, policy_name: str) -> bool:
    """Whether the pod carries hints written for this policy (what deletion must remove)."""
    return pod.annotations.get(ANNOTATION_POLICY) == policy_name
