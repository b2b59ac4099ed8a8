"""Placement: filter reasons, lowest caps, committed watts, expected energy and scores, table-driven."""

from __future__ import annotations

import math

import pytest
from builders import h100_status

from edpilot import placement
from edpilot.models import GPUStatus, PowerCapSpec
from edpilot.placement import (
    BudgetView,
    EnergySample,
    NodeView,
    PodDemand,
    build_history,
    committed_watts,
    expected_joules_per_unit,
    filter_nodes,
    lowest_cap_watts,
    score_nodes,
)

H100 = "NVIDIA-H100-80GB-HBM3"  # GFD label spelling
H100_NVML = "NVIDIA H100 80GB HBM3"  # NVML spelling
A100 = "NVIDIA-A100-SXM4-80GB"


def h100(name: str, budgets: tuple[str, ...] = (), throttle: str = "") -> NodeView:
    return NodeView(name, H100, 700, 200, 700, throttle, budgets)


def a100(name: str, budgets: tuple[str, ...] = ()) -> NodeView:
    return NodeView(name, A100, 400, 100, 400, "", budgets)


def pod(
    gpus: int = 2, cap: PowerCapSpec | None = None, policy: str | None = "ml/llm", image: str = "llm:1"
) -> PodDemand:
    """A pod its policy governs (default powerCap unless `cap`); `policy=None`: no policy does."""
    power_cap = cap if cap is not None else (PowerCapSpec() if policy is not None else None)
    return PodDemand(key="ml/p", gpus=gpus, image=image, policy=policy, power_cap=power_cap)


def gpu(
    index: int,
    *,
    enforced: float = 700,
    power: float = 80,
    pods: tuple[str, ...] = (),
    throttle: tuple[str, ...] = (),
) -> GPUStatus:
    return h100_status(
        index,
        model=H100_NVML,
        enforcedLimitWatts=enforced,
        powerWatts=power,
        energyJoules=1.0,
        throttleReasons=list(throttle),
        pods=list(pods),
    )


# ---------------------------------------------------------------- priors


def test_priors_put_the_h100_ahead_of_the_a100_and_know_both_spellings() -> None:
    assert placement.prior_for(H100) == placement.prior_for(H100_NVML)
    h, a = placement.prior_for(H100), placement.prior_for(A100)
    assert h is not None and a is not None
    assert h.relative_joules_per_unit == pytest.approx(1.0)
    # gpusim's A100 prior: a big bf16 GEMM costs about 1.5-2x the H100's energy.
    assert 1.4 < a.relative_joules_per_unit < 2.2
    assert (h.default_limit_watts, h.min_limit_watts) == (700, 200)
    assert (a.default_limit_watts, a.min_limit_watts) == (400, 100)


def test_simulated_models_carry_their_compute_bound_cap_curve_with_its_knee() -> None:
    h100 = placement.prior_for(H100)
    assert h100 is not None
    curve = h100.compute_curve
    assert (curve[0][0], curve[-1][0]) == (200, 700)
    assert dict(curve)[700] == pytest.approx(1.0)
    rates = [r for _, r in curve]
    assert rates == sorted(rates) and rates[0] < 0.6

    # Log-log slope: shallow near the default limit, steep near the floor, where the voltage
    # has nothing left to give and power falls only with the clock.
    def slope(a: float, b: float) -> float:
        return math.log(dict(curve)[b] / dict(curve)[a]) / math.log(b / a)

    assert slope(300, 350) > 2 * slope(600, 700)
    # The H200 is simulated too (its memory system fitted to its probe, the H100's compute): the
    # H100's curve. Spec-sheet priors know no curve.
    h200 = placement.prior_for("NVIDIA H200")
    assert h200 is not None
    assert [w for w, _ in h200.compute_curve] == [w for w, _ in curve]
    assert [r for _, r in h200.compute_curve] == pytest.approx(rates, rel=0.05)
    l40s = placement.prior_for("NVIDIA L40S")
    assert l40s is not None and l40s.compute_curve == ()


def test_unknown_gpu_models_get_the_worst_known_factor() -> None:
    assert placement.prior_for("Voodoo 5 6000") is None
    assert placement.relative_joules_per_unit("Voodoo 5 6000") == max(
        placement.relative_joules_per_unit(m) for m in (H100, A100)
    )


# ---------------------------------------------------------------- lowest cap


@pytest.mark.parametrize(
    ("cap", "node", "expected"),
    [
        (PowerCapSpec(), h100("n"), 350.0),  # PowerCapSpec defaults: 50% of 700 W
        (PowerCapSpec(minPercent=30), h100("n"), 210.0),
        (PowerCapSpec(minPercent=10), h100("n"), 200.0),  # never below the GPU's constraint
        (PowerCapSpec(minPercent=30, minWatts=400), h100("n"), 400.0),  # the tighter bound wins
        (PowerCapSpec(mode="Off"), h100("n"), 700.0),  # never capped: the default limit
        (PowerCapSpec(mode="Fixed", watts=450), h100("n"), 450.0),
        (PowerCapSpec(mode="Fixed", watts=900), h100("n"), 700.0),
        (PowerCapSpec(minPercent=50), a100("n"), 200.0),
        (None, NodeView("unknown"), 0.0),  # nothing known of the GPUs
        (None, h100("n"), 700.0),  # no policy: nothing caps it under a Governed budget
    ],
)
def test_lowest_cap(cap: PowerCapSpec | None, node: NodeView, expected: float) -> None:
    assert lowest_cap_watts(cap, node) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("cap", "expected"),
    [
        (None, 350.0),  # an AllGPUs budget caps it like a default policy would
        (PowerCapSpec(mode="Off"), 350.0),
        (PowerCapSpec(mode="Fixed", watts=450), 350.0),
        (PowerCapSpec(mode="Fixed", watts=250), 250.0),  # never above what its own policy leaves it
        (PowerCapSpec(minPercent=30), 210.0),  # an Auto policy's own bounds
    ],
)
def test_lowest_cap_under_an_all_gpus_budget(cap: PowerCapSpec | None, expected: float) -> None:
    assert lowest_cap_watts(cap, h100("n"), all_gpus=True) == pytest.approx(expected)


def test_a_pod_no_policy_governs_is_placed_at_its_default_unless_the_budget_caps_every_gpu() -> None:
    """Placed as if it would be capped and then left at its default limit, a pod would break a
    Governed budget (issue 14, finding 1)."""
    ungoverned = pod(1, policy=None)
    tight = {"tight": BudgetView("tight", 6_000, 5_300)}  # 700 W left
    assert filter_nodes(ungoverned, [h100("n", ("tight",))], tight).passed == ["n"]  # 700 W fits
    assert (
        "1400 W needed at the lowest allowed cap of 700 W"
        in filter_nodes(pod(2, policy=None), [h100("n", ("tight",))], tight).failed["n"]
    )
    hard = {"tight": BudgetView("tight", 6_000, 5_300, all_gpus=True)}
    assert filter_nodes(pod(2, policy=None), [h100("n", ("tight",))], hard).passed == ["n"]  # 2 x 350 W


# ---------------------------------------------------------------- committed watts


@pytest.mark.parametrize(
    ("gpus", "unreported", "expected"),
    [
        ([], 0, 0.0),
        ([gpu(0), gpu(1)], 0, 160.0),  # idle: their draw
        ([gpu(0, enforced=400, pods=("ns/a",)), gpu(1)], 0, 480.0),  # busy: its enforced limit
        # a pod bound to the node but not yet in the report takes an idle GPU at the default limit
        ([gpu(0, enforced=400, pods=("ns/a",)), gpu(1, power=60), gpu(2, power=90)], 1, 400 + 700 + 90),
        ([], 3, 2100.0),  # no report yet: bound GPUs at the default limit
        ([gpu(0, power=50)], 2, 1400.0),  # more bound GPUs than reported ones
    ],
)
def test_committed_watts(gpus: list[GPUStatus], unreported: int, expected: float) -> None:
    assert committed_watts(gpus, unreported, 700) == pytest.approx(expected)


# ---------------------------------------------------------------- filter


def test_blocking_throttle_names_gpus_and_reasons_but_ignores_the_power_cap() -> None:
    assert placement.blocking_throttle([gpu(0, throttle=("SwPowerCap",))]) == ""
    text = placement.blocking_throttle(
        [
            gpu(0, throttle=("SwPowerCap", "HwThermalSlowdown")),
            gpu(3, throttle=("HwPowerBrakeSlowdown",)),
        ]
    )
    assert (
        text
        == "edpilot: node GPUs are throttled: GPU 0 hardware thermal slowdown, GPU 3 power-brake slowdown"
    )


BUDGETS = {
    "roomy": BudgetView("roomy", 10_000, 2_000),
    "full": BudgetView("full", 6_000, 5_800),  # 200 W left
    "tight": BudgetView("tight", 6_000, 5_300),  # 700 W left
}


@pytest.mark.parametrize(
    ("demand", "node", "fails_with"),
    [
        (pod(2), h100("n", ("roomy",)), None),
        (pod(2), h100("n"), None),  # no budget selects the node
        (pod(2), h100("n", ("full",)), "PowerBudget full cannot take 2 GPU(s): 700 W needed"),
        (pod(2), h100("n", ("tight",)), None),  # 2 x 350 W = 700 W fits exactly
        (
            pod(3),
            h100("n", ("tight",)),
            "1050 W needed at the lowest allowed cap of 350 W, 700 W left of 6000 W",
        ),
        (pod(3, PowerCapSpec(minPercent=30)), h100("n", ("tight",)), None),  # 3 x 210 W
        (pod(2), h100("n", ("roomy", "full")), "PowerBudget full"),  # every budget must fit
        (pod(1), a100("n", ("full",)), None),  # 200 W on an A100 at 50%
        (
            pod(2),
            h100("n", (), "edpilot: node GPUs are throttled: GPU 1 hardware thermal slowdown"),
            "throttled",
        ),
        (pod(0), h100("n", ("full",)), None),  # a pod without GPUs needs nothing
    ],
)
def test_filter(demand: PodDemand, node: NodeView, fails_with: str | None) -> None:
    result = filter_nodes(demand, [node], BUDGETS)
    if fails_with is None:
        assert result.passed == ["n"] and result.failed == {}
    else:
        assert result.passed == []
        assert fails_with in result.failed["n"]


def test_filter_keeps_order_and_gives_every_node_of_a_full_budget_the_same_reason() -> None:
    nodes = [h100("a0", ("full",)), h100("b0", ("roomy",)), h100("a1", ("full",)), h100("b1", ("roomy",))]
    result = filter_nodes(pod(2), nodes, BUDGETS)
    assert result.passed == ["b0", "b1"]
    assert result.failed["a0"] == result.failed["a1"]
    assert result.failed["a0"].startswith("edpilot: PowerBudget full")


# ---------------------------------------------------------------- expected energy


HISTORY = build_history(
    [
        EnergySample("ml/llm", "llm:1", H100_NVML, 0.010),
        EnergySample("ml/llm", "llm:1", H100_NVML, 0.012),
        EnergySample("ml/llm", "llm:1", H100_NVML, 0.011),
        EnergySample("ml/llm", "llm:0", A100, 0.030),
        EnergySample("ml/train", "t:1", A100, 4.0),
        EnergySample("ml/train", "t:1", "", 9.0),  # no GPU model: ignored
        EnergySample("ml/train", "t:1", A100, 0.0),  # not a measurement: ignored
    ]
)


@pytest.mark.parametrize(
    ("demand", "model", "expected", "basis"),
    [
        (pod(image="llm:1"), H100, 0.011, "measured"),  # median of this policy+image on this model
        # measured on the H100 only: carried over by the priors' ratio
        (pod(image="llm:1"), A100, 0.011 * placement.relative_joules_per_unit(A100), "transferred"),
        (pod(image="llm:0"), A100, 0.030, "measured"),
        # a new image of the policy: its other images' figures
        (pod(image="llm:2"), H100, 0.011, "policy"),
        (pod(policy="ml/train", image="t:1"), A100, 4.0, "measured"),
        (pod(policy="ml/other"), A100, placement.relative_joules_per_unit(A100), "prior"),
        (pod(policy=None), H100, 1.0, "prior"),
    ],
)
def test_expected_energy(demand: PodDemand, model: str, expected: float, basis: str) -> None:
    value, used = expected_joules_per_unit(demand, model, HISTORY)
    assert used == basis
    assert value == pytest.approx(expected)


# ---------------------------------------------------------------- scores


@pytest.mark.parametrize(
    ("demand", "nodes", "budgets", "expected"),
    [
        # priors only: the H100 is the most efficient; the A100 is scored by the ratio
        (
            pod(policy=None),
            [h100("h"), a100("a")],
            {},
            {"h": 10, "a": round(10 * (0.7 / placement.relative_joules_per_unit(A100) + 0.3))},
        ),
        # measurements that reverse the prior win: this workload is cheaper on the A100
        (
            PodDemand("ml/p", 1, "mem:1", "ml/mem"),
            [h100("h"), a100("a")],
            {},
            {"a": 10, "h": round(10 * (0.7 * 0.008 / 0.010 + 0.3))},
        ),
        # equal efficiency: headroom decides (after the pod: 0.8 vs 0.0 of maxWatts)
        (
            pod(1),
            [h100("roomy", ("roomy",)), h100("tight", ("tight",))],
            {"roomy": BudgetView("roomy", 10_000, 1_650), "tight": BudgetView("tight", 1_000, 650)},
            {"roomy": 9, "tight": 7},
        ),
        ([], [], {}, {}),
    ],
)
def test_scores(
    demand: PodDemand | list[object],
    nodes: list[NodeView],
    budgets: dict[str, BudgetView],
    expected: dict[str, int],
) -> None:
    history = build_history(
        [EnergySample("ml/mem", "mem:1", H100, 0.010), EnergySample("ml/mem", "mem:1", A100, 0.008)]
    )
    if not isinstance(demand, PodDemand):
        demand = pod()
    scores = score_nodes(demand, nodes, budgets, history)
    assert scores == expected
    assert all(0 <= s <= placement.MAX_SCORE for s in scores.values())


def test_scores_stay_in_range_for_many_nodes_and_same_group_same_score() -> None:
    nodes = [h100(f"h{i}", ("roomy",)) for i in range(50)] + [a100(f"a{i}") for i in range(50)]
    scores = score_nodes(pod(), nodes, BUDGETS, HISTORY)
    assert len(set(scores[f"h{i}"] for i in range(50))) == 1
    assert len(set(scores[f"a{i}"] for i in range(50))) == 1
    assert scores["h0"] > scores["a0"]


def test_gpus_of_models_without_a_curve_get_the_h100s_stretched_over_their_limits() -> None:
    h100 = placement.prior_for(H100)
    assert h100 is not None
    curve = placement.compute_bound_curve("NVIDIA L40S", 100, 350)
    assert (curve[0][0], curve[-1][0]) == (100, 350)
    assert [t for _, t in curve] == [t for _, t in h100.compute_curve]
    assert placement.compute_bound_curve(H100_NVML, 200, 700) == h100.compute_curve
    assert placement.compute_bound_curve("Voodoo 5 6000", 0, 0) == ()
