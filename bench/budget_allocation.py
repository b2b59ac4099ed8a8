"""How close a shrunk PowerBudget's allocation comes to the water-filling optimum, by curve model.

The PowerBudget end-to-end test's four pods (two training jobs, a GEMM, an LLM decode; one H100
each) are run through edpilot's optimizer on simulated GPUs, as the sim agent runs them (one
synchronous step per GPU), until each converges on a cap. Their probes then go through the
operator's budget service, for budgets cut by 300, 500 and 700 W below the chosen caps. The
throughput each allocation loses (each pod relative to its rate at 700 W, on gpusim's noiseless
curves) is divided by what the best caps lose (a 2 W knapsack on the same curves): 1.00 is the
optimum, the issue's goal is at most 1.05.

Three curve models side by side, on the same probes:
- the H100's compute-bound curve from its GPU-model prior (what the operator uses);
- the A100's curve stretched over the H100's power range: a prior with the wrong knee, as a GPU
  model gpusim does not simulate gets one (the H100's, stretched over its limits), to show how
  much the result owes to the prior being right;
- a bare local power law (what a GPU with unknown limits gets).
The prior and the truth both come from gpusim, whose cap behaviour is a model fitted to the H100
probe, not measured under caps.

    .venv/bin/python bench/budget_allocation.py [--seeds 40]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from edpilot_operator.budgets import gpu_curve, probe_points

from edpilot import gpusim
from edpilot.budget import Curve, GpuDemand, allocate, grid_optimum
from edpilot.models import EnergyPolicySpec, Profile
from edpilot.optimizer import OptimizerState, Tuning, step
from edpilot.placement import prior_for, stretched
from edpilot.simulate import SimWorkload, SimWorkloadSpec

RESULTS: Final = Path(__file__).resolve().parent / "results"
H100: Final = gpusim.H100_SXM
FLOOR: Final = 0.4 * H100.default_power_limit_watts  # the policy's minPercent 40
CUTS: Final = (300, 500, 700)
GOAL: Final = 1.05
POLICY: Final = EnergyPolicySpec.model_validate(
    {
        "selector": {"matchLabels": {"app": "budgeted"}},
        "objective": "EDP",
        "maxSlowdownPercent": 10,
        "powerCap": {"mode": "Auto", "minPercent": 40, "maxPercent": 100},
        "workMetric": {"name": "work_units_total"},
    }
)
# The operator's fast settings in the end-to-end tests (localrun.FAST_OPERATOR_ARGS).
TUNING: Final = Tuning(windowSeconds=5, baselineWindows=3, probeWindows=2, applyTimeoutSeconds=30)
REPORT_SECONDS: Final = 5.0


@dataclass(frozen=True)
class Pod:
    profile: gpusim.WorkloadProfile
    precision: Profile
    batch: int

    def rate(self, cap: float) -> float:
        return gpusim.job_step(
            H100, self.profile, self.precision, [self.batch], [cap], batch_size=self.batch
        ).units_per_second


PODS: Final = {
    "train-a": Pod(gpusim.training(), "bf16", 8),
    "train-b": Pod(gpusim.training(), "bf16", 2),
    "gemm-c": Pod(gpusim.gemm(), "bf16", 4),
    "decode-d": Pod(gpusim.llama_decode(), "bf16", 64),
}


def converge(name: str, index: int, seed: int) -> tuple[str, OptimizerState, float]:
    """(GPU UUID, the optimizer's final state, its chosen cap) of one pod."""
    pod = PODS[name]
    spec = SimWorkloadSpec(
        name,
        pod.profile,
        pod.batch,
        pod.precision,
        POLICY,
        workPerRank=(float(pod.batch),),
        reportsBatch=False,
    )
    sim = SimWorkload(spec, seed * len(PODS) + index)
    info, rng = sim.info(), random.Random(f"{seed}/{name}")
    state: OptimizerState | None = None
    now = 0.0
    while True:
        decision = step(POLICY, info, state, sim.observation(now), now, TUNING)
        state = decision.state
        sim.apply(decision, now)
        if decision.phase == "Converged" or now > 3600:
            break
        sim.advance(now, REPORT_SECONDS, rng)
        now += REPORT_SECONDS
    cap = next(iter(decision.capWatts.values())) or H100.default_power_limit_watts
    return sim.gpus[0].uuid, state, cap


def least_loss(chosen: Mapping[str, float], available: float) -> float:
    """Throughput the best caps within [floor, chosen] summing to `available` lose (2 W grid)."""
    choices = [
        {c: PODS[n].rate(c) / PODS[n].rate(700) for c in range(int(FLOOR), int(hi) + 1, 2)}
        for n, hi in chosen.items()
    ]
    return sum(PODS[n].rate(c) / PODS[n].rate(700) for n, c in chosen.items()) - grid_optimum(
        choices, available
    )


def shapes() -> dict[str, Curve]:
    h100, a100 = prior_for(H100.name), prior_for(gpusim.A100_SXM.name)
    assert h100 is not None and a100 is not None
    wrong = stretched(a100.compute_curve, H100.min_power_limit_watts, H100.max_power_limit_watts)
    return {
        "H100 prior (an H100's)": h100.compute_curve,
        "A100 knee on the H100 (another model's)": wrong,
        "bare power law (no curve)": (),
    }


def trial(seed: int, models: Mapping[str, Curve]) -> dict[str, dict[int, float]]:
    """model -> cut -> lost / least lost, for one seed's probes."""
    rows, chosen, gpu = [], {}, {}
    for index, name in enumerate(PODS):
        uuid, state, cap = converge(name, index, seed)
        rows.append(state.model_dump(mode="json"))
        chosen[name], gpu[name] = cap, uuid
    points = probe_points(rows)
    out: dict[str, dict[int, float]] = {}
    for model, shape in models.items():
        demands = [
            GpuDemand(gpu[n], FLOOR, chosen[n], gpu_curve(points.get(gpu[n], ()), 700, FLOOR, shape), 10, 700)
            for n in PODS
        ]
        out[model] = {}
        for cut in CUTS:
            available = sum(chosen.values()) - cut
            caps = allocate(demands, available).caps
            lost = sum(
                (PODS[n].rate(chosen[n]) - PODS[n].rate(caps[gpu[n]])) / PODS[n].rate(700) for n in PODS
            )
            out[model][cut] = lost / least_loss(chosen, available)
    return out


def summary(ratios: Sequence[float]) -> dict[str, float]:
    ordered = sorted(ratios)
    return {
        "median": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1],
        "within_goal": sum(r <= GOAL for r in ordered) / len(ordered),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=40, help="independent optimizer runs (probe noise)")
    args = p.parse_args(argv)
    models = shapes()
    trials = [trial(seed, models) for seed in range(args.seeds)]
    table: dict[str, dict[str, dict[str, float]]] = {
        model: {str(cut): summary([t[model][cut] for t in trials]) for cut in CUTS}
        | {"all": summary([t[model][cut] for t in trials for cut in CUTS])}
        for model in models
    }
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}",
        "python": sys.version.split()[0],
        "seeds": args.seeds,
        "cuts_watts": list(CUTS),
        "goal_ratio": GOAL,
        "lost_over_least_lost": table,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "budget_allocation.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = [
        "# Budget allocation vs the water-filling optimum, by curve model",
        "",
        f"{result['date']}, {result['machine']}, Python {result['python']}. Produced by "
        f"`bench/budget_allocation.py --seeds {args.seeds}`: throughput lost / least throughput lost "
        "(1.00 = optimum) on gpusim's true curves, over every seed's probes; the goal is at most "
        f"{GOAL:.2f}.",
        "",
        "| curve model | cut | median | p90 | max | runs within goal |",
        "|---|---|---|---|---|---|",
    ]
    for model, by_cut in table.items():
        for cut, s in by_cut.items():
            label = f"{cut} W" if cut != "all" else "all cuts"
            rows.append(
                f"| {model} | {label} | {s['median']:.3f} | {s['p90']:.3f} | {s['max']:.3f} | {s['within_goal']:.0%} |"
            )
    (RESULTS / "budget_allocation.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
