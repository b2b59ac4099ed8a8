"""The report sweep: every node's GPUNodeReport spec composed in one pass, and the operator's Lease
renewed, at most once per report interval.

The policy and budget timers start it (`sweep_reports`), not a timer per report: kopf puts its
finalizer on every object a timer runs on (2,000 patches when an operator first meets a fleet,
and a report no one could delete once the operator is gone) and runs each timer as a task of its
own (400 runs a second at 2,000 nodes and a 5 s interval). kopf stops those timers while peering
pauses a replica and when the operator stops, so a paused or stopped replica starts no sweep (one
under way finishes): it neither writes a spec nor renews the Lease. With no policy and no budget
there is nothing to enforce: no spec is written, the Lease runs out, and every agent keeps its
GPUs at their defaults."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .apply import apply_report_sweep, renew_lease
from .plans import plan_report_sweep
from .runtime import Runtime
from .snapshot import ClusterSnapshot


def sweep_reports(runtime: Runtime, indexes: Mapping[str, Any], logger: Any) -> None:
    """Start the sweep when it is due and none runs. It runs beside the timer that started it: a
    policy's status is written when its timer returns, and would otherwise wait for every spec
    write of the sweep."""
    now = runtime.clock()
    if runtime.sweeping is not None and not runtime.sweeping.done():
        return
    if runtime.sweep_due(now):
        runtime.sweeping = asyncio.create_task(_sweep(runtime, runtime.snapshot(indexes), now, logger))


async def _sweep(runtime: Runtime, snapshot: ClusterSnapshot, now: datetime, logger: Any) -> None:
    try:
        sweep = plan_report_sweep(snapshot, runtime.written_specs, now, runtime.cfg)
        await apply_report_sweep(sweep, runtime, logger)
        await renew_lease(runtime)
    except Exception:  # a bug here must not end the sweeps: the next timer starts the next one
        logger.exception("the report sweep failed")
