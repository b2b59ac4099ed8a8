"""GPUNodeReport handler: compose each node's desired spec; renew the operator's Lease."""

from __future__ import annotations

from typing import Any

import kopf

from .apply import apply_report, prune_reports, renew_lease
from .plans import plan_report_spec
from .runtime import Runtime


def compose_report(
    name: str,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **indexes: Any,
) -> None:
    runtime: Runtime = memo.runtime
    snapshot = runtime.snapshot(indexes)
    version = str(meta.get("resourceVersion", ""))
    written = runtime.written_specs.get(name)
    plan = plan_report_spec(snapshot, name, spec, status, version, written, runtime.cfg)
    apply_report(plan, runtime, name, version, patch)
    prune_reports(runtime, snapshot)
    renew_lease(runtime)
