"""The watches' in-memory indexes (kopf passes each to every handler under its function's name,
and `ClusterSnapshot` reads them), so a decision reads no object with a GET. Those that
governance depends on note what they saw in the `GovernanceCache` (`Runtime.governance`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from edpilot.contract import StoredState, states_of, stored_state
from edpilot.dra import ClaimView, SliceDevice, claim_view, slice_devices
from edpilot.models import EnergyPolicySpec, GPUNodeReportSpec, GPUNodeReportStatus
from edpilot.optimizer import Config
from edpilot.rollout import OwnerView, owner_view

from .. import budgets
from ..reports import Decided, decided, state_target
from ..selection import PodInfo, PolicyEntry, PolicyRef, may_hold_gpus, pod_info
from .runtime import Runtime
from .snapshot import SeenSpec


def is_gpu_pod(spec: Mapping[str, Any], **_: Any) -> bool:
    return may_hold_gpus(spec)


def pods_by_namespace(namespace: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> dict[str, PodInfo]:
    info = pod_info(body)
    runtime: Runtime = memo.runtime
    fingerprint = (info.uid, tuple(sorted(info.labels.items())), info.excluded)
    runtime.governance.note(namespace, f"pod/{info.name}", fingerprint)
    return {namespace: info}


def pods_by_node(spec: kopf.Spec, body: kopf.Body, **_: Any) -> dict[str, PodInfo] | None:
    node = spec.get("nodeName")
    return {node: pod_info(body)} if node else None


def claims_by_pod(namespace: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> dict[str, ClaimView]:
    # Keyed by the UIDs its status reserves it for (the scheduler's), in its own namespace.
    runtime: Runtime = memo.runtime
    assert runtime.cfg.dra is not None  # registered only with DRA on
    view = claim_view(body, runtime.cfg.dra)
    return {f"{namespace}/{uid}": view for uid in view.consumers} if view.allocated else {}


def slices_by_pool(
    body: kopf.Body, memo: kopf.Memo, **_: Any
) -> dict[tuple[str, str], tuple[SliceDevice, ...]]:
    runtime: Runtime = memo.runtime
    assert runtime.cfg.dra is not None  # registered only with DRA on
    devices = slice_devices(body, runtime.cfg.dra)
    return {devices[0].key[:2]: devices} if devices else {}


def deployments_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict[str, OwnerView]:
    return {namespace: owner_view("Deployment", body)}


def statefulsets_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict[str, OwnerView]:
    return {namespace: owner_view("StatefulSet", body)}


def policy_entry(namespace: str, name: str, spec: Mapping[str, Any], meta: Mapping[str, Any]) -> PolicyEntry:
    try:
        ref: PolicyRef | None = PolicyRef(namespace, name, EnergyPolicySpec.model_validate(dict(spec)))
    except ValidationError:
        ref = None
    return PolicyEntry(ref=ref, deleting=meta.get("deletionTimestamp") is not None)


def policies_by_namespace(
    namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, memo: kopf.Memo, **_: Any
) -> dict[str, PolicyEntry]:
    entry = policy_entry(namespace, name, spec, meta)
    # Status writes (most policy events) leave uid and generation alone: no recompute.
    fingerprint = (meta.get("uid"), meta.get("generation"), entry.deleting, entry.ref is None)
    runtime: Runtime = memo.runtime
    runtime.governance.note(namespace, f"policy/{name}", fingerprint)
    return {namespace: entry}


def decisions_by_policy(namespace: str, name: str, status: kopf.Status, **_: Any) -> dict[str, Decided]:
    return {f"{namespace}/{name}": decided(namespace, status)}


def states_by_policy(
    namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any
) -> dict[str, StoredState] | None:
    owners = meta.get("ownerReferences") or []
    owner = next((str(o.get("uid", "")) for o in owners if o.get("kind") == "EnergyPolicy"), "")
    stored = stored_state(name, spec, owner)
    return {f"{namespace}/{stored.policy}": stored} if stored else None


def targets_by_workload(
    namespace: str, name: str, spec: kopf.Spec, **_: Any
) -> dict[tuple[str, str], Config] | None:
    # Only an object under the name its policy and workload give it counts (`states_of`).
    stored = stored_state(name, spec)
    if stored is None or not states_of([stored], stored.policy):
        return None
    target = state_target(stored.state)
    return {(f"{namespace}/{stored.policy}", stored.workload): target} if target else None


def reports_by_node(name: str, status: kopf.Status, **_: Any) -> dict[str, GPUNodeReportStatus] | None:
    try:
        return {name: GPUNodeReportStatus.model_validate(dict(status))} if status else None
    except ValidationError:
        return None  # a malformed report gives no observation; the policy reports the node as silent


def report_specs(name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any) -> dict[str, SeenSpec]:
    """Every report's spec, which the report sweep compares with the spec it wants."""
    try:
        seen = GPUNodeReportSpec.model_validate(dict(spec))
    except ValidationError:
        seen = GPUNodeReportSpec()  # rewritten whole at the next write
    return {name: SeenSpec(int(meta.get("generation") or 0), seen)}


def probe_points_by_policy_gpu(
    namespace: str, spec: kopf.Spec, **_: Any
) -> dict[tuple[str, str], tuple[budgets.ProbePoint, ...]]:
    # Keyed by policy too: a state names any GPU UUID it likes, but only the policy that governs a
    # GPU's pod shapes that GPU's curve.
    policy, state = spec.get("policy"), spec.get("state")
    if not isinstance(policy, str) or not isinstance(state, Mapping):
        return {}
    return {(f"{namespace}/{policy}", uuid): p for uuid, p in budgets.probe_points([state]).items()}


def budget_caps_by_node(status: kopf.Status, **_: Any) -> dict[str, dict[str, float]]:
    return budgets.caps_by_node(status)
