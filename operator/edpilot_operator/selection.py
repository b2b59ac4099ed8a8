"""Which pods a policy governs, and how they form workloads. Plain data in, plain data out.

A pod is governed by the policy of highest `priority` (ties: the smallest name) among the policies
of its namespace whose selector matches it, unless it opts out with `edpilot.io/exclude: "true"`.
Pods that share the policy's `groupByLabel` value form one workload (a job); otherwise each pod is
its own workload.

Governance is computed from labels, the opt-out and the policies' specs only, never from the
`edpilot.io/policy` annotation (a tenant can write annotations; see docs/security.md). A namespace's
governance is computed once and shared by every policy's reconcile, the report composer and the
budgets (`GovernanceCache`): per policy, with the policy count bounded only by a quota, it was
quadratic (issue 14, finding 5).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from edpilot.contract import ANNOTATION_POLICY, gpu_request, is_excluded
from edpilot.dra import ClaimView, DeviceKey, PodGpu, SliceDevice, pod_gpus
from edpilot.models import EnergyPolicySpec
from edpilot.optimizer import Config
from edpilot.rollout import OwnerKind, owner_of


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
    # GPUs allocated through DRA (`with_dra`), counted in `gpus` too.
    dra_gpus: tuple[PodGpu, ...] = ()
    # The claim kube-scheduler made for an extended resource (nvidia.com/gpu) that a DRA driver
    # serves: its devices are already counted in the resource's request.
    extended_claim: str = ""
    # Its controller (ownerReferences with controller: true), e.g. ("ReplicaSet", "chat-5d8f9c").
    controller: tuple[str, str] | None = None
    ready: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def excluded(self) -> bool:
        return is_excluded(self.annotations)


def may_hold_gpus(pod_spec: Mapping[str, Any]) -> bool:
    """Whether a pod asks for GPUs through the device plugin or names DRA claims (whose devices
    `with_dra` counts once the scheduler allocated them)."""
    return gpu_request(pod_spec) > 0 or bool(pod_spec.get("resourceClaims"))


def pod_info(body: Mapping[str, Any]) -> PodInfo:
    """A pod as its body says; `with_dra` adds what its DRA claims hold."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    containers = spec.get("containers") or [{}]
    restarts = sum(int(cs.get("restartCount") or 0) for cs in status.get("containerStatuses") or [])
    extended = status.get("extendedResourceClaimStatus") or {}
    controller = next(
        (
            (str(ref.get("kind") or ""), str(ref.get("name") or ""))
            for ref in meta.get("ownerReferences") or []
            if isinstance(ref, Mapping) and ref.get("controller")
        ),
        None,
    )
    ready = any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
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
        extended_claim=str(extended.get("resourceClaimName") or "") if isinstance(extended, Mapping) else "",
        controller=controller,
        ready=ready,
    )


def with_dra(pod: PodInfo, claims: Iterable[ClaimView], catalog: Mapping[DeviceKey, SliceDevice]) -> PodInfo:
    """The pod with the GPUs that DRA allocated to it: the devices of the claims reserved for it (by
    UID, in its namespace), their UUIDs from the driver's ResourceSlices. Nothing a tenant writes
    decides which devices or UUIDs these are (edpilot.dra). Idempotent."""
    gpus = pod_gpus(claims, catalog, pod.namespace, pod.uid)
    if not gpus and not pod.dra_gpus:
        return pod
    counted = [g for g in gpus if g.claim != pod.extended_claim]
    before = [g for g in pod.dra_gpus if g.claim != pod.extended_claim]
    return replace(pod, gpus=pod.gpus - len(before) + len(counted), dra_gpus=gpus)


@dataclass(frozen=True)
class PolicyRef:
    namespace: str
    name: str
    spec: EnergyPolicySpec

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PolicyEntry:
    """What the operator's index keeps of a policy: its spec (None when the API server accepted a
    spec the models reject) and whether it is being deleted."""

    ref: PolicyRef | None
    deleting: bool = False

    @property
    def live(self) -> PolicyRef | None:
        return self.ref if not self.deleting else None


@dataclass(frozen=True)
class Governed:
    """A pod as the operator governs it: its policy, the configuration the policy's optimizer
    decided for its workload (None before the first decision), and whether that workload explores."""

    policy: PolicyRef
    target: Config | None = None
    exploring: bool = False


def governing_policy(pod: PodInfo, policies: Iterable[PolicyRef]) -> PolicyRef | None:
    """The policy that wins this pod, or None when none selects it or it opts out."""
    if pod.excluded:
        return None
    labels = dict(pod.labels)
    candidates = [p for p in policies if p.namespace == pod.namespace and p.spec.selector.matches(labels)]
    return _winner(candidates)


def _winner(candidates: Iterable[PolicyRef]) -> PolicyRef | None:
    return min(candidates, key=lambda p: (-p.spec.priority, p.name), default=None)


@dataclass(frozen=True)
class Governance:
    """Which policy governs each pod, and which policies select it at all (by pod key)."""

    winners: Mapping[str, PolicyRef] = field(default_factory=dict)
    selected_by: Mapping[str, frozenset[str]] = field(default_factory=dict)  # policy names

    def of(self, pod: PodInfo) -> PolicyRef | None:
        return self.winners.get(pod.key)


def governance(pods: Iterable[PodInfo], policies: Iterable[PolicyRef]) -> Governance:
    """Every pod's governing policy: each selector is evaluated once per pod of its namespace."""
    by_namespace: dict[str, list[PolicyRef]] = {}
    for policy in policies:
        by_namespace.setdefault(policy.namespace, []).append(policy)
    winners: dict[str, PolicyRef] = {}
    selected_by: dict[str, frozenset[str]] = {}
    for pod in pods:
        labels = dict(pod.labels)
        matching = [p for p in by_namespace.get(pod.namespace, ()) if p.spec.selector.matches(labels)]
        if not matching:
            continue
        selected_by[pod.key] = frozenset(p.name for p in matching)
        winner = None if pod.excluded else _winner(matching)
        if winner is not None:
            winners[pod.key] = winner
    return Governance(winners=winners, selected_by=selected_by)


class GovernanceCache:
    """Each namespace's `Governance`, recomputed only when something it depends on changed, and at
    least every `max_age` seconds of `clock`.

    The operator's watch indexes call `note` with what governance reads of each object (a pod's
    labels and opt-out, a policy's uid, generation and deletion); a namespace is recomputed when a
    note differs from the last one or when its pod or policy count changed (an object gone from an
    index is never noted). Status writes, the bulk of the events, change nothing here. A note lands
    a moment before its index does, so `max_age` (one reconcile interval) bounds how long a
    computation made in between can stand. No I/O."""

    def __init__(self, max_age: float = math.inf, clock: Callable[[], float] = lambda: 0.0) -> None:
        self._lock = threading.Lock()
        self._max_age = max_age
        self._clock = clock
        self._versions: dict[str, int] = {}
        self._seen: dict[str, dict[str, Hashable]] = {}  # namespace -> "pod/x" or "policy/y" -> note
        self._cached: dict[str, tuple[tuple[int, int, int], float, Governance]] = {}

    def note(self, namespace: str, key: str, fingerprint: Hashable) -> None:
        with self._lock:
            seen = self._seen.setdefault(namespace, {})
            if seen.get(key) != fingerprint:
                seen[key] = fingerprint
                self._versions[namespace] = self._versions.get(namespace, 0) + 1

    def get(self, namespace: str, pods: Collection[PodInfo], policies: Collection[PolicyEntry]) -> Governance:
        """The governance of the namespace's `pods` under its `policies` (live or not, as indexed)."""
        with self._lock:
            now = self._clock()
            stamp = (self._versions.get(namespace, 0), len(pods), len(policies))
            cached = self._cached.get(namespace)
            if cached is not None and cached[0] == stamp and now - cached[1] < self._max_age:
                return cached[2]
            result = governance(pods, [e.live for e in policies if e.live is not None])
            self._cached[namespace] = (stamp, now, result)
            # Forget the notes of pods gone from the index: generated pod names would pile up.
            present = {f"pod/{p.name}" for p in pods}
            seen = self._seen.get(namespace, {})
            for key in [k for k in seen if k.startswith("pod/") and k not in present]:
                del seen[key]
            return result


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


def select(policy: PolicyRef, pods: Iterable[PodInfo], governed: Governance) -> Selection:
    """Workloads the policy governs among running GPU pods of its namespace, read from the
    namespace's `governance` (no selector is evaluated here)."""
    grouped: dict[str, list[PodInfo]] = {}
    lost_to: dict[str, str] = {}
    excluded: list[str] = []
    for pod in pods:
        if pod.namespace != policy.namespace or pod.gpus <= 0 or not pod.node or pod.deleting:
            continue
        if pod.phase not in ("Running", "Pending"):
            continue
        if policy.name not in governed.selected_by.get(pod.key, ()):
            continue
        if pod.excluded:
            excluded.append(pod.key)
            continue
        winner = governed.of(pod)
        if winner is not None and winner.key != policy.key:
            lost_to[pod.key] = winner.name
            continue
        grouped.setdefault(workload_name(policy, pod), []).append(pod)
    workloads = tuple(
        Workload(name=name, pods=tuple(sorted(members, key=lambda p: p.name)))
        for name, members in sorted(grouped.items())
    )
    return Selection(workloads=workloads, lost_to=lost_to, excluded=tuple(sorted(excluded)))


def workload_name(policy: PolicyRef, pod: PodInfo) -> str:
    """The workload a pod belongs to: its job (groupByLabel), else under delivery Rollout its
    Deployment or StatefulSet (one template, one configuration), else the pod itself."""
    group_label = policy.spec.groupByLabel
    group = pod.labels.get(group_label) if group_label else None
    if group:
        return f"job:{group}"
    owner = pod_owner(pod) if policy.spec.delivery.mode == "Rollout" else None
    return f"{owner[0]}/{owner[1]}" if owner else pod.name


def pod_owner(pod: PodInfo) -> tuple[OwnerKind, str] | None:
    """The Deployment or StatefulSet a pod was created for, from its controller reference."""
    return owner_of(*pod.controller, pod.labels) if pod.controller else None


def governed_by(pod: PodInfo, policy_name: str) -> bool:
    """Whether the pod carries hints written for this policy (what deletion must remove)."""
    return pod.annotations.get(ANNOTATION_POLICY) == policy_name
