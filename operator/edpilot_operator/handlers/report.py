"""The report sweep: every node's GPUNodeReport spec composed in one pass, and the operator's Lease
renewed, at most once per report interval.

The policy and budget timers run it (`sweep_reports`), not a timer per report: kopf puts its
finalizer on every object a timer runs on (2,000 patches when an operator first meets a fleet,
and a report no one could delete once the operator is gone) and runs each timer as a task of its
own (400 runs a second at 2,000 nodes and a 5 s interval). kopf stops those timers while peering
pauses a replica and when the operator stops, so a paused or stopped replica neither writes a spec
nor renews the Lease. With no policy and no budget there is nothing to enforce: no spec is written,
the Lease runs out, and every agent keeps its GPUs at their defaults."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .apply import apply_report_sweep, renew_lease
from .plans import plan_report_sweep
from .runtime import Runtime


async def sweep_reports(runtime: Runtime, indexes: Mapping[str, Any], logger: Any) -> None:
    now = runtime.clock()
    if not runtime.sweep_due(now):
        return
    sweep = plan_report_sweep(runtime.snapshot(indexes), runtime.written_specs, now, runtime.cfg)
    await apply_report_sweep(sweep, runtime, logger)
    await renew_lease(runtime)
