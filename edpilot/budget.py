"""Power budgets: share a PowerBudget's watts among its GPUs where they buy the most work. Pure.

Each GPU that holds a pod edpilot governs comes with a throughput curve over its power limit
(the optimizer's probes: a few (cap, units/s) points, or a concave prior when nothing was
measured) and bounds [lo, hi] (the GPU's constraints within its policy's). GPUs edpilot cannot
cap (idle ones, pods no policy governs) hold `reserved_watts` (see `edpilot.placement` for the
accounting). Allocation is water-filling: every GPU starts at its floor and each further watt goes
to the GPU whose curve rises most there. On concave piecewise-linear curves this greedy is optimal
(the fractional knapsack), so curves are replaced by their upper concave hull over [lo, hi] first;
on measured curves that are not concave, at most one GPU ends inside a bridged stretch.

A policy's `maxSlowdownPercent` is a floor too: every GPU first gets the cap that keeps it within
its slowdown (against its throughput at `hi`), when the budget affords all such floors; otherwise
the allocation falls back to the policy bounds and says which GPUs run slower than allowed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from edpilot.contract import committed_watts, transition
from edpilot.models import Condition, GPUStatus, PowerBudgetSpec, PowerBudgetStatus

Curve = tuple[tuple[float, float], ...]  # (cap watts, units per second), caps ascending

# With nothing measured, throughput ~ sqrt(cap): power grows faster than the clock it buys, so
# the first watts buy the most work. Sampled at these fractions of `hi`.
PRIOR_EXPONENT: Final = 0.5
_PRIOR_FRACTIONS: Final = (0.25, 0.5, 0.75, 1.0)

CONDITION_FEASIBLE: Final = "Feasible"
CONDITION_WITHIN_BUDGET: Final = "WithinBudget"
CONDITION_SLOWDOWN: Final = "SlowdownRespected"
_MAX_NAMED: Final = 5  # GPUs named in a condition message before "and N more"


@dataclass(frozen=True)
class GpuDemand:
    """One governed GPU as the allocation sees it."""

    uuid: str
    lo: float
    hi: float
    curve: Curve = ()
    max_slowdown_percent: float | None = None
    reference_cap: float | None = (
        None  # the baseline's cap (default limit) slowdown is measured against; hi if None
    )


@dataclass(frozen=True)
class Allocation:
    caps: Mapping[str, float]  # GPU UUID -> power limit, whole watts
    feasible: bool  # the floors fit in the budget
    needed_watts: float  # what the floors need, reserved watts included
    available_watts: float  # maxWatts minus the reserved watts
    slowdown_exceeded: tuple[str, ...] = ()  # GPUs capped below what their policy's slowdown allows
    relative_throughput: Mapping[str, float] = field(default_factory=dict)  # expected, 1.0 = at hi

    @property
    def allocated_watts(self) -> float:
        return sum(self.caps.values())


# ---------------------------------------------------------------- curves


def prior_curve(hi: float) -> Curve:
    return tuple((hi * f, f**PRIOR_EXPONENT) for f in _PRIOR_FRACTIONS)


def concave_hull(points: Sequence[tuple[float, float]]) -> Curve:
    """The least concave majorant of the points, flat after the throughput peak (a higher cap
    cannot lower throughput, nor is it assumed to raise it)."""
    clean = sorted((c, t) for c, t in points if math.isfinite(c) and math.isfinite(t) and c > 0 and t >= 0)
    if not clean:
        return ()
    peak = max(t for _, t in clean)
    upto = next(i for i, (_, t) in enumerate(clean) if t == peak)
    hull: list[tuple[float, float]] = []
    for point in clean[: upto + 1]:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) >= 0:
            hull.pop()
        hull.append(point)
    return tuple(hull)


def domain_curve(points: Sequence[tuple[float, float]], lo: float, hi: float) -> Curve:
    """The concave majorant of the measured curve over [lo, hi] only. Every GPU gets at least lo
    anyway, so a convex stretch below the first point that pays (low caps starve the clock) is
    bridged from lo, not from zero: a GPU then either stays at lo or gets the whole stretch."""
    raw = _monotone(points)
    inner = [(c, t) for c, t in raw if lo < c < hi]
    return concave_hull([(lo, throughput_at(raw, lo)), *inner, (hi, throughput_at(raw, hi))])


def _monotone(points: Sequence[tuple[float, float]]) -> Curve:
    """The points in cap order with throughput made non-decreasing (later dips are noise)."""
    clean = sorted((c, t) for c, t in points if math.isfinite(c) and math.isfinite(t) and c > 0 and t >= 0)
    out: list[tuple[float, float]] = []
    for c, t in clean:
        if not out or t > out[-1][1]:
            out.append((c, t))
    return tuple(out)


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def throughput_at(curve: Curve, cap: float) -> float:
    """Piecewise-linear through the curve's points, proportional to the cap below the first one,
    flat after the last one."""
    if not curve:
        return 0.0
    prev_c, prev_t = 0.0, 0.0
    for c, t in curve:
        if cap <= c:
            return prev_t + (t - prev_t) * (cap - prev_c) / (c - prev_c) if c > prev_c else t
        prev_c, prev_t = c, t
    return prev_t


def cap_for_throughput(curve: Curve, target: float, lo: float, hi: float) -> float:
    """The lowest cap in [lo, hi] whose throughput reaches `target` (hi when none does)."""
    if throughput_at(curve, lo) >= target:
        return lo
    prev_c, prev_t = 0.0, 0.0
    for c, t in curve:
        if t >= target and t > prev_t:
            cap = prev_c + (c - prev_c) * (target - prev_t) / (t - prev_t)
            return min(hi, max(lo, cap))
        prev_c, prev_t = c, t
    return hi


def _segments(curve: Curve, start: float, stop: float) -> list[tuple[float, float]]:
    """(slope, watts) pieces of the curve between start and stop; on a concave curve the slopes
    do not increase, and past the last point they are 0."""
    cuts = sorted({start, stop, *(c for c, _ in curve if start < c < stop)})
    return [
        ((throughput_at(curve, b) - throughput_at(curve, a)) / (b - a), b - a)
        for a, b in itertools.pairwise(cuts)
    ]


# ---------------------------------------------------------------- allocation


def _normalised(gpu: GpuDemand) -> Curve:
    """The GPU's hull scaled so that throughput at its reference cap is 1: a unit of one workload's
    work is not worth a unit of another's, but a fraction of its own full speed is comparable."""
    reference = gpu.reference_cap or gpu.hi
    measured = _monotone(gpu.curve)
    if throughput_at(measured, reference) <= 0:
        measured = prior_curve(reference)
    top = throughput_at(measured, reference)
    hull = domain_curve(measured, gpu.lo, max(gpu.hi, reference))
    return tuple((c, t / top) for c, t in hull)


def allocate(gpus: Sequence[GpuDemand], max_watts: float, reserved_watts: float = 0.0) -> Allocation:
    """Caps for the governed GPUs whose sum stays within `max_watts - reserved_watts`, maximising
    the sum of their relative throughputs. When even the floors do not fit, every GPU gets its
    floor (`lo`) and the allocation is marked infeasible: the operator applies the lowest caps and
    says so; it never goes below a policy's bounds."""
    for g in gpus:
        if not (0 < g.lo <= g.hi):
            raise ValueError(f"GPU {g.uuid}: bounds [{g.lo}, {g.hi}] W are not 0 < lo <= hi")
    available = max_watts - reserved_watts
    curves = {g.uuid: _normalised(g) for g in gpus}
    floors = {g.uuid: g.lo for g in gpus}
    needed = sum(floors.values())

    if needed > available:
        caps, feasible = dict(floors), False
    elif sum(g.hi for g in gpus) <= available:
        caps, feasible = {g.uuid: g.hi for g in gpus}, True
    else:
        caps, feasible = _water_fill(gpus, curves, available), True

    # Whole watts, rounded down so the sum stays within the budget, never below a floor.
    whole = {u: max(floors[u], float(math.floor(c + 1e-9))) for u, c in caps.items()}
    relative = {u: throughput_at(curves[u], c) for u, c in whole.items()}
    exceeded = tuple(g.uuid for g in gpus if relative[g.uuid] < _slowdown_floor(g) - 1e-6)
    return Allocation(whole, feasible, needed + reserved_watts, available, exceeded, relative)


def _slowdown_floor(gpu: GpuDemand) -> float:
    """The relative throughput the GPU's policy allows it to fall to (0: no limit)."""
    return 0.0 if gpu.max_slowdown_percent is None else 1.0 - gpu.max_slowdown_percent / 100.0


def _slowdown_cap(gpu: GpuDemand, curve: Curve) -> float:
    return cap_for_throughput(curve, _slowdown_floor(gpu), gpu.lo, gpu.hi)


def _water_fill(gpus: Sequence[GpuDemand], curves: Mapping[str, Curve], available: float) -> dict[str, float]:
    # Rounded up to whole watts, so rounding the caps down later cannot break the slowdown.
    slowdown_floors = {g.uuid: min(g.hi, math.ceil(_slowdown_cap(g, curves[g.uuid]) - 1e-9)) for g in gpus}
    if sum(slowdown_floors.values()) <= available:
        caps = dict(slowdown_floors)
    else:
        caps = {g.uuid: g.lo for g in gpus}
    remaining = available - sum(caps.values())
    pieces = [
        (slope, watts, g.uuid) for g in gpus for slope, watts in _segments(curves[g.uuid], caps[g.uuid], g.hi)
    ]
    # Highest marginal gain first; concavity keeps each GPU's pieces in their own order. Pieces of
    # equal gain share what is left in proportion, so identical GPUs get identical caps.
    pieces.sort(key=lambda p: -p[0])
    for _, group in itertools.groupby(pieces, key=lambda p: round(p[0], 12)):
        if remaining <= 0:
            break
        same = list(group)
        total = sum(watts for _, watts, _ in same)
        share = min(1.0, remaining / total)
        for _, watts, uuid in same:
            caps[uuid] += watts * share
        remaining -= total * share
    return caps


def grid_optimum(choices: Sequence[Mapping[int, float]], max_watts: float) -> float:
    """The largest sum of one value per GPU (each GPU's {cap in whole watts: value}) whose caps sum
    to at most `max_watts`: the exact optimum on a grid, by dynamic programming over the watts used.
    For checking the water-filling against (tests, benchmarks); it is too slow to allocate with."""
    best: dict[int, float] = {0: 0.0}
    for values in choices:
        nxt: dict[int, float] = {}
        for used, total in best.items():
            for cap, value in values.items():
                if used + cap <= max_watts and nxt.get(used + cap, -math.inf) < total + value:
                    nxt[used + cap] = total + value
        best = nxt
    if not best:
        raise ValueError(f"no caps on the grid fit in {max_watts} W")
    return max(best.values())


# ---------------------------------------------------------------- status


def _named(uuids: Sequence[str]) -> str:
    more = f" and {len(uuids) - _MAX_NAMED} more" if len(uuids) > _MAX_NAMED else ""
    return ", ".join(uuids[:_MAX_NAMED]) + more


def budget_status(
    spec: PowerBudgetSpec,
    generation: int | None,
    nodes: Sequence[str],
    gpus: Sequence[GPUStatus],
    allocation: Allocation | None,
    reserved_watts: float,
    previous: PowerBudgetStatus | None,
    now: datetime,
) -> PowerBudgetStatus:
    """The PowerBudget's status: what is allocated, measured and left, and conditions that say
    whether the budget holds (`WithinBudget`), can hold (`Feasible`) and at what cost to the
    policies' slowdown limits (`SlowdownRespected`).

    `gpus` are all GPUs of the budget's nodes as reported; `allocation` is the latest
    `allocate(...)` (None when no GPU is governed); allocated watts are its caps plus the reserved
    watts of GPUs edpilot does not cap."""
    old = previous.conditions if previous is not None else []
    committed = committed_watts(gpus)
    allocated = (allocation.allocated_watts if allocation is not None else 0.0) + reserved_watts
    if allocation is None:
        allocated = committed

    def cond(type_: str, ok: bool, reason: str, message: str) -> Condition:
        return transition(old, type_, "True" if ok else "False", reason, message, now, generation)

    conditions = []
    if allocation is not None and not allocation.feasible:
        conditions.append(
            cond(
                CONDITION_FEASIBLE,
                False,
                "BudgetInfeasible",
                f"the lowest caps the policies allow need {allocation.needed_watts:.0f} W (of which "
                f"{reserved_watts:.0f} W idle or unmanaged GPUs), over maxWatts {spec.maxWatts:.0f} W",
            )
        )
    else:
        conditions.append(
            cond(
                CONDITION_FEASIBLE,
                True,
                "AllocationFits",
                f"allocated {allocated:.0f} W of {spec.maxWatts:.0f} W",
            )
        )
    if committed <= spec.maxWatts + 1e-6:
        conditions.append(
            cond(
                CONDITION_WITHIN_BUDGET,
                True,
                "LimitsWithinBudget",
                f"GPUs commit {committed:.0f} W of {spec.maxWatts:.0f} W",
            )
        )
    else:
        conditions.append(
            cond(
                CONDITION_WITHIN_BUDGET,
                False,
                "OverBudget",
                f"GPUs commit {committed:.0f} W (busy GPUs' enforced limits, idle GPUs' draw), "
                f"over maxWatts {spec.maxWatts:.0f} W",
            )
        )
    exceeded = allocation.slowdown_exceeded if allocation is not None else ()
    if exceeded:
        conditions.append(
            cond(
                CONDITION_SLOWDOWN,
                False,
                "SlowdownExceeded",
                f"{len(exceeded)} GPU(s) are capped below what their policy's maxSlowdownPercent allows "
                f"to fit the budget: {_named(list(exceeded))}",
            )
        )
    else:
        conditions.append(
            cond(
                CONDITION_SLOWDOWN,
                True,
                "WithinSlowdown",
                "every governed GPU runs within its policy's maxSlowdownPercent",
            )
        )
    return PowerBudgetStatus(
        observedGeneration=generation,
        allocatedWatts=round(allocated, 1),
        measuredWatts=round(sum(g.powerWatts for g in gpus), 1),
        headroomWatts=round(spec.maxWatts - allocated, 1),
        gpus=len(gpus),
        nodes=sorted(nodes),
        conditions=conditions,
    )
