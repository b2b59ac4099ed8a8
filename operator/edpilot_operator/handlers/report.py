"""GPUNodeReport handler: compose each node's desired spec; renew the operator's Lease."""

from __future__ import annotations

from typing import Any

import kopf

from .apply import apply_report, prune_reports, renew_lease
from .plans import plan_report_spec
from .runtime import Runtime


async def compose_report(
    name: str,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **indexes: Any,
) -> None:
    # A coroutine: thousands of these timers run every report interval, and kopf would hand each
    # run of a plain function to its thread pool.
    runtime: Runtime = memo.runtime
    snapshot = runtime.snapshot(indexes)
    generation = int(meta.get("generation") or 0)
    written = runtime.written_specs.get(name)
    plan = plan_report_spec(snapshot, name, spec, status, generation, written, runtime.clock(), runtime.cfg)
    apply_report(plan, runtime, name, generation, patch)
    prune_reports(runtime, snapshot)
    await renew_lease(runtime)
