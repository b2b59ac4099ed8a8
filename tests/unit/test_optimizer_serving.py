"""The optimizer on load-driven (serving) workloads: latency gates, queues, load levels."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest

from edpilot import gpusim, serving
from edpilot.edp import MemberSample
from edpilot.models import EnergyPolicySpec, LatencySLO
from edpilot.optimizer import (
    DEFAULT_TUNING,
    Decision,
    MemberInfo,
    Observation,
    OptimizerState,
    WorkloadInfo,
    load_band,
    step,
)
from edpilot.simulate import SimServing, SimWorkloadSpec, chat, serving_policy, slo_value

REPORT_SECONDS = 5.0
MEMBER = "GPU-0"


# ---------------------------------------------------------------- a served replica, closed loop


@dataclass
class Trace:
    """What happened in each report window, by the engine's own (exact) histograms."""

    times: list[float]
    decisions: list[Decision]
    violations: list[bool]  # the window broke the policy's latency or first-token bound
    caps: list[float]


def serve(spec: SimWorkloadSpec, seconds: float) -> Trace:
    sim = SimServing(spec, 0, seed=1)
    info = sim.info()
    policy = spec.policy
    assert policy.latencySLO is not None and policy.firstTokenSLO is not None
    state: OptimizerState | None = None
    trace = Trace([], [], [], [])
    rng = random.Random(0)
    now = 0.0
    while now < seconds:
        decision = step(policy, info, state, sim.observation(now), now)
        state = decision.state
        sim.apply(decision, now)
        c = sim.engine.counters
        before = replace(c, itl_fine=dict(c.itl_fine), ttft_fine=dict(c.ttft_fine))
        sim.advance(now, REPORT_SECONDS, rng)
        itl = slo_value(policy.latencySLO, sim.engine.counters, before)
        ttft = slo_value(policy.firstTokenSLO, sim.engine.counters, before)
        trace.times.append(now)
        trace.decisions.append(decision)
        trace.violations.append(
            (itl or 0.0) > policy.latencySLO.maxSeconds or (ttft or 0.0) > policy.firstTokenSLO.maxSeconds
        )
        trace.caps.append(sim.gpus[0].power_limit_watts)
        now += REPORT_SECONDS
    return trace


def _longest_violation_under_a_lowered_cap(trace: Trace) -> int:
    longest = run = 0
    for bad, cap in zip(trace.violations, trace.caps, strict=True):
        run = run + 1 if bad and cap < 700.0 else 0
        longest = max(longest, run)
    return longest


def test_a_load_step_up_and_down_moves_the_cap_without_a_violation_longer_than_one_report_interval() -> None:
    # Caps only on an H100 at 6 requests/s, then 19 (near what bf16 at 700 W carries), then 6 again.
    spec = chat(
        "chat", gpusim.H100_SXM, 6.0, serving_policy(knobs=False), steps=((0, 6.0), (1500, 19.0), (3000, 6.0))
    )
    trace = serve(spec, 4500.0)

    def cap_at(t: float) -> float:
        return trace.caps[trace.times.index(t)]

    low, high, low_again = cap_at(1495.0), cap_at(2995.0), cap_at(4495.0)
    assert low <= 350.0, "at 6 requests/s a low cap carries the load"
    assert high > low + 100.0, "at 19 requests/s the cap must rise"
    assert low_again <= 350.0
    # Under a cap edpilot chose, a window that breaks the SLO is followed by the fallback at once.
    assert _longest_violation_under_a_lowered_cap(trace) <= 1
    events = [e.reason for d in trace.decisions for e in d.events]
    assert "SLOBreach" in events or "DriftDetected" in events
    # Coming back to 6 requests/s reuses the level found before: no new exploration.
    assert "LoadLevelChanged" in events
    after = [d for t, d in zip(trace.times, trace.decisions, strict=True) if t >= 3000.0]
    assert not any(d.phase == "Exploring" for d in after)


# ---------------------------------------------------------------- synthetic measurements


@dataclass
class FakeReplica:
    """A serving replica whose power, latency and queue per configuration the test sets."""

    physics: Callable[[float], tuple[float, float, float]]  # cap -> (watts, latency s, waiting growth/s)
    requests_per_second: float = 10.0
    precision: str = "bf16"
    # fp8: the same physics, this much faster and frugal (weights read in half the bytes).
    fp8_factor: float = 0.8
    tokens_per_request: float = 250.0
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    energy: float = 0.0
    tokens: float = 0.0
    finished: float = 0.0
    waiting: float = 0.0
    cap: float = 700.0
    latency: float = 0.0

    def advance(self, seconds: float) -> None:
        watts, latency, growth = self.physics(self.cap)
        if self.precision == "fp8":
            watts, latency = watts * self.fp8_factor, latency * self.fp8_factor
        noise = self.rng.gauss(1.0, 0.01)
        self.energy += watts * seconds * noise
        self.tokens += (
            self.requests_per_second * self.tokens_per_request * seconds * self.rng.gauss(1.0, 0.02)
        )
        self.waiting = max(0.0, self.waiting + growth * seconds)
        self.finished += self.requests_per_second * seconds - growth * seconds
        self.latency = latency * self.rng.gauss(1.0, 0.005)

    def observation(self, now: float) -> Observation:
        return Observation(
            time=now,
            members=(
                MemberSample(
                    member=MEMBER,
                    energyJoules=self.energy,
                    workUnits=self.tokens,
                    powerWatts=0.0,
                    capWatts=self.cap,
                    batchSize=256,
                    quantization="fp8" if self.precision == "fp8" else "bf16",
                    latencySeconds=self.latency,
                    firstTokenSeconds=0.2,
                    requestsRunning=40.0,
                    requestsWaiting=self.waiting,
                    requestsFinished=self.finished,
                ),
            ),
        )


INFO = WorkloadInfo(
    name="w",
    members=(MemberInfo(member=MEMBER, pod="ns/p", minWatts=200.0, maxWatts=700.0, defaultWatts=700.0),),
    batchSize=256,
    quantization="bf16",
)


def run_fake(
    replica: FakeReplica,
    policy: EnergyPolicySpec,
    seconds: float = 3000.0,
    info: WorkloadInfo | None = None,
    load: Callable[[float], float] | None = None,
) -> Decision:
    state: OptimizerState | None = None
    decision: Decision | None = None
    now = 0.0
    while now < seconds:
        if load is not None:
            replica.requests_per_second = load(now)
        decision = step(policy, info or INFO, state, replica.observation(now), now)
        state = decision.state
        cap = decision.capWatts.get(MEMBER)
        if cap is not None:
            replica.cap = cap
        replica.precision = decision.quantization or replica.precision
        replica.advance(REPORT_SECONDS)
        now += REPORT_SECONDS
    assert decision is not None
    return decision


def decode_like(cap: float) -> tuple[float, float, float]:
    """Power follows the cap down to 300 W; latency rises 1% per 10 W below 600 W, then 3%."""
    watts = min(cap, 560.0)
    slower = max(0.0, 600.0 - cap) / 10.0 * 0.01 + max(0.0, 450.0 - cap) / 10.0 * 0.02
    return watts, 0.010 * (1.0 + slower), 0.0


def test_latency_not_throughput_gates_the_slowdown_of_a_load_driven_workload() -> None:
    # Demand sets the work rate, so every cap serves the same tokens/s: a throughput gate would
    # take the lowest cap. The latency gate (20% over the baseline's median) stops where it rises.
    serving_one = serving_policy(knobs=False, min_cap_percent=30.0)
    decision = run_fake(FakeReplica(decode_like), serving_one)
    assert decision.phase == "Converged"
    cap = decision.capWatts[MEMBER]
    assert cap is not None
    _, latency, _ = decode_like(cap)
    assert latency <= 0.010 * 1.20
    assert cap < 560.0  # it did cut power where latency allowed
    assert decision.figures.slowdownPercent is not None and decision.figures.slowdownPercent <= 20.0
    # The same measurements under a throughput policy (no latency SLO) end at the floor.
    throughput_one = serving_one.model_copy(
        update={
            "latencySLO": None,
            "firstTokenSLO": None,
            "workMetric": serving_one.workMetric.model_copy(update={"load": None}),
        }
    )
    floor = run_fake(FakeReplica(decode_like), throughput_one).capWatts[MEMBER]
    assert floor is not None and floor < cap


def test_a_cap_under_which_the_queue_grows_is_never_kept() -> None:
    def queues_below_500(cap: float) -> tuple[float, float, float]:
        # Less power, same latency of the running requests, but below 500 W they queue.
        return min(cap, 560.0), 0.010, (0.0 if cap >= 500.0 else 2.0)

    decision = run_fake(FakeReplica(queues_below_500), serving_policy(knobs=False, min_cap_percent=30.0))
    assert decision.phase == "Converged"
    cap = decision.capWatts[MEMBER]
    assert cap is not None and cap >= 500.0
    failed = [p for p in decision.state.probes if p.failed]
    assert failed and all("queue growing" in (p.failed or "") for p in failed)


def test_a_slo_bound_on_the_first_token_rules_a_configuration_out() -> None:
    policy = serving_policy(knobs=False).model_copy(
        update={
            "firstTokenSLO": LatencySLO(
                metricName="vllm:time_to_first_token_seconds", quantile=0.99, maxSeconds=0.1
            )
        }
    )
    # Every window reports a first token at 0.2 s: over the 0.1 s bound, nothing is kept.
    decision = run_fake(FakeReplica(decode_like), policy)
    assert decision.capWatts[MEMBER] == 700.0
    assert all(p.failed for p in decision.state.probes)


def test_load_bands_are_fixed_and_a_tolerance_apart() -> None:
    assert load_band(6.0, DEFAULT_TUNING) == load_band(6.4, DEFAULT_TUNING)
    assert load_band(6.0, DEFAULT_TUNING) + 1 == load_band(6.0 * 1.25, DEFAULT_TUNING)
    assert load_band(0.0, DEFAULT_TUNING) == load_band(1e-9, DEFAULT_TUNING)  # no load is a band too


def test_the_sequence_limit_is_probed_only_upwards_and_only_where_it_binds() -> None:
    # At 4 requests/s an H100 runs ~20 sequences: a limit of 256 never binds, so no batch probe.
    quiet = serve(chat("quiet", gpusim.H100_SXM, 4.0, serving_policy()), 900.0)
    probes = quiet.decisions[-1].state.probes
    assert not [p for p in probes if p.stage == "batch"]
    # On a replica whose limit of 16 binds, larger limits are probed and smaller ones never.
    small = replace(chat("busy", gpusim.H100_SXM, 12.0, serving_policy()), batchSize=16)
    busy = serve(small, 1500.0)
    batch = [p.config.batchSize for d in busy.decisions for p in d.state.probes if p.stage == "batch"]
    assert batch and all(b is not None and b > 16 for b in batch)


def test_the_engine_model_is_what_the_simulated_replica_serves() -> None:
    spec = chat("c", gpusim.H200_SXM, 5.0, serving_policy())
    assert spec.serving is not None
    assert spec.serving.model == serving.ServedModel(gpu=gpusim.H200_SXM)


def test_a_later_levels_slowdown_is_against_the_workloads_own_precision_not_the_chosen_one() -> None:
    # fp8 is 20% faster than bf16. At the first level edpilot measures both at the default cap;
    # later levels measure their baseline in fp8 (a reload back to bf16 would cost a restart),
    # but the limit (20%) is still against the latency bf16 would have, 1.25x fp8's.
    policy = serving_policy(min_cap_percent=30.0)
    info = INFO.model_copy(update={"accuracy": {"bf16": 1.0, "fp8": 0.995}})
    decision = run_fake(
        FakeReplica(decode_like),
        policy,
        seconds=4000.0,
        info=info,
        load=lambda t: 10.0 if t < 1500.0 else 14.0,
    )
    state = decision.state
    assert state.heldQuantization == "fp8" and state.latencyScale is not None
    assert state.latencyScale == pytest.approx(1.25, rel=0.03)
    assert len(state.levels) == 2 and decision.phase == "Converged"
    cap = decision.capWatts[MEMBER]
    assert cap is not None
    _, bf16_latency_at_cap, _ = decode_like(cap)
    fp8_latency = 0.8 * bf16_latency_at_cap
    # Within 20% of bf16 at the default cap (10 ms), and past 20% over fp8's own 8 ms there.
    assert fp8_latency <= 0.010 * 1.20
    assert fp8_latency > 0.008 * 1.20
