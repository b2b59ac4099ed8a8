"""The clock stage: a locked SM clock ceiling searched like the cap, on gpusim's simulated GPUs.

The workload of most tests is a Llama-3-8B-shaped decode at batch 8 without CUDA graphs on an
H100: it draws about 350 W at 700 W TDP, below any cap a policy with minPercent 60 may try, so
caps change nothing there and the SM clock is the only lever (gpusim: a lock near 1100 MHz
saves about 45% J/token at 8% slowdown).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from builders import Hook, clock_policy, decode_at_batch_8, drive, h100_status
from edpilot_operator.reports import ReportTiming, desired_spec, member_info
from edpilot_operator.selection import Governed, PodInfo, PolicyRef

from edpilot import gpusim
from edpilot.edp import MemberSample, objective_value, seconds_per_unit
from edpilot.models import (
    EnergyPolicySpec,
    GPUNodeReportSpec,
    GPUNodeReportStatus,
    LatencySLO,
    LeaseRef,
    Objective,
    PowerCapSpec,
    SmClockSpec,
)
from edpilot.optimizer import (
    Config,
    Decision,
    MemberInfo,
    Observation,
    OptimizerState,
    Tuning,
    WorkloadInfo,
    clock_bounds,
    member_clocks,
    step,
)
from edpilot.simulate import ACTUATORS, Running, SimWorkload, run_serving

H100 = gpusim.H100_SXM
GRAPH_DECODE = gpusim.llama_decode()


policy = clock_policy
decode = decode_at_batch_8


def truth(sim: SimWorkload, objective: Objective, cap: float, clock: float | None) -> tuple[float, float]:
    """gpusim's noiseless (objective, units/s) at `cap` and a lock at `clock` (None: unlocked)."""
    run = Running(8, "bf16")
    ups, watts, _ = sim.true_point(run, [cap], [clock])
    return objective_value(objective, watts / ups, seconds_per_unit(ups, run.batchSize)), ups


def final_setting(d: Decision) -> tuple[float, float | None]:
    [cap] = d.capWatts.values()
    [clock] = d.smClockMHz.values()
    return cap or H100.default_power_limit_watts, clock


def sweep_best(
    sim: SimWorkload, objective: Objective, min_speed: float, cap: float = 700.0
) -> tuple[float, float]:
    """(objective, clock) of the best lock on the supported clocks (15 MHz apart) at `cap` whose
    throughput stays at or above `min_speed` units/s: the exhaustive answer."""
    candidates = [(*truth(sim, objective, cap, float(c)), float(c)) for c in range(795, 1981, 15)]
    feasible = [(obj, clock) for obj, ups, clock in candidates if ups >= min_speed]
    return min(feasible)


# ---------------------------------------------------------------- when the stage runs


def no_clocks(now: float, sim: SimWorkload, info: WorkloadInfo) -> WorkloadInfo:
    del now, sim
    members = tuple(m.model_copy(update={"minClockMHz": None, "maxClockMHz": None}) for m in info.members)
    return info.model_copy(update={"members": members})


@pytest.mark.parametrize(
    ("sm_clock", "hook", "reason"),
    [
        (SmClockSpec(mode="Off"), None, "SM clock: mode Off"),
        (SmClockSpec(mode="Auto"), no_clocks, "SM clock: some GPU's supported clocks are unknown"),
    ],
)
def test_the_clock_stage_is_skipped_when_off_or_the_clocks_are_unknown(
    sm_clock: SmClockSpec, hook: Hook | None, reason: str
) -> None:
    sim, decisions = drive(decode(policy(smClock=sm_clock)), seconds=900, hook=hook)
    d = decisions[-1]
    assert d.phase == "Converged"
    assert any(r.startswith(reason) for dd in decisions for r in dd.reasons), reason
    assert all(c is None for dd in decisions for c in dd.smClockMHz.values())
    assert all(p.stage != "clock" for p in d.state.probes)
    assert sim.gpus[0].locked_clock_mhz is None
    assert d.figures.smClockMHz is None


# ---------------------------------------------------------------- the search


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_clock_search_converges_near_gpusims_best_clock_where_caps_cannot_bind(seed: int) -> None:
    sim, decisions = drive(decode(policy()), seed=seed)
    d = decisions[-1]
    assert d.phase == "Converged", d.reasons
    assert not [p for p in d.state.probes if p.stage == "cap"]  # the draw is below every cap tried
    cap, clock = final_setting(d)
    assert cap == H100.default_power_limit_watts and clock is not None
    probes = [p for p in d.state.probes if p.stage == "clock"]
    assert 3 <= len(probes) <= Tuning().clockProbeBudget
    _, base_ups = truth(sim, "EDP", 700.0, None)
    chosen, chosen_ups = truth(sim, "EDP", 700.0, clock)
    # The exhaustive search knows the truth; the optimizer keeps 1.5 points of slowdown for its noise.
    best, best_clock = sweep_best(sim, "EDP", 0.915 * base_ups)
    assert chosen <= 1.02 * best, (clock, best_clock)
    assert abs(clock - best_clock) <= 120
    assert chosen_ups >= 0.90 * base_ups
    joules, _ = truth(sim, "Energy", 700.0, clock)
    base_joules, _ = truth(sim, "Energy", 700.0, None)
    assert joules <= 0.6 * base_joules  # gpusim: ~45% J/token saved at ~8% slowdown
    # The GPU runs the chosen lock, and the status and events say so.
    assert sim.gpus[0].locked_clock_mhz == clock
    assert d.figures.smClockMHz == clock
    converged = [e.message for dd in decisions for e in dd.events if e.reason == "Converged"]
    assert converged and f"SM clock ≤ {clock:.0f} MHz" in converged[-1]


@pytest.mark.parametrize("max_slowdown", [3.0, 5.0, 10.0])
def test_the_clock_keeps_the_slowdown_limit(max_slowdown: float) -> None:
    sim, decisions = drive(decode(policy(objective="Energy", maxSlowdownPercent=max_slowdown)), seed=7)
    d = decisions[-1]
    assert d.phase == "Converged"
    _, clock = final_setting(d)
    assert clock is not None
    _, base_ups = truth(sim, "Energy", 700.0, None)
    chosen, chosen_ups = truth(sim, "Energy", 700.0, clock)
    assert chosen_ups >= (1 - max_slowdown / 100) * base_ups
    assert d.figures.slowdownPercent is not None and d.figures.slowdownPercent <= max_slowdown
    # Energy falls all the way down the clocks: the choice sits near the limit, less the noise margin.
    best, _ = sweep_best(sim, "Energy", (1 - (max_slowdown - 1.5) / 100) * base_ups)
    assert chosen <= 1.05 * best


def test_the_clock_keeps_the_latency_slo() -> None:
    """The step latency (what the workload reports) may rise 4%, though the slowdown limit allows 30."""
    probe = SimWorkload(decode(policy()), 0)
    base_step = probe.true_point(Running(8, "bf16"), [700.0], [None])[2]
    slo = LatencySLO(metricName="step_seconds", maxSeconds=1.04 * base_step)
    sim, decisions = drive(decode(policy(objective="Energy", maxSlowdownPercent=30, latencySLO=slo)))
    d = decisions[-1]
    assert d.phase == "Converged"
    _, clock = final_setting(d)
    assert clock is not None and clock < 1980  # the SLO leaves room for some lock
    assert sim.true_point(Running(8, "bf16"), [700.0], [clock])[2] <= slo.maxSeconds
    # Without the SLO the same policy goes lower.
    _, free = drive(decode(policy(objective="Energy", maxSlowdownPercent=30)))
    free_clock = final_setting(free[-1])[1]
    assert free_clock is not None and free_clock < clock


def test_baselines_run_unlocked_also_after_a_restart() -> None:
    def restart(now: float, sim: SimWorkload, info: WorkloadInfo) -> WorkloadInfo:
        del sim
        return info.model_copy(update={"restarts": 1}) if now >= 1800 else info

    locked_during_baseline: list[float | None] = []
    _, decisions = drive(decode(policy()), seconds=3000, hook=restart)
    phases = [d.phase for d in decisions]
    assert "Converged" in phases[: 1800 // 5]
    assert phases[1800 // 5] == "Drifted"  # the restart: a new baseline
    for d in decisions:
        if d.phase in ("Baseline", "Drifted"):
            locked_during_baseline.extend(d.smClockMHz.values())
            assert d.state.target.smClockMHz is None
    assert locked_during_baseline and all(c is None for c in locked_during_baseline)
    # Both baselines were measured unlocked, and both explorations ended on a lock.
    d = decisions[-1]
    assert d.state.baseline is not None and d.state.baseline.config.smClockMHz is None
    assert d.phase == "Converged" and final_setting(d)[1] is not None


def test_a_baseline_is_not_measured_while_the_gpu_still_reports_a_lock() -> None:
    """The agent has not reset the clocks yet: the optimizer waits, it does not measure."""
    pol = policy()
    member = MemberInfo(
        member="GPU-0",
        pod="default/p",
        minWatts=200,
        maxWatts=700,
        defaultWatts=700,
        minClockMHz=345,
        maxClockMHz=1980,
    )
    info = WorkloadInfo(name="w", members=(member,), batchSize=8)

    def obs(t: float, locked: float | None) -> Observation:
        sample = MemberSample(
            member="GPU-0",
            energyJoules=300.0 * t,
            workUnits=1000.0 * t,
            capWatts=700.0,
            batchSize=8,
            smClockMHz=locked or 1980.0,
            lockedClockMHz=locked,
        )
        return Observation(time=t, members=(sample,))

    state = None
    for t in range(0, 200, 5):
        d = step(pol, info, state, obs(float(t), 1200.0), float(t))
        state = d.state
    assert state is not None and state.baseline is None and state.acc.windows == 0
    for t in range(200, 400, 5):
        d = step(pol, info, state, obs(float(t), None), float(t))
        state = d.state
    assert state.baseline is not None  # measured once the lock is gone


def test_both_stages_cap_first_then_a_clock_below_what_the_cap_left() -> None:
    """With CUDA graphs the decode draws ~430 W: caps from 50% bind, then a clock lock goes further."""
    pol = policy(powerCap=PowerCapSpec(mode="Auto", minPercent=50))
    sim, decisions = drive(decode(pol, GRAPH_DECODE))
    d = decisions[-1]
    assert d.phase == "Converged"
    stages = [p.stage for p in d.state.probes]
    assert "cap" in stages and "clock" in stages
    assert stages == sorted(stages, key=["cap", "clock"].index)  # the clock stage after the cap's
    cap_chosen = next(p for p in d.state.probes if p.stage == "clock").config.capWatts
    assert cap_chosen is not None and cap_chosen < 700
    # Every clock probe keeps the cap the cap stage chose, and locks below the clock it left.
    capped_clock = truth_clock(cap_chosen)
    for p in d.state.probes:
        if p.stage == "clock":
            assert p.config.capWatts == cap_chosen
            assert p.config.smClockMHz is not None and p.config.smClockMHz < capped_clock
    # The search spans [40% of the highest clock, the clock read under the cap]: its first probe
    # is the lower golden point of that range, not of the full one.
    first = next(p for p in d.state.probes if p.stage == "clock").config.smClockMHz
    assert first is not None and abs(first - (capped_clock - 0.618 * (capped_clock - 795))) <= 60
    cap, clock = final_setting(d)
    _, base_ups = truth(sim, "EDP", 700.0, None)
    cap_only, _ = truth(sim, "EDP", cap_chosen, None)
    both, both_ups = truth(sim, "EDP", cap, clock)
    assert both_ups >= 0.9 * base_ups
    assert both < 0.9 * cap_only  # the lock saves well beyond what the cap reached


def truth_clock(cap: float) -> float:
    return gpusim.operating_point(H100, GRAPH_DECODE, 8, "bf16", cap).sm_clock_mhz


# ---------------------------------------------------------------- persisted state

NEW_FIELDS = {"clockBracket", "smClockMHz", "smClocks", "lockedClockMHz"}


def strip(value: Any) -> Any:
    """A stored state as an operator without the clock stage wrote it: no clock fields anywhere."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in NEW_FIELDS}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def mentions(value: Any, keys: set[str]) -> bool:
    if isinstance(value, dict):
        return bool(keys & set(value)) or any(mentions(v, keys) for v in value.values())
    if isinstance(value, list):
        return any(mentions(v, keys) for v in value)
    return False


def test_a_state_stored_before_the_clock_stage_still_loads_and_resumes() -> None:
    pol = policy(smClock=SmClockSpec(mode="Off"))
    spec = decode(pol)
    sim, decisions = drive(spec, seconds=600)
    stored = json.loads(json.dumps(decisions[-1].state.model_dump(mode="json")))
    old = strip(stored)
    assert mentions(stored, NEW_FIELDS) and not mentions(old, NEW_FIELDS)
    state = OptimizerState.model_validate(old)
    assert state.clockBracket is None and state.target.smClockMHz is None
    d = step(pol, sim.info(), state, sim.observation(600.0), 600.0)
    assert d.phase == decisions[-1].phase
    assert d.state.probes == decisions[-1].state.probes


def test_resuming_from_the_stored_state_mid_clock_search_gives_the_same_result() -> None:
    _, plain = drive(decode(policy()), seed=3)
    _, resumed = drive(decode(policy()), seed=3, roundtrip=True)
    assert final_setting(plain[-1]) == final_setting(resumed[-1])
    assert [p.config for p in plain[-1].state.probes] == [p.config for p in resumed[-1].state.probes]


# ---------------------------------------------------------------- bounds


@pytest.mark.parametrize(
    ("spec", "lo", "hi", "expected"),
    [
        (SmClockSpec(mode="Auto"), 345.0, 1980.0, (795.0, 1980.0)),  # 40% of 1980, up to a 15 MHz step
        (SmClockSpec(mode="Auto", minPercent=10), 345.0, 1980.0, (345.0, 1980.0)),  # never below the lowest
        (SmClockSpec(mode="Auto", minPercent=100), 345.0, 1980.0, (1980.0, 1980.0)),
        (SmClockSpec(mode="Off"), 345.0, 1980.0, None),
        (SmClockSpec(mode="Auto"), None, 1980.0, None),
        (SmClockSpec(mode="Auto"), 1500.0, 1000.0, None),  # inconsistent: never locked
    ],
)
def test_clock_bounds(
    spec: SmClockSpec, lo: float | None, hi: float | None, expected: tuple[float, float] | None
) -> None:
    member = MemberInfo(member="GPU-0", pod="ns/p", minClockMHz=lo, maxClockMHz=hi)
    assert clock_bounds(spec, member) == expected


@pytest.mark.parametrize(
    ("wanted", "got"), [(1500.0, 1500.0), (99999.0, 1980.0), (100.0, 795.0), (None, None)]
)
def test_a_member_clock_is_clamped_into_its_bounds(wanted: float | None, got: float | None) -> None:
    member = MemberInfo(member="GPU-0", pod="ns/p", minClockMHz=345, maxClockMHz=1980)
    info = WorkloadInfo(name="w", members=(member,))
    assert member_clocks(policy(), info, Config(smClockMHz=wanted)) == {"GPU-0": got}


# ---------------------------------------------------------------- the operator's translation

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def node_status(**gpu: Any) -> GPUNodeReportStatus:
    fields = {"minSmClockMHz": 345, "maxSmClockMHz": 1980, **gpu}
    gpus = [
        h100_status(0, "GPU-n0-0", pods=["ns/a"], **fields),
        h100_status(1, "GPU-n0-1", pods=[], **fields),
    ]
    return GPUNodeReportStatus(nodeName="n0", agentVersion="t", backend="sim", time=NOW, gpus=gpus)


def node_spec(sm_clock: dict[str, Any], target: Config | None, **gpu: Any) -> GPUNodeReportSpec:
    spec = EnergyPolicySpec.model_validate(
        {"selector": {"matchLabels": {"app": "llm"}}, "workMetric": {"name": "t"}, "smClock": sm_clock}
    )
    pod = PodInfo("ns", "a", "uid-a", "n0", "Running", 1, {"app": "llm"}, {}, "img:1")
    return desired_spec(
        pods=[pod],
        status=node_status(**gpu),
        governed={"ns/a": Governed(PolicyRef("ns", "p", spec), target)},
        lease=LeaseRef(namespace="edpilot", name="op"),
        timing=ReportTiming(),
    )


@pytest.mark.parametrize(
    ("sm_clock", "target", "gpu", "expected"),
    [
        ({"mode": "Auto"}, Config(smClockMHz=1500), {}, 1500.0),
        ({"mode": "Auto"}, Config(smClockMHz=99999), {}, 1980.0),  # clamped into the supported clocks
        ({"mode": "Auto", "minPercent": 50}, Config(smClockMHz=300), {}, 990.0),  # and the policy's floor
        ({"mode": "Auto"}, Config(), {}, None),  # no lock decided: unlocked
        ({"mode": "Auto"}, None, {}, None),  # before a decision
        ({"mode": "Off"}, Config(smClockMHz=1500), {}, None),  # Off: never, whatever the state says
        ({"mode": "Auto"}, Config(smClockMHz=1500), {"maxSmClockMHz": 0}, None),  # clocks unknown
        ({"mode": "Auto"}, Config(smClockMHz=1500), {"migEnabled": True}, None),
        ({"mode": "Auto"}, Config(smClockMHz=1500, capWatts=400), {"maxLimitWatts": 0}, 1500.0),
    ],
)
def test_the_operator_writes_the_decided_lock_into_the_node_report_spec(
    sm_clock: dict[str, Any], target: Config | None, gpu: dict[str, Any], expected: float | None
) -> None:
    spec = node_spec(sm_clock, target, **gpu)
    locks = [(c.gpuUUID, c.maxMHz, c.pod) for c in spec.lockedClocks]
    assert locks == ([] if expected is None else [("GPU-n0-0", expected, "ns/a")])


def test_a_gpu_the_pod_does_not_hold_alone_is_never_locked() -> None:
    spec = node_spec({"mode": "Auto"}, Config(smClockMHz=1500), shared=True)
    assert spec.lockedClocks == []


@pytest.mark.parametrize(("lo", "hi", "expected"), [(345, 1980, (345, 1980)), (0, 0, (None, None))])
def test_member_info_reads_the_supported_clocks_unknown_as_none(
    lo: float, hi: float, expected: tuple[float | None, float | None]
) -> None:
    gpu = h100_status(0, "GPU-0", minSmClockMHz=lo, maxSmClockMHz=hi)
    m = member_info(gpu, "ns/a")
    assert (m.minClockMHz, m.maxClockMHz) == expected
    assert member_info(gpu, "ns/a", exclusive=False).maxClockMHz is None


# ---------------------------------------------------------------- the serving loop


def test_run_serving_locks_the_engines_clock_only_where_the_policy_lets_it() -> None:
    outcomes = {
        name: run_serving(cap, clock, duration_seconds=1200)
        for name, (cap, clock) in ACTUATORS.items()
        if name in ("caps", "clocks")
    }
    caps, clocks = outcomes["caps"], outcomes["clocks"]
    assert caps.smClockMHz is None and caps.capWatts is not None
    assert clocks.capWatts is None and clocks.smClockMHz is not None and clocks.smClockMHz < 1980
    for o in outcomes.values():
        assert o.phase == "Converged"
        assert o.trueJoulesPerToken < 0.8 * o.trueBaselineJoulesPerToken
        assert o.p99ItlSeconds is not None and o.p99ItlSeconds > 0
        assert o.steadyJoulesPerToken is not None and o.steadyJoulesPerToken < o.trueBaselineJoulesPerToken
        assert o.sloViolationSeconds >= 0
