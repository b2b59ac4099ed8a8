"""kopf handlers. They stay thin: translate bodies, call `services` (which calls the pure core),
and write back. Watches feed in-memory indexes, so a decision reads no object with a GET."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from edpilot.contract import (
    HINT_ANNOTATIONS,
    STATE_PLURAL,
    StoredState,
    states_of,
    stored_state,
)
from edpilot.dra import (
    DEFAULT_CONFIG,
    ClaimView,
    DraConfig,
    DraHoldings,
    SliceDevice,
    claim_view,
    device_catalog,
    holdings,
    slice_devices,
)
from edpilot.models import (
    GROUP,
    VERSION,
    EnergyPolicySpec,
    GPUNodeReportSpec,
    GPUNodeReportStatus,
    LeaseRef,
    PowerBudgetSpec,
    PowerBudgetStatus,
)
from edpilot.optimizer import DEFAULT_TUNING, Config, Tuning
from edpilot.rollout import OwnerView, owner_view

from . import budgets, metrics, services
from .kube import Kube, load_client
from .liveness import LeaseKeeper, LeaseWriter
from .reports import Decided, ReportTiming, decided, desired_spec, state_target, target_of
from .selection import (
    GovernanceCache,
    Governed,
    PodInfo,
    PolicyEntry,
    PolicyRef,
    governed_by,
    may_hold_gpus,
    pod_info,
    with_dra,
)

POLICIES = (GROUP, VERSION, "energypolicies")
REPORTS = (GROUP, VERSION, "gpunodereports")
BUDGETS = (GROUP, VERSION, "powerbudgets")
STATES = (GROUP, VERSION, STATE_PLURAL)
CLAIMS = ("resource.k8s.io", "v1", "resourceclaims")
DEPLOYMENTS = ("apps", "v1", "deployments")
STATEFULSETS = ("apps", "v1", "statefulsets")
SLICES = ("resource.k8s.io", "v1", "resourceslices")
PROGRESS_PREFIX = GROUP
STATE_MANAGER = "edpilot-operator"  # the field manager of state objects (server-side apply)


@dataclass(frozen=True)
class OperatorConfig:
    kubeconfig: str | None = None
    identity: str = "edpilot-operator"
    reconcile_interval: float = 5.0
    report_interval: float = 5.0
    lease_seconds: int = 60
    # The one coordination.k8s.io Lease the operator renews and every report spec names.
    lease_namespace: str = "default"
    lease_name: str = "edpilot-operator"
    fast_report_interval: int = 5
    slow_report_interval: int = 60
    tuning: Tuning = DEFAULT_TUNING
    dra: DraConfig | None = DEFAULT_CONFIG  # None: a cluster without DRA; no claim or slice is read
    # Delivery Rollout: watch Deployments and StatefulSets and patch their pod templates (the
    # chart grants that only with operator.rolloutDelivery.enabled).
    rollouts: bool = False

    @property
    def lease(self) -> LeaseRef:
        return LeaseRef(namespace=self.lease_namespace, name=self.lease_name)

    @property
    def timing(self) -> ReportTiming:
        return ReportTiming(self.lease_seconds, self.fast_report_interval, self.slow_report_interval)


def _is_gpu_pod(spec: Mapping[str, Any], **_: Any) -> bool:
    return may_hold_gpus(spec)


ClaimIndex = kopf.Index[str, ClaimView]
OwnerIndex = kopf.Index[str, OwnerView]
SliceIndex = kopf.Index[tuple[str, str], tuple[SliceDevice, ...]]
TargetIndex = kopf.Index[tuple[str, str], Config]  # ("namespace/policy", workload) -> its target


def with_dra_gpus(
    pods: Iterable[PodInfo], claims_by_pod: ClaimIndex | None, slices_by_pool: SliceIndex | None
) -> list[PodInfo]:
    """The pods with the GPUs DRA allocated to them (`selection.with_dra`), read from the claims
    reserved for each (by namespace and UID) and the slices of the pools those name."""
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


def dra_holdings(pods: Iterable[PodInfo]) -> DraHoldings:
    """Who DRA allocated each GPU to, among `pods` (enriched by `with_dra_gpus`)."""
    return holdings({p.key: p.dra_gpus for p in pods if p.dra_gpus})


def _policy_entry(namespace: str, name: str, spec: Mapping[str, Any], meta: Any) -> PolicyEntry:
    try:
        ref: PolicyRef | None = PolicyRef(namespace, name, EnergyPolicySpec.model_validate(dict(spec)))
    except ValidationError:
        ref = None
    return PolicyEntry(ref=ref, deleting=meta.get("deletionTimestamp") is not None)


def register(registry: kopf.OperatorRegistry, cfg: OperatorConfig) -> None:
    """Register every handler on `registry` with the intervals of `cfg`."""
    # Each namespace's governance, shared by the policy timers, the report composer and budgets.
    governance = GovernanceCache(max_age=cfg.reconcile_interval, clock=time.monotonic)

    def governed(
        pods: Iterable[PodInfo],
        pods_by_namespace: kopf.Index[str, PodInfo],
        policies_by_namespace: kopf.Index[str, PolicyEntry],
        decisions_by_policy: kopf.Index[str, Decided],
        targets_by_workload: TargetIndex,
    ) -> dict[str, Governed]:
        """How the operator governs each of `pods`: the winning policy from labels and specs (never
        from annotations), and that policy's decision for the pod from its status (which pods form
        which workload, which explore) and its workload's stored state (the target)."""
        result: dict[str, Governed] = {}
        for pod in pods:
            namespace = pod.namespace
            winner = governance.get(
                namespace, pods_by_namespace.get(namespace, []), policies_by_namespace.get(namespace, [])
            ).of(pod)
            if winner is None:
                continue
            decision = next(iter(decisions_by_policy.get(winner.key, [])), Decided())

            def stored(workload: str, policy: str = winner.key) -> Config | None:
                return next(iter(targets_by_workload.get((policy, workload), [])), None)

            target = target_of(decision, pod.key, stored)
            result[pod.key] = Governed(winner, target, pod.key in decision.exploring)
        return result

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # An explicit kubeconfig wins. In a pod: the mounted ServiceAccount token, sent to the API
        # server the kubelet names in KUBERNETES_SERVICE_HOST/PORT, as client-go and the
        # Kubernetes client find it (kopf's own service-account login dials the DNS name
        # kubernetes.default.svc, which a pod without cluster DNS cannot resolve).
        if cfg.kubeconfig:
            return kopf.login_with_kubeconfig(**kwargs)
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.persistence.finalizer = f"{GROUP}/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PROGRESS_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=PROGRESS_PREFIX,
            key="last-handled-configuration",
            # No handler reacts to spec changes (timers read the spec afresh). A copy of a spec
            # the API accepts (a 32x64 selector: 420 KiB) can exceed the 256 KiB annotations
            # limit, and kopf then could not even remove its finalizer from a deleted policy.
            ignored_fields=["spec"],
        )
        settings.posting.level = logging.INFO
        settings.watching.server_timeout = 300
        settings.networking.request_timeout = 30
        # A policy deleted while its reconcile timer runs waits this long before release_policy
        # (kopf's default, 60 s, held caps and hints for a minute after a delete in bench/soak.py).
        settings.background.cancellation_polling = 1
        api = load_client(cfg.kubeconfig)
        memo.kube = Kube(api)
        memo.lease_keeper = LeaseKeeper(
            cfg.lease, cfg.identity, cfg.lease_seconds, LeaseWriter(api).renew, time.monotonic
        )

    @kopf.on.probe(id="policies", registry=registry)
    def probe_policies(policies_by_namespace: kopf.Index[str, PolicyEntry], **_: Any) -> int:
        return sum(len(v) for v in policies_by_namespace.values())

    @kopf.index("pods", id="pods_by_namespace", when=_is_gpu_pod, registry=registry)
    def pods_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict[str, PodInfo]:
        info = pod_info(body)
        governance.note(
            namespace, f"pod/{info.name}", (info.uid, tuple(sorted(info.labels.items())), info.excluded)
        )
        return {namespace: info}

    @kopf.index("pods", id="pods_by_node", when=_is_gpu_pod, registry=registry)
    def pods_by_node(spec: kopf.Spec, body: kopf.Body, **_: Any) -> dict[str, PodInfo] | None:
        node = spec.get("nodeName")
        return {node: pod_info(body)} if node else None

    if cfg.dra is not None:
        dra = cfg.dra

        @kopf.index(*CLAIMS, id="claims_by_pod", registry=registry)
        def claims_by_pod(namespace: str, body: kopf.Body, **_: Any) -> dict[str, ClaimView]:
            # Keyed by the UIDs its status reserves it for (the scheduler's), in its own namespace.
            view = claim_view(body, dra)
            return {f"{namespace}/{uid}": view for uid in view.consumers} if view.allocated else {}

        @kopf.index(*SLICES, id="slices_by_pool", registry=registry)
        def slices_by_pool(body: kopf.Body, **_: Any) -> dict[tuple[str, str], tuple[SliceDevice, ...]]:
            devices = slice_devices(body, dra)
            return {devices[0].key[:2]: devices} if devices else {}

    if cfg.rollouts:

        @kopf.index(*DEPLOYMENTS, id="deployments_by_namespace", registry=registry)
        def deployments_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict[str, OwnerView]:
            return {namespace: owner_view("Deployment", body)}

        @kopf.index(*STATEFULSETS, id="statefulsets_by_namespace", registry=registry)
        def statefulsets_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict[str, OwnerView]:
            return {namespace: owner_view("StatefulSet", body)}

    @kopf.index(*POLICIES, id="policies_by_namespace", registry=registry)
    def policies_by_namespace(
        namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any
    ) -> dict[str, PolicyEntry]:
        entry = _policy_entry(namespace, name, spec, meta)
        # Status writes (most policy events) leave uid and generation alone: no recompute.
        fingerprint = (meta.get("uid"), meta.get("generation"), entry.deleting, entry.ref is None)
        governance.note(namespace, f"policy/{name}", fingerprint)
        return {namespace: entry}

    @kopf.index(*POLICIES, id="decisions_by_policy", registry=registry)
    def decisions_by_policy(namespace: str, name: str, status: kopf.Status, **_: Any) -> dict[str, Decided]:
        return {f"{namespace}/{name}": decided(namespace, status)}

    @kopf.index(*STATES, id="states_by_policy", registry=registry)
    def states_by_policy(
        namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any
    ) -> dict[str, StoredState] | None:
        owners = meta.get("ownerReferences") or []
        owner = next((str(o.get("uid", "")) for o in owners if o.get("kind") == "EnergyPolicy"), "")
        stored = stored_state(name, spec, owner)
        return {f"{namespace}/{stored.policy}": stored} if stored else None

    @kopf.index(*STATES, id="targets_by_workload", registry=registry)
    def targets_by_workload(
        namespace: str, name: str, spec: kopf.Spec, **_: Any
    ) -> dict[tuple[str, str], Config] | None:
        # Only an object under the name its policy and workload give it counts (`states_of`).
        stored = stored_state(name, spec)
        if stored is None or not states_of([stored], stored.policy):
            return None
        target = state_target(stored.state)
        return {(f"{namespace}/{stored.policy}", stored.workload): target} if target else None

    @kopf.index(*REPORTS, id="reports_by_node", registry=registry)
    def reports_by_node(name: str, status: kopf.Status, **_: Any) -> dict[str, GPUNodeReportStatus] | None:
        try:
            return {name: GPUNodeReportStatus.model_validate(dict(status))} if status else None
        except ValidationError:
            return None  # a malformed report gives no observation; the policy reports the node as silent

    @kopf.timer(
        *POLICIES, id="reconcile_policy", interval=cfg.reconcile_interval, initial_delay=1, registry=registry
    )
    async def reconcile_policy(
        namespace: str,
        name: str,
        spec: kopf.Spec,
        status: kopf.Status,
        meta: kopf.Meta,
        body: kopf.Body,
        patch: kopf.Patch,
        memo: kopf.Memo,
        logger: kopf.Logger,
        pods_by_namespace: kopf.Index[str, PodInfo],
        policies_by_namespace: kopf.Index[str, PolicyEntry],
        reports_by_node: kopf.Index[str, GPUNodeReportStatus],
        pods_by_node: kopf.Index[str, PodInfo],
        states_by_policy: kopf.Index[str, StoredState],
        claims_by_pod: ClaimIndex | None = None,
        slices_by_pool: SliceIndex | None = None,
        deployments_by_namespace: OwnerIndex | None = None,
        statefulsets_by_namespace: OwnerIndex | None = None,
        **_: Any,
    ) -> None:
        if meta.get("deletionTimestamp"):
            return
        now = datetime.now(UTC)
        try:
            policy = PolicyRef(namespace, name, EnergyPolicySpec.model_validate(dict(spec)))
        except ValidationError as exc:
            patch.status["conditions"] = services.invalid_spec_conditions(
                dict(status), str(exc), meta.get("generation"), now
            )
            logger.error("EnergyPolicy %s/%s: spec rejected by edpilot: %s", namespace, name, exc)
            return
        members: Collection[PodInfo] = pods_by_namespace.get(namespace, [])
        pods = with_dra_gpus(members, claims_by_pod, slices_by_pool)
        shared = governance.get(namespace, members, policies_by_namespace.get(namespace, []))
        reports = {p.node: next(iter(store)) for p in pods if (store := reports_by_node.get(p.node))}
        # Another namespace's pod may hold one of these GPUs through DRA too.
        neighbours = [p for node in reports for p in pods_by_node.get(node, [])]
        holders = dra_holdings(with_dra_gpus(neighbours, claims_by_pod, slices_by_pool))
        stored = list(states_by_policy.get(f"{namespace}/{name}", []))
        # The optimizer is CPU work: off the event loop, so watches and lease renewals go on.
        outcome = await asyncio.to_thread(
            services.reconcile_policy,
            policy=policy,
            status=dict(status),
            generation=meta.get("generation"),
            pods=pods,
            governance=shared,
            reports=reports,
            now=now,
            tuning=cfg.tuning,
            dra=holders,
            owners=owners_of(namespace, deployments_by_namespace, statefulsets_by_namespace),
            states=states_of(stored, name),
        )
        kube: Kube = memo.kube
        unstored = await store_states(kube, namespace, name, str(meta.get("uid", "")), stored, outcome)
        for workload, problem in unstored.items():
            logger.error("EnergyPolicy %s/%s: state of %s not stored: %s", namespace, name, workload, problem)
        for owner_key, owner_patch in outcome.owner_patches.items():
            if not await kube.patch_owner(namespace, owner_key, owner_patch):
                logger.info("%s/%s changed since it was read: its rollout waits", namespace, owner_key)
                services.not_started(outcome.status, owner_key)
        for pod_key, pod_patch in outcome.pod_annotations.items():
            pod_ns, pod_name = pod_key.split("/", 1)
            await kube.patch_pod_annotations(pod_ns, pod_name, pod_patch)
        patch.status.update(outcome.status)
        metrics.publish_policy_status(namespace, name, outcome.status)
        for event in outcome.events:
            target: Any = _pod_ref(event.pod, pods) if event.pod else body
            if target is not None:
                kopf.event(target, type=event.type, reason=event.reason, message=event.message)

    def node_spec(
        pods: Collection[PodInfo],
        status: GPUNodeReportStatus | None,
        rules: Mapping[str, Governed],
        budget_caps: Mapping[str, float],
    ) -> GPUNodeReportSpec:
        """A node's desired spec: `rules` says how the operator governs its pods (enriched by
        `with_dra_gpus`)."""
        return desired_spec(
            dra=dra_holdings(pods),
            pods=pods,
            status=status,
            governed=rules,
            lease=cfg.lease,
            timing=cfg.timing,
            budget_caps=budget_caps,
        )

    # The last spec written per report, with the resourceVersion it was composed from: while the
    # watch has not delivered that write yet, the timer compares with what it wrote, not with the
    # older spec it still sees, and does not write the same spec again.
    written_specs: dict[str, tuple[str, GPUNodeReportSpec]] = {}

    @kopf.timer(
        *REPORTS, id="compose_report", interval=cfg.report_interval, initial_delay=1, registry=registry
    )
    def compose_report(
        name: str,
        spec: kopf.Spec,
        status: kopf.Status,
        meta: kopf.Meta,
        patch: kopf.Patch,
        memo: kopf.Memo,
        pods_by_node: kopf.Index[str, PodInfo],
        pods_by_namespace: kopf.Index[str, PodInfo],
        policies_by_namespace: kopf.Index[str, PolicyEntry],
        decisions_by_policy: kopf.Index[str, Decided],
        targets_by_workload: TargetIndex,
        budget_caps_by_node: kopf.Index[str, dict[str, float]],
        claims_by_pod: ClaimIndex | None = None,
        slices_by_pool: SliceIndex | None = None,
        **_: Any,
    ) -> None:
        seen = _report_spec(spec)
        version = str(meta.get("resourceVersion", ""))
        mine = written_specs.get(name)
        current = mine[1] if mine is not None and mine[0] == version else seen
        pods = with_dra_gpus(pods_by_node.get(name, []), claims_by_pod, slices_by_pool)
        desired = node_spec(
            pods,
            _report_status(status),
            governed(
                pods, pods_by_namespace, policies_by_namespace, decisions_by_policy, targets_by_workload
            ),
            budgets.lowest_caps(budget_caps_by_node.get(name, [])),
        )
        if desired != current:
            patch.spec.update(desired.model_dump(mode="json", exclude_none=True))
            if seen.lease is not None:
                patch.spec["lease"] = None  # an older operator's per-node lease: operatorLease rules
            written_specs[name] = (version, desired)
        # Renewed only from here: kopf stops this timer while the replica is paused or stopping.
        keeper: LeaseKeeper = memo.lease_keeper
        keeper.renew_if_due(datetime.now(UTC))

    # ---------------------------------------------------------------- power budgets

    @kopf.index("nodes", id="node_labels", registry=registry)
    def node_labels(name: str, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, str]]:
        return {name: dict(labels)}

    @kopf.index(*STATES, id="probe_points_by_policy_gpu", registry=registry)
    def probe_points_by_policy_gpu(
        namespace: str, spec: kopf.Spec, **_: Any
    ) -> dict[tuple[str, str], tuple[budgets.ProbePoint, ...]]:
        # Keyed by policy too: a state names any GPU UUID it likes, but only the policy that
        # governs a GPU's pod shapes that GPU's curve.
        policy, state = spec.get("policy"), spec.get("state")
        if not isinstance(policy, str) or not isinstance(state, Mapping):
            return {}
        return {(f"{namespace}/{policy}", uuid): p for uuid, p in budgets.probe_points([state]).items()}

    @kopf.index(*BUDGETS, id="budget_caps_by_node", registry=registry)
    def budget_caps_by_node(status: kopf.Status, **_: Any) -> dict[str, dict[str, float]]:
        return budgets.caps_by_node(status)

    @kopf.timer(
        *BUDGETS, id="reconcile_budget", interval=cfg.report_interval, initial_delay=1, registry=registry
    )
    def reconcile_budget(
        name: str,
        spec: kopf.Spec,
        status: kopf.Status,
        meta: kopf.Meta,
        patch: kopf.Patch,
        logger: kopf.Logger,
        node_labels: kopf.Index[str, dict[str, str]],
        reports_by_node: kopf.Index[str, GPUNodeReportStatus],
        pods_by_node: kopf.Index[str, PodInfo],
        pods_by_namespace: kopf.Index[str, PodInfo],
        policies_by_namespace: kopf.Index[str, PolicyEntry],
        decisions_by_policy: kopf.Index[str, Decided],
        targets_by_workload: TargetIndex,
        probe_points_by_policy_gpu: kopf.Index[tuple[str, str], tuple[budgets.ProbePoint, ...]],
        claims_by_pod: ClaimIndex | None = None,
        slices_by_pool: SliceIndex | None = None,
        **_: Any,
    ) -> None:
        if meta.get("deletionTimestamp"):
            return
        try:
            budget = PowerBudgetSpec.model_validate(dict(spec))
        except ValidationError as exc:
            logger.error("PowerBudget %s: spec rejected by edpilot: %s", name, exc)
            return
        try:
            previous = PowerBudgetStatus.model_validate(dict(status)) if status else None
        except ValidationError:
            previous = None  # rewritten whole below
        labels = {node: next(iter(store)) for node, store in node_labels.items() if store}
        nodes = budgets.selected_nodes(budget, labels)
        reports = {n: next(iter(reports_by_node[n])) for n in nodes if reports_by_node.get(n)}
        enriched = with_dra_gpus(
            (p for n in nodes for p in pods_by_node.get(n, [])), claims_by_pod, slices_by_pool
        )
        pods = {p.key: p for p in enriched}
        rules = governed(
            pods.values(), pods_by_namespace, policies_by_namespace, decisions_by_policy, targets_by_workload
        )
        keys = {
            (rule.policy.key, g.uuid)
            for r in reports.values()
            for g in r.gpus
            for p in g.pods
            if (rule := rules.get(p))
        }
        new = budgets.reconcile_budget(
            spec=budget,
            generation=meta.get("generation"),
            previous=previous,
            node_labels=labels,
            reports=reports,
            pods=pods,
            governed=rules,
            curves={k: next(iter(store)) for k in keys if (store := probe_points_by_policy_gpu.get(k))},
            now=datetime.now(UTC),
            dra=dra_holdings(enriched),
        )
        if previous is None or new.allocations != previous.allocations:
            caps = ", ".join(f"{a.gpuUUID}={a.watts:.0f}W" for a in new.allocations) or "none"
            logger.info(
                "PowerBudget %s: %.0f of %.0f W allocated; caps %s",
                name,
                new.allocatedWatts,
                budget.maxWatts,
                caps,
            )
        status_body = new.model_dump(mode="json", exclude_none=True)
        patch.status.update(status_body)
        metrics.publish_budget_status(name, budget.maxWatts, status_body)

    @kopf.on.delete(*BUDGETS, id="forget_budget", optional=True, registry=registry)
    def forget_budget(name: str, **_: Any) -> None:
        metrics.forget_budget(name)

    @kopf.on.delete(*POLICIES, id="release_policy", registry=registry)
    async def release_policy(
        namespace: str,
        name: str,
        memo: kopf.Memo,
        logger: kopf.Logger,
        pods_by_namespace: kopf.Index[str, PodInfo],
        pods_by_node: kopf.Index[str, PodInfo],
        policies_by_namespace: kopf.Index[str, PolicyEntry],
        decisions_by_policy: kopf.Index[str, Decided],
        targets_by_workload: TargetIndex,
        reports_by_node: kopf.Index[str, GPUNodeReportStatus],
        budget_caps_by_node: kopf.Index[str, dict[str, float]],
        spec: kopf.Spec,
        status: kopf.Status,
        claims_by_pod: ClaimIndex | None = None,
        slices_by_pool: SliceIndex | None = None,
        deployments_by_namespace: OwnerIndex | None = None,
        statefulsets_by_namespace: OwnerIndex | None = None,
        **_: Any,
    ) -> None:
        """Remove this policy's hints and caps; its GPUs go back to their default limits, and the
        pod templates it rolled out go back to what they were."""
        kube: Kube = memo.kube
        owners = owners_of(namespace, deployments_by_namespace, statefulsets_by_namespace)
        for owner_key, owner_patch in services.release_owners(dict(status), owners, dict(spec)).items():
            if not await kube.patch_owner(namespace, owner_key, owner_patch):
                raise kopf.TemporaryError(
                    f"{namespace}/{owner_key} changed while its template was restored", delay=1
                )
        released = [p for p in pods_by_namespace.get(namespace, []) if governed_by(p, name)]
        for pod in released:
            await kube.patch_pod_annotations(pod.namespace, pod.name, dict.fromkeys(HINT_ANNOTATIONS))
        # Recompose the affected nodes' specs now rather than at the next report timer, so the
        # caps are gone by the time the finalizer lets the policy disappear.
        for node in sorted({p.node for p in released}):
            store = reports_by_node.get(node)
            pods = with_dra_gpus(pods_by_node.get(node, []), claims_by_pod, slices_by_pool)
            rules = governed(
                pods, pods_by_namespace, policies_by_namespace, decisions_by_policy, targets_by_workload
            )
            desired = node_spec(
                pods,
                next(iter(store)) if store else None,
                {k: r for k, r in rules.items() if r.policy.key != f"{namespace}/{name}"},
                budgets.lowest_caps(budget_caps_by_node.get(node, [])),
            )
            await kube.patch_report_spec(node, desired.model_dump(mode="json", exclude_none=True))
        metrics.forget_policy(namespace, name)
        logger.info("EnergyPolicy %s/%s released %d pods", namespace, name, len(released))


async def store_states(
    kube: Kube, namespace: str, policy: str, uid: str, stored: Collection[StoredState], outcome: Any
) -> dict[str, str]:
    """Write the states `services.state_writes` says changed, delete the orphans; a state that
    could not be written stays in its status row (`services.keep_embedded`). Returns those, with why."""
    writes = services.state_writes(namespace, policy, uid, stored, outcome.states)
    failed: dict[str, str] = {}
    for workload, body in writes.apply.items():
        try:
            await kube.apply_state(body, manager=STATE_MANAGER)
        except (kopf.TemporaryError, ApiException) as exc:
            failed[workload] = str(exc)
    for name in writes.delete:
        try:
            await kube.delete_state(namespace, name)
        except (kopf.TemporaryError, ApiException) as exc:
            failed[f"(orphan {name})"] = str(exc)
    services.keep_embedded(outcome, failed)
    return failed


def owners_of(
    namespace: str, deployments: OwnerIndex | None, statefulsets: OwnerIndex | None
) -> dict[str, OwnerView]:
    """The namespace's Deployments and StatefulSets by "Kind/name" (none unless rollouts are on)."""
    found: dict[str, OwnerView] = {}
    for index in (deployments, statefulsets):
        for owner in index.get(namespace, []) if index is not None else []:
            found[owner.key] = owner
    return found


def _pod_ref(pod_key: str, pods: Iterable[PodInfo]) -> dict[str, Any] | None:
    for pod in pods:
        if pod.key == pod_key:
            return {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"namespace": pod.namespace, "name": pod.name, "uid": pod.uid},
            }
    return None


def _report_spec(spec: Mapping[str, Any]) -> GPUNodeReportSpec:
    try:
        return GPUNodeReportSpec.model_validate(dict(spec))
    except ValidationError:
        return GPUNodeReportSpec()  # rewritten whole at the next patch


def _report_status(status: Mapping[str, Any]) -> GPUNodeReportStatus | None:
    try:
        return GPUNodeReportStatus.model_validate(dict(status)) if status else None
    except ValidationError:
        return None
