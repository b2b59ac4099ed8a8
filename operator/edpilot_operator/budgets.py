"""One PowerBudget's reconcile: the GPUs of its nodes and the curves the optimizers measured on them
go through `edpilot.budget.allocate`; what comes back is the budget's status. Pure.

The status's `allocations` bound the caps `reports.desired_spec` asks each agent for (the lower of
the policy's cap and the budget's), so the sum of power limits stays within `maxWatts`. A GPU is
steered when the pod on it is governed (as the operator computes it, never as its annotations
claim) by a live EnergyPolicy whose power cap is Auto. With `scope: AllGPUs` every other busy GPU
of the budget's nodes is steered too, within `UNMANAGED_CAP`'s bounds and never above what its own
policy leaves it at. Every GPU not steered is counted at what it will hold: busy, the larger of its
enforced limit and the limit the operator leaves it at (its default unless a Fixed policy says
less), so a pod that opts out after it was placed still consumes the budget; idle, its draw. A GPU
that no pod holds alone (shared or partitioned, `edpilot.sharing`) is never steered, whatever the
scope, and counts at the larger of its enforced and default limits.

Three things keep the sum within the budget while caps move, not only once they have moved:
- idle GPUs are reserved at their draw plus `IDLE_RESERVE_FRACTION`: the power gauge is noisy and
  an idle GPU's draw rises as soon as a process opens it, and edpilot cannot cap an idle GPU;
- a cap only rises into watts no GPU commits now; GPUs that must come down do so first, and the
  ones waiting get their rise at the next reconcile, once the others' lower limits are reported;
- the caps stay where they are while they still fit and the new allocation would move less than
  `HYSTERESIS_FRACTION` of the budget in all (at least `HYSTERESIS_MIN_WATTS`): it is not worth
  rewriting node specs at every reconcile for that. What is reserved for idle GPUs stays put while
  their draws move within gauge noise, so that noise moves neither the caps nor the watts to share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final

from pydantic import ValidationError

from edpilot.budget import (
    PRIOR_EXPONENT,
    Allocation,
    Curve,
    GpuDemand,
    allocate,
    budget_status,
    throughput_at,
)
from edpilot.contract import cap_bounds
from edpilot.dra import DraHoldings
from edpilot.models import (
    BudgetAllocation,
    GPUNodeReportStatus,
    GPUStatus,
    PowerBudgetSpec,
    PowerBudgetStatus,
    PowerCapSpec,
)
from edpilot.optimizer import Config, load_state
from edpilot.placement import compute_bound_curve
from edpilot.sharing import NO_DRA

from .reports import gpu_exclusivity, known_limits, member_info, planned_cap
from .selection import Governed, PodInfo

IDLE_RESERVE_FRACTION: Final = 0.10
# The bounds a budget of scope AllGPUs gives a busy GPU that no Auto policy steers: 50-100% of its
# default limit, as if a policy with the default powerCap governed it (what the extender assumes).
UNMANAGED_CAP: Final = PowerCapSpec()
HYSTERESIS_FRACTION: Final = 0.01
HYSTERESIS_MIN_WATTS: Final = 10.0
# A GPU drawing less than this share of its cap runs as it would under a cap at its draw: one more
# point of its curve for free. Closer to the cap, the draw is the cap at work.
DRAW_BELOW_CAP: Final = 0.97
# Spacing of the points a fitted curve is drawn with.
CURVE_STEP_WATTS: Final = 20.0
# How far a measurement counts in the fit at another cap (Gaussian width): wide enough to average
# the search's closely spaced probes, narrow enough to follow the curve's knee.
FIT_BANDWIDTH_WATTS: Final = 100.0


@dataclass(frozen=True)
class ProbePoint:
    """One configuration the optimizer measured on one GPU."""

    cap_watts: float | None  # None: the GPU's baseline cap (its default limit within the policy's bounds)
    draw_watts: float | None  # what the GPU drew meanwhile
    units_per_second: float  # the whole workload's: curves are compared relative to their own top


def probe_points(states: Iterable[Mapping[str, Any]]) -> dict[str, tuple[ProbePoint, ...]]:
    """GPU UUID -> the points the optimizer measured for the configuration its workload runs now
    (probes of another batch size or quantization are another curve), from stored optimizer states
    (the `spec.state` of WorkloadOptimizerState objects)."""
    points: dict[str, tuple[ProbePoint, ...]] = {}
    for stored in states:
        if not stored:
            continue
        try:
            state = load_state(stored)
        except ValueError:  # unreadable, or written by a newer optimizer (StateTooNew)
            continue  # the policy reconciler reports unreadable state; no curve meanwhile
        running = (state.target.quantization, state.target.batchSize)
        measured = [
            p
            for p in (state.baseline, *state.probes)
            if p is not None
            and p.metrics is not None
            and p.metrics.unitsPerSecond > 0
            and (p.config.quantization, p.config.batchSize) == running
        ]
        members = sorted({m for p in measured if p.metrics is not None for m in p.metrics.wattsByMember})
        for member in members:
            points[member] = tuple(
                ProbePoint(
                    cap_watts=p.config.memberCaps.get(member, p.config.capWatts),
                    draw_watts=p.metrics.wattsByMember.get(member),
                    units_per_second=p.metrics.unitsPerSecond,
                )
                for p in measured
                if p.metrics is not None
            )
    return points


def gpu_curve(points: Iterable[ProbePoint], baseline_cap: float, floor: float, shape: Curve = ()) -> Curve:
    """(cap, units/s) of one GPU: what was measured, smoothed, drawn down to `floor`.

    Its draw counts as its cap where it drew well below the cap. The curve is fitted, not interpolated:
    the search's last probes sit a few watts apart, where measurement noise alone makes the slopes
    between neighbours anything, and water-filling follows slopes. At each cap it is
    units/s = scale * shape(cap)^k, least squares in log-log over the points near it (weighted by
    distance, `FIT_BANDWIDTH_WATTS`).

    `shape` is the GPU's compute-bound curve (`placement.compute_bound_curve`): k then
    says how strongly this workload follows it (about 1 compute-bound, about 0 memory-bound), and
    the model's knee carries the curve across gaps between probes and below the lowest one. A
    power law cannot bend there, so a GPU whose probes stop above the knee would look cheaper to cut
    than one that measured it, and would be starved. Without a model curve, shape(cap) is the cap
    (a local power law) and below the lowest probe the exponent is the fitted one or the prior's,
    whichever is steeper: concave, so GPUs with similar work share a cut."""
    measured: list[tuple[float, float]] = []
    for p in points:
        cap = p.cap_watts if p.cap_watts is not None else baseline_cap
        if p.draw_watts is not None and 0 < p.draw_watts < DRAW_BELOW_CAP * cap:
            cap = p.draw_watts  # the caps above it are the flat end of the curve, no slope evidence
        measured.append((cap, p.units_per_second))
    usable = [(c, u) for c, u in measured if c > 0 and u > 0 and math.isfinite(c) and math.isfinite(u)]
    if not usable:
        return ()

    def along(cap: float) -> float:
        return throughput_at(shape, cap) if shape else cap

    prior = 1.0 if shape else PRIOR_EXPONENT
    logged = [(c, math.log(along(c)), math.log(u)) for c, u in usable]
    lowest, highest = min(c for c, _ in usable), max(c for c, _ in usable)
    curve = []
    for c in _grid(lowest, highest):
        k, log_scale = _log_log_fit(logged, c, prior)
        curve.append((c, math.exp(log_scale) * along(c) ** k))
    k, log_scale = _log_log_fit(logged, lowest, prior)
    below = k if shape else max(k, PRIOR_EXPONENT)
    at_lowest = math.exp(log_scale) * along(lowest) ** k
    curve += [
        (c, at_lowest * (along(c) / along(lowest)) ** below) for c in _grid(floor, lowest) if c < lowest
    ]
    return tuple(sorted(curve))


def _log_log_fit(
    points: Sequence[tuple[float, float, float]], at: float, prior: float
) -> tuple[float, float]:
    """(k, log scale) of log units/s = log scale + k * x over (cap, x, log units/s) points, weighted
    by their distance in watts from `at`, k within [0, 1]; with one cap measured, the prior's k."""
    ws = [math.exp(-(((c - at) / FIT_BANDWIDTH_WATTS) ** 2)) + 1e-6 for c, _, _ in points]
    xs = [x for _, x, _ in points]
    ys = [y for _, _, y in points]
    total = sum(ws)
    mean_x = sum(w * x for w, x in zip(ws, xs, strict=True)) / total
    mean_y = sum(w * y for w, y in zip(ws, ys, strict=True)) / total
    spread = sum(w * (x - mean_x) ** 2 for w, x in zip(ws, xs, strict=True))
    if spread < 1e-9 * total:
        k = prior
    else:
        k = sum(w * (x - mean_x) * (y - mean_y) for w, x, y in zip(ws, xs, ys, strict=True)) / spread
        k = min(1.0, max(0.0, k))
    return k, mean_y - k * mean_x


def _grid(start: float, stop: float) -> list[float]:
    if stop <= start:
        return [stop]
    n = math.ceil((stop - start) / CURVE_STEP_WATTS)
    return [start + (stop - start) * i / n for i in range(n + 1)]


def selected_nodes(spec: PowerBudgetSpec, node_labels: Mapping[str, Mapping[str, str]]) -> list[str]:
    return sorted(node for node, labels in node_labels.items() if spec.nodeSelector.matches(dict(labels)))


def caps_by_node(budget_status_body: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Node -> {GPU UUID: watts} of one budget's stored allocations (what the report composer reads)."""
    by_node: dict[str, dict[str, float]] = {}
    for entry in budget_status_body.get("allocations") or []:
        try:
            allocation = BudgetAllocation.model_validate(entry)
        except ValidationError:
            continue
        by_node.setdefault(allocation.node, {})[allocation.gpuUUID] = allocation.watts
    return by_node


def lowest_caps(per_budget: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """A GPU that several budgets select gets the lowest of their allocations."""
    lowest: dict[str, float] = {}
    for caps in per_budget:
        for uuid, watts in caps.items():
            lowest[uuid] = min(watts, lowest.get(uuid, math.inf))
    return lowest


def gpu_demand(
    gpu: GPUStatus,
    pods: Mapping[str, PodInfo],
    governed: Mapping[str, Governed],
    curves: Mapping[tuple[str, str], Sequence[ProbePoint]],
    all_gpus: bool = False,
    dra: DraHoldings = NO_DRA,
) -> GpuDemand | None:
    """The GPU as the allocation sees it, or None when the budget does not steer it. `curves` are
    the probe points by (policy key, GPU UUID): only the governing policy's own measurements shape
    its GPU's curve, never another namespace's status."""
    if not known_limits(gpu):
        return None  # unknown constraints: its limit is left alone, like the optimizer does
    if gpu_exclusivity(gpu, dra).holder is None:
        return None  # shared, partitioned or idle: never capped
    for pod_key in gpu.pods:
        pod = pods.get(pod_key)
        if pod is None or pod.deleting:
            continue
        rule = governed.get(pod_key)
        if rule is not None and rule.policy.spec.powerCap.mode == "Auto":
            return _steered(gpu, pod_key, rule, curves.get((rule.policy.key, gpu.uuid), ()))
        if all_gpus:
            return _unmanaged(gpu, pod_key, rule)
    return None


def _steered(gpu: GPUStatus, pod_key: str, rule: Governed, points: Sequence[ProbePoint]) -> GpuDemand | None:
    power_cap = rule.policy.spec.powerCap
    bounds = cap_bounds(power_cap, member_info(gpu, pod_key))
    if isinstance(bounds, str):
        return None
    # The optimizer's choice is the most the GPU needs; the budget only ever takes from it.
    chosen = planned_cap(power_cap, rule.target, gpu, pod_key)
    hi = bounds.hi if chosen is None else min(bounds.hi, max(bounds.lo, chosen))
    return GpuDemand(
        uuid=gpu.uuid,
        lo=bounds.lo,
        hi=hi,
        curve=gpu_curve(
            points,
            bounds.baseline,
            bounds.lo,
            compute_bound_curve(gpu.model, gpu.minLimitWatts, gpu.maxLimitWatts),
        ),
        max_slowdown_percent=rule.policy.spec.maxSlowdownPercent,
        reference_cap=bounds.baseline,
    )


def _unmanaged(gpu: GPUStatus, pod_key: str, rule: Governed | None) -> GpuDemand | None:
    bounds = cap_bounds(UNMANAGED_CAP, member_info(gpu, pod_key))
    if isinstance(bounds, str):
        return None
    hi = min(bounds.hi, _left_at(gpu, pod_key, rule))
    return GpuDemand(uuid=gpu.uuid, lo=min(bounds.lo, hi), hi=hi, reference_cap=hi)


def _left_at(gpu: GPUStatus, pod_key: str, rule: Governed | None) -> float:
    """The limit the operator leaves a GPU at when no budget steers it: its Fixed or Off policy's
    cap, or the default limit."""
    fixed = planned_cap(rule.policy.spec.powerCap, Config(), gpu, pod_key) if rule is not None else None
    return gpu.defaultLimitWatts if fixed is None else fixed


def _holds(
    gpu: GPUStatus, pods: Mapping[str, PodInfo], governed: Mapping[str, Governed], dra: DraHoldings
) -> float:
    """What a GPU the budget does not steer holds against it: busy, the larger of its enforced
    limit and the limit it will be left at; idle, its draw (edpilot cannot cap an idle GPU)."""
    holders = [p for p in gpu.pods if p in pods and not pods[p].deleting] or list(gpu.pods)
    if gpu_exclusivity(gpu, dra).shared:
        return max(gpu.enforcedLimitWatts, gpu.defaultLimitWatts)  # no policy's cap applies
    if not holders:
        return gpu.powerWatts
    left = max(_left_at(gpu, p, governed.get(p)) for p in holders)
    return max(gpu.enforcedLimitWatts, left)


def reconcile_budget(
    *,
    spec: PowerBudgetSpec,
    generation: int | None,
    previous: PowerBudgetStatus | None,
    node_labels: Mapping[str, Mapping[str, str]],
    reports: Mapping[str, GPUNodeReportStatus],
    pods: Mapping[str, PodInfo],
    governed: Mapping[str, Governed],
    curves: Mapping[tuple[str, str], Sequence[ProbePoint]],
    now: datetime,
    dra: DraHoldings = NO_DRA,
) -> PowerBudgetStatus:
    """The budget's next status. `node_labels` covers every node; `reports` and `pods` (by
    "namespace/name") at least those of the selected nodes; `governed` maps pod keys to how the
    operator governs them; `curves` are `probe_points` by (policy key, GPU UUID); `dra` what DRA
    allocated on the selected nodes."""
    nodes = selected_nodes(spec, node_labels)
    gpus: list[GPUStatus] = []
    node_of: dict[str, str] = {}
    for node in nodes:
        report = reports.get(node)
        for gpu in report.gpus if report is not None else ():
            gpus.append(gpu)
            node_of[gpu.uuid] = node

    demands: list[GpuDemand] = []
    others: list[GPUStatus] = []
    for gpu in gpus:
        demand = gpu_demand(gpu, pods, governed, curves, all_gpus=spec.scope == "AllGPUs", dra=dra)
        if demand is None:
            others.append(gpu)
        else:
            demands.append(demand)
    idle_draw = sum(g.powerWatts for g in others if not g.pods)
    held = sum(_holds(g, pods, governed, dra) for g in others)
    reserved = _steady_reserve(held + IDLE_RESERVE_FRACTION * idle_draw, previous, idle_draw)

    allocation: Allocation | None = None
    if demands:
        target = allocate(demands, spec.maxWatts, reserved)
        kept = previous.allocations if previous is not None else []
        tolerance = max(HYSTERESIS_MIN_WATTS, HYSTERESIS_FRACTION * spec.maxWatts)
        previous_caps = {a.gpuUUID: a.watts for a in kept}
        caps = _steady(target.caps, previous_caps, demands, target.available_watts, tolerance)
        enforced = {g.uuid: g.enforcedLimitWatts for g in gpus}
        caps = _rises_within_free_watts(caps, enforced, demands, target.available_watts)
        allocation = replace(target, caps=caps)

    status = budget_status(spec, generation, nodes, gpus, allocation, reserved, previous, now)
    status.allocations = [
        BudgetAllocation(node=node_of[uuid], gpuUUID=uuid, watts=watts)
        for uuid, watts in sorted((allocation.caps if allocation is not None else {}).items())
    ]
    return status


def _steady_reserve(reserved: float, previous: PowerBudgetStatus | None, idle_draw: float) -> float:
    """The previous reconcile's reserve while the new one is within half the idle GPUs' margin of
    it. The idle GPUs' gauge noise would otherwise move the watts left to share at every reconcile:
    the caps would follow it, or, held by the hysteresis, leave watts unshared (at a curve's knee
    10 W buy 2% of a GPU's throughput). Half the margin is still kept in the worst case."""
    if previous is None or not previous.allocations:
        return reserved
    before = previous.allocatedWatts - sum(a.watts for a in previous.allocations)
    return before if abs(reserved - before) <= IDLE_RESERVE_FRACTION / 2 * idle_draw else reserved


def _steady(
    target: Mapping[str, float],
    previous: Mapping[str, float],
    demands: Sequence[GpuDemand],
    available: float,
    tolerance: float,
) -> dict[str, float]:
    """The previous caps when they cover the same GPUs within their bounds, fit the budget, and the
    target moves less than `tolerance` watts in all; otherwise the target."""
    if set(previous) != set(target) or not all(g.lo <= previous[g.uuid] <= g.hi for g in demands):
        return dict(target)
    moved = sum(abs(previous[u] - c) for u, c in target.items())
    fits = sum(previous.values()) <= available + 1e-9
    return dict(previous) if fits and moved <= tolerance else dict(target)


def _rises_within_free_watts(
    caps: Mapping[str, float],
    enforced: Mapping[str, float],
    demands: Sequence[GpuDemand],
    available: float,
) -> dict[str, float]:
    """Caps that rise above what the GPU enforces now get only the watts no governed GPU commits
    now (shared in proportion to the rises): whichever node applies its spec first, the sum of the
    limits never passes the budget on the way."""
    rises = {u: c - enforced[u] for u, c in caps.items() if u in enforced and c > enforced[u]}
    free = available - sum(enforced.get(g.uuid, caps[g.uuid]) for g in demands)
    wanted = sum(rises.values())
    if not rises or wanted <= free:
        return dict(caps)
    share = max(free, 0.0) / wanted
    lo = {g.uuid: g.lo for g in demands}
    return {
        u: max(lo[u], float(math.floor(enforced[u] + rises[u] * share))) if u in rises else c
        for u, c in caps.items()
    }
