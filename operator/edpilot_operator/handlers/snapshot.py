"""`ClusterSnapshot`: what the operator's watches hold, read the same way by every planner.

It wraps the kopf indexes (mappings of key -> collection of values) without copying them, so a
timer builds one for nothing; tests pass plain dicts of lists. Every "which pods, which policy,
which decision" read lives here once. No I/O."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from edpilot.contract import StoredState
from edpilot.dra import ClaimView, DraHoldings, SliceDevice, device_catalog, holdings
from edpilot.models import GPUNodeReportSpec, GPUNodeReportStatus
from edpilot.optimizer import Config
from edpilot.rollout import OwnerView

from .. import budgets
from ..reports import Decided, target_of
from ..selection import Governance, Governed, PodInfo, PolicyEntry, governance, with_dra

K = TypeVar("K")
V = TypeVar("V")
Index = Mapping[K, Collection[V]]
GovernanceOf = Callable[[str, Collection[PodInfo], Collection[PolicyEntry]], Governance]


def fresh_governance(_: str, pods: Collection[PodInfo], policies: Collection[PolicyEntry]) -> Governance:
    """Governance computed afresh (the operator passes its `GovernanceCache.get` instead)."""
    return governance(pods, [e.live for e in policies if e.live is not None])


def _first(index: Index[K, V] | None, key: K) -> V | None:
    store = index.get(key) if index is not None else None
    return next(iter(store), None) if store else None


@dataclass(frozen=True)
class SeenSpec:
    """A report's spec as the watch last delivered it, and the report's generation then (only
    spec writes raise it: the status is a subresource)."""

    generation: int
    spec: GPUNodeReportSpec


@dataclass(frozen=True)
class ClusterSnapshot:
    """Field names are the ids of the kopf indexes (`handlers.indexes`)."""

    pods_by_namespace: Index[str, PodInfo]
    pods_by_node: Index[str, PodInfo]
    policies_by_namespace: Index[str, PolicyEntry]
    decisions_by_policy: Index[str, Decided]
    targets_by_workload: Index[tuple[str, str], Config]
    states_by_policy: Index[str, StoredState]
    reports_by_node: Index[str, GPUNodeReportStatus]
    budget_caps_by_node: Index[str, dict[str, float]]
    probe_points_by_policy_gpu: Index[tuple[str, str], tuple[budgets.ProbePoint, ...]]
    report_specs: Index[str, SeenSpec]
    claims_by_pod: Index[str, ClaimView] | None = None  # None: DRA is off
    slices_by_pool: Index[tuple[str, str], tuple[SliceDevice, ...]] | None = None
    deployments_by_namespace: Index[str, OwnerView] | None = None  # None: delivery Rollout is off
    statefulsets_by_namespace: Index[str, OwnerView] | None = None
    governance_of: GovernanceOf = fresh_governance

    @classmethod
    def of(
        cls, indexes: Mapping[str, Any], governance_of: GovernanceOf = fresh_governance
    ) -> ClusterSnapshot:
        """From a handler's kwargs (kopf passes every index by its id); a missing one is empty."""
        optional = {
            "claims_by_pod",
            "slices_by_pool",
            "deployments_by_namespace",
            "statefulsets_by_namespace",
        }
        values = {
            f.name: indexes.get(f.name, None if f.name in optional else {})
            for f in fields(cls)
            if f.name != "governance_of"
        }
        return cls(**values, governance_of=governance_of)

    # ------------------------------------------------------------ reads

    def report(self, node: str) -> GPUNodeReportStatus | None:
        return _first(self.reports_by_node, node)

    def seen_specs(self) -> dict[str, SeenSpec]:
        """Every report's spec, by node (every report has one, with or without a status)."""
        return {node: seen for node, store in self.report_specs.items() for seen in store}

    def governance(self, namespace: str) -> Governance:
        return self.governance_of(
            namespace,
            self.pods_by_namespace.get(namespace, []),
            self.policies_by_namespace.get(namespace, []),
        )

    def with_dra(self, pods: Iterable[PodInfo]) -> list[PodInfo]:
        """The pods with the GPUs DRA allocated to them (`selection.with_dra`), read from the claims
        reserved for each (by namespace and UID) and the slices of the pools those name."""
        claims_by_pod, slices_by_pool = self.claims_by_pod, self.slices_by_pool
        if claims_by_pod is None or slices_by_pool is None:
            return list(pods)
        result = []
        for pod in pods:
            claims = list(claims_by_pod.get(f"{pod.namespace}/{pod.uid}", []))
            if not claims:
                result.append(pod)
                continue
            pools = {device.key[:2] for claim in claims for device in claim.devices}
            catalog = device_catalog(
                d for pool in pools for published in slices_by_pool.get(pool, []) for d in published
            )
            result.append(with_dra(pod, claims, catalog))
        return result

    def node_pods(self, node: str) -> list[PodInfo]:
        """The GPU pods on `node`, with their DRA GPUs."""
        return self.with_dra(self.pods_by_node.get(node, []))

    def owners(self, namespace: str) -> dict[str, OwnerView]:
        """The namespace's Deployments and StatefulSets by "Kind/name" (none unless rollouts are on)."""
        found: dict[str, OwnerView] = {}
        for index in (self.deployments_by_namespace, self.statefulsets_by_namespace):
            for owner in index.get(namespace, []) if index is not None else []:
                found[owner.key] = owner
        return found

    def stored_states(self, policy_key: str) -> list[StoredState]:
        return list(self.states_by_policy.get(policy_key, []))

    def budget_caps(self, node: str) -> dict[str, float]:
        return budgets.lowest_caps(self.budget_caps_by_node.get(node, []))

    def curves(
        self, reports: Iterable[GPUNodeReportStatus], rules: Mapping[str, Governed]
    ) -> dict[tuple[str, str], tuple[budgets.ProbePoint, ...]]:
        """The probe points of each reported GPU whose pod is governed, by (policy key, GPU UUID):
        only the policy that governs a GPU's pod shapes that GPU's curve."""
        keys = {
            (rule.policy.key, g.uuid)
            for r in reports
            for g in r.gpus
            for p in g.pods
            if (rule := rules.get(p))
        }
        return {k: points for k in keys if (points := _first(self.probe_points_by_policy_gpu, k)) is not None}

    def governed(self, pods: Iterable[PodInfo]) -> dict[str, Governed]:
        """How the operator governs each of `pods`: the winning policy from labels and specs (never
        from annotations), and that policy's decision for the pod from its status (which pods form
        which workload, which explore) and its workload's stored state (the target)."""
        result: dict[str, Governed] = {}
        for pod in pods:
            winner = self.governance(pod.namespace).of(pod)
            if winner is None:
                continue
            decision = _first(self.decisions_by_policy, winner.key) or Decided()

            def stored(workload: str, policy: str = winner.key) -> Config | None:
                return _first(self.targets_by_workload, (policy, workload))

            target = target_of(decision, pod.key, stored)
            result[pod.key] = Governed(winner, target, pod.key in decision.exploring)
        return result


def dra_holdings(pods: Iterable[PodInfo]) -> DraHoldings:
    """Who DRA allocated each GPU to, among `pods` (enriched by `ClusterSnapshot.with_dra`)."""
    return holdings({p.key: p.dra_gpus for p in pods if p.dra_gpus})
