"""EnergyPolicy handlers: each reads a snapshot, calls a planner, applies the plan."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from .. import metrics
from ..kube import Kube
from .apply import apply_policy, apply_release
from .plans import plan_policy, plan_release, policy_view
from .report import sweep_reports
from .runtime import Runtime


def _kube(runtime: Runtime) -> Kube:
    assert runtime.kube is not None, "the startup handler sets it"
    return runtime.kube


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
    **indexes: Any,
) -> None:
    runtime: Runtime = memo.runtime
    view = policy_view(runtime.snapshot(indexes), namespace, name, spec, status, meta, runtime.held)
    # The optimizer is CPU work: off the event loop, so watches and lease renewals go on.
    plan = await asyncio.to_thread(plan_policy, view, runtime.clock(), runtime.cfg.tuning)
    if plan is not None:
        runtime.held.remember(view.stored, plan.outcome.states, plan.states)
        await apply_policy(plan, _kube(runtime), namespace, name, patch, body, logger)
    sweep_reports(runtime, indexes, logger)


async def release_policy(
    namespace: str,
    name: str,
    spec: kopf.Spec,
    status: kopf.Status,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **indexes: Any,
) -> None:
    """Remove this policy's hints and caps; its GPUs go back to their default limits, and the pod
    templates it rolled out go back to what they were."""
    runtime: Runtime = memo.runtime
    plan = plan_release(runtime.snapshot(indexes), namespace, name, spec, status, runtime.cfg)
    await apply_release(plan, _kube(runtime), namespace)
    metrics.forget_policy(namespace, name)
    logger.info("EnergyPolicy %s/%s released %d pods", namespace, name, len(plan.pod_annotations))
