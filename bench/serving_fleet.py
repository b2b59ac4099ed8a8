"""A simulated GPU fleet over a day of load: what edpilot saves, side by side with the alternatives.

Serving replicas of a Llama-3-8B-shaped model on H100s and H200s (`edpilot.serving`: continuous
batching, chunked prefill, a KV cache bounded by memory, gpusim's calibrated step costs) are
offered a diurnal trace: Poisson arrivals whose rate peaks near what a replica carries at its
defaults (15:00) and falls to 20% of the peak (03:00). Beside them run a compute-bound training
job and a two-GPU job with a straggler. Five strategies, each on the same arrivals:

  (a) defaults      bf16, 256 sequences, every GPU at its 700 W default limit
  (b) static 60%    every GPU capped at 60% of TDP (420 W), what a fixed power annotation does
  (c) caps only     edpilot's optimizer with the power cap as its only knob
  (d) every knob    edpilot with precision (bf16/fp8, by a surge rollout), sequence limit and cap
  (e) oracle        per hour of the day, the configuration a sweep of the true model finds best
                    within the SLOs (switched for free); the training jobs' best caps by gpusim

Printed and written (bench/results/serving_fleet.{json,md}): fleet energy, serving J/token, the
day's p99 inter-token latency (ITL) and time to first token (TTFT) against the SLOs, and the
minutes in SLO violation (a replica-minute whose p99 ITL exceeds 100 ms or p99 TTFT 1 s), each as
a ratio to (a), and the training jobs' work as a ratio to (a).

The policies bound what they can measure well: the median ITL of a 5 s window (20% over the
baseline, at most 50 ms) and the p99 TTFT (1 s); the day's p99 ITL and the violation minutes are
the check of whether that is enough. Caps below the default rest on gpusim's physics under a
cap, which the probes never measured (a lent GPU's settings must not be changed).

    .venv/bin/python bench/serving_fleet.py [--hours 24] [--replicas 4] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Final, Literal

from edpilot import gpusim, serving
from edpilot.edp import objective_value
from edpilot.models import EnergyPolicySpec, PowerCapSpec
from edpilot.optimizer import Decision, OptimizerState, step
from edpilot.simulate import (
    Running,
    SimServing,
    SimWorkload,
    SimWorkloadSpec,
    _policy,
    chat,
    serving_policy,
)

RESULTS: Final = Path(__file__).resolve().parent / "results"
REPORT_SECONDS: Final = 5.0
SLO_ITL_P99: Final = 0.100
SLO_TTFT_P99: Final = 1.0
TROUGH: Final = 0.2
STATIC_CAP_FRACTION: Final = 0.6
Strategy = Literal["defaults", "static-60%", "caps-only", "every-knob", "oracle"]
STRATEGIES: Final[tuple[Strategy, ...]] = ("defaults", "static-60%", "caps-only", "every-knob", "oracle")


@dataclass(frozen=True)
class Replica:
    name: str
    gpu: gpusim.GpuSpec
    peak: float  # requests per second at 15:00


# Peaks near what bf16 at 700 W carries within the SLOs (about 22 requests/s on the H100 model,
# 25 on the H200), and two replicas that peak lower.
FLEET: Final = (
    Replica("h100-a", gpusim.H100_SXM, 20.0),
    Replica("h200-a", gpusim.H200_SXM, 23.0),
    Replica("h100-b", gpusim.H100_SXM, 15.0),
    Replica("h200-b", gpusim.H200_SXM, 17.0),
)

TRAINING_POLICY: Final = _policy(
    objective="EDP", maxSlowdownPercent=10, powerCap=PowerCapSpec(mode="Auto", minPercent=50, maxPercent=100)
)
JOB_POLICY: Final = _policy(objective="EDP", maxSlowdownPercent=5, groupByLabel="edpilot.io/job")
JOBS: Final = (
    SimWorkloadSpec("training-bf16", gpusim.training(), 16, "bf16", TRAINING_POLICY, reportsBatch=False),
    SimWorkloadSpec(
        "job-2gpu-straggler", gpusim.gemm(), 1, "bf16", JOB_POLICY, workPerRank=(8.0, 4.0), reportsBatch=False
    ),
)


# ---------------------------------------------------------------- per-minute SLO accounting


@dataclass
class Minutes:
    """The SLO check per replica-minute, from the engine's exact histograms."""

    violations: int = 0
    minutes: int = 0
    itl_day: dict[int, float] = field(default_factory=dict)
    ttft_day: dict[int, float] = field(default_factory=dict)
    _itl: dict[int, float] = field(default_factory=dict)
    _ttft: dict[int, float] = field(default_factory=dict)

    def close(self, counters: serving.Counters) -> None:
        itl = {
            k: v - self._itl.get(k, 0.0) for k, v in counters.itl_fine.items() if v > self._itl.get(k, 0.0)
        }
        ttft = {
            k: v - self._ttft.get(k, 0.0) for k, v in counters.ttft_fine.items() if v > self._ttft.get(k, 0.0)
        }
        self._itl, self._ttft = dict(counters.itl_fine), dict(counters.ttft_fine)
        self.minutes += 1
        p99_itl, p99_ttft = serving.quantile(itl, 0.99), serving.quantile(ttft, 0.99)
        if (p99_itl or 0.0) > SLO_ITL_P99 or (p99_ttft or 0.0) > SLO_TTFT_P99:
            self.violations += 1


# ---------------------------------------------------------------- the oracle


def _feasible_cost(
    gpu: gpusim.GpuSpec,
    rate: float,
    limit: int,
    precision: str,
    cap: float,
    default_itl: float,
    seconds: float,
) -> float | None:
    """J/token of a configuration at a steady rate, or None when it breaks an SLO or the policy:
    held to the SLOs as the fleet is, minute by minute, so the oracle is no better than its word."""
    engine = serving.ServingEngine(
        serving.ServedModel(gpu=gpu),
        serving.EngineConfig(limit, precision, cap),
        random.Random(f"oracle/{rate}"),
    )
    minutes = Minutes()
    for _ in range(max(1, round(seconds / 60.0))):
        engine.run(60.0, rate)
        minutes.close(engine.counters)
    if minutes.violations:
        return None
    c = engine.counters
    itl50, itl99 = serving.quantile(c.itl_fine, 0.5), serving.quantile(c.itl_fine, 0.99)
    ttft99 = serving.quantile(c.ttft_fine, 0.99)
    if itl50 is None or itl99 is None or ttft99 is None or engine.waiting > 8:
        return None
    if itl50 > min(0.05, 1.2 * default_itl) or itl99 > SLO_ITL_P99 or ttft99 > SLO_TTFT_P99:
        return None
    return c.energy_joules / max(c.generation_tokens, 1)


def oracle_config(task: tuple[str, float, float]) -> tuple[str, float, tuple[int, str, float]]:
    """The best configuration of a GPU model at a steady rate, within the chat policy's bounds:
    caps on a 20 W grid from 40% of TDP, bf16 or fp8, 256 or (H200, room for it) 512 sequences."""
    gpu_name, rate, seconds = task
    gpu = gpusim.GPU_MODELS[gpu_name]
    base = serving.ServingEngine(
        serving.ServedModel(gpu=gpu),
        serving.EngineConfig(256, "bf16", gpu.default_power_limit_watts),
        random.Random(f"oracle/{rate}"),
    )
    base.run(seconds, rate)
    default_itl = serving.quantile(base.counters.itl_fine, 0.5) or 0.05
    best: tuple[float, tuple[int, str, float]] = (math.inf, (256, "bf16", gpu.default_power_limit_watts))
    lowest = 0.4 * gpu.default_power_limit_watts
    for precision in ("bf16", "fp8"):
        for limit in (256, 512) if gpu.memory_bytes > 100e9 else (256,):
            # Coarse 40 W steps, then 20 W around the best of them.
            costs = {}
            for cap in [
                lowest + 40.0 * k for k in range(int((gpu.default_power_limit_watts - lowest) / 40) + 1)
            ]:
                costs[cap] = _feasible_cost(gpu, rate, limit, precision, cap, default_itl, seconds)
            feasible = {c: v for c, v in costs.items() if v is not None}
            if not feasible:
                continue
            top = min(feasible, key=feasible.__getitem__)
            for cap in (top - 20.0, top + 20.0):
                if lowest <= cap <= gpu.default_power_limit_watts and cap not in costs:
                    cost = _feasible_cost(gpu, rate, limit, precision, cap, default_itl, seconds)
                    if cost is not None:
                        feasible[cap] = cost
            cap = min(feasible, key=feasible.__getitem__)
            if feasible[cap] < best[0]:
                best = (feasible[cap], (limit, precision, cap))
    return gpu_name, rate, best[1]


def hourly_peak(replica: Replica, hour: int) -> float:
    """The highest rate of the hour (the oracle provisions for it), on a 0.5 requests/s grid."""
    rates = [serving.diurnal_rate(3600.0 * hour + 60.0 * m, replica.peak, TROUGH) for m in range(0, 61, 5)]
    return math.ceil(2.0 * max(rates)) / 2.0


def job_oracle_caps(spec: SimWorkloadSpec) -> list[float]:
    """The caps the simulated job's noiseless truth finds best (EDP within its slowdown limit)."""
    truth = SimWorkload(spec, 0)
    running = Running(spec.batchSize, spec.quantization)
    default = spec.gpu.default_power_limit_watts
    ranks = len(spec.workPerRank)

    def edp(caps: list[float]) -> tuple[float, float]:
        ups, watts, _ = truth.true_point(running, caps)
        return objective_value("EDP", watts / ups, 1.0 / ups), ups

    base_edp, base_ups = edp([default] * ranks)
    floor = (1.0 - spec.policy.maxSlowdownPercent / 100.0) * base_ups
    lowest = spec.policy.powerCap.minPercent / 100.0 * default
    grid = [float(c) for c in range(200, 701, 10) if c >= lowest]
    candidates = [[c] for c in grid] if ranks == 1 else [[a, b] for a in grid for b in grid]
    best = (base_edp, [default] * ranks)
    for caps in candidates:
        value, ups = edp(caps)
        if ups >= floor and value < best[0]:
            best = (value, caps)
    return best[1]


# ---------------------------------------------------------------- one workload, one strategy


@dataclass
class Outcome:
    strategy: str
    workload: str
    gpus: int
    energy_joules: float
    work: float
    unit: str
    minutes: int = 0
    violation_minutes: int = 0
    itl_p99: float | None = None
    ttft_p99: float | None = None
    itl_fine: dict[int, float] = field(default_factory=dict)
    ttft_fine: dict[int, float] = field(default_factory=dict)
    probes: int = 0
    rollouts: int = 0
    seconds: float = 0.0


def _policy_for(strategy: Strategy) -> EnergyPolicySpec:
    return serving_policy(knobs=strategy == "every-knob")


def run_replica(task: tuple[Strategy, int, float, dict[int, tuple[int, str, float]]]) -> Outcome:
    strategy, index, hours, oracle = task
    replica = FLEET[index]
    started = time.monotonic()
    spec = chat(replica.name, replica.gpu, replica.peak, _policy_for(strategy), trough_fraction=TROUGH)
    sim = SimServing(spec, index, seed=0)
    gpu = sim.gpus[0]
    info = sim.info()
    minutes = Minutes()
    state: OptimizerState | None = None
    decision: Decision | None = None
    rng = random.Random(0)
    rollouts, precision = 0, sim.running.quantization
    if strategy == "static-60%":
        gpu.set_power_limit(STATIC_CAP_FRACTION * replica.gpu.default_power_limit_watts)
        sim._configure(sim.running)
    now, windows = 0.0, 0
    while now < 3600.0 * hours:
        if strategy == "oracle" and now % 3600.0 == 0.0:
            limit, wanted, cap = oracle[int(now // 3600) % 24]
            gpu.set_power_limit(cap)
            sim.engine.configure(serving.EngineConfig(limit, wanted, cap))
        elif strategy in ("caps-only", "every-knob"):
            decision = step(spec.policy, info, state, sim.observation(now), now)
            state = decision.state
            sim.apply(decision, now)
            if (sim.pending or sim.running).quantization != precision:
                rollouts += 1
                precision = (sim.pending or sim.running).quantization
        sim.advance(now, REPORT_SECONDS, rng)
        now += REPORT_SECONDS
        windows += 1
        if windows % 12 == 0:
            minutes.close(sim.engine.counters)
    c = sim.engine.counters
    return Outcome(
        strategy=strategy,
        workload=replica.name,
        gpus=1,
        energy_joules=c.energy_joules + sim.surgeJoules,
        work=float(c.generation_tokens),
        unit="token",
        minutes=minutes.minutes,
        violation_minutes=minutes.violations,
        itl_p99=serving.quantile(c.itl_fine, 0.99),
        ttft_p99=serving.quantile(c.ttft_fine, 0.99),
        itl_fine=dict(c.itl_fine),
        ttft_fine=dict(c.ttft_fine),
        probes=_probes(decision),
        rollouts=rollouts,
        seconds=time.monotonic() - started,
    )


def _probes(decision: Decision | None) -> int:
    return 0 if decision is None else decision.figures.probes


def run_job(task: tuple[Strategy, int, float]) -> Outcome:
    strategy, index, hours = task
    spec = JOBS[index]
    started = time.monotonic()
    sim = SimWorkload(spec, 100 + index)
    info = sim.info()
    rng = random.Random(1)
    if strategy == "static-60%":
        for g in sim.gpus:
            g.set_power_limit(STATIC_CAP_FRACTION * g.spec.default_power_limit_watts)
    elif strategy == "oracle":
        for g, cap in zip(sim.gpus, job_oracle_caps(spec), strict=True):
            g.set_power_limit(cap)
    state: OptimizerState | None = None
    now = 0.0
    while now < 3600.0 * hours:
        if strategy in ("caps-only", "every-knob"):
            decision = step(spec.policy, info, state, sim.observation(now), now)
            state = decision.state
            sim.apply(decision, now)
        sim.advance(now, REPORT_SECONDS, rng)
        now += REPORT_SECONDS
    return Outcome(
        strategy=strategy,
        workload=spec.name,
        gpus=len(sim.gpus),
        energy_joules=sum(g.energy_counter_mj for g in sim.gpus) / 1000.0,
        work=min(g.work_counter for g in sim.gpus),
        unit=spec.profile.unit,
        seconds=time.monotonic() - started,
    )


# ---------------------------------------------------------------- the fleet


def _ratio(x: float | None, base: float | None) -> float | None:
    return None if x is None or not base else x / base


def summarise(outcomes: Sequence[Outcome]) -> dict[str, dict[str, Any]]:
    by: dict[str, dict[str, Any]] = {}
    for s in STRATEGIES:
        mine = [o for o in outcomes if o.strategy == s]
        if not mine:
            continue
        served = [o for o in mine if o.unit == "token" and o.minutes]
        jobs = [o for o in mine if o not in served]
        itl: dict[int, float] = {}
        ttft: dict[int, float] = {}
        for o in served:
            for k, v in o.itl_fine.items():
                itl[k] = itl.get(k, 0.0) + v
            for k, v in o.ttft_fine.items():
                ttft[k] = ttft.get(k, 0.0) + v
        serving_j = sum(o.energy_joules for o in served)
        tokens = sum(o.work for o in served)
        by[s] = {
            "fleetEnergyJoules": sum(o.energy_joules for o in mine),
            "servingEnergyJoules": serving_j,
            "jobEnergyJoules": sum(o.energy_joules for o in jobs),
            "joulesPerToken": serving_j / tokens if tokens else None,
            "tokens": tokens,
            "itlP99Seconds": serving.quantile(itl, 0.99),
            "ttftP99Seconds": serving.quantile(ttft, 0.99),
            "violationMinutes": sum(o.violation_minutes for o in served),
            "replicaMinutes": sum(o.minutes for o in served),
            "jobWork": {o.workload: o.work for o in jobs},
            "rollouts": sum(o.rollouts for o in served),
            "perWorkload": [
                {k: v for k, v in vars(o).items() if k not in ("itl_fine", "ttft_fine")} for o in mine
            ],
        }
    return by


def table(summary: dict[str, dict[str, Any]]) -> str:
    base = summary["defaults"]
    head = (
        "| strategy | fleet energy | ratio to (a) | serving J/token | ratio | p99 ITL (SLO 100 ms) | p99 TTFT (SLO 1 s) "
        "| SLO-violation minutes | training work ratio | precision rollouts |"
    )
    rows = [head, "|" + "---|" * 10]
    for label, s in zip("abcde", STRATEGIES, strict=True):
        r = summary.get(s)
        if r is None:
            continue
        work = [_ratio(v, base["jobWork"].get(k)) for k, v in r["jobWork"].items() if base["jobWork"].get(k)]
        rows.append(
            f"| ({label}) {s} | {r['fleetEnergyJoules'] / 3.6e6:.1f} kWh | {r['fleetEnergyJoules'] / base['fleetEnergyJoules']:.3f} "
            f"| {r['joulesPerToken']:.4f} | {r['joulesPerToken'] / base['joulesPerToken']:.3f} "
            f"| {1000 * (r['itlP99Seconds'] or math.nan):.0f} ms | {r['ttftP99Seconds'] or math.nan:.2f} s "
            f"| {r['violationMinutes']} of {r['replicaMinutes']} "
            f"| {' / '.join(f'{w:.3f}' for w in work if w is not None) or '-'} | {r['rollouts']} |"
        )
    return "\n".join(rows)


def goals(summary: dict[str, dict[str, Any]]) -> list[str]:
    a, b, d, e = (summary.get(k) for k in ("defaults", "static-60%", "every-knob", "oracle"))
    if a is None or d is None:
        return []
    out = [
        f"(d) uses {100 * (1 - d['fleetEnergyJoules'] / a['fleetEnergyJoules']):.1f}% less fleet energy than (a) (goal: at least 30%)",
        f"(d) SLO-violation minutes {d['violationMinutes']} vs (a) {a['violationMinutes']} (goal: no more than (a))",
    ]
    if b is not None:
        out.append(
            f"(d) fleet energy / (b)'s: {d['fleetEnergyJoules'] / b['fleetEnergyJoules']:.3f}; violation minutes (b) {b['violationMinutes']} (goal: beat (b))"
        )
    if e is not None:
        out.append(
            f"(d) fleet energy / (e)'s: {d['fleetEnergyJoules'] / e['fleetEnergyJoules']:.3f} (goal: within 1.05)"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours (from midnight)")
    parser.add_argument("--replicas", type=int, default=len(FLEET), help=f"serving replicas, 1-{len(FLEET)}")
    parser.add_argument("--jobs", type=int, default=len(JOBS), help=f"training jobs, 0-{len(JOBS)}")
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    parser.add_argument(
        "--oracle-seconds", type=float, default=180.0, help="simulated seconds per oracle probe"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    args = parser.parse_args(argv)
    if not (0 < args.hours <= 48 and 1 <= args.replicas <= len(FLEET) and 0 <= args.jobs <= len(JOBS)):
        parser.error("--hours must be in (0, 48], --replicas in [1, 4], --jobs in [0, 2]")
    started = time.monotonic()
    replicas = range(args.replicas)
    hours = range(math.ceil(args.hours))
    with Pool(args.processes) as pool:
        wanted = sorted({(FLEET[i].gpu.name, hourly_peak(FLEET[i], h % 24)) for i in replicas for h in hours})
        table_ = {
            (g, r): cfg
            for g, r, cfg in pool.map(oracle_config, [(g, r, args.oracle_seconds) for g, r in wanted])
        }
        oracles = {
            i: {
                h: table_[(FLEET[i].gpu.name, hourly_peak(FLEET[i], h % 24))]
                for h in range(24)
                if (FLEET[i].gpu.name, hourly_peak(FLEET[i], h % 24)) in table_
            }
            for i in replicas
        }
        serving_tasks = [(s, i, args.hours, oracles[i]) for s in STRATEGIES for i in replicas]
        job_tasks = [(s, j, args.hours) for s in STRATEGIES for j in range(args.jobs)]
        outcomes = pool.map(run_replica, serving_tasks) + pool.map(run_job, job_tasks)
    summary = summarise(outcomes)
    text = table(summary)
    lines = goals(summary)
    print(text)
    print("\n".join(lines))
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        result = {
            "machine": platform.platform(),
            "python": platform.python_version(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "argv": sys.argv[1:],
            "hours": args.hours,
            "slo": {"itlP99Seconds": SLO_ITL_P99, "ttftP99Seconds": SLO_TTFT_P99},
            "fleet": [
                {"name": r.name, "gpu": r.gpu.name, "peakRequestsPerSecond": r.peak}
                for r in FLEET[: args.replicas]
            ],
            "oracle": {FLEET[i].name: {str(h): list(c) for h, c in o.items()} for i, o in oracles.items()},
            "strategies": summary,
            "goals": lines,
            "wallSeconds": time.monotonic() - started,
        }
        (RESULTS / "serving_fleet.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / "serving_fleet.md").write_text(
            "# Serving fleet over a day (`bench/serving_fleet.py`)\n\n"
            + (__doc__ or "").split("\n\n")[0]
            + f"\n\n{args.hours:g} simulated hours, {args.replicas} serving replicas, {args.jobs} training jobs; "
            f"run {result['date']} on {result['machine']}.\n\n"
            + text
            + "\n\n"
            + "\n".join(f"- {line}" for line in lines)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
