"""Power-budget allocation: water-filling against brute force, on made-up and on gpusim curves."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from builders import h100_status
from hypothesis import given, settings
from hypothesis import strategies as st

from edpilot import budget, gpusim
from edpilot.budget import GpuDemand, allocate, budget_status, concave_hull, grid_optimum, throughput_at
from edpilot.models import GPUStatus, LabelSelector, PowerBudgetSpec

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


# ---------------------------------------------------------------- curves


@pytest.mark.parametrize(
    ("points", "hull"),
    [
        ([], ()),
        ([(100, 10)], ((100, 10),)),
        # already concave: unchanged
        ([(100, 50), (200, 80), (300, 90)], ((100, 50), (200, 80), (300, 90))),
        # a dip (noise) is bridged by the majorant
        ([(100, 50), (200, 60), (300, 90)], ((100, 50), (300, 90))),
        # a convex stretch (the H100's low caps) is bridged
        ([(200, 20), (300, 30), (400, 75)], ((200, 20), (400, 75))),
        # throughput falling at a higher cap is noise: the curve stays flat at its peak
        ([(100, 50), (200, 80), (300, 70)], ((100, 50), (200, 80))),
        # unsorted input, non-positive caps and NaN are ignored
        ([(200, 80), (float("nan"), 5), (0, 3), (100, 50)], ((100, 50), (200, 80))),
    ],
)
def test_concave_hull(points: list[tuple[float, float]], hull: tuple[tuple[float, float], ...]) -> None:
    assert concave_hull(points) == hull


def test_domain_curve_bridges_from_the_floor_not_from_zero() -> None:
    # Convex below 300 W: from 0 the hull would skip (200, 20); from the 200 W floor it starts there.
    points = [(200, 20), (300, 60), (400, 75), (500, 70)]
    assert budget.domain_curve(points, 250, 450) == ((250, 40), (300, 60), (400, 75))


@pytest.mark.parametrize(
    ("cap", "expected"),
    [(0, 0.0), (50, 25.0), (100, 50.0), (150, 65.0), (200, 80.0), (1000, 80.0)],
)
def test_throughput_interpolates_and_is_flat_after_the_last_point(cap: float, expected: float) -> None:
    assert throughput_at(((100, 50), (200, 80)), cap) == pytest.approx(expected)


# ---------------------------------------------------------------- allocation, simple cases


def linear(hi: float, slope: float) -> tuple[tuple[float, float], ...]:
    return ((hi, hi * slope),)


def test_everyone_gets_hi_when_the_budget_is_loose() -> None:
    gpus = [GpuDemand("a", 100, 400, linear(400, 1)), GpuDemand("b", 100, 300, linear(300, 2))]
    result = allocate(gpus, max_watts=1000)
    assert result.feasible
    assert dict(result.caps) == {"a": 400, "b": 300}


def test_infeasible_budget_gets_the_floors_and_says_so() -> None:
    gpus = [GpuDemand("a", 200, 700), GpuDemand("b", 250, 700)]
    result = allocate(gpus, max_watts=600, reserved_watts=200)
    assert not result.feasible
    assert dict(result.caps) == {"a": 200, "b": 250}
    assert result.needed_watts == 650
    assert result.available_watts == 400


def test_watts_go_where_they_buy_the_most_work() -> None:
    # a: steep then flat at 300 W; b: gentle all the way. 600 W to share over floors of 100 W each.
    a = GpuDemand("a", 100, 500, ((300, 300), (500, 310)))
    b = GpuDemand("b", 100, 500, ((500, 300),))
    result = allocate([a, b], max_watts=600)
    # a's slope (normalised) to 300 W is 0.97/300 per W, b's is 1/500: a is filled to its knee first.
    assert result.caps["a"] == 300
    assert result.caps["b"] == 300
    assert result.allocated_watts == 600


def test_bounds_always_hold_and_caps_are_whole_watts() -> None:
    gpus = [GpuDemand(str(i), 150.5, 350.0, ((100, 10), (200, 18), (350, 21))) for i in range(3)]
    result = allocate(gpus, max_watts=700)
    assert all(150.5 <= c <= 350 for c in result.caps.values())
    assert all(c == int(c) or c == 150.5 for c in result.caps.values())
    assert result.allocated_watts <= 700


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="not 0 < lo <= hi"):
        allocate([GpuDemand("a", 500, 400)], max_watts=1000)


def test_no_measurements_share_by_the_concave_prior() -> None:
    gpus = [GpuDemand("a", 100, 400), GpuDemand("b", 100, 400)]
    result = allocate(gpus, max_watts=500)
    # Identical priors: an even split.
    assert result.caps["a"] == pytest.approx(250, abs=1)
    assert result.caps["b"] == pytest.approx(250, abs=1)


# ---------------------------------------------------------------- maxSlowdownPercent


def test_slowdown_floors_are_honoured_when_the_budget_affords_them() -> None:
    # a is steep all the way; b's curve flattens after 100 W, so plain water-filling would leave b
    # at its 100 W floor (73% of its speed) although its policy allows only 20% slowdown.
    a = GpuDemand("a", 100, 500, ((500, 500),))
    b = GpuDemand("b", 100, 500, ((100, 80), (500, 110)))
    assert allocate([a, b], max_watts=600).caps["b"] == 100
    result = allocate([a, b.__class__(**{**b.__dict__, "max_slowdown_percent": 20})], max_watts=600)
    assert result.slowdown_exceeded == ()
    assert result.relative_throughput["b"] >= 0.8
    # 80% of 110 = 88 units/s: 100 W + 400 W * 8/30 = 206.7 W, rounded up; a gets the rest.
    assert dict(result.caps) == {"a": 393, "b": 207}


def test_slowdown_that_cannot_be_honoured_is_reported() -> None:
    gpus = [GpuDemand(str(i), 100, 500, ((500, 100),), max_slowdown_percent=10) for i in range(2)]
    result = allocate(gpus, max_watts=400)  # each would need 450 W
    assert result.feasible
    assert set(result.slowdown_exceeded) == {"0", "1"}


# ---------------------------------------------------------------- optimality


def brute_force(gpus: list[GpuDemand], max_watts: float, step: float) -> float:
    """Best total relative throughput over a grid of caps (exhaustive)."""
    curves = [budget._normalised(g) for g in gpus]
    grids = [[g.lo + k * step for k in range(int((g.hi - g.lo) / step) + 1)] for g in gpus]
    best = 0.0
    for caps in itertools.product(*grids):
        if sum(caps) <= max_watts + 1e-9:
            best = max(best, sum(throughput_at(c, x) for c, x in zip(curves, caps, strict=True)))
    return best


concave_curves = st.lists(st.floats(min_value=0.05, max_value=5.0), min_size=1, max_size=4).map(
    lambda slopes: sorted(slopes, reverse=True)
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(concave_curves, min_size=2, max_size=3),
    st.integers(min_value=300, max_value=1300),
)
def test_water_filling_matches_brute_force_on_concave_curves(
    slopes: list[list[float]], max_watts: int
) -> None:
    # Breakpoints every 100 W from the 100 W floor: brute force on a 50 W grid visits all of them.
    gpus = []
    for i, s in enumerate(slopes):
        points, t = [], 0.0
        for k, slope in enumerate(s):
            t += slope * 100
            points.append((100.0 * (k + 1), t))
        gpus.append(GpuDemand(str(i), 100, 100.0 * len(s) + 100, tuple(points)))
    result = allocate(gpus, max_watts=max_watts)
    if not result.feasible:
        assert max_watts < 100 * len(gpus)
        return
    assert result.allocated_watts <= max_watts
    ours = sum(result.relative_throughput.values())
    optimum = brute_force(gpus, max_watts, step=50)
    max_slope = max(budget._normalised(g)[0][1] / budget._normalised(g)[0][0] for g in gpus)
    # Greedy is optimal; rounding down to whole watts costs at most one watt per GPU.
    assert ours >= optimum - len(gpus) * max_slope - 1e-9


# ---------------------------------------------------------------- gpusim curves

H100 = gpusim.H100_SXM
# Six H100s running different work: compute-bound GEMM and training, memory-bound decode.
FLEET = [
    (gpusim.gemm(), 1, "bf16"),
    (gpusim.training(), 8, "bf16"),
    (gpusim.llm_decode(), 64, "bf16"),
    (gpusim.llm_decode(), 1, "bf16"),
    (gpusim.llm_decode(), 256, "fp8"),
    (gpusim.training(), 16, "fp8"),
]


def rate(work: tuple[gpusim.WorkloadProfile, int, str], cap: float) -> float:
    profile, batch, precision = work
    return gpusim.operating_point(H100, profile, batch, precision, cap).units_per_second


def optimum_on_true_curves(max_watts: float, step: int = 10) -> float:
    """Best total throughput (each GPU relative to its rate at 700 W) over a 10 W grid, on the
    simulated physics itself, not on anything the allocator sees."""
    grid = range(200, 701, step)
    return grid_optimum([{c: rate(w, c) / rate(w, 700) for c in grid} for w in FLEET], max_watts)


def ours_on_true_curves(probe_caps: list[int], max_watts: float) -> tuple[float, dict[str, float]]:
    gpus = [
        GpuDemand(str(i), 200, 700, tuple((c, rate(w, c)) for c in probe_caps)) for i, w in enumerate(FLEET)
    ]
    result = allocate(gpus, max_watts=max_watts)
    assert result.feasible and result.allocated_watts <= max_watts
    total = sum(rate(w, result.caps[str(i)]) / rate(w, 700) for i, w in enumerate(FLEET))
    return total, dict(result.caps)


@pytest.mark.parametrize("max_watts", [3000, 2400, 1800, 1500])
def test_throughput_lost_within_5_percent_of_the_optimum_on_gpusim_curves(max_watts: int) -> None:
    """The issue's criterion: shrinking the budget from 4200 W (6 x 700 W) loses no more throughput
    than the optimum does, plus 5%. Curves known every 25 W (the measured curves)."""
    optimum = optimum_on_true_curves(max_watts)
    ours, _ = ours_on_true_curves(list(range(200, 701, 25)), max_watts)
    lost_opt, lost_ours = len(FLEET) - optimum, len(FLEET) - ours
    assert lost_ours <= 1.05 * lost_opt, (lost_ours, lost_opt)


@pytest.mark.parametrize("max_watts", [3600, 3000, 2400, 1800, 1500])
def test_six_probes_keep_total_throughput_within_5_percent_of_the_optimum(max_watts: int) -> None:
    """With only a few probes per GPU (every 100 W) the chords under-read the curves near their
    knees (measured: 97-100% of the optimum), yet the total stays within 5% of the optimum's."""
    optimum = optimum_on_true_curves(max_watts)
    ours, _ = ours_on_true_curves([200, 300, 400, 500, 600, 700], max_watts)
    assert ours >= 0.95 * optimum


# ---------------------------------------------------------------- status


def gpu(index: int, enforced: float, power: float, pods: list[str]) -> GPUStatus:
    return h100_status(index, enforcedLimitWatts=enforced, powerWatts=power, pods=pods)


SPEC = PowerBudgetSpec(nodeSelector=LabelSelector(matchLabels={"rack": "a"}), maxWatts=1000)


def test_status_reports_allocation_measurement_and_conditions() -> None:
    gpus = [gpu(0, 450, 430, ["ns/a"]), gpu(1, 450, 300, ["ns/b"]), gpu(2, 700, 70, [])]
    allocation = allocate(
        [GpuDemand("GPU-0", 200, 700), GpuDemand("GPU-1", 200, 700)], 1000, reserved_watts=70
    )
    status = budget_status(SPEC, 3, ["n2", "n1"], gpus, allocation, 70, None, NOW)
    assert status.observedGeneration == 3
    assert status.allocatedWatts == pytest.approx(allocation.allocated_watts + 70)
    assert status.allocatedWatts <= 1000
    assert status.measuredWatts == 800
    assert status.headroomWatts == pytest.approx(1000 - status.allocatedWatts)
    assert status.gpus == 3 and status.nodes == ["n1", "n2"]
    conditions = {c.type: c for c in status.conditions}
    assert conditions["Feasible"].status == "True"
    # 450 + 450 + 70 (idle draw) = 970 W committed: within 1000 W.
    assert conditions["WithinBudget"].status == "True"
    assert conditions["SlowdownRespected"].status == "True"


def test_status_says_over_budget_and_infeasible_and_keeps_transition_times() -> None:
    gpus = [gpu(0, 700, 650, ["ns/a"]), gpu(1, 700, 650, ["ns/b"])]
    tight = PowerBudgetSpec(nodeSelector=SPEC.nodeSelector, maxWatts=350)
    allocation = allocate([GpuDemand("GPU-0", 200, 700), GpuDemand("GPU-1", 200, 700)], 350)
    first = budget_status(tight, 1, ["n1"], gpus, allocation, 0, None, NOW)
    conditions = {c.type: c for c in first.conditions}
    assert (conditions["Feasible"].status, conditions["Feasible"].reason) == ("False", "BudgetInfeasible")
    assert "400 W" in conditions["Feasible"].message and "350 W" in conditions["Feasible"].message
    assert (conditions["WithinBudget"].status, conditions["WithinBudget"].reason) == ("False", "OverBudget")
    assert first.headroomWatts < 0

    later = budget_status(tight, 1, ["n1"], gpus, allocation, 0, first, NOW + timedelta(minutes=5))
    assert {c.type: c.lastTransitionTime for c in later.conditions} == {
        c.type: c.lastTransitionTime for c in first.conditions
    }
    relaxed = PowerBudgetSpec(nodeSelector=SPEC.nodeSelector, maxWatts=2000)
    fixed = budget_status(relaxed, 2, ["n1"], gpus, allocate([], 2000), 0, later, NOW + timedelta(minutes=6))
    assert {c.type: c.lastTransitionTime for c in fixed.conditions}["WithinBudget"] == NOW + timedelta(
        minutes=6
    )


def test_status_without_governed_gpus_counts_what_they_commit() -> None:
    gpus = [gpu(0, 700, 80, []), gpu(1, 500, 480, ["ns/unmanaged"])]
    status = budget_status(SPEC, None, ["n1"], gpus, None, 0, None, NOW)
    assert status.allocatedWatts == 580
    assert status.headroomWatts == 420


def test_grid_optimum_picks_the_best_caps_that_fit_and_refuses_a_budget_nothing_fits() -> None:
    steep = {100: 0.5, 200: 0.9, 300: 1.0}
    flat = {100: 0.95, 200: 0.99, 300: 1.0}
    # The watts go where they buy the most: to the steep GPU first.
    assert grid_optimum([steep, flat], 400) == pytest.approx(1.0 + 0.95)
    assert grid_optimum([steep, flat], 600) == pytest.approx(2.0)
    assert grid_optimum([steep, flat], 399) == pytest.approx(0.9 + 0.95)
    with pytest.raises(ValueError, match="no caps"):
        grid_optimum([steep, flat], 150)
