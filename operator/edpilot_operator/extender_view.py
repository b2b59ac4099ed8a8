"""The scheduler extender's picture of the cluster, kept current by watch events. No I/O here.

Every event updates only what it touches: a node's `NodeView`, what its GPUs commit, and the sums
of the budgets that select it, so a request reads ready-made views and never walks the fleet.
A PowerBudget change re-matches all nodes (budgets change rarely).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pydantic import ValidationError

from edpilot.contract import committed_watts, gpu_request
from edpilot.dra import DEFAULT_CONFIG, ClaimView, DraConfig, claim_view, requested_gpus
from edpilot.models import EnergyPolicySpec, GPUNodeReportStatus, GPUStatus, PowerBudgetSpec, WorkloadStatus
from edpilot.placement import (
    BudgetView,
    EnergyHistory,
    EnergySample,
    NodeView,
    PodDemand,
    blocking_throttle,
    build_history,
    prior_for,
)
from edpilot_operator.selection import PodInfo, PolicyRef, governing_policy, pod_info

log = logging.getLogger(__name__)

NODES: Final = "nodes"
PODS: Final = "pods"
REPORTS: Final = "gpunodereports"
BUDGETS: Final = "powerbudgets"
POLICIES: Final = "energypolicies"
CLAIMS: Final = "resourceclaims"
TEMPLATES: Final = "resourceclaimtemplates"
BASE_KINDS: Final = (NODES, PODS, REPORTS, BUDGETS, POLICIES)
KINDS: Final = (*BASE_KINDS, CLAIMS, TEMPLATES)  # with DRA

PRODUCT_LABEL: Final = "nvidia.com/gpu.product"  # NVIDIA GPU feature discovery


@dataclass(frozen=True, slots=True)
class _Node:
    labels: Mapping[str, str]
    product: str


@dataclass(frozen=True, slots=True)
class _BoundPod:
    key: str  # namespace/name
    node: str
    gpus: int
    image: str


@dataclass(frozen=True, slots=True)
class _Policy:
    ref: PolicyRef
    workloads: tuple[WorkloadStatus, ...]


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def gpu_image(body: Mapping[str, Any]) -> str:
    """The image of the first container that asks for GPUs (the workload), else the first one's."""
    containers = (body.get("spec") or {}).get("containers") or []
    for c in containers:
        if gpu_request({"containers": [c]}) > 0:
            return str(c.get("image") or "")
    return str(containers[0].get("image") or "") if containers else ""


class ClusterView:
    """Nodes, GPUNodeReports, PowerBudgets, EnergyPolicies and bound GPU pods, as placement needs them;
    with DRA, ResourceClaims and ResourceClaimTemplates too, to count the GPUs a pod's claims hold
    or ask for."""

    def __init__(self, dra: DraConfig | None = DEFAULT_CONFIG) -> None:
        self.dra = dra
        self.kinds: tuple[str, ...] = KINDS if dra is not None else BASE_KINDS
        self._claims: dict[str, ClaimView] = {}  # by namespace/name
        self._templates: dict[str, int] = {}  # namespace/name -> GPUs its claims ask for
        self._nodes: dict[str, _Node] = {}
        self._reports: dict[str, tuple[GPUStatus, ...]] = {}
        self._budgets: dict[str, PowerBudgetSpec] = {}
        self._policies: dict[str, _Policy] = {}
        self._pods: dict[str, _BoundPod] = {}  # by namespace/name
        self._bound: dict[str, dict[str, int]] = {}  # node -> bound GPU pod -> its GPUs
        self.node_views: dict[str, NodeView] = {}
        self._committed: dict[str, float] = {}
        self._budget_committed: dict[str, float] = {}
        self.budget_views: dict[str, BudgetView] = {}
        self._policies_by_namespace: dict[str, list[PolicyRef]] = {}
        self._history: EnergyHistory | None = None
        self.synced: set[str] = set()
        self.events = 0

    @property
    def ready(self) -> bool:
        return self.synced.issuperset(self.kinds)

    # ------------------------------------------------------------ events

    def replace_all(self, kind: str, items: Iterable[Mapping[str, Any]]) -> None:
        """A fresh list: forget what the last list and watch said about this kind."""
        if kind == NODES:
            self._nodes.clear()
        elif kind == PODS:
            self._pods.clear()
            self._bound.clear()
        elif kind == REPORTS:
            self._reports.clear()
        elif kind == BUDGETS:
            self._budgets.clear()
        elif kind == POLICIES:
            self._policies.clear()
        elif kind == CLAIMS:
            self._claims.clear()
        elif kind == TEMPLATES:
            self._templates.clear()
        else:
            raise ValueError(f"unknown kind {kind}")
        for item in items:
            self._store(kind, item, deleted=False)
        self._rebuild()
        self.synced.add(kind)

    def apply(self, kind: str, event_type: str, obj: Mapping[str, Any]) -> None:
        """One watch event (ADDED, MODIFIED or DELETED)."""
        self.events += 1
        touched = self._store(kind, obj, deleted=event_type == "DELETED")
        if kind == BUDGETS:
            self._rebuild()
        else:
            for node in touched:
                self._refresh_node(node)

    def _store(self, kind: str, obj: Mapping[str, Any], deleted: bool) -> tuple[str, ...]:
        """Record one object; returns the nodes whose view it changes."""
        name = _name(obj)
        if kind == NODES:
            if deleted:
                self._nodes.pop(name, None)
            else:
                labels = dict((obj.get("metadata") or {}).get("labels") or {})
                self._nodes[name] = _Node(labels=labels, product=labels.get(PRODUCT_LABEL, ""))
            return (name,)
        if kind == REPORTS:
            gpus = () if deleted else self._report_gpus(name, obj)
            if gpus:
                self._reports[name] = gpus
            else:
                self._reports.pop(name, None)
            return (name,)
        if kind == PODS:
            return self._store_pod(obj, deleted)
        if kind == BUDGETS:
            self._store_budget(name, obj, deleted)
            return ()
        if kind == POLICIES:
            self._store_policy(obj, deleted)
            return ()
        if kind in (CLAIMS, TEMPLATES):
            self._store_dra(kind, obj, deleted)
            return ()
        raise ValueError(f"unknown kind {kind}")

    @staticmethod
    def _report_gpus(name: str, obj: Mapping[str, Any]) -> tuple[GPUStatus, ...]:
        status = obj.get("status")
        if not status:
            return ()
        try:
            return tuple(GPUNodeReportStatus.model_validate(status).gpus)
        except ValidationError as exc:
            log.warning("GPUNodeReport %s: status ignored, it does not validate: %s", name, exc.errors()[:1])
            return ()

    def _store_dra(self, kind: str, obj: Mapping[str, Any], deleted: bool) -> None:
        """A claim or template. A bound pod's count is taken when its own event comes (after the
        scheduler allocated its claims); a later change of a claim does not recount it."""
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"
        store: dict[str, Any] = self._claims if kind == CLAIMS else self._templates
        store.pop(key, None)
        if deleted or self.dra is None:
            return
        if kind == CLAIMS:
            self._claims[key] = claim_view(obj, self.dra)
        else:
            template = (obj.get("spec") or {}).get("spec") or {}
            self._templates[key] = requested_gpus(template if isinstance(template, Mapping) else {}, self.dra)

    def dra_gpus(self, pod: Mapping[str, Any]) -> int:
        """GPUs a pod's DRA claims hold (allocated) or ask for (not yet). The claims' specs are the
        tenant's: they size only that tenant's own pod."""
        if self.dra is None:
            return 0
        namespace = str((pod.get("metadata") or {}).get("namespace") or "")
        spec, status = pod.get("spec") or {}, pod.get("status") or {}
        generated = {
            str(s.get("name")): str(s.get("resourceClaimName") or "")
            for s in status.get("resourceClaimStatuses") or []
            if isinstance(s, Mapping)
        }
        total = 0
        for entry in spec.get("resourceClaims") or []:
            if not isinstance(entry, Mapping):
                continue
            name = entry.get("resourceClaimName") or generated.get(str(entry.get("name")))
            claim = self._claims.get(f"{namespace}/{name}") if name else None
            if claim is not None:
                total += len(claim.devices) if claim.allocated else claim.requested_gpus
            elif entry.get("resourceClaimTemplateName"):
                total += self._templates.get(f"{namespace}/{entry['resourceClaimTemplateName']}", 0)
        return total

    def _gpus(self, obj: Mapping[str, Any], info: PodInfo) -> int:
        return info.gpus + self.dra_gpus(obj)

    def _store_pod(self, obj: Mapping[str, Any], deleted: bool) -> tuple[str, ...]:
        info = pod_info(obj)
        old = self._pods.pop(info.key, None)
        if old is not None:
            self._bound.get(old.node, {}).pop(old.key, None)
        gpus = self._gpus(obj, info) if not deleted and info.node else 0
        keep = not deleted and not info.deleting and info.node and gpus > 0
        keep = keep and info.phase not in ("Succeeded", "Failed")
        if keep:
            new = _BoundPod(info.key, info.node, gpus, gpu_image(obj))
            self._pods[info.key] = new
            self._bound.setdefault(new.node, {})[new.key] = new.gpus
        self._history = None
        return tuple({n for n in (old.node if old else "", info.node if keep else "") if n})

    def _store_budget(self, name: str, obj: Mapping[str, Any], deleted: bool) -> None:
        self._budgets.pop(name, None)
        if deleted:
            return
        try:
            self._budgets[name] = PowerBudgetSpec.model_validate(obj.get("spec") or {})
        except ValidationError as exc:
            log.warning("PowerBudget %s ignored, its spec does not validate: %s", name, exc.errors()[:1])

    def _store_policy(self, obj: Mapping[str, Any], deleted: bool) -> None:
        meta = obj.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        key = f"{namespace}/{name}"
        self._policies.pop(key, None)
        self._history = None
        if not deleted:
            try:
                spec = EnergyPolicySpec.model_validate(obj.get("spec") or {})
            except ValidationError as exc:
                log.warning("EnergyPolicy %s ignored, its spec does not validate: %s", key, exc.errors()[:1])
            else:
                rows = []
                for row in (obj.get("status") or {}).get("workloads") or []:
                    try:
                        rows.append(WorkloadStatus.model_validate(row))
                    except ValidationError:
                        continue
                self._policies[key] = _Policy(PolicyRef(namespace, name, spec), tuple(rows))
        by_namespace: dict[str, list[PolicyRef]] = {}
        for policy in self._policies.values():
            by_namespace.setdefault(policy.ref.namespace, []).append(policy.ref)
        self._policies_by_namespace = by_namespace

    # ------------------------------------------------------------ derived views

    def _rebuild(self) -> None:
        self.node_views.clear()
        self.budget_views.clear()
        self._committed.clear()
        self._budget_committed = dict.fromkeys(self._budgets, 0.0)
        for name in self._nodes:
            self._refresh_node(name)
        self._publish_budgets(self._budgets)

    def _refresh_node(self, name: str) -> None:
        old_view = self.node_views.pop(name, None)
        old_committed = self._committed.pop(name, 0.0)
        if old_view is not None:
            for budget in old_view.budgets:
                self._budget_committed[budget] -= old_committed
        node = self._nodes.get(name)
        if node is not None:
            view, committed = self._node_view(name, node)
            self.node_views[name] = view
            self._committed[name] = committed
            for budget in view.budgets:
                self._budget_committed[budget] += committed
        touched = set(old_view.budgets if old_view else ()) | set(
            self.node_views[name].budgets if name in self.node_views else ()
        )
        self._publish_budgets(touched)

    def _node_view(self, name: str, node: _Node) -> tuple[NodeView, float]:
        gpus = self._reports.get(name, ())
        model = gpus[0].model if gpus else node.product
        if gpus:
            default, low, high = gpus[0].defaultLimitWatts, gpus[0].minLimitWatts, gpus[0].maxLimitWatts
        else:
            prior = prior_for(model)
            default, low, high = (
                (prior.default_limit_watts, prior.min_limit_watts, prior.max_limit_watts)
                if prior
                else (0, 0, 0)
            )
        budgets = tuple(
            sorted(b for b, spec in self._budgets.items() if spec.nodeSelector.matches(dict(node.labels)))
        )
        view = NodeView(name, model, default, low, high, blocking_throttle(gpus), budgets)
        reported = {pod for g in gpus for pod in g.pods}
        unreported = sum(n for pod, n in self._bound.get(name, {}).items() if pod not in reported)
        return view, committed_watts(gpus, unreported, default)

    def _publish_budgets(self, names: Iterable[str]) -> None:
        for name in names:
            spec = self._budgets.get(name)
            if spec is None:
                self.budget_views.pop(name, None)
                self._budget_committed.pop(name, None)
            else:
                committed = self._budget_committed.get(name, 0.0)
                self.budget_views[name] = BudgetView(name, spec.maxWatts, committed, spec.scope == "AllGPUs")

    # ------------------------------------------------------------ what requests read

    def nodes_named(self, names: Sequence[str]) -> list[NodeView]:
        """Views of the named nodes; a node the view has not seen yet passes with nothing known."""
        views = self.node_views
        return [views.get(n) or NodeView(n) for n in names]

    def demand(self, pod: Mapping[str, Any]) -> PodDemand:
        info: PodInfo = pod_info(pod)
        policy = governing_policy(info, self._policies_by_namespace.get(info.namespace, ()))
        return PodDemand(
            key=info.key,
            gpus=self._gpus(pod, info),
            image=gpu_image(pod),
            policy=policy.key if policy else None,
            power_cap=policy.spec.powerCap if policy else None,
        )

    def history(self) -> EnergyHistory:
        """What edpilot measured per policy, image and GPU model (rebuilt after a change)."""
        if self._history is None:
            self._history = build_history(self._samples())
        return self._history

    def _samples(self) -> Iterable[EnergySample]:
        for key, policy in self._policies.items():
            for row in policy.workloads:
                measured = row.current or row.baseline
                if measured is None or measured.joulesPerUnit <= 0 or not row.nodes:
                    continue
                node = self.node_views.get(row.nodes[0])
                if node is None or not node.gpu_model:
                    continue
                images = {
                    p.image
                    for p in (
                        self._pods.get(pod if "/" in pod else f"{policy.ref.namespace}/{pod}")
                        for pod in row.pods
                    )
                    if p is not None
                }
                for image in images or {""}:
                    yield EnergySample(key, image, node.gpu_model, measured.joulesPerUnit)

    def counts(self) -> dict[str, int]:
        return {
            NODES: len(self._nodes),
            PODS: len(self._pods),
            REPORTS: len(self._reports),
            BUDGETS: len(self._budgets),
            POLICIES: len(self._policies),
            CLAIMS: len(self._claims),
            TEMPLATES: len(self._templates),
        }
