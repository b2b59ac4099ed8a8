"""bench/serving_clocks.py: its accounting (ratios seed by seed against the unsteered run)."""

from __future__ import annotations

from typing import Any

from bench import serving_clocks as bench
from edpilot.simulate import ServingOutcome


def outcome(
    j_per_token: float, cap: float | None = None, clock: float | None = None, **kw: Any
) -> ServingOutcome:
    base: dict[str, Any] = {
        "name": "chat",
        "gpu": "NVIDIA H100 80GB HBM3",
        "requestsPerSecond": 8.0,
        "powerCapMode": "Off",
        "smClockMode": "Off",
        "phase": "Converged",
        "convergedAtSeconds": 600.0,
        "probes": 5,
        "capWatts": cap,
        "smClockMHz": clock,
        "joulesPerToken": 2 * j_per_token,  # the whole run: exploration included
        "p99ItlSeconds": 0.05,
        "sloViolationSeconds": 0.0,
        "steadyJoulesPerToken": j_per_token,
        "steadyP99ItlSeconds": 0.04,
        "trueBaselineJoulesPerToken": 0.25,
        "trueJoulesPerToken": 0.25 * j_per_token / 0.2,
        "trueLatencySeconds": 0.01,
        "trueBaselineLatencySeconds": 0.01,
    }
    return ServingOutcome(**{**base, **kw})


def test_energy_is_compared_seed_by_seed_after_convergence() -> None:
    runs = {
        "none": [outcome(0.2), outcome(0.4)],
        "clocks": [
            outcome(0.1, clock=1200.0),
            outcome(0.4, clock=None, phase="Exploring", steadyJoulesPerToken=None),
        ],
    }
    summary = bench.summarise(runs)
    clocks = summary["clocks"]
    # Seed 0 halves the energy; seed 1 never converged, so its whole run (0.8) counts: 2x.
    assert clocks["vsNone"] == (0.5 + 2.0) / 2
    assert (clocks["locksKept"], clocks["converged"], clocks["runs"]) == (1, 1, 2)
    assert clocks["smClockMHz"] == 1200.0
    assert summary["none"]["vsNone"] == 1.0


def test_the_table_has_every_scenario_and_variant() -> None:
    one = bench.summarise({v: [outcome(0.2, cap=300.0 if v != "none" else None)] for v in bench.VARIANTS})
    text = bench.table({s.name: one for s in bench.SCENARIOS})
    assert len(text.splitlines()) == 2 + len(bench.SCENARIOS) * len(bench.VARIANTS)
    assert "cap 300 W (1/1)" in text and "none kept" in text
