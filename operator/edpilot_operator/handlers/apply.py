"""Every write the operator makes from a plan (`handlers.plans`), and nothing else: a maintainer
finds where a decision ends (the plan) and a write begins (here). A write's failure may change what
is written next (a state that could not be stored stays in its status row; an owner that changed
since it was read gets no rollout): those follow-ups are pure functions of `services`."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from .. import metrics, services
from ..kube import Kube
from ..liveness import LeaseKeeper
from .plans import BudgetPlan, PolicyPlan, ReleasePlan, ReportSweep
from .runtime import Runtime

STATE_MANAGER = "edpilot-operator"  # the field manager of state objects (server-side apply)


async def apply_policy(
    plan: PolicyPlan, kube: Kube, namespace: str, name: str, patch: kopf.Patch, body: Any, logger: Any
) -> None:
    outcome = plan.outcome
    if plan.rejected:
        patch.status.update(outcome.status)
        logger.error("EnergyPolicy %s/%s: spec rejected by edpilot: %s", namespace, name, plan.rejected)
        return
    for workload, problem in (await store_states(kube, plan, namespace)).items():
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
        target = plan.event_targets.get(event.pod) if event.pod else body
        if target is not None:
            kopf.event(target, type=event.type, reason=event.reason, message=event.message)


async def store_states(kube: Kube, plan: PolicyPlan, namespace: str) -> dict[str, str]:
    """Write the state objects the plan says changed, delete the orphans; a state that could not
    be written stays in its status row (`services.keep_embedded`). Returns those, with why."""
    failed: dict[str, str] = {}
    for workload, state in plan.states.apply.items():
        try:
            await kube.apply_state(state, manager=STATE_MANAGER)
        except (kopf.TemporaryError, ApiException) as exc:
            failed[workload] = str(exc)
    for orphan in plan.states.delete:
        try:
            await kube.delete_state(namespace, orphan)
        except (kopf.TemporaryError, ApiException) as exc:
            failed[f"(orphan {orphan})"] = str(exc)
    services.keep_embedded(plan.outcome, failed)
    return failed


async def apply_report_sweep(sweep: ReportSweep, runtime: Runtime, logger: Any) -> None:
    """Send the sweep's spec writes within the write budget; a write over it, or one that fails,
    is left to the next sweep, which composes it again."""
    for node in sweep.forget:
        runtime.written_specs.pop(node, None)
    assert runtime.kube is not None, "the startup handler sets it"
    for node, plan in sweep.writes.items():
        if plan.spec_patch is None or plan.written is None:
            continue
        if not runtime.spec_writes.take():
            return
        try:
            await runtime.kube.patch_report_spec(node, plan.spec_patch)
        except (kopf.TemporaryError, ApiException) as exc:
            logger.warning("GPUNodeReport %s: spec not written: %s", node, exc)
            continue
        runtime.written_specs[node] = plan.written


async def renew_lease(runtime: Runtime) -> None:
    # Renewed only from the report sweep, which kopf's timers run: kopf stops them while the
    # replica is paused or stopping. The write blocks, so it runs in a thread.
    keeper: LeaseKeeper | None = runtime.lease_keeper
    now = runtime.clock()
    if keeper is not None and keeper.due():
        await asyncio.to_thread(keeper.renew_if_due, now)


async def apply_release(plan: ReleasePlan, kube: Kube, namespace: str) -> None:
    for owner_key, owner_patch in plan.owner_patches.items():
        if not await kube.patch_owner(namespace, owner_key, owner_patch):
            raise kopf.TemporaryError(
                f"{namespace}/{owner_key} changed while its template was restored", delay=1
            )
    for pod_key, hints in plan.pod_annotations.items():
        pod_ns, pod_name = pod_key.split("/", 1)
        await kube.patch_pod_annotations(pod_ns, pod_name, hints)
    for node, spec in plan.report_specs.items():
        await kube.patch_report_spec(node, spec)


def apply_budget(plan: BudgetPlan, name: str, patch: kopf.Patch, logger: Any) -> None:
    if plan.rejected:
        logger.error("PowerBudget %s: spec rejected by edpilot: %s", name, plan.rejected)
        return
    if plan.changed:
        logger.info("PowerBudget %s: %s", name, plan.changed)
    patch.status.update(plan.status)
    metrics.publish_budget_status(name, plan.max_watts, plan.status)
