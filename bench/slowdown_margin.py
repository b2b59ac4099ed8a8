"""What the slowdown limit's noise margin costs, and what a sequential test gives back.

A configuration is kept only when its slowdown is within `maxSlowdownPercent` with a margin of
3 standard deviations of the measurement noise: the promise holds with confidence, but the margin
is allowance the search cannot use. Two tests side by side, on the same simulated runs:

  fixed       every probe judged after probeWindows windows, at that margin (the old test)
  sequential  a probe within the margin of the limit, either way, is measured for more windows
              (up to maxWindows) before it is judged, at the margin of the windows it has

For compute-bound work whose best cap sits at the slowdown limit (training and large GEMMs on
simulated H100s, EDP objective, 5% and 10% allowed), over many seeds: the true slowdown of the
configuration kept (gpusim's noiseless model), how much of the allowance that is, the runs whose
true slowdown breaks the limit, the true EDP reduction, and the probes and windows spent.

    .venv/bin/python bench/slowdown_margin.py [--seeds 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from edpilot import gpusim
from edpilot.edp import objective_value
from edpilot.models import EnergyPolicySpec, PowerCapSpec
from edpilot.optimizer import Config, OptimizerState, Tuning, member_caps, step
from edpilot.simulate import Running, SimWorkload, SimWorkloadSpec, _policy

RESULTS: Final = Path(__file__).resolve().parent / "results"
REPORT_SECONDS: Final = 5.0
SECONDS: Final = 2400.0
Test = Literal["fixed", "sequential"]
TESTS: Final[tuple[Test, ...]] = ("fixed", "sequential")


@dataclass(frozen=True)
class Case:
    name: str
    profile: gpusim.WorkloadProfile
    batch: int
    slowdown: float


CASES: Final = (
    Case("training-5%", gpusim.training(), 16, 5.0),
    Case("training-10%", gpusim.training(), 16, 10.0),
    Case("gemm-5%", gpusim.gemm(), 1, 5.0),
    Case("gemm-10%", gpusim.gemm(), 1, 10.0),
)


def policy(case: Case) -> EnergyPolicySpec:
    return _policy(
        objective="EDP",
        maxSlowdownPercent=case.slowdown,
        powerCap=PowerCapSpec(mode="Auto", minPercent=30, maxPercent=100),
    )


@dataclass(frozen=True)
class Run:
    true_slowdown: float
    true_edp_reduction: float
    probes: int
    windows: int


def run(case: Case, test: Test, seed: int) -> Run:
    spec = SimWorkloadSpec(case.name, case.profile, case.batch, "bf16", policy(case), reportsBatch=False)
    sim = SimWorkload(spec, 0)
    info = sim.info()
    tuning = Tuning(slowdownTest=test)
    rng = random.Random(f"{seed}/{case.name}")
    state: OptimizerState | None = None
    now = 0.0
    while now < SECONDS:
        decision = step(spec.policy, info, state, sim.observation(now), now, tuning)
        state = decision.state
        sim.apply(decision, now)
        sim.advance(now, REPORT_SECONDS, rng)
        now += REPORT_SECONDS
    assert state is not None and state.incumbent is not None
    running = Running(case.batch, "bf16")
    default = spec.gpu.default_power_limit_watts

    def truth(config: Config) -> tuple[float, float]:
        caps = [c if c is not None else default for c in member_caps(spec.policy, info, config).values()]
        ups, watts, _ = sim.true_point(running, caps)
        return objective_value("EDP", watts / ups, 1.0 / ups), ups

    base_edp, base_ups = truth(Config())
    kept_edp, kept_ups = truth(state.incumbent.config)
    windows = sum(p.metrics.windows for p in state.probes if p.metrics is not None)
    return Run(
        100.0 * (1.0 - kept_ups / base_ups), 100.0 * (1.0 - kept_edp / base_edp), len(state.probes), windows
    )


def oracle(case: Case) -> float:
    """The best true EDP reduction any cap on a 5 W grid gives within the slowdown limit."""
    sim = SimWorkload(SimWorkloadSpec(case.name, case.profile, case.batch, "bf16", policy(case)), 0)
    running = Running(case.batch, "bf16")

    def truth(cap: float) -> tuple[float, float]:
        ups, watts, _ = sim.true_point(running, [cap])
        return objective_value("EDP", watts / ups, 1.0 / ups), ups

    base_edp, base_ups = truth(700.0)
    best = min(
        edp
        for edp, ups in (truth(float(c)) for c in range(210, 701, 5))
        if 100.0 * (1.0 - ups / base_ups) <= case.slowdown
    )
    return 100.0 * (1.0 - best / base_edp)


def summarise(case: Case, runs: Sequence[Run]) -> dict[str, Any]:
    slow = [r.true_slowdown for r in runs]
    return {
        "trueSlowdownPercent": statistics.fmean(slow),
        "allowanceUsed": statistics.fmean(slow) / case.slowdown,
        "limitBroken": sum(s > case.slowdown for s in slow),
        "runs": len(runs),
        "trueEdpReductionPercent": statistics.fmean(r.true_edp_reduction for r in runs),
        "oracleEdpReductionPercent": oracle(case),
        "probes": statistics.fmean(r.probes for r in runs),
        "windows": statistics.fmean(r.windows for r in runs),
    }


def table(results: dict[str, dict[Test, dict[str, Any]]]) -> str:
    rows = [
        "| case | test | true slowdown | of the allowance | runs breaking the limit | true EDP reduction "
        "| the oracle's | probes | probe windows |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        for test in TESTS:
            r = results[case.name][test]
            rows.append(
                f"| {case.name} | {test} | {r['trueSlowdownPercent']:.2f}% | {100 * r['allowanceUsed']:.0f}% "
                f"| {r['limitBroken']} of {r['runs']} | {r['trueEdpReductionPercent']:.2f}% "
                f"| {r['oracleEdpReductionPercent']:.2f}% | {r['probes']:.1f} "
                f"| {r['windows']:.1f} |"
            )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    args = parser.parse_args(argv)
    results = {
        case.name: {test: summarise(case, [run(case, test, s) for s in range(args.seeds)]) for test in TESTS}
        for case in CASES
    }
    text = table(results)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        meta = {"machine": platform.platform(), "date": datetime.now(UTC).isoformat(timespec="seconds")}
        (RESULTS / "slowdown_margin.json").write_text(
            json.dumps({**meta, "seeds": args.seeds, "results": results}, indent=1) + "\n"
        )
        (RESULTS / "slowdown_margin.md").write_text(
            "# The slowdown limit's noise margin (`bench/slowdown_margin.py`)\n\n"
            + (__doc__ or "").split("\n\n")[1]
            + f"\n\n{args.seeds} seeds per case; run {meta['date']}.\n\n"
            + text
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
