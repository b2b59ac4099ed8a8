"""Every write the operator makes from a plan (`handlers.plans`), and nothing else: a maintainer
finds where a decision ends (the plan) and a write begins (here). A write's failure may change what
is written next (a state that could not be stored stays in its status row; an owner that changed
since it was read gets no rollout): those follow-ups are pure functions of `services`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from .. import metrics, services
from ..kube import Kube
from ..liveness import LeaseKeeper
from .plans import BudgetPlan, PolicyPlan, ReleasePlan, ReportSweep
from .runtime import Runtime, WrittenSpec

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
    if plan.write_status:
        patch.status.update(outcome.status)
    metrics.publish_policy_status(namespace, name, outcome.status)
    for event in outcome.events:
        target = plan.event_targets.get(event.pod) if event.pod else body
        if target is not None:
            kopf.event(target, type=event.type, reason=event.reason, message=event.message)


# Writes on their way at once: each holds a worker thread, and the API client's connection pool
# holds a few more. One after another, a policy's last state waited for all the others, and that
# wait was most of the decision lag's tail at 2,000 nodes (`bench.operator_scale`).
WRITES_IN_FLIGHT = 4


async def _attempt(call: Awaitable[object]) -> str | None:
    """None once `call` succeeded, else why it did not."""
    try:
        await call
    except (kopf.TemporaryError, ApiException) as exc:
        return str(exc)
    return None


async def _attempt_all(calls: Mapping[str, Callable[[], Awaitable[object]]]) -> dict[str, str]:
    """Run `calls`, `WRITES_IN_FLIGHT` at a time; returns those that failed, with why."""
    in_flight = asyncio.Semaphore(WRITES_IN_FLIGHT)

    async def one(call: Callable[[], Awaitable[object]]) -> str | None:
        async with in_flight:
            return await _attempt(call())

    problems = await asyncio.gather(*(one(call) for call in calls.values()))
    return {key: problem for key, problem in zip(calls, problems, strict=True) if problem is not None}


async def store_states(kube: Kube, plan: PolicyPlan, namespace: str) -> dict[str, str]:
    """Write the state objects the plan says changed, then delete the orphans; a state that could
    not be written stays in its status row (`services.keep_embedded`). Returns those, with why."""
    applies = {w: partial(kube.apply_state, s, manager=STATE_MANAGER) for w, s in plan.states.apply.items()}
    deletes = {f"(orphan {o})": partial(kube.delete_state, namespace, o) for o in plan.states.delete}
    failed = await _attempt_all(applies)
    failed |= await _attempt_all(deletes)
    services.keep_embedded(plan.outcome, failed)
    return failed


async def apply_report_sweep(
    sweep: ReportSweep,
    runtime: Runtime,
    logger: Any,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Send the sweep's spec writes in its order, paced by the write budget, as many as one
    report interval allows: the rest, and a write that fails, are left to the next sweep, which
    composes them afresh (a spec composed longer ago may no longer be what its node needs)."""
    for node in sweep.forget:
        runtime.written_specs.pop(node, None)
    kube = runtime.kube
    assert kube is not None, "the startup handler sets it"
    in_flight = asyncio.Semaphore(WRITES_IN_FLIGHT)

    async def write(node: str, patch: dict[str, Any], written: WrittenSpec) -> None:
        try:
            problem = await _attempt(kube.patch_report_spec(node, patch))
        finally:
            in_flight.release()  # whatever happened: a leaked slot would stall every later sweep
        if problem is None:
            runtime.written_specs[node] = written
        else:
            logger.warning("GPUNodeReport %s: spec not written: %s", node, problem)

    sending = []
    allowed = runtime.spec_writes.per_interval(runtime.cfg.report_interval)
    for node, plan in list(sweep.writes.items())[:allowed]:
        if plan.spec_patch is None or plan.written is None:
            continue
        await sleep(runtime.spec_writes.reserve())
        await in_flight.acquire()
        sending.append(asyncio.create_task(write(node, plan.spec_patch, plan.written)))
    await asyncio.gather(*sending)


async def renew_lease(runtime: Runtime) -> None:
    # Renewed only from the report sweep, which kopf's timers start: kopf stops them while the
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
