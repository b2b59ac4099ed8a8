"""The power cap's search: how fast it gets near the optimum (issue 17's Zeus goal), and the model
of the workload's throughput that guides it."""

from __future__ import annotations

import importlib
import math
import statistics
from types import ModuleType

import pytest

from edpilot.optimizer import _ratio, _throughput_fit


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return importlib.import_module("bench.cap_search_vs_zeus")


# Rows of bench/cap_search_vs_zeus.py whose optimum lies below the default limit, with a quarter
# of the probes Zeus's GlobalPowerLimitOptimizer needs there to get within 2% of the oracle
# (bench/results/cap_search_vs_zeus.json: 20, 19, 16, 18, 18, 16, 14, 15), rounded down. The
# golden-section search needed 7, 6, 5, 5, 6, 5, 4.5 and 5 (the baseline counts as a probe).
QUARTER_OF_ZEUS = [
    ("decode-bf16-b64", "Energy", 5),
    ("decode-bf16-b64", "EDP", 4),
    ("decode-bf16-b64", "ZeusCost", 4),
    ("decode-bf16-b256", "Energy", 4),
    ("decode-bf16-b256", "EDP", 4),
    ("decode-bf16-b256", "ZeusCost", 4),
    ("gemm-bf16-8192", "Energy", 3),
    ("training-bf16", "Energy", 3),
]


@pytest.mark.parametrize(("name", "objective", "most"), QUARTER_OF_ZEUS)
def test_the_cap_search_is_within_2_percent_in_a_quarter_of_zeus_probes(
    bench: ModuleType, name: str, objective: str, most: int
) -> None:
    """Median over noise seeds, as the bench counts: probes (the baseline included) until the
    lowest measured objective is within 2% of the noiseless optimum and stays there."""
    case = next(c for c in bench.CASES if c.name == name)
    best = bench.oracle(case, objective)
    counts = []
    for seed in range(5):
        run = bench.run_edpilot(case, objective, seed)
        until = bench.probes_until_within(
            run.picks, lambda cap: bench.true_objective(case, cap, objective), best.value
        )
        counts.append(math.inf if until is None else until)
    assert statistics.median(counts) <= most, counts


@pytest.mark.parametrize(("k", "p"), [(0.7, 2.0), (0.3, 3.0), (0.05, 1.2)])
def test_the_throughput_model_recovers_its_own_curve(k: float, p: float) -> None:
    draw = 600.0
    points = [(cap, math.exp(-k * math.log(draw / cap) ** p)) for cap in (450.0, 300.0, 220.0)]
    fit = _throughput_fit(points, draw)
    assert fit is not None
    assert fit == pytest.approx((k, p), rel=1e-6)
    assert _ratio(fit, 250.0, draw) == pytest.approx(math.exp(-k * math.log(draw / 250.0) ** p))
    assert _ratio(fit, 650.0, draw) == 1.0  # a cap above the draw takes nothing away


def test_one_probe_fixes_the_model_with_the_loss_growing_from_the_draw() -> None:
    fit = _throughput_fit([(400.0, 0.8), (690.0, 1.0)], 700.0)  # the point at the draw tells nothing
    assert fit is not None
    assert fit[1] == 2.0
    assert _ratio(fit, 400.0, 700.0) == pytest.approx(0.8)
    assert _throughput_fit([(690.0, 1.0), (500.0, 1.001)], 700.0) is None  # no loss measured: no model


def test_on_a_flat_curve_a_lucky_reading_does_not_shut_out_the_optimums_side(bench: ModuleType) -> None:
    """decode-bf16-b8 under Zeus's cost: within 1% of the optimum from 225 W to 295 W. A probe that
    read lucky above the optimum made the probe just below it look worse by less than the noise, and
    the search then bisected between the two until its budget ran out (seeds 3, 4 and 7 kept 300 to
    320 W: gaps of 0.8 to 1.5%). A neighbour within one sigma no longer bounds the bracket."""
    case = next(c for c in bench.CASES if c.name == "decode-bf16-b8")
    best = bench.oracle(case, "ZeusCost")
    gaps = [
        100.0
        * (
            bench.true_objective(case, bench.run_edpilot(case, "ZeusCost", seed).final_cap, "ZeusCost")
            / best.value
            - 1.0
        )
        for seed in range(10)
    ]
    # Zeus's mean gap here is 0.09 to 0.13% (30 and 10 seeds, bench/results/cap_search_vs_zeus.md); the
    # goal allows 0.2 more.
    assert statistics.fmean(gaps) <= 0.33, gaps
