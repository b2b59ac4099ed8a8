"""`edpilot simulate`: the optimizer and simulated GPUs in one process, on a virtual clock.

No cluster: each simulated workload runs on `gpusim.SimulatedGpu`s, applies the optimizer's hints
after a short delay (a quantization switch reloads the model, doing no work meanwhile), and
reports what it runs, the way a real workload reports through its metrics. Every report
interval the agent's view (cumulative energy, work, enforced limit, locked SM clock, reported
config) goes through `optimizer.step`, and its decision is applied: caps and clock locks at once
(the agent), hints later (the workload).

Serving workloads run `serving.ServingEngine` under offered load (a steady rate or a diurnal
trace): demand sets their work rate, their batch knob limits the sequences in flight, and they
report what a vLLM engine exposes (generated tokens, the policy's latency, running and waiting
requests), so the optimizer judges them on latency at the load they serve.

`run_fleet(config, seed)` is the reusable pure part; `main` prints a table or `--json`.
`run_serving(...)` runs one serving replica under a policy's powerCap and smClock (the actuator
variants of `ACTUATORS`: caps only, clocks only, both) and returns its J/token, p99 inter-token
latency and time over the SLO.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from pydantic import BaseModel, ConfigDict

from edpilot import gpusim, serving
from edpilot.edp import MemberSample, Metrics, objective_value, seconds_per_unit
from edpilot.models import (
    PROFILES,
    BatchSizeSpec,
    EnergyPolicySpec,
    LabelSelector,
    LatencySLO,
    LoadMetrics,
    Phase,
    PowerCapSpec,
    Profile,
    QuantizationSpec,
    SmClockSpec,
    WorkMetric,
)
from edpilot.optimizer import (
    Config,
    Decision,
    MemberInfo,
    Observation,
    OptimizerState,
    Tuning,
    WorkloadInfo,
    member_caps,
    member_clocks,
    step,
)

BATCH_APPLY_SECONDS = 1.0  # a serving engine picks up a new batch limit at its next scheduling round
RELOAD_SECONDS = 20.0  # a quantization switch reloads the weights: no work meanwhile


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ServingLoad:
    """What a serving workload is offered: requests per second over the day (a steady rate when
    troughFraction is 1), of the model's prompt and output lengths."""

    model: serving.ServedModel
    peakRequestsPerSecond: float
    troughFraction: float = 1.0
    peakHour: float = 15.0
    startHour: float = 0.0  # the hour of the day at simulated time 0
    # Or load steps: (from simulated second, requests per second), in order; they replace the trace.
    steps: tuple[tuple[float, float], ...] = ()

    def rate(self, t_seconds: float) -> float:
        if self.steps:
            return next((r for start, r in reversed(self.steps) if t_seconds >= start), self.steps[0][1])
        return serving.diurnal_rate(
            t_seconds + 3600.0 * self.startHour,
            self.peakRequestsPerSecond,
            self.troughFraction,
            self.peakHour,
        )


@dataclass(frozen=True)
class SimWorkloadSpec:
    """One simulated workload: what it runs, the policy that selects it, and its GPUs."""

    name: str
    profile: gpusim.WorkloadProfile
    batchSize: int
    quantization: Profile
    policy: EnergyPolicySpec
    accuracy: dict[Profile, float] = field(default_factory=dict)
    workPerRank: tuple[float, ...] = (1.0,)  # one GPU per rank; a step waits for the slowest
    reportsBatch: bool = True  # a training job's unit is a sample, not a batched token
    followsHints: bool = True
    gpu: gpusim.GpuSpec = gpusim.H100_SXM
    # One GPU too runs synchronous steps (compute, then a sync), as the sim agent runs a pod.
    synchronous: bool = False
    serving: ServingLoad | None = None  # a serving engine under offered load (profile unused)


@dataclass(frozen=True)
class FleetConfig:
    workloads: tuple[SimWorkloadSpec, ...]
    durationSeconds: float = 2400.0
    reportSeconds: float = 5.0
    tuning: Tuning = field(default_factory=Tuning)


def _policy(**overrides: object) -> EnergyPolicySpec:
    base: dict[str, object] = {
        "selector": LabelSelector(matchLabels={"edpilot.io/managed": "true"}),
        "workMetric": WorkMetric(name="work_units_total"),
    }
    return EnergyPolicySpec.model_validate({**base, **overrides})


DECODE_ACCURACY: dict[Profile, float] = {"bf16": 1.0, "fp16": 0.999, "fp8": 0.995, "int8": 0.97}

# Chat serving of a Llama-3-8B-shaped model: tokens, latencies and load read under vLLM's names.
# The median inter-token latency is what slowdown is measured on (within 50 ms, and at most 20%
# above what the defaults give): a window's median is stable, while its 99th percentile swings
# by 15-30% from one 5 s window to the next, more than any slowdown limit of a few tens of
# percent. The 99th percentile of the time to first token is held under 1 s.
CHAT_WORK = WorkMetric(name="vllm:generation_tokens_total", unit="tokens", load=LoadMetrics())
CHAT_ITL_SLO = LatencySLO(metricName="vllm:inter_token_latency_seconds", quantile=0.5, maxSeconds=0.05)
CHAT_TTFT_SLO = LatencySLO(metricName="vllm:time_to_first_token_seconds", quantile=0.99, maxSeconds=1.0)


def serving_policy(knobs: bool = True, min_cap_percent: float = 40.0) -> EnergyPolicySpec:
    """The chat policy: every knob, or (knobs=False) the power cap alone."""
    return _policy(
        objective="EDP",
        maxSlowdownPercent=20,
        latencySLO=CHAT_ITL_SLO,
        firstTokenSLO=CHAT_TTFT_SLO,
        workMetric=CHAT_WORK,
        powerCap=PowerCapSpec(mode="Auto", minPercent=min_cap_percent, maxPercent=100),
        batchSize=BatchSizeSpec(mode="Auto" if knobs else "Off", min=64, max=1024, multipleOf=64),
        quantization=QuantizationSpec(
            mode="Auto" if knobs else "Off", allowed=["bf16", "fp8"], maxAccuracyDropPercent=1.0
        ),
    )


def chat(
    name: str,
    gpu: gpusim.GpuSpec,
    requests_per_second: float,
    policy: EnergyPolicySpec,
    trough_fraction: float = 1.0,
    start_hour: float = 0.0,
    steps: tuple[tuple[float, float], ...] = (),
) -> SimWorkloadSpec:
    """A chat-serving replica of a Llama-3-8B-shaped model (bf16, 256 sequences, CUDA graphs),
    offered `requests_per_second` (the peak of a day when trough_fraction < 1, or load steps)."""
    model = serving.ServedModel(gpu=gpu)
    load = ServingLoad(
        model, requests_per_second, troughFraction=trough_fraction, startHour=start_hour, steps=steps
    )
    return SimWorkloadSpec(
        name, gpusim.llama_decode(), 256, "bf16", policy, DECODE_ACCURACY, gpu=gpu, serving=load
    )


def sample_fleet() -> FleetConfig:
    """Chat replicas on H100 and H200 at a moderate and a busy steady load, a compute-bound
    training job and a two-GPU job with a straggler."""
    training = _policy(
        objective="EDP",
        maxSlowdownPercent=10,
        powerCap=PowerCapSpec(mode="Auto", minPercent=50, maxPercent=100),
    )
    job = _policy(objective="EDP", maxSlowdownPercent=5, groupByLabel="edpilot.io/job")
    return FleetConfig(
        workloads=(
            chat("chat-h100", gpusim.H100_SXM, 8.0, serving_policy()),
            chat("chat-h100-busy", gpusim.H100_SXM, 16.0, serving_policy()),
            chat("chat-h200-caps", gpusim.H200_SXM, 12.0, serving_policy(knobs=False)),
            SimWorkloadSpec("training-bf16", gpusim.training(), 16, "bf16", training, reportsBatch=False),
            SimWorkloadSpec(
                "job-2gpu-straggler",
                gpusim.gemm(),
                1,
                "bf16",
                job,
                workPerRank=(8.0, 4.0),
                reportsBatch=False,
            ),
        )
    )


# ---------------------------------------------------------------- one simulated workload


@dataclass(frozen=True)
class Running:
    batchSize: int
    quantization: Profile


def _workload_info(
    spec: SimWorkloadSpec, gpus: Sequence[gpusim.SimulatedGpu], pods: Sequence[str]
) -> WorkloadInfo:
    g = spec.gpu
    return WorkloadInfo(
        name=spec.name,
        members=tuple(
            MemberInfo(
                member=gpu.uuid,
                pod=pod,
                minWatts=g.min_power_limit_watts,
                maxWatts=g.max_power_limit_watts,
                defaultWatts=g.default_power_limit_watts,
                minClockMHz=g.min_sm_clock_mhz,
                maxClockMHz=g.max_sm_clock_mhz,
            )
            for gpu, pod in zip(gpus, pods, strict=True)
        ),
        accuracy=spec.accuracy,
        batchSize=spec.batchSize,
        quantization=spec.quantization,
        image="registry.example/sim:1",
    )


def _apply_locks(gpus: Sequence[gpusim.SimulatedGpu], decision: Decision) -> bool:
    """Lock (or reset) each GPU's SM clock as the decision says, the way the agent does: a GPU
    the decision names no ceiling for runs unlocked. Whether any lock changed."""
    changed = False
    for gpu in gpus:
        wanted = decision.smClockMHz.get(gpu.uuid)
        if wanted == gpu.locked_clock_mhz:
            continue
        if wanted is None:
            gpu.reset_locked_clock()
        else:
            gpu.lock_sm_clock(wanted)
        changed = True
    return changed


class SimWorkload:
    """GPUs running one workload that follows its hints the way a real one would. A locked SM
    clock acts on one GPU running alone (gpusim's job model of several ranks has no locks)."""

    def __init__(self, spec: SimWorkloadSpec, index: int) -> None:
        self.spec = spec
        node = f"sim-node-{index}"
        self.gpus = [gpusim.SimulatedGpu(spec.gpu, i, seed_name=node) for i in range(len(spec.workPerRank))]
        self.pods = [f"default/{spec.name}-{r}" for r in range(len(self.gpus))]
        self.running = Running(spec.batchSize, spec.quantization)
        self.pending: Running | None = None
        self.applyAt = 0.0
        self.busyUntil = 0.0  # reloading: no work until then
        self.latency = 0.0
        self.gauge: dict[str, float] = {}  # the last instantaneous power reading per GPU
        self.clock: dict[str, float] = {}  # the last SM clock reading per GPU

    def info(self) -> WorkloadInfo:
        return _workload_info(self.spec, self.gpus, self.pods)

    def true_point(
        self, running: Running, caps: Sequence[float], clocks: Sequence[float | None] = ()
    ) -> tuple[float, float, float]:
        """Noiseless (units/s, watts, step seconds) of the whole workload (`clocks`: the locked
        ceilings per GPU, none by default)."""
        s = self.spec
        if len(self.gpus) == 1 and not s.synchronous:
            lock = clocks[0] if clocks else None
            p = gpusim.operating_point(
                s.gpu, s.profile, running.batchSize, running.quantization, caps[0], lock
            )
            return p.units_per_second, p.power_watts, p.step_seconds
        job = gpusim.job_step(s.gpu, s.profile, running.quantization, s.workPerRank, caps, running.batchSize)
        return job.units_per_second, sum(job.per_rank_power_watts), job.step_seconds

    def _run(self, seconds: float, rng: random.Random) -> None:
        s = self.spec
        if seconds <= 0:
            return
        caps = [g.power_limit_watts for g in self.gpus]
        if len(self.gpus) == 1 and not s.synchronous:
            gpu = self.gpus[0]
            gpu.assign(s.profile, self.running.batchSize, self.running.quantization)
            point = gpu.current_point()
            assert point is not None
            reading = gpu.advance(seconds, rng)
            self.gauge[gpu.uuid], self.clock[gpu.uuid] = reading.power_watts, reading.sm_clock_mhz
            self.latency = point.step_seconds
            return
        job = gpusim.job_step(
            s.gpu, s.profile, self.running.quantization, s.workPerRank, caps, self.running.batchSize
        )
        for gpu, rank in zip(self.gpus, job.ranks, strict=True):
            # Every rank counts the job's progress (a global step counter), so the slowest rank's
            # counter is the job's throughput.
            reading = gpu.advance_at(replace(rank, units_per_second=job.units_per_second), seconds, rng)
            self.gauge[gpu.uuid], self.clock[gpu.uuid] = reading.power_watts, reading.sm_clock_mhz
        self.latency = job.step_seconds

    def _idle(self, seconds: float, rng: random.Random) -> None:
        if seconds > 0:
            for gpu in self.gpus:
                gpu.clear()
                reading = gpu.advance(seconds, rng)
                self.gauge[gpu.uuid], self.clock[gpu.uuid] = reading.power_watts, reading.sm_clock_mhz

    def advance(self, start: float, seconds: float, rng: random.Random) -> None:
        end = start + seconds
        t = start
        if self.pending is not None and self.applyAt < end:
            self._run(max(0.0, self.applyAt - t), rng)
            t = max(t, self.applyAt)
            if self.pending.quantization != self.running.quantization:
                self.busyUntil = t + RELOAD_SECONDS
            self.running, self.pending = self.pending, None
        if self.busyUntil > t:
            idle = min(self.busyUntil, end) - t
            self._idle(idle, rng)
            t += idle
        self._run(end - t, rng)

    def observation(self, now: float) -> Observation:
        return Observation(
            time=now,
            members=tuple(
                MemberSample(
                    member=gpu.uuid,
                    energyJoules=gpu.energy_counter_mj / 1000.0,
                    workUnits=gpu.work_counter,
                    powerWatts=self.gauge.get(gpu.uuid, 0.0),
                    capWatts=gpu.power_limit_watts,
                    batchSize=self.running.batchSize if self.spec.reportsBatch else None,
                    quantization=self.running.quantization,
                    latencySeconds=self.latency,
                    smClockMHz=self.clock.get(gpu.uuid),
                    lockedClockMHz=gpu.locked_clock_mhz,
                )
                for gpu in self.gpus
            ),
        )

    def apply(self, decision: Decision, now: float) -> None:
        for gpu in self.gpus:
            cap = decision.capWatts.get(gpu.uuid)
            if cap is not None and cap != gpu.power_limit_watts:
                gpu.set_power_limit(cap)
        _apply_locks(self.gpus, decision)
        wanted = Running(
            decision.batchSize or self.running.batchSize,
            decision.quantization or self.running.quantization,
        )
        target = self.pending or self.running
        if wanted != target and self.spec.followsHints:
            self.pending = wanted
            self.applyAt = now + BATCH_APPLY_SECONDS


class SimServing:
    """One serving replica: a continuous-batching engine on one simulated GPU under offered load.

    Like a vLLM Deployment rolled out with a surge pod: a new precision takes RELOAD_SECONDS to
    load on another GPU while this one keeps serving, then traffic moves to it (the surge GPU's
    energy is counted in `surgeJoules`). A new sequence limit applies at the next scheduling
    round, a cap or a clock lock at once."""

    def __init__(self, spec: SimWorkloadSpec, index: int, seed: int = 0) -> None:
        assert spec.serving is not None
        self.spec = spec
        self.load = spec.serving
        self.gpus = [gpusim.SimulatedGpu(spec.gpu, 0, seed_name=f"sim-node-{index}")]
        self.pods = [f"default/{spec.name}-0"]
        self.engine = serving.ServingEngine(
            self.load.model,
            serving.EngineConfig(spec.batchSize, spec.quantization, spec.gpu.default_power_limit_watts),
            random.Random(f"{seed}/{spec.name}/arrivals"),
        )
        self.pending: Running | None = None
        self.applyAt = 0.0
        self._last: serving.Counters | None = None
        self._gauge = 0.0
        self.surgeJoules = 0.0

    @property
    def running(self) -> Running:
        c = self.engine.config
        precision = next(p for p in PROFILES if p == c.precision)
        return Running(c.max_num_seqs, precision)

    def info(self) -> WorkloadInfo:
        return _workload_info(self.spec, self.gpus, self.pods)

    def _configure(self, running: Running) -> None:
        gpu = self.gpus[0]
        config = serving.EngineConfig(
            running.batchSize, running.quantization, gpu.power_limit_watts, gpu.locked_clock_mhz
        )
        self.engine.configure(config)

    def advance(self, start: float, seconds: float, rng: random.Random) -> None:
        del rng  # the engine draws its arrivals from its own seeded generator
        end = start + seconds
        t = start
        energy = self.engine.counters.energy_joules
        while t < end:
            chunk = min(end - t, 5.0)
            if self.pending is not None and t >= self.applyAt:
                self._configure(self.pending)
                self.pending = None
            elif self.pending is not None:
                chunk = min(chunk, self.applyAt - t)
            self.engine.run(chunk, self.load.rate(t))
            t += chunk
        self._gauge = (self.engine.counters.energy_joules - energy) / seconds if seconds > 0 else 0.0

    def _window_latency(self, slo: LatencySLO | None, metric: str | None) -> float | None:
        """What an SLO's metric read over the last window, as a scraper reads the engine's histograms."""
        if slo is None:
            return None
        empty = serving.Counters()
        return slo_value(slo, self.engine.counters, self._last or empty, metric)

    def observation(self, now: float) -> Observation:
        e, c = self.engine, self.engine.counters
        policy = self.spec.policy
        names = policy.metrics()
        latency, first_token = (
            self._window_latency(policy.latencySLO, names.latency),
            self._window_latency(policy.firstTokenSLO, names.firstToken),
        )
        self._last = replace(c, itl_fine=dict(c.itl_fine), ttft_fine=dict(c.ttft_fine))
        gpu = self.gpus[0]
        # The SM clock NVML would read now: where the running batch puts the governor.
        model = self.load.model
        decode = gpusim.llama_decode(cuda_graphs=model.cuda_graphs, shape=model.shape)
        clock = gpusim.operating_point(
            model.gpu,
            decode,
            max(1, e.running),
            e.config.precision,
            gpu.power_limit_watts,
            gpu.locked_clock_mhz,
        ).sm_clock_mhz
        return Observation(
            time=now,
            members=(
                MemberSample(
                    member=gpu.uuid,
                    energyJoules=c.energy_joules,
                    workUnits=float(c.generation_tokens),
                    powerWatts=self._gauge,
                    capWatts=gpu.power_limit_watts,
                    batchSize=e.config.max_num_seqs,
                    quantization=self.running.quantization,
                    latencySeconds=latency,
                    firstTokenSeconds=first_token,
                    requestsRunning=float(e.running),
                    requestsWaiting=float(e.waiting),
                    requestsFinished=float(c.finished),
                    smClockMHz=clock,
                    lockedClockMHz=gpu.locked_clock_mhz,
                ),
            ),
        )

    def apply(self, decision: Decision, now: float) -> None:
        gpu = self.gpus[0]
        cap = decision.capWatts.get(gpu.uuid)
        changed = cap is not None and cap != gpu.power_limit_watts
        if cap is not None and changed:
            gpu.set_power_limit(cap)
        if _apply_locks(self.gpus, decision) or changed:
            self._configure(self.running)
        wanted = Running(
            decision.batchSize or self.running.batchSize, decision.quantization or self.running.quantization
        )
        if wanted != (self.pending or self.running) and self.spec.followsHints:
            self.pending = wanted
            self.applyAt = now + BATCH_APPLY_SECONDS
            if wanted.quantization != self.running.quantization:
                # The surge pod loads the new weights on another GPU, awake, meanwhile.
                self.applyAt = now + RELOAD_SECONDS
                self.surgeJoules += RELOAD_SECONDS * self.spec.gpu.awake_watts


def sim_workload(spec: SimWorkloadSpec, index: int, seed: int = 0) -> SimWorkload | SimServing:
    return SimServing(spec, index, seed) if spec.serving is not None else SimWorkload(spec, index)


# ---------------------------------------------------------------- results


class Figures(BaseModel):
    model_config = ConfigDict(extra="forbid")

    joulesPerUnit: float
    secondsPerUnit: float
    unitsPerSecond: float
    edp: float
    objective: float


class ProbeRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    quantization: Profile | None
    batchSize: int | None
    capWatts: dict[str, float | None]
    smClockMHz: dict[str, float | None] = {}
    objective: float | None
    unitsPerSecond: float | None
    failed: str | None = None


class WorkloadResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    gpus: int
    objective: str
    maxSlowdownPercent: float
    serving: bool = False  # load-driven: slowdown is a latency rise at the load served
    phase: Phase
    convergedAtSeconds: float | None
    probes: int
    baseline: Figures | None  # as the optimizer measured them
    final: Figures | None
    edpReductionPercent: float | None
    objectiveReductionPercent: float | None
    slowdownPercent: float | None
    trueEdpReductionPercent: float | None  # from gpusim's noiseless model, for comparison
    trueSlowdownPercent: float | None
    capWatts: dict[str, float | None]
    smClockMHz: dict[str, float | None] = {}  # the locked SM clock ceilings; None: unlocked
    defaultCapWatts: float
    batchSize: int | None
    quantization: Profile | None
    energySavedJoules: float
    explored: list[ProbeRecord]
    energySavedSeries: list[tuple[float, float]]
    badData: dict[str, int]


class FleetResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int
    durationSeconds: float
    workloads: list[WorkloadResult]


def _figures(m: Metrics | None) -> Figures | None:
    if m is None:
        return None
    return Figures(
        joulesPerUnit=m.joulesPerUnit,
        secondsPerUnit=m.secondsPerUnit,
        unitsPerSecond=m.unitsPerSecond,
        edp=m.edp,
        objective=m.objective,
    )


def _true_edp(
    sim: SimWorkload, running: Running, caps: Sequence[float], clocks: Sequence[float | None] = ()
) -> tuple[float, float]:
    ups, watts, _ = sim.true_point(running, caps, clocks)
    batch = running.batchSize if sim.spec.reportsBatch else None
    spu = seconds_per_unit(ups, batch)
    return objective_value("EDP", watts / ups, spu), ups


def slo_value(
    slo: LatencySLO, now: serving.Counters, before: serving.Counters, metric: str | None = None
) -> float | None:
    """An SLO's metric (`metric`: its name after the engine preset, else its own) over the time
    between two readings of an engine's counters: inter-token latency unless the metric names time
    to first token; its quantile, or the mean."""
    ttft = "first_token" in (metric or slo.metricName or "")
    fine, old = (now.ttft_fine, before.ttft_fine) if ttft else (now.itl_fine, before.itl_fine)
    total = (now.ttft_sum - before.ttft_sum) if ttft else (now.itl_sum - before.itl_sum)
    window = {k: v - old.get(k, 0.0) for k, v in fine.items() if v - old.get(k, 0.0) > 0}
    count = sum(window.values())
    if count <= 0:
        return None
    if slo.quantile is not None:
        return serving.quantile(window, slo.quantile)
    return total / count


TRUTH_SECONDS = 900.0


def serving_truth(
    spec: SimWorkloadSpec,
    running: Running,
    cap_watts: float,
    rate: float,
    seed: int = 0,
    locked_clock_mhz: float | None = None,
) -> tuple[float, float]:
    """(J/token, the policy's latency) of a configuration over a long run at a steady `rate`.
    The same seed gives the same arrivals, so two configurations compare on the same requests."""
    assert spec.serving is not None
    engine = serving.ServingEngine(
        spec.serving.model,
        serving.EngineConfig(running.batchSize, running.quantization, cap_watts, locked_clock_mhz),
        random.Random(f"truth/{seed}"),
    )
    engine.run(TRUTH_SECONDS, rate)
    c = engine.counters
    slo = spec.policy.latencySLO
    latency = (
        slo_value(slo, c, serving.Counters(), spec.policy.metrics().latency) if slo is not None else None
    )
    return c.energy_joules / max(c.generation_tokens, 1), latency or math.inf


def _true_figures(
    sim: SimWorkload | SimServing,
    baseline: Running,
    final: Running,
    final_caps: Sequence[float],
    end: float,
    final_clocks: Sequence[float | None] = (),
) -> tuple[float, float]:
    """(EDP reduction %, slowdown %) of the final configuration against the baseline, by the model.
    The baseline runs at the baseline cap the optimizer measured it at (`member_caps` of no config),
    unlocked."""
    default = sim.spec.gpu.default_power_limit_watts
    baseline_caps = [
        default if c is None else c for c in member_caps(sim.spec.policy, sim.info(), Config()).values()
    ]
    if isinstance(sim, SimServing):
        rate = sim.load.rate(end)
        b_j, b_lat = serving_truth(sim.spec, baseline, baseline_caps[0], rate)
        lock = final_clocks[0] if final_clocks else None
        f_j, f_lat = serving_truth(sim.spec, final, final_caps[0], rate, locked_clock_mhz=lock)
        return 100.0 * (1.0 - f_j * f_lat / (b_j * b_lat)), 100.0 * (f_lat / b_lat - 1.0)
    b_edp, b_ups = _true_edp(sim, baseline, baseline_caps)
    f_edp, f_ups = _true_edp(sim, final, final_caps, final_clocks)
    return 100.0 * (1.0 - f_edp / b_edp), 100.0 * (1.0 - f_ups / b_ups)


def _result(
    sim: SimWorkload | SimServing,
    decision: Decision,
    converged_at: float | None,
    series: list[tuple[float, float]],
    bad: dict[str, int],
    end: float,
) -> WorkloadResult:
    st = decision.state
    spec = sim.spec
    info = sim.info()
    default = spec.gpu.default_power_limit_watts
    base = st.baseline.metrics if st.baseline else None
    final = st.incumbent.metrics if st.incumbent else None
    true_red = true_slow = None
    if st.baseline is not None and st.incumbent is not None:
        b_cfg, f_cfg = st.baseline.config, st.incumbent.config
        b_run = Running(b_cfg.batchSize or spec.batchSize, b_cfg.quantization or spec.quantization)
        f_run = Running(f_cfg.batchSize or b_run.batchSize, f_cfg.quantization or b_run.quantization)
        final_caps = [c if c is not None else default for c in decision.capWatts.values()]
        final_clocks = [decision.smClockMHz.get(m) for m in decision.capWatts]
        true_red, true_slow = _true_figures(sim, b_run, f_run, final_caps, end, final_clocks)
    explored = [
        ProbeRecord(
            stage=p.stage,
            quantization=p.config.quantization,
            batchSize=p.config.batchSize,
            capWatts=member_caps(spec.policy, info, p.config),
            smClockMHz=member_clocks(spec.policy, info, p.config),
            objective=p.metrics.objective if p.metrics else None,
            unitsPerSecond=p.metrics.unitsPerSecond if p.metrics else None,
            failed=p.failed,
        )
        for p in st.probes
    ]
    fig = decision.figures
    return WorkloadResult(
        name=spec.name,
        gpus=len(sim.gpus),
        objective=spec.policy.objective,
        maxSlowdownPercent=spec.policy.maxSlowdownPercent,
        serving=spec.serving is not None,
        phase=decision.phase,
        convergedAtSeconds=converged_at,
        probes=len(st.probes),
        baseline=_figures(base),
        final=_figures(final),
        edpReductionPercent=fig.edpReductionPercent,
        objectiveReductionPercent=decision.objectiveReductionPercent,
        slowdownPercent=fig.slowdownPercent,
        trueEdpReductionPercent=true_red,
        trueSlowdownPercent=true_slow,
        capWatts=decision.capWatts,
        smClockMHz=decision.smClockMHz,
        defaultCapWatts=default,
        batchSize=fig.batchSize,
        quantization=fig.quantization,
        energySavedJoules=fig.energySavedJoules,
        explored=explored,
        energySavedSeries=series,
        badData=bad,
    )


Watch = Callable[[float, Observation, Decision], None]


@dataclass
class _Run:
    sim: SimWorkload | SimServing
    decision: Decision
    convergedAt: float | None
    series: list[tuple[float, float]]
    bad: dict[str, int]
    end: float


def _drive(sim: SimWorkload | SimServing, config: FleetConfig, seed: int, watch: Watch | None = None) -> _Run:
    """One workload through the optimizer on a virtual clock; `watch` sees every observation and
    the decision taken on it."""
    spec = sim.spec
    rng = random.Random(f"{seed}/{spec.name}")
    info = sim.info()
    state: OptimizerState | None = None
    decision: Decision | None = None
    converged_at: float | None = None
    series: list[tuple[float, float]] = []
    bad: dict[str, int] = {}
    now = 0.0
    while now < config.durationSeconds:
        observation = sim.observation(now)
        decision = step(spec.policy, info, state, observation, now, config.tuning)
        state = decision.state
        if watch is not None:
            watch(now, observation, decision)
        if decision.badData is not None:
            bad[decision.badData.value] = bad.get(decision.badData.value, 0) + 1
        if decision.phase == "Converged" and converged_at is None:
            converged_at = now
        series.append((now, decision.figures.energySavedJoules))
        sim.apply(decision, now)
        sim.advance(now, config.reportSeconds, rng)
        now += config.reportSeconds
    assert decision is not None
    return _Run(sim, decision, converged_at, series, bad, now)


def run_fleet(config: FleetConfig, seed: int = 0) -> FleetResult:
    """Run every workload of `config` through the optimizer on a virtual clock."""
    results = []
    for index, spec in enumerate(config.workloads):
        r = _drive(sim_workload(spec, index, seed), config, seed)
        results.append(
            _result(r.sim, r.decision, r.convergedAt, r.series[:: max(1, len(r.series) // 60)], r.bad, r.end)
        )
    return FleetResult(seed=seed, durationSeconds=config.durationSeconds, workloads=results)


# ---------------------------------------------------------------- actuators side by side

# The actuator variants of a serving replica's policy: power caps only, locked SM clocks only, both.
ACTUATORS: dict[str, tuple[PowerCapSpec, SmClockSpec]] = {
    "caps": (PowerCapSpec(mode="Auto", minPercent=40, maxPercent=100), SmClockSpec(mode="Off")),
    "clocks": (PowerCapSpec(mode="Off"), SmClockSpec(mode="Auto")),
    "both": (PowerCapSpec(mode="Auto", minPercent=40, maxPercent=100), SmClockSpec(mode="Auto")),
}


class ServingOutcome(BaseModel):
    """One serving replica's run under one policy: what it cost and how its latency fared.
    Whole-run figures include the exploration; steady ones run from convergence to the end."""

    model_config = ConfigDict(extra="forbid")

    name: str
    gpu: str
    requestsPerSecond: float
    powerCapMode: str
    smClockMode: str
    phase: Phase
    convergedAtSeconds: float | None
    probes: int
    capWatts: float | None  # the final cap; None: the limit was left alone
    smClockMHz: float | None  # the final locked ceiling; None: unlocked
    joulesPerToken: float
    p99ItlSeconds: float | None
    sloViolationSeconds: float  # report windows whose latency SLO (either of them) was broken
    steadyJoulesPerToken: float | None
    steadyP99ItlSeconds: float | None
    trueBaselineJoulesPerToken: float  # gpusim's long run: the replica's own config, default cap, unlocked
    trueJoulesPerToken: float  # gpusim's long run at the final configuration
    trueLatencySeconds: float  # the policy's latency metric in that run
    trueBaselineLatencySeconds: float


def _p99_itl(now: serving.Counters, before: serving.Counters) -> float | None:
    window = {k: v - before.itl_fine.get(k, 0.0) for k, v in now.itl_fine.items()}
    return serving.quantile({k: v for k, v in window.items() if v > 0}, 0.99)


def run_serving(
    power_cap: PowerCapSpec,
    sm_clock: SmClockSpec,
    *,
    gpu: gpusim.GpuSpec = gpusim.H100_SXM,
    requests_per_second: float = 8.0,
    model: serving.ServedModel | None = None,
    knobs: bool = False,
    duration_seconds: float = 2400.0,
    seed: int = 0,
    tuning: Tuning | None = None,
    name: str = "chat",
) -> ServingOutcome:
    """A chat replica (`model`, by default a Llama-3-8B-shaped one with CUDA graphs on `gpu`) at a
    steady load, under the chat policy with `power_cap` and `sm_clock` (batch size and precision
    too with `knobs`). The same seed gives the same arrivals to every variant."""
    policy = serving_policy(knobs=knobs).model_copy(update={"powerCap": power_cap, "smClock": sm_clock})
    served = model or serving.ServedModel(gpu=gpu)
    load = ServingLoad(served, requests_per_second)
    spec = SimWorkloadSpec(
        name, gpusim.llama_decode(), 256, "bf16", policy, DECODE_ACCURACY, gpu=served.gpu, serving=load
    )
    config = FleetConfig(workloads=(spec,), durationSeconds=duration_seconds, tuning=tuning or Tuning())
    over = 0.0
    steady: list[serving.Counters] = []

    def watch(now: float, observation: Observation, decision: Decision) -> None:
        nonlocal over
        m = observation.members[0]
        for slo, value in (
            (policy.latencySLO, m.latencySeconds),
            (policy.firstTokenSLO, m.firstTokenSeconds),
        ):
            if now > 0 and slo is not None and value is not None and value > slo.maxSeconds:
                over += config.reportSeconds
                break
        if decision.phase == "Converged" and not steady:
            c = sim.engine.counters
            steady.append(replace(c, itl_fine=dict(c.itl_fine), ttft_fine=dict(c.ttft_fine)))

    sim = SimServing(spec, 0, seed)
    run = _drive(sim, config, seed, watch)
    c = sim.engine.counters
    empty = serving.Counters()
    st = run.decision.state
    final = st.incumbent.config if st.incumbent is not None else Config()
    caps = [v for v in run.decision.capWatts.values() if v is not None]
    clocks = [v for v in run.decision.smClockMHz.values() if v is not None]
    default = served.gpu.default_power_limit_watts
    base_run = Running(spec.batchSize, spec.quantization)
    final_run = Running(final.batchSize or spec.batchSize, final.quantization or spec.quantization)
    b_j, b_lat = serving_truth(spec, base_run, default, requests_per_second, seed)
    f_j, f_lat = serving_truth(
        spec,
        final_run,
        max(caps, default=default),
        requests_per_second,
        seed,
        locked_clock_mhz=max(clocks, default=None),
    )
    since = steady[0] if steady else None
    return ServingOutcome(
        name=name,
        gpu=served.gpu.name,
        requestsPerSecond=requests_per_second,
        powerCapMode=power_cap.mode,
        smClockMode=sm_clock.mode,
        phase=run.decision.phase,
        convergedAtSeconds=run.convergedAt,
        probes=len(st.probes),
        capWatts=max(caps, default=None),
        smClockMHz=max(clocks, default=None),
        joulesPerToken=c.energy_joules / max(c.generation_tokens, 1),
        p99ItlSeconds=_p99_itl(c, empty),
        sloViolationSeconds=over,
        steadyJoulesPerToken=(c.energy_joules - since.energy_joules)
        / max(c.generation_tokens - since.generation_tokens, 1)
        if since is not None
        else None,
        steadyP99ItlSeconds=_p99_itl(c, since) if since is not None else None,
        trueBaselineJoulesPerToken=b_j,
        trueJoulesPerToken=f_j,
        trueLatencySeconds=f_lat,
        trueBaselineLatencySeconds=b_lat,
    )


# ---------------------------------------------------------------- output


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(result: FleetResult) -> str:
    head = (
        f"{'workload':<20} {'phase':<10} {'J/unit base→final':>21} {'s/unit base→final':>21} "
        f"{'EDP base→final':>21} {'EDP red':>8} {'slow':>6} {'cap W':>9} {'batch':>5} {'profile':>7} {'probes':>6}"
    )
    rows = [head, "-" * len(head)]
    for w in result.workloads:
        b, f = w.baseline, w.final
        caps = sorted({round(c) for c in w.capWatts.values() if c is not None})
        rows.append(
            f"{w.name:<20} {w.phase:<10} "
            f"{_fmt(b.joulesPerUnit if b else None, '.3g'):>10}→{_fmt(f.joulesPerUnit if f else None, '<10.3g')} "
            f"{_fmt(b.secondsPerUnit if b else None, '.3g'):>10}→{_fmt(f.secondsPerUnit if f else None, '<10.3g')} "
            f"{_fmt(b.edp if b else None, '.3g'):>10}→{_fmt(f.edp if f else None, '<10.3g')} "
            f"{_fmt(w.edpReductionPercent, '.1f'):>7}% {_fmt(w.slowdownPercent, '.1f'):>5}% "
            f"{'/'.join(str(c) for c in caps) or '-':>9} {_fmt(w.batchSize, 'd'):>5} "
            f"{w.quantization or '-':>7} {w.probes:>6}"
        )
    if any(w.serving for w in result.workloads):
        rows.append(
            "serving rows (load-driven): J/unit is energy per token at the load served, s/unit the "
            "policy's latency and slow its rise; EDP is their product"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edpilot simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated noise")
    parser.add_argument("--duration", type=float, default=None, help="simulated seconds per workload")
    args = parser.parse_args(argv)
    config = sample_fleet()
    if args.duration is not None:
        if args.duration <= 0:
            parser.error("--duration must be positive")
        config = replace(config, durationSeconds=args.duration)
    result = run_fleet(config, args.seed)
    if args.json:
        json.dump(result.model_dump(mode="json"), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(table(result))
    return 0
