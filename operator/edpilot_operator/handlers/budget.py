"""PowerBudget handlers."""

from __future__ import annotations

from typing import Any

import kopf

from .. import metrics
from .apply import apply_budget
from .plans import plan_budget
from .report import sweep_reports
from .runtime import Runtime


async def reconcile_budget(
    name: str,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **indexes: Any,
) -> None:
    runtime: Runtime = memo.runtime
    labels = await runtime.node_labels()
    plan = plan_budget(runtime.snapshot(indexes), name, spec, status, meta, labels, runtime.clock())
    if plan is not None:
        apply_budget(plan, name, patch, logger)
    sweep_reports(runtime, indexes, logger)


def forget_budget(name: str, **_: Any) -> None:
    metrics.forget_budget(name)
