"""Closed loop on a real H100: edpilot's optimizer steers a real PyTorch LLM decode with a KV cache.

The workload has the shape of the Llama-3-8B decode the team probed (edpilot/data/README.md,
h100_llama8b_decode*.json): 32 layers, hidden 4096, 32 query and 8 KV heads of 128, SwiGLU FFN
14336, vocabulary 128,256, random weights; every sequence attends over a preallocated KV cache of
1,088 positions with grouped-query SDPA; greedy sampling; each step replayed from a CUDA graph as
serving engines do. Weights of the linear layers in bf16 or fp8 (torch._scaled_mm, rows padded to
16; the KV cache, attention, norms, embedding and output head stay bf16). It runs in a thread,
counts the tokens of completed steps and follows a hint (precision, batch size) the way a pod
follows its downward-API file. Energy comes from the agent's own NVML backend, read-only, with
every pynvml setter disabled before anything else runs.

1. Oracle: an exhaustive sweep of every allowed (precision, batch) pair.
2. Closed loop: from the default (bf16, batch 8), `edpilot.optimizer.step` (the operator's core)
   is fed observations built from the NVML energy counter and the workload's token counter, and
   its hints are applied to the workload until it converges. Power cap mode is Off: the cap
   actuator would only be a dry run here (nothing on this GPU may change), so caps are not
   explored; any cap the optimizer asked for would be logged, never set.
3. The converged configuration, the oracle's and the default are measured again back to back.

It runs the decode at a fixed batch (a saturated, offline decode): the serving side, where demand
sets the work rate, is `bench/serving_fleet.py` on the simulator calibrated to the same probes.

Needs torch, nvidia-ml-py, pydantic and this repository, and about 61 GB of GPU memory:
    python bench/h100_closed_loop.py [--gpu 0] [--out bench/results]
Writes h100_closed_loop.json and h100_closed_loop.md; takes about 4 minutes on an H100 (--quick: 1.5).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import platform
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "node_agent")]

from bench.gpu_preflight import open_gpu  # noqa: E402
from edpilot.edp import MemberSample  # noqa: E402
from edpilot.models import (  # noqa: E402
    BatchSizeSpec,
    EnergyPolicySpec,
    LabelSelector,
    PowerCapSpec,
    Profile,
    QuantizationSpec,
    WorkMetric,
)
from edpilot.optimizer import (  # noqa: E402
    Decision,
    MemberInfo,
    Observation,
    OptimizerState,
    Tuning,
    WorkloadInfo,
    step,
)

RESULTS = REPO / "bench" / "results"
# Llama 3 8B's shape (gpusim.LLAMA3_8B) and the probe's context: 1,024 prompt + 64 generated.
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 32, 4096, 32, 8, 128, 14336, 128256
CONTEXT = 1088
BATCHES = (8, 16, 32, 64, 128, 256)
PRECISIONS: tuple[Profile, ...] = ("bf16", "fp8")
ACCURACY: dict[Profile, float] = {"bf16": 1.0, "fp8": 0.995}  # declared by the workload's owner
FP8_MIN_ROWS = 16  # torch._scaled_mm wants every dimension a multiple of 16
GOAL_EDP_RATIO = 1.05
WORKLOAD = "bench/h100-decode"


@dataclass(frozen=True, order=True)
class RunConfig:
    precision: Profile
    batch: int

    def __str__(self) -> str:
        return f"{self.precision} b{self.batch}"


DEFAULT = RunConfig("bf16", 8)


def policy_spec(
    batches: Sequence[int] = BATCHES, precisions: Sequence[Profile] = PRECISIONS
) -> EnergyPolicySpec:
    """The policy the loop runs: batch size and quantization Auto, power cap Off."""
    return EnergyPolicySpec(
        selector=LabelSelector(matchLabels={"app": "h100-decode"}),
        objective="EDP",
        maxSlowdownPercent=10,
        powerCap=PowerCapSpec(mode="Off"),
        batchSize=BatchSizeSpec(mode="Auto", min=min(batches), max=max(batches), multipleOf=8),
        quantization=QuantizationSpec(mode="Auto", allowed=list(precisions), maxAccuracyDropPercent=1.0),
        workMetric=WorkMetric(name="decode_tokens_total", unit="tokens"),
    )


# Short windows so the whole run fits a few minutes of device time; the energy counter updates
# every 100 ms and readings are aligned to its updates, so 2 s windows are good to ~0.5%.
TUNING = Tuning(
    windowSeconds=2.0,
    baselineWindows=3,
    probeWindows=2,
    maxWindows=6,
    settleWindows=1,
    applyTimeoutSeconds=30.0,
)


# ---------------------------------------------------------------- pure parts (tested on CPU)


def parameter_count() -> int:
    """Every weight: the layers' linear layers, the embedding and the output head (norms aside)."""
    qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM * HIDDEN
    layer = qkv + HEADS * HEAD_DIM * HIDDEN + 3 * HIDDEN * FFN
    return LAYERS * layer + 2 * VOCAB * HIDDEN


def padded_rows(config: RunConfig) -> int:
    """Rows the matmuls really run: fp8 pads the batch to a multiple of 16, at least 16."""
    if config.precision != "fp8":
        return config.batch
    return max(FP8_MIN_ROWS, math.ceil(config.batch / FP8_MIN_ROWS) * FP8_MIN_ROWS)


@dataclass(frozen=True)
class Reading:
    """Cumulative counters at `time`: what the agent would report for the workload's GPU."""

    time: float
    joules: float
    tokens: float
    config: RunConfig
    watts: float = 0.0
    limit_watts: float = 0.0
    sm_clock_mhz: float = 0.0


@dataclass(frozen=True)
class Measured:
    """One configuration over consecutive windows (ratio of sums; per-window EDPs for noise)."""

    config: RunConfig
    seconds: float
    joules: float
    tokens: float
    window_edps: tuple[float, ...] = ()
    sm_clock_mhz: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def joules_per_token(self) -> float:
        return self.joules / self.tokens

    @property
    def step_seconds(self) -> float:
        """The delay a token sees: a whole decode step (as edpilot.edp defines it)."""
        return self.config.batch / self.tokens_per_second

    @property
    def edp(self) -> float:
        return self.joules_per_token * self.step_seconds

    @property
    def watts(self) -> float:
        return self.joules / self.seconds

    @property
    def noise(self) -> float:
        """Relative standard deviation of the per-window EDP."""
        if len(self.window_edps) < 2:
            return 0.0
        return statistics.stdev(self.window_edps) / statistics.fmean(self.window_edps)

    def row(self) -> dict[str, Any]:
        return {
            "precision": self.config.precision,
            "batch": self.config.batch,
            "seconds": self.seconds,
            "joules": self.joules,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens_per_second,
            "watts": self.watts,
            "joules_per_token": self.joules_per_token,
            "step_ms": self.step_seconds * 1000,
            "edp": self.edp,
            "noise": self.noise,
            "windows": len(self.window_edps),
            "sm_clock_mhz": self.sm_clock_mhz,
        }


def measured_between(readings: Sequence[Reading]) -> Measured:
    """The measurement of consecutive readings of one configuration."""
    if len(readings) < 2:
        raise ValueError("a measurement needs at least two readings")
    configs = {r.config for r in readings}
    if len(configs) != 1:
        raise ValueError(f"the workload changed configuration while measured: {sorted(map(str, configs))}")
    config = configs.pop()
    edps = []
    for a, b in itertools.pairwise(readings):
        seconds, joules, tokens = b.time - a.time, b.joules - a.joules, b.tokens - a.tokens
        if seconds <= 0 or joules <= 0 or tokens <= 0:
            raise ValueError(f"a window of {config} has no time, energy or work: {a} -> {b}")
        edps.append(joules / tokens * config.batch * seconds / tokens)
    first, last = readings[0], readings[-1]
    return Measured(
        config=config,
        seconds=last.time - first.time,
        joules=last.joules - first.joules,
        tokens=last.tokens - first.tokens,
        window_edps=tuple(edps),
        sm_clock_mhz=last.sm_clock_mhz,
    )


def eligible(
    config: RunConfig, policy: EnergyPolicySpec, accuracy: dict[Profile, float], default: RunConfig
) -> bool:
    """Inside the policy's bounds and accurate enough against the default's profile."""
    b, q = policy.batchSize, policy.quantization
    if not b.min <= config.batch <= b.max or config.batch % b.multipleOf:
        return False
    if config.precision != default.precision:
        if config.precision not in q.allowed or config.precision not in accuracy:
            return False
        reference = accuracy[default.precision]
        if 100.0 * (reference - accuracy[config.precision]) / reference > q.maxAccuracyDropPercent:
            return False
    return True


def oracle(
    rows: Sequence[Measured], policy: EnergyPolicySpec, accuracy: dict[Profile, float], default: RunConfig
) -> Measured:
    """The lowest-EDP configuration of an exhaustive sweep that the policy allows: eligible, and
    with throughput within maxSlowdownPercent of the default's."""
    base = next((r for r in rows if r.config == default), None)
    if base is None:
        raise ValueError(f"the sweep has no row for the default {default}")
    floor = base.tokens_per_second * (1.0 - policy.maxSlowdownPercent / 100.0)
    feasible = [
        r for r in rows if eligible(r.config, policy, accuracy, default) and r.tokens_per_second >= floor
    ]
    return min(feasible, key=lambda r: r.edp)


def ratios(of: Measured, to: Measured) -> dict[str, float]:
    return {
        "edp": of.edp / to.edp,
        "joules_per_token": of.joules_per_token / to.joules_per_token,
        "tokens_per_second": of.tokens_per_second / to.tokens_per_second,
    }


def exploration_energy(
    start: Reading, end: Reading, converged: Measured, default: Measured
) -> dict[str, float]:
    """What exploring cost: its energy, that energy less what the converged configuration would
    have spent on the same tokens, and what it saved against staying at the default."""
    joules, tokens = end.joules - start.joules, end.tokens - start.tokens
    return {
        "seconds": end.time - start.time,
        "joules": joules,
        "tokens": tokens,
        "joules_over_converged": joules - tokens * converged.joules_per_token,
        "joules_saved_vs_default": tokens * default.joules_per_token - joules,
    }


# ---------------------------------------------------------------- driving a rig (tested with a simulated one)


class Rig(Protocol):
    """A GPU running the workload: the agent's view (counters) and the workload's hint input."""

    uuid: str
    min_limit_watts: float
    max_limit_watts: float

    def apply(self, config: RunConfig) -> None:
        """Hint a configuration; the workload switches at its next step."""
        ...

    def read(self) -> Reading: ...

    def wait(self, seconds: float) -> None: ...


def measure(
    rig: Rig, config: RunConfig, windows: int, window_seconds: float, settle_seconds: float
) -> Measured:
    rig.apply(config)
    rig.wait(settle_seconds)
    readings = [rig.read()]
    for _ in range(windows):
        rig.wait(window_seconds)
        readings.append(rig.read())
    return measured_between(readings)


def sweep(
    rig: Rig, configs: Sequence[RunConfig], windows: int, window_seconds: float, settle_seconds: float
) -> list[Measured]:
    rows = []
    for config in configs:
        row = measure(rig, config, windows, window_seconds, settle_seconds)
        print(
            f"  sweep {config!s:<10} {row.tokens_per_second:>10.0f} tok/s {row.watts:>6.0f} W "
            f"{row.joules_per_token:.3e} J/tok  step {row.step_seconds * 1000:6.3f} ms  EDP {row.edp:.3e}"
            f"  noise {100 * row.noise:.1f}%",
            flush=True,
        )
        rows.append(row)
    return rows


@dataclass
class LoopResult:
    converged: bool
    config: RunConfig  # what the optimizer holds at the end (its incumbent)
    probes: int
    start: Reading
    end: Reading
    decisions: int
    bad_windows: dict[str, int]
    events: list[dict[str, Any]]
    probe_log: list[dict[str, Any]]
    dry_run_caps: list[dict[str, Any]]
    figures: dict[str, Any]
    state: OptimizerState | None = field(default=None, repr=False)


def _observation(r: Reading, uuid: str) -> Observation:
    return Observation(
        time=r.time,
        members=(
            MemberSample(
                member=uuid,
                energyJoules=r.joules,
                workUnits=r.tokens,
                powerWatts=r.watts,
                capWatts=r.limit_watts,
                batchSize=r.config.batch,
                quantization=r.config.precision,
            ),
        ),
    )


def closed_loop(
    rig: Rig,
    policy: EnergyPolicySpec,
    tuning: Tuning,
    accuracy: dict[Profile, float],
    default: RunConfig,
    max_seconds: float,
    observe_seconds: float,
    log: Callable[[str], None] = print,
) -> LoopResult:
    """Feed the optimizer observations of the rig and apply its hints until it converges."""
    rig.apply(default)
    rig.wait(observe_seconds)
    start = rig.read()
    # The limit in force is the baseline cap: this benchmark never changes it.
    info = WorkloadInfo(
        name=WORKLOAD,
        members=(
            MemberInfo(
                member=rig.uuid,
                pod=WORKLOAD,
                minWatts=rig.min_limit_watts,
                maxWatts=rig.max_limit_watts,
                defaultWatts=start.limit_watts,
            ),
        ),
        accuracy=accuracy,
        batchSize=default.batch,
        quantization=default.precision,
    )
    state: OptimizerState | None = None
    decision: Decision | None = None
    events: list[dict[str, Any]] = []
    dry_run: list[dict[str, Any]] = []
    bad: dict[str, int] = {}
    decisions = 0
    running = default
    r = start
    while True:
        decision = step(policy, info, state, _observation(r, rig.uuid), r.time, tuning)
        state = decision.state
        decisions += 1
        at = r.time - start.time
        for e in decision.events:
            events.append({"t": round(at, 2), "reason": e.reason, "message": e.message})
            log(f"  [{at:6.1f} s] {e.reason}: {e.message}")
        if decision.badData is not None:
            bad[decision.badData.value] = bad.get(decision.badData.value, 0) + 1
        cap = decision.capWatts.get(rig.uuid)
        if cap is not None and abs(cap - r.limit_watts) > 1.0:
            dry_run.append({"t": round(at, 2), "would_set_watts": cap, "enforced_watts": r.limit_watts})
        hinted = RunConfig(decision.quantization or running.precision, decision.batchSize or running.batch)
        if hinted != running:
            rig.apply(hinted)
            running = hinted
        if decision.phase == "Converged" or at >= max_seconds:
            break
        rig.wait(observe_seconds)
        r = rig.read()
    incumbent = state.incumbent.config if state.incumbent is not None else None
    config = (
        RunConfig(incumbent.quantization or running.precision, incumbent.batchSize or running.batch)
        if incumbent is not None
        else running
    )
    probe_log = [
        {
            "stage": p.stage,
            "precision": p.config.quantization,
            "batch": p.config.batchSize,
            "edp": p.metrics.edp if p.metrics else None,
            "joules_per_token": p.metrics.joulesPerUnit if p.metrics else None,
            "tokens_per_second": p.metrics.unitsPerSecond if p.metrics else None,
            "windows": p.metrics.windows if p.metrics else 0,
            "failed": p.failed,
        }
        for p in ([state.baseline] if state.baseline else []) + list(state.probes)
    ]
    return LoopResult(
        converged=decision.phase == "Converged",
        config=config,
        probes=decision.figures.probes,
        start=start,
        end=r,
        decisions=decisions,
        bad_windows=bad,
        events=events,
        probe_log=probe_log,
        dry_run_caps=dry_run,
        figures=decision.figures.model_dump(mode="json"),
        state=state,
    )


def run_experiment(
    rig: Rig,
    configs: Sequence[RunConfig],
    policy: EnergyPolicySpec,
    tuning: Tuning,
    *,
    sweep_windows: int = 2,
    window_seconds: float = 2.0,
    settle_seconds: float = 0.5,
    max_loop_seconds: float = 240.0,
    observe_seconds: float = 0.5,
    hold_windows: int = 5,
    recheck_windows: int = 3,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Sweep for the oracle, close the loop from the default, then measure the converged, the
    oracle's and the default configuration again back to back (same minute, same temperature)."""
    log(f"oracle sweep: {len(configs)} configurations x {sweep_windows} windows of {window_seconds:g} s")
    rows = sweep(rig, configs, sweep_windows, window_seconds, settle_seconds)
    best = oracle(rows, policy, ACCURACY, DEFAULT)
    default = next(r for r in rows if r.config == DEFAULT)
    log(f"oracle: {best.config} (EDP {best.edp:.3e}); default {DEFAULT}: EDP {default.edp:.3e}")
    log("closed loop from the default:")
    loop = closed_loop(rig, policy, tuning, ACCURACY, DEFAULT, max_loop_seconds, observe_seconds, log)
    log(
        f"{'converged' if loop.converged else 'NOT converged'} on {loop.config} after {loop.probes} probes, "
        f"{loop.end.time - loop.start.time:.1f} s"
    )
    hold = measure(rig, loop.config, hold_windows, window_seconds, settle_seconds)
    # Re-measured even when it is the converged one: the spread between the two is the noise.
    paired_oracle = measure(rig, best.config, recheck_windows, window_seconds, settle_seconds)
    paired_default = measure(rig, DEFAULT, recheck_windows, window_seconds, settle_seconds)
    converged_row = next(r for r in rows if r.config == loop.config)
    return {
        "sweep": [r.row() for r in rows],
        "oracle": best.row(),
        "default": default.row(),
        "loop": {
            "converged": loop.converged,
            "config": {"precision": loop.config.precision, "batch": loop.config.batch},
            "probes": loop.probes,
            "decisions": loop.decisions,
            "seconds_to_converge": loop.end.time - loop.start.time,
            "bad_windows": loop.bad_windows,
            "events": loop.events,
            "probe_log": loop.probe_log,
            "dry_run_caps": loop.dry_run_caps,
            "figures": loop.figures,
        },
        "converged_in_sweep": converged_row.row(),
        "converged_held": hold.row(),
        "rechecked": {"oracle": paired_oracle.row(), "default": paired_default.row()},
        "ratios": {
            # The choice: both configurations from the same sweep, measured the same way.
            "vs_oracle_sweep": ratios(converged_row, best),
            "vs_default_sweep": ratios(converged_row, default),
            # After convergence, held and re-measured back to back with the other two.
            "vs_oracle_rechecked": ratios(hold, paired_oracle),
            "vs_default_rechecked": ratios(hold, paired_default),
        },
        "goal_edp_ratio": GOAL_EDP_RATIO,
        "goal_met": ratios(converged_row, best)["edp"] <= GOAL_EDP_RATIO
        and ratios(hold, paired_oracle)["edp"] <= GOAL_EDP_RATIO,
        "exploration": exploration_energy(loop.start, loop.end, hold, default),
        "settings": {
            "sweep_windows": sweep_windows,
            "window_seconds": window_seconds,
            "settle_seconds": settle_seconds,
            "observe_seconds": observe_seconds,
            "hold_windows": hold_windows,
            "recheck_windows": recheck_windows,
            "max_loop_seconds": max_loop_seconds,
            "tuning": tuning.model_dump(),
            "policy": policy.model_dump(mode="json", exclude_none=True),
            "accuracy": ACCURACY,
        },
    }


def _f(x: float, spec: str = ".3g") -> str:
    return format(x, spec)


def render_markdown(result: dict[str, Any]) -> str:
    m, loop, rat, x = result["machine"], result["loop"], result["ratios"], result["exploration"]
    conv = loop["config"]
    lines = [
        "# Closed loop on a real H100",
        "",
        f"{result['date']}; {m['gpu']} (UUID {m['uuid']}); driver {m['driver']}, CUDA {m['cuda_driver']}; "
        f"torch {m['torch']} (CUDA {m['torch_cuda']}), nvidia-ml-py {m['pynvml']}, Python {m['python']}; "
        f"CUDA graphs: {m['cuda_graphs']}. Produced by `bench/h100_closed_loop.py` in {result['run_seconds']:.0f} s.",
        "",
        f"Workload: {result['workload']}. Objective EDP = J/token × step time (the delay a token sees); "
        f"policy: batch size Auto {min(b['batch'] for b in result['sweep'])}…{max(b['batch'] for b in result['sweep'])}, "
        "quantization Auto [bf16, fp8] (declared accuracy bf16 1.0, fp8 0.995), power cap Off, "
        "maxSlowdownPercent 10.",
        "",
        "## Result",
        "",
        f"- oracle (exhaustive sweep): **{result['oracle']['precision']} b{result['oracle']['batch']}**, "
        f"EDP {_f(result['oracle']['edp'])} J·s/token, {_f(result['oracle']['joules_per_token'])} J/token",
        f"- default: bf16 b8, EDP {_f(result['default']['edp'])}, {_f(result['default']['joules_per_token'])} J/token",
        f"- edpilot {'converged' if loop['converged'] else 'did NOT converge'} on **{conv['precision']} b{conv['batch']}** "
        f"after {loop['probes']} probes (+ baseline) in {loop['seconds_to_converge']:.0f} s",
        "",
        "| converged vs | EDP | J/token | tokens/s |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("vs_oracle_sweep", "oracle (both from the sweep)"),
        ("vs_oracle_rechecked", "oracle (converged held, then both re-measured back to back)"),
        ("vs_default_sweep", "default bf16 b8 (sweep)"),
        ("vs_default_rechecked", "default bf16 b8 (re-measured)"),
    ):
        r = rat[key]
        lines.append(
            f"| {label} | {r['edp']:.3f} | {r['joules_per_token']:.3f} | {r['tokens_per_second']:.3f} |"
        )
    lines += [
        "",
        f"Goal: EDP within {100 * (result['goal_edp_ratio'] - 1):.0f}% of the oracle's: "
        f"**{'met' if result['goal_met'] else 'NOT met'}**.",
        "",
        "Hints reach the workload in-process, at its next step; in a cluster the kubelet's refresh of "
        "the downward-API file adds its delay to every probe.",
        "",
        f"Exploration (baseline + probes, until convergence): {x['seconds']:.0f} s, {x['joules']:.0f} J for "
        f"{x['tokens']:.3g} tokens; {x['joules_over_converged']:.0f} J more than the converged configuration "
        f"would have spent on those tokens, {x['joules_saved_vs_default']:.0f} J less than the default would have.",
        "",
        "## Oracle sweep",
        "",
        "| precision | batch | tokens/s | W | J/token | step ms | EDP (J·s/token) | EDP / oracle | noise | SM MHz |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["sweep"]:
        lines.append(
            f"| {r['precision']} | {r['batch']} | {r['tokens_per_second']:.0f} | {r['watts']:.0f} | "
            f"{r['joules_per_token']:.3e} | {r['step_ms']:.3f} | {r['edp']:.3e} | "
            f"{r['edp'] / result['oracle']['edp']:.2f} | {100 * r['noise']:.1f}% | {r['sm_clock_mhz']:.0f} |"
        )
    lines += [
        "",
        "## The optimizer's measurements (baseline, then probes in order)",
        "",
        "| stage | precision | batch | windows | tokens/s | J/token | EDP |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in loop["probe_log"]:
        if p["edp"] is None:
            lines.append(
                f"| {p['stage']} | {p['precision']} | {p['batch']} | - | failed: {p['failed']} | | |"
            )
        else:
            lines.append(
                f"| {p['stage']} | {p['precision']} | {p['batch']} | {p['windows']} | "
                f"{p['tokens_per_second']:.0f} | {p['joules_per_token']:.3e} | {p['edp']:.3e} |"
            )
    lines += ["", "Events:", ""]
    lines += [f"- {e['t']:.1f} s {e['reason']}: {e['message']}" for e in loop["events"]]
    s = result["safety"]
    lines += [
        "",
        "## Safety",
        "",
        f"- NVML setters disabled before the run: {s['setters_forbidden']}; the backend is read-only.",
        f"- enforced power limit before {s['limit_before_watts']:g} W, after {s['limit_after_watts']:g} W "
        f"(default {s['default_limit_watts']:g} W, constraints {s['min_limit_watts']:g}-{s['max_limit_watts']:g} W).",
        f"- caps the optimizer asked for that differ from the enforced limit (dry run, never set): "
        f"{len(loop['dry_run_caps'])}; power cap mode is Off, so caps were not explored.",
        f"- windows the optimizer discarded: {loop['bad_windows'] or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the real workload (needs a GPU)


class TorchDecodeRig:
    """The decode workload in a thread on one GPU, and the agent's NVML view of that GPU.

    The thread keeps two steps in flight and counts a step's tokens once it has completed, so
    the token counter is exact to two steps; a new hint is applied between steps after the
    steps in flight have been counted, so every counted token belongs to the reported config.
    One KV cache for the largest batch serves every batch (a batch of b uses its first b rows)."""

    IN_FLIGHT = 2

    def __init__(self, torch: Any, backend: Any, gpu_index: int, configs: Sequence[RunConfig]) -> None:
        self.torch = torch
        self.backend = backend
        self.gpu_index = gpu_index
        info = backend.gpus()[gpu_index]
        self.uuid: str = info.uuid
        self.min_limit_watts: float = info.min_limit_watts
        self.max_limit_watts: float = info.max_limit_watts
        torch.cuda.set_device(gpu_index)
        self.device = torch.device("cuda", gpu_index)
        gen = torch.Generator(device=self.device).manual_seed(0)
        dt = torch.bfloat16

        def weight(*shape: int) -> Any:
            return torch.empty(*shape, device=self.device, dtype=dt).normal_(0.0, 0.02, generator=gen)

        self.embedding = weight(VOCAB, HIDDEN)
        self.head = weight(VOCAB, HIDDEN)
        self.norm = torch.ones(HIDDEN, device=self.device, dtype=dt)
        # Per layer: qkv, o, gate+up, down (out, in); fp8 copies of the same matrices, e4m3.
        self.bf16: list[tuple[Any, ...]] = []
        self.fp8: list[tuple[Any, ...]] = []
        for _ in range(LAYERS):
            mats = (
                weight((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
                weight(HIDDEN, HEADS * HEAD_DIM),
                weight(2 * FFN, HIDDEN),
                weight(HIDDEN, FFN),
            )
            self.bf16.append(mats)
            self.fp8.append(tuple(w.to(torch.float8_e4m3fn) for w in mats))
        self.one = torch.ones((), device=self.device, dtype=torch.float32)
        most = max(c.batch for c in configs)
        self.cache = [
            (
                torch.randn(most, KV_HEADS, CONTEXT, HEAD_DIM, device=self.device, dtype=dt, generator=gen),
                torch.randn(most, KV_HEADS, CONTEXT, HEAD_DIM, device=self.device, dtype=dt, generator=gen),
            )
            for _ in range(LAYERS)
        ]
        self.mask = torch.ones(most, 1, 1, CONTEXT, device=self.device, dtype=torch.bool)
        self.position = torch.tensor([CONTEXT - 1], device=self.device)
        self.tokens_in = torch.randint(0, VOCAB, (most,), device=self.device, generator=gen)
        self.graphs: dict[RunConfig, Any] = {}
        self.cuda_graphs = True
        try:
            for c in configs:
                self.graphs[c] = self._capture(c)
        except Exception as exc:  # a capture failure costs speed, not the benchmark
            print(f"CUDA graph capture failed ({exc!r}); running eagerly", flush=True)
            self.graphs.clear()
            self.cuda_graphs = False
            for c in configs:
                self._forward(c)
        torch.cuda.synchronize()
        self._lock = threading.Lock()
        self._hint = DEFAULT
        self._active = DEFAULT
        self._tokens = 0.0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="decode", daemon=True)
        self._thread.start()

    def _linear(self, x: Any, w: Any, fp8: bool) -> Any:
        """x @ w.T; in fp8 the activations are cast per call and their rows padded to 16."""
        torch = self.torch
        if not fp8:
            return x @ w.t()
        rows = x.shape[0]
        pad = (-rows) % FP8_MIN_ROWS
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        y = torch._scaled_mm(x.to(torch.float8_e4m3fn), w.t(), self.one, self.one, out_dtype=torch.bfloat16)
        return y[:rows]

    def _rms(self, x: Any) -> Any:
        torch = self.torch
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype) * self.norm

    def _forward(self, c: RunConfig) -> Any:
        """One decode step of `c.batch` sequences: one new token each, attending over the cache."""
        torch = self.torch
        b, fp8 = c.batch, c.precision == "fp8"
        functional = torch.nn.functional
        x = self.embedding[self.tokens_in[:b]]
        mask = self.mask[:b]
        for (wqkv, wo, wgu, wdown), (k_cache, v_cache) in zip(
            self.fp8 if fp8 else self.bf16, self.cache, strict=True
        ):
            h = self._rms(x)
            q, k, v = self._linear(h, wqkv, fp8).split(
                [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1
            )
            kc, vc = k_cache[:b], v_cache[:b]
            kc.index_copy_(2, self.position, k.view(b, KV_HEADS, 1, HEAD_DIM))
            vc.index_copy_(2, self.position, v.view(b, KV_HEADS, 1, HEAD_DIM))
            a = functional.scaled_dot_product_attention(
                q.view(b, HEADS, 1, HEAD_DIM), kc, vc, attn_mask=mask, enable_gqa=True
            )
            x = x + self._linear(a.reshape(b, HEADS * HEAD_DIM), wo, fp8)
            gate, up = self._linear(self._rms(x), wgu, fp8).chunk(2, dim=-1)
            x = x + self._linear(functional.silu(gate) * up, wdown, fp8)
        return (self._rms(x) @ self.head.t()).argmax(-1)

    def _capture(self, c: RunConfig) -> Any:
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(c)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._forward(c)
        return graph

    def _work(self) -> None:
        torch = self.torch
        try:
            torch.cuda.set_device(self.gpu_index)
            in_flight: collections.deque[tuple[Any, int]] = collections.deque()
            while not self._stop.is_set():
                hint = self._hint
                if hint != self._active:
                    while in_flight:
                        event, batch = in_flight.popleft()
                        event.synchronize()
                        with self._lock:
                            self._tokens += batch
                    with self._lock:
                        self._active = hint
                if self.graphs:
                    self.graphs[hint].replay()
                else:
                    self._forward(hint)
                event = torch.cuda.Event()
                event.record()
                in_flight.append((event, hint.batch))
                if len(in_flight) > self.IN_FLIGHT:
                    done, batch = in_flight.popleft()
                    done.synchronize()
                    with self._lock:
                        self._tokens += batch
            torch.cuda.synchronize()
        except BaseException as exc:
            self._error = exc

    def apply(self, config: RunConfig) -> None:
        self._check()
        self._hint = config

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the decode workload failed: {self._error!r}") from self._error
        if not self._thread.is_alive() and not self._stop.is_set():
            raise RuntimeError("the decode workload thread stopped")

    def read(self) -> Reading:
        """Counters right after the energy counter ticks (every ~100 ms), so that a window's
        energy and its length start and end at the same instant."""
        self._check()
        first = self.backend.energy_counter_joules(self.uuid)
        deadline = time.monotonic() + 0.3
        joules = first
        while joules == first and time.monotonic() < deadline:
            joules = self.backend.energy_counter_joules(self.uuid)
        now = time.monotonic()
        with self._lock:
            tokens, active = self._tokens, self._active
        g = self.backend.read(self.uuid, energy=False)
        return Reading(
            time=now,
            joules=joules,
            tokens=tokens,
            config=active,
            watts=g.power_watts,
            limit_watts=g.enforced_limit_watts,
            sm_clock_mhz=g.sm_clock_mhz,
        )

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)
        self._check()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", type=int, default=0, help="index of the GPU to run on")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the .json and .md results")
    p.add_argument("--window-seconds", type=float, default=2.0)
    p.add_argument("--sweep-windows", type=int, default=2)
    p.add_argument("--max-loop-seconds", type=float, default=240.0)
    p.add_argument("--quick", action="store_true", help="a one-minute smoke run with short windows")
    args = p.parse_args(argv)
    started = time.monotonic()
    opened = open_gpu("h100_closed_loop", args.gpu)
    if opened is None:
        return 2
    backend, info, torch = opened.backend, opened.info, opened.torch
    if info.mig_enabled:
        print(
            "h100_closed_loop: MIG is enabled on this GPU; the benchmark needs a whole GPU", file=sys.stderr
        )
        return 2
    limit_before = backend.read(info.uuid, energy=False).enforced_limit_watts
    from importlib.metadata import version

    machine = {
        "host": platform.node(),
        "gpu": info.model,
        "uuid": info.uuid,
        **backend.versions(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "pynvml": version("nvidia-ml-py"),
        "python": sys.version.split()[0],
    }
    configs = [RunConfig(q, b) for q in PRECISIONS for b in BATCHES]
    window = 0.5 if args.quick else args.window_seconds
    tuning = TUNING.model_copy(update={"windowSeconds": window}) if args.quick else TUNING
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "quick": args.quick,
        "workload": (
            f"Llama-3-8B-shaped decode ({parameter_count() / 1e9:.2f} B parameters: {LAYERS} layers, hidden "
            f"{HIDDEN}, {HEADS} query / {KV_HEADS} KV heads of {HEAD_DIM}, FFN {FFN}, vocabulary {VOCAB}), KV cache "
            f"of {CONTEXT} positions per sequence read every step; linear layers in bf16 or fp8 "
            "(torch._scaled_mm, rows padded to 16), cache, attention and head in bf16"
        ),
    }
    code = 0
    rig: TorchDecodeRig | None = None
    try:
        print(
            f"{info.model} {info.uuid}: enforced limit {limit_before:g} W; building the workload", flush=True
        )
        rig = TorchDecodeRig(torch, backend, args.gpu, configs)
        machine["cuda_graphs"] = rig.cuda_graphs
        result.update(
            run_experiment(
                rig,
                configs,
                policy_spec(),
                tuning,
                sweep_windows=1 if args.quick else args.sweep_windows,
                window_seconds=window,
                settle_seconds=0.2 if args.quick else 0.5,
                max_loop_seconds=40.0 if args.quick else args.max_loop_seconds,
                observe_seconds=0.25 if args.quick else 0.5,
                hold_windows=2 if args.quick else 5,
                recheck_windows=1 if args.quick else 3,
            )
        )
    except Exception:
        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr)
        code = 1
    finally:
        if rig is not None:
            rig.close()
        limit_after = backend.read(info.uuid, energy=False).enforced_limit_watts
        backend.close()
    result["safety"] = {
        "setters_forbidden": opened.setters_forbidden,
        "limit_before_watts": limit_before,
        "limit_after_watts": limit_after,
        "default_limit_watts": info.default_limit_watts,
        "min_limit_watts": info.min_limit_watts,
        "max_limit_watts": info.max_limit_watts,
    }
    if limit_after != limit_before:
        print(
            f"h100_closed_loop: the enforced limit changed {limit_before} -> {limit_after} W", file=sys.stderr
        )
        code = 1
    result["run_seconds"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "h100_closed_loop.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    if code == 0:
        (args.out / "h100_closed_loop.md").write_text(render_markdown(result))
        r = result["ratios"]
        print(
            f"oracle {result['oracle']['precision']} b{result['oracle']['batch']}; converged "
            f"{result['loop']['config']['precision']} b{result['loop']['config']['batch']} after "
            f"{result['loop']['probes']} probes; EDP/oracle {r['vs_oracle_sweep']['edp']:.3f} (sweep), "
            f"{r['vs_oracle_rechecked']['edp']:.3f} (rechecked); EDP/default {r['vs_default_sweep']['edp']:.3f}; "
            f"J/token/oracle {r['vs_oracle_sweep']['joules_per_token']:.3f}; goal "
            f"{'met' if result['goal_met'] else 'NOT met'}; limit {limit_before:g} -> {limit_after:g} W"
        )
    print(f"wrote {args.out / 'h100_closed_loop.json'} in {result['run_seconds']} s")
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
