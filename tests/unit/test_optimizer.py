"""The optimizer: bounds, bad data, and convergence on gpusim's simulated GPUs with their noise."""

from __future__ import annotations

import itertools
import json
import math
import zlib
from dataclasses import replace

import pytest
from builders import REPORT_SECONDS, drive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edpilot import gpusim
from edpilot.contract import cap_bounds, parse_accuracy
from edpilot.edp import BadData, MemberSample, objective_value, seconds_per_unit
from edpilot.models import (
    BatchSizeSpec,
    EnergyPolicySpec,
    LabelSelector,
    LatencySLO,
    Objective,
    PowerCapSpec,
    Profile,
    QuantizationSpec,
    WorkMetric,
)
from edpilot.optimizer import (
    Decision,
    MemberInfo,
    Observation,
    OptimizerState,
    Tuning,
    WorkloadInfo,
    batch_candidates,
    step,
)
from edpilot.simulate import DECODE_ACCURACY, Running, SimWorkload, SimWorkloadSpec

H100 = gpusim.H100_SXM


def policy(**overrides: object) -> EnergyPolicySpec:
    return EnergyPolicySpec.model_validate(
        {
            "selector": LabelSelector(),
            "workMetric": WorkMetric(name="work_total"),
            "maxSlowdownPercent": 10,
            **overrides,
        }
    )


def h100(member: str = "GPU-0", pod: str = "default/p") -> MemberInfo:
    return MemberInfo(member=member, pod=pod, minWatts=200.0, maxWatts=700.0, defaultWatts=700.0)


def true_objective(
    sim: SimWorkload, objective: Objective, caps: list[float], running: Running | None = None
) -> tuple[float, float]:
    """gpusim's noiseless (objective, units/s) of the workload at `caps`."""
    run = running or sim.running
    ups, watts, _ = sim.true_point(run, caps)
    batch = run.batchSize if sim.spec.reportsBatch else None
    return objective_value(objective, watts / ups, seconds_per_unit(ups, batch)), ups


def final_caps(sim: SimWorkload, d: Decision) -> list[float]:
    return [d.capWatts[g.uuid] or H100.default_power_limit_watts for g in sim.gpus]


# ---------------------------------------------------------------- bounds and parsing


@pytest.mark.parametrize(
    ("spec", "member", "expected"),
    [
        (PowerCapSpec(), h100(), (350.0, 700.0, 700.0)),
        (PowerCapSpec(minPercent=20), h100(), (200.0, 700.0, 700.0)),  # constraints win over the policy
        (PowerCapSpec(minPercent=60, maxPercent=80), h100(), (420.0, 560.0, 560.0)),
        (PowerCapSpec(minWatts=400, maxWatts=650), h100(), (400.0, 650.0, 650.0)),
        (PowerCapSpec(mode="Fixed", watts=450), h100(), (450.0, 450.0, 450.0)),
        (PowerCapSpec(mode="Fixed", watts=900), h100(), (700.0, 700.0, 700.0)),  # clamped into constraints
        (PowerCapSpec(mode="Fixed", watts=100), h100(), (200.0, 200.0, 200.0)),
        (PowerCapSpec(mode="Off", minPercent=60), h100(), None),  # left alone, never written
        (PowerCapSpec(minWatts=800), h100(), None),  # empty intersection
        (PowerCapSpec(), MemberInfo(member="GPU-x", pod="p"), None),  # unknown GPU
        (
            PowerCapSpec(),
            MemberInfo(member="GPU-x", pod="p", minWatts=100, maxWatts=300, defaultWatts=400),
            None,
        ),
    ],
)
def test_cap_bounds(
    spec: PowerCapSpec, member: MemberInfo, expected: tuple[float, float, float] | None
) -> None:
    got = cap_bounds(spec, member)
    if expected is None:
        assert isinstance(got, str) and "left alone" in got
    else:
        assert not isinstance(got, str)
        assert (got.lo, got.hi, got.baseline) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"bf16": 1.0, "fp8": 0.995}', {"bf16": 1.0, "fp8": 0.995}),
        ('{"fp16": 71.2, "int4-awq": 69}', {"fp16": 71.2, "int4-awq": 69.0}),
        ("{}", {}),
    ],
)
def test_parse_accuracy(text: str, expected: dict[str, float]) -> None:
    assert parse_accuracy(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{bf16: 1}", "not valid JSON"),
        ('["bf16"]', "must be a JSON object"),
        ('{"bf17": 1.0}', "unknown profile 'bf17'"),
        ('{"fp8": -1}', "positive number"),
        ('{"fp8": "high"}', "positive number"),
        ('{"fp8": true}', "positive number"),
        ('{"fp8": NaN}', "positive number"),
    ],
)
def test_parse_accuracy_rejects_nonsense_clearly(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_accuracy(text)
    assert "edpilot.io/quantization-accuracy" in str(err.value)


@pytest.mark.parametrize(
    ("spec", "batch_range", "expected"),
    [
        (BatchSizeSpec(mode="Auto"), None, [8, 16, 32, 64, 128, 256, 512, 1024]),
        (BatchSizeSpec(mode="Auto", min=1, max=64, multipleOf=1), None, [1, 2, 4, 8, 16, 32, 64]),
        (BatchSizeSpec(mode="Auto", min=8, max=1024, multipleOf=64), None, [64, 128, 256, 512, 1024]),
        (BatchSizeSpec(mode="Auto", min=1, max=200, multipleOf=24), None, [24, 48, 72, 144]),
        (BatchSizeSpec(mode="Auto"), (16, 100), [16, 32, 64]),
        (BatchSizeSpec(mode="Auto", min=9, max=15), None, []),
    ],
)
def test_batch_candidates(
    spec: BatchSizeSpec, batch_range: tuple[int, int] | None, expected: list[int]
) -> None:
    info = WorkloadInfo(name="w", members=(h100(),), batchRange=batch_range)
    got = batch_candidates(policy(batchSize=spec), info)
    assert got == expected
    assert all(c % spec.multipleOf == 0 for c in got)


# ---------------------------------------------------------------- property: bounds and bad data

FAST = Tuning(windowSeconds=1.0, baselineWindows=2, probeWindows=1, maxWindows=1, settleWindows=0)


def expected_range(spec: PowerCapSpec, m: MemberInfo) -> tuple[float, float] | str | None:
    """An independent statement of invariant 1 (DESIGN.md §5)."""
    if m.minWatts is None or m.maxWatts is None or m.defaultWatts is None:
        return None
    if not m.minWatts <= m.defaultWatts <= m.maxWatts:
        return None
    if spec.mode == "Off":
        return None  # the GPU's limit is left alone
    if spec.mode == "Fixed":
        assert spec.watts is not None
        w = min(max(spec.watts, m.minWatts), m.maxWatts)
        return (w, w)
    lo = max(m.minWatts, spec.minPercent * m.defaultWatts / 100, spec.minWatts or 0)
    hi = min(m.maxWatts, spec.maxPercent * m.defaultWatts / 100, spec.maxWatts or math.inf)
    if abs(lo - hi) < 1e-9:
        return "either"  # empty or one watt-value wide depending on rounding: both answers are right
    return None if lo > hi else (lo, hi)


@st.composite
def cap_specs(draw: st.DrawFn) -> PowerCapSpec:
    mode = draw(st.sampled_from(["Auto", "Auto", "Fixed", "Off"]))
    p1, p2 = sorted(draw(st.lists(st.floats(10, 100), min_size=2, max_size=2)))
    watts = sorted(draw(st.lists(st.floats(1, 1500), min_size=2, max_size=2)))
    use_watts = draw(st.booleans())
    return PowerCapSpec(
        mode=mode,
        minPercent=p1,
        maxPercent=p2,
        minWatts=watts[0] if use_watts else None,
        maxWatts=watts[1] if use_watts else None,
        watts=draw(st.floats(1, 1500)) if mode == "Fixed" else None,
    )


CONSTRAINTS = st.one_of(
    st.none(),
    st.tuples(st.floats(50, 400), st.floats(0, 700), st.floats(0, 1)).map(
        lambda t: (t[0], t[0] + t[1], t[0] + t[2] * t[1])  # min, max, default in between
    ),
)
SPECIAL = st.sampled_from([math.nan, math.inf, -1.0, 0.0])
TICKS = st.tuples(  # (dt, energy delta, work delta, batch, follow the hints, reset the counters)
    st.one_of(st.just(1.5), st.floats(-1, 3), SPECIAL),
    st.one_of(st.floats(10, 2000), SPECIAL),
    st.one_of(st.floats(1, 1000), SPECIAL),
    st.sampled_from([8, 16, 32]),
    st.booleans(),
    st.integers(0, 15).map(lambda n: n == 0),
)


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    spec=cap_specs(),
    constraints=st.lists(CONSTRAINTS, min_size=1, max_size=2),
    stream=st.lists(TICKS, min_size=2, max_size=7),
    objective=st.sampled_from(["Energy", "EDP", "ED2P"]),
)
def test_never_outside_bounds_and_never_a_decision_from_bad_data(
    spec: PowerCapSpec,
    constraints: list[tuple[float, float, float] | None],
    stream: list[tuple[float, float, float, int, bool, bool]],
    objective: Objective,
) -> None:
    gpus = tuple(
        MemberInfo(member=f"GPU-{i}", pod=f"default/p{i}")
        if c is None
        else MemberInfo(
            member=f"GPU-{i}", pod=f"default/p{i}", minWatts=c[0], maxWatts=c[1], defaultWatts=c[2]
        )
        for i, c in enumerate(constraints)
    )
    pol = policy(objective=objective, powerCap=spec, batchSize=BatchSizeSpec(mode="Auto", min=8, max=64))
    info = WorkloadInfo(name="w", members=gpus, batchSize=8)
    time, energy, work = 0.0, {g.member: 0.0 for g in gpus}, 0.0
    caps: dict[str, float | None] = {g.member: g.defaultWatts for g in gpus}
    batch = 8
    state: OptimizerState | None = None
    for dt, de, dw, b, follow, reset in stream:
        time += dt
        work = 0.0 if reset else work + dw
        for g in gpus:
            energy[g.member] = energy[g.member] + de
        if not follow:
            batch = b
        obs = Observation(
            time=time,
            members=tuple(
                MemberSample(
                    member=g.member,
                    energyJoules=energy[g.member],
                    workUnits=work,
                    powerWatts=300.0,
                    capWatts=caps[g.member],
                    batchSize=batch,
                    quantization="bf16",
                )
                for g in gpus
            ),
        )
        d = step(pol, info, state, obs, now=time if math.isfinite(time) else 0.0, tuning=FAST)
        for g in gpus:
            allowed = expected_range(spec, g)
            cap = d.capWatts[g.member]
            if allowed == "either":
                continue
            if allowed is None:
                assert cap is None
            else:
                assert isinstance(allowed, tuple)
                assert cap is not None and allowed[0] - 1e-9 <= cap <= allowed[1] + 1e-9
                assert g.minWatts is not None and g.maxWatts is not None
                assert g.minWatts - 1e-9 <= cap <= g.maxWatts + 1e-9
        if d.badData is not None and state is not None:
            # nothing the optimizer decides or believes moved
            before, after = state, d.state
            assert after.target == before.target
            assert after.phase == before.phase
            assert after.probes == before.probes
            assert after.baseline == before.baseline
            assert after.acc == before.acc
            assert d.badData not in (BadData.CONFIG_CHANGED, BadData.ZERO_LENGTH)
        state = d.state
        if follow:  # the agent applies caps, the workload applies the batch hint
            caps = {k: v for k, v in d.capWatts.items()}
            batch = d.batchSize or batch


# ---------------------------------------------------------------- convergence on gpusim


def cap_only(objective: Objective = "EDP", max_slowdown: float = 10) -> EnergyPolicySpec:
    return policy(objective=objective, maxSlowdownPercent=max_slowdown, powerCap=PowerCapSpec(mode="Auto"))


DECODE = gpusim.llm_decode()
SIM_PROFILES: list[tuple[str, gpusim.WorkloadProfile, int, Profile, bool]] = [
    ("decode bf16 b8", DECODE, 8, "bf16", True),
    ("decode bf16 b64", DECODE, 64, "bf16", True),
    ("decode bf16 b256", DECODE, 256, "bf16", True),
    ("decode fp8 b32", DECODE, 32, "fp8", True),
    ("decode fp8 b512", DECODE, 512, "fp8", True),
    ("decode fp32 b64", DECODE, 64, "fp32", True),
    ("gemm bf16", gpusim.gemm(), 1, "bf16", False),
    ("gemm fp8", gpusim.gemm(), 1, "fp8", False),
    ("gemm tf32 n2048", gpusim.gemm(2048), 4, "tf32", False),
    ("training bf16", gpusim.training(), 1, "bf16", False),
    ("training bf16 eff0.8", gpusim.training(compute_efficiency=0.8), 1, "bf16", False),
    ("training fp8", gpusim.training(), 1, "fp8", False),
    ("training throttled", gpusim.throttled(gpusim.training()), 1, "bf16", False),
]


def cap_search(name: str, objective: Objective, seed: int) -> tuple[float, int, float]:
    """(chosen / exhaustive optimum, cap probes, true slowdown %) of one converged cap search."""
    _, profile, batch, precision, batched = next(p for p in SIM_PROFILES if p[0] == name)
    spec = SimWorkloadSpec(name, profile, batch, precision, cap_only(objective), reportsBatch=batched)
    sim, decisions = drive(spec, seconds=2400, seed=seed)
    d = decisions[-1]
    assert d.phase == "Converged", (name, objective, d.reasons)
    chosen, chosen_ups = true_objective(sim, objective, final_caps(sim, d))
    _, base_ups = true_objective(sim, objective, [700.0])
    sweep = [true_objective(sim, objective, [float(c)]) for c in range(350, 701, 5)]
    # the exhaustive search knows the truth; the optimizer keeps 1.5 points of slowdown for its noise
    optimum = min(obj for obj, ups in sweep if ups >= 0.915 * base_ups)
    probes = sum(1 for p in d.state.probes if p.stage == "cap")
    return chosen / optimum, probes, 100 * (1 - chosen_ups / base_ups)


def test_cap_search_is_within_2_percent_of_the_exhaustive_optimum_in_8_probes() -> None:
    """Every gpusim profile, every objective, with gpusim's noise. A single noisy run can land on
    the wrong side of a 5 W-wide kink (gpusim's voltage knee), so the 2% goal is asserted for
    nearly all runs and a 3% bound for every one; probes, slowdown and convergence for every one."""
    results = {
        (name, objective): cap_search(name, objective, zlib.crc32(name.encode()))
        for name, *_ in SIM_PROFILES
        for objective in ("EDP", "Energy", "ED2P")
    }
    for case, (ratio, probes, slowdown) in results.items():
        assert probes <= 8, case
        assert slowdown <= 10.0, case  # the slowdown limit holds for the truth, not only the measurement
        assert ratio <= 1.03, (case, ratio)
    within = [case for case, (ratio, _, _) in results.items() if ratio <= 1.02]
    assert len(within) >= 0.9 * len(results), sorted(set(results) - set(within))


@pytest.mark.parametrize("max_slowdown", [0.0, 2.0, 5.0, 20.0])
@pytest.mark.parametrize("seed", [1, 2])
def test_the_kept_configuration_never_breaks_the_slowdown_limit(max_slowdown: float, seed: int) -> None:
    pol = policy(
        maxSlowdownPercent=max_slowdown,
        objective="Energy",
        batchSize=BatchSizeSpec(mode="Auto", min=8, max=1024),
        quantization=QuantizationSpec(mode="Auto", allowed=["bf16", "fp8"], maxAccuracyDropPercent=1),
    )
    spec = SimWorkloadSpec("decode", DECODE, 64, "bf16", pol, DECODE_ACCURACY)
    sim, decisions = drive(spec, seconds=3600, seed=seed)
    d = decisions[-1]
    assert d.phase == "Converged"
    final, final_ups = true_objective(sim, "Energy", final_caps(sim, d))
    base, base_ups = true_objective(sim, "Energy", [700.0], Running(64, "bf16"))
    assert final_ups >= (1 - max_slowdown / 100) * base_ups
    assert d.figures.slowdownPercent is not None and d.figures.slowdownPercent <= max_slowdown
    assert final < base


def test_decode_explores_quantization_then_batch_then_cap() -> None:
    pol = policy(
        batchSize=BatchSizeSpec(mode="Auto", min=8, max=1024),
        quantization=QuantizationSpec(mode="Auto", allowed=["bf16", "fp8", "int8"], maxAccuracyDropPercent=1),
    )
    spec = SimWorkloadSpec("decode", DECODE, 8, "bf16", pol, DECODE_ACCURACY)
    sim, decisions = drive(spec, seconds=2400)
    d = decisions[-1]
    assert d.phase == "Converged"
    # Quantization at the starting batch, then batch sizes, then the precision checked again at the
    # batch chosen, then caps.
    order = {"quantization": 0, "batch": 1, "requantization": 2, "cap": 3, "straggler": 4}
    stages = [
        "requantization" if p.stage == "quantization" and p.config.batchSize != 8 else p.stage
        for p in d.state.probes
    ]
    assert stages == sorted(stages, key=order.__getitem__)
    assert "requantization" in stages
    # int8 declares 3% accuracy loss, over the 1% allowed: never tried
    assert {p.config.quantization for p in d.state.probes if p.stage == "quantization"} == {"fp8", "bf16"}
    assert d.quantization == "fp8" and sim.running.quantization == "fp8"
    assert d.figures.edpReductionPercent is not None and d.figures.edpReductionPercent > 50


def test_each_quantization_profile_is_tried_at_most_once_and_hints_never_flap() -> None:
    pol = policy(
        batchSize=BatchSizeSpec(mode="Auto", min=8, max=1024),
        quantization=QuantizationSpec(
            mode="Auto", allowed=["bf16", "fp16", "fp8", "int8"], maxAccuracyDropPercent=5
        ),
    )
    spec = SimWorkloadSpec("decode", DECODE, 8, "bf16", pol, DECODE_ACCURACY)
    _, decisions = drive(spec, seconds=3600)
    assert decisions[-1].phase == "Converged"
    probes = [p for p in decisions[-1].state.probes if p.stage == "quantization"]
    at_start = [p.config.quantization for p in probes if p.config.batchSize == 8]
    again = [p.config.quantization for p in probes if p.config.batchSize != 8]
    # All eligible, each once, the running bf16 not again; then each once more at the new batch.
    assert sorted(str(t) for t in at_start) == ["fp16", "fp8", "int8"]
    assert len(again) == len(set(again)) <= 3
    hinted = [d.quantization for d in decisions]
    switches = [b for a, b in itertools.pairwise(hinted) if a != b]
    # one switch per tried profile, plus one back to the best after each of the two quantization
    # stages: each a model reload
    assert len(switches) <= len(probes) + 2
    # never back and forth between two configurations: once converged, the hint holds
    converged_at = next(i for i, d in enumerate(decisions) if d.phase == "Converged")
    assert (
        len({(d.quantization, d.batchSize, tuple(d.capWatts.values())) for d in decisions[converged_at:]})
        == 1
    )


def test_resuming_from_the_stored_state_gives_the_same_result() -> None:
    pol = policy(
        batchSize=BatchSizeSpec(mode="Auto", min=8, max=1024),
        quantization=QuantizationSpec(mode="Auto", allowed=["bf16", "fp8"], maxAccuracyDropPercent=1),
    )
    spec = SimWorkloadSpec("decode", DECODE, 8, "bf16", pol, DECODE_ACCURACY)
    _, straight = drive(spec, seconds=1500, seed=7)
    _, resumed = drive(spec, seconds=1500, seed=7, roundtrip=True)
    assert [d.state for d in straight] == [d.state for d in resumed]
    assert [d.capWatts for d in straight] == [d.capWatts for d in resumed]
    stored = json.dumps(straight[-1].state.model_dump(mode="json"))
    assert len(stored) < 32_000  # it lives in etcd


def test_drift_in_work_rate_triggers_a_new_exploration() -> None:
    spec = SimWorkloadSpec("train", gpusim.training(), 1, "bf16", cap_only(), reportsBatch=False)
    bigger = gpusim.training(params=700_000_000)

    def swap_model(now: float, sim: SimWorkload, info: WorkloadInfo) -> WorkloadInfo:
        if now == 1500.0:
            sim.spec = replace(sim.spec, profile=bigger)  # same config, half the samples per second
        return info

    _, decisions = drive(spec, seconds=3000, hook=swap_model)
    phases = [d.phase for d in decisions]
    first = phases.index("Converged")
    assert first * REPORT_SECONDS < 1500
    drifted = phases.index("Drifted")
    assert drifted * REPORT_SECONDS > 1500
    assert any(e.reason == "DriftDetected" for e in decisions[drifted].events)
    assert decisions[-1].phase == "Converged" and decisions[-1].state.exploration == 2
    # the new baseline is the new model's
    new, old = decisions[-1].state.baseline, decisions[first].state.baseline
    assert new is not None and new.metrics is not None and old is not None and old.metrics is not None
    assert new.metrics.unitsPerSecond < 0.7 * old.metrics.unitsPerSecond


@pytest.mark.parametrize("change", ["restarts", "image"])
def test_a_restart_or_new_image_triggers_a_new_exploration(change: str) -> None:
    spec = SimWorkloadSpec("train", gpusim.training(), 1, "bf16", cap_only(), reportsBatch=False)

    def restart(now: float, sim: SimWorkload, info: WorkloadInfo) -> WorkloadInfo:
        if now < 1500.0:
            return info
        return info.model_copy(
            update={"restarts": 1} if change == "restarts" else {"image": "registry.example/sim:2"}
        )

    _, decisions = drive(spec, seconds=2600, hook=restart)
    at = int(1500 / REPORT_SECONDS)
    assert decisions[at - 1].phase == "Converged"
    assert decisions[at].phase == "Drifted"
    assert decisions[at].capWatts == {g: 700.0 for g in decisions[at].capWatts}  # back to the baseline cap
    assert decisions[-1].phase == "Converged" and decisions[-1].state.exploration == 2


def test_straggler_caps_lower_energy_without_slowing_the_job() -> None:
    # A tight 2%: the cap stage barely moves the common cap, the straggler stage does the work.
    pol = policy(maxSlowdownPercent=2, groupByLabel="job")
    spec = SimWorkloadSpec("job", gpusim.gemm(), 1, "bf16", pol, workPerRank=(8.0, 4.0), reportsBatch=False)
    sim, decisions = drive(spec, seconds=2400)
    d = decisions[-1]
    assert d.phase == "Converged"
    caps = final_caps(sim, d)
    assert caps[1] < caps[0]  # the waiting rank got its own, lower cap
    assert any(p.stage == "straggler" for p in d.state.probes)
    job_before = gpusim.job_step(H100, spec.profile, "bf16", spec.workPerRank, [caps[0], caps[0]])
    job_after = gpusim.job_step(H100, spec.profile, "bf16", spec.workPerRank, caps)
    assert job_after.units_per_second >= 0.99 * job_before.units_per_second
    assert sum(job_after.per_rank_power_watts) < 0.9 * sum(job_before.per_rank_power_watts)


def test_a_workload_that_ignores_hints_fails_probes_and_still_converges() -> None:
    pol = policy(batchSize=BatchSizeSpec(mode="Auto", min=8, max=64))
    spec = SimWorkloadSpec("stubborn", DECODE, 8, "bf16", pol, followsHints=False)
    _, decisions = drive(spec, seconds=2400)
    d = decisions[-1]
    assert d.phase == "Converged"
    failed = [p for p in d.state.probes if p.failed]
    assert failed and all(p.stage == "batch" for p in failed)
    assert any(e.reason == "ProbeFailed" for dd in decisions for e in dd.events)
    assert d.state.incumbent is not None and d.state.incumbent.config.batchSize == 8


def test_a_tight_latency_slo_keeps_the_batch_small() -> None:
    base = dict(batchSize=BatchSizeSpec(mode="Auto", min=8, max=1024))
    spec = SimWorkloadSpec("decode", DECODE, 8, "bf16", policy(**base))
    _, free = drive(spec, seconds=2400)
    slo = policy(**base, latencySLO=LatencySLO(metricName="tpot_seconds", maxSeconds=0.00095))
    sim, bound = drive(replace(spec, policy=slo), seconds=2400)
    assert free[-1].figures.batchSize is not None and bound[-1].figures.batchSize is not None
    assert bound[-1].figures.batchSize < free[-1].figures.batchSize
    point = gpusim.operating_point(
        H100, DECODE, bound[-1].figures.batchSize, "bf16", final_caps(sim, bound[-1])[0]
    )
    assert point.step_seconds <= 0.00095 * 1.02


@pytest.mark.parametrize(
    ("spec", "expected"),
    # Off leaves every GPU's limit alone: no cap is ever asked for, not even the default.
    [(PowerCapSpec(mode="Fixed", watts=450), 450.0), (PowerCapSpec(mode="Off"), None)],
)
def test_fixed_and_off_caps_are_held_from_the_start(spec: PowerCapSpec, expected: float | None) -> None:
    pol = policy(powerCap=spec)
    _, decisions = drive(
        SimWorkloadSpec("t", gpusim.training(), 1, "bf16", pol, reportsBatch=False), seconds=300
    )
    assert {c for d in decisions for c in d.capWatts.values()} == {expected}
    assert decisions[-1].phase == "Converged"
    assert all(p.stage != "cap" for p in decisions[-1].state.probes)


def test_an_unknown_gpu_gets_no_cap() -> None:
    info = WorkloadInfo(name="w", members=(MemberInfo(member="GPU-0", pod="default/p"),))
    obs = Observation(time=0.0, members=(MemberSample(member="GPU-0", energyJoules=0.0, workUnits=0.0),))
    d = step(cap_only(), info, None, obs, now=0.0)
    assert d.capWatts == {"GPU-0": None}
    assert any("left alone" in r for r in d.reasons)


def test_energy_objective_caps_lower_than_edp() -> None:
    caps = {}
    for objective in ("Energy", "EDP"):
        # gpusim puts both optima of this profile below the default 50% floor (350 W): EDP near
        # 300 W, energy lower; a 30% floor (210 W) lets the search reach both.
        pol = policy(
            objective=objective, maxSlowdownPercent=30, powerCap=PowerCapSpec(mode="Auto", minPercent=30)
        )
        spec = SimWorkloadSpec(
            "t", gpusim.training(compute_efficiency=0.8), 1, "bf16", pol, reportsBatch=False
        )
        sim, decisions = drive(spec, seconds=2400)
        caps[objective] = final_caps(sim, decisions[-1])[0]
    assert caps["Energy"] < caps["EDP"]


def test_bad_data_streak_reports_degraded_and_holds_the_configuration() -> None:
    info = WorkloadInfo(name="w", members=(h100(),))
    state = None
    decisions = []
    for i, work in enumerate([0.0, 100.0, 50.0, 20.0, 10.0, 5.0]):  # the counter keeps going backwards
        obs = Observation(
            time=10.0 * i,
            members=(MemberSample(member="GPU-0", energyJoules=1000.0 * i, workUnits=work, capWatts=700.0),),
        )
        d = step(cap_only(), info, state, obs, now=10.0 * i)
        decisions.append(d)
        state = d.state
    assert [d.badData for d in decisions[2:]] == [BadData.COUNTER_RESET] * 4
    assert decisions[-1].phase == "Degraded"
    assert sum(1 for d in decisions for e in d.events if e.reason == "BadMeasurement") == 1
    assert {tuple(d.capWatts.values()) for d in decisions} == {(700.0,)}


def test_a_sample_the_agent_flags_unhealthy_yields_no_decision_unless_a_hint_is_reloading() -> None:
    info = WorkloadInfo(name="w", members=(h100(),))

    def obs(i: int, healthy: bool = True) -> Observation:
        return Observation(
            time=10.0 * i,
            members=(
                MemberSample(
                    member="GPU-0",
                    energyJoules=3000.0 * i,
                    workUnits=1000.0 * i,
                    capWatts=700.0,
                    healthy=healthy,
                ),
            ),
        )

    tuning = Tuning(applyTimeoutSeconds=5.0)
    state: OptimizerState | None = None
    for i in range(4):
        state = step(cap_only(), info, state, obs(i), now=10.0 * i, tuning=tuning).state
    assert state is not None and state.phase == "Baseline"
    before = state
    d = step(cap_only(), info, state, obs(4, healthy=False), now=40.0, tuning=tuning)
    assert d.badData == BadData.UNHEALTHY_SAMPLE
    assert d.state.baseline == before.baseline and d.state.probes == before.probes
    assert d.state.acc.windows == before.acc.windows
    # The window after it starts at the flagged sample: discarded too, then measuring resumes.
    d = step(cap_only(), info, d.state, obs(5), now=50.0, tuning=tuning)
    assert d.badData == BadData.UNHEALTHY_SAMPLE and d.state.badStreak == 2
    d = step(cap_only(), info, d.state, obs(6), now=60.0, tuning=tuning)
    assert d.badData is None and d.state.badStreak == 0
    assert d.state.acc.windows == before.acc.windows + 1
    # Right after a new hint an unhealthy counter is the workload reloading, not bad data.
    reloading = d.state.model_copy(update={"targetSince": 65.0})
    d = step(cap_only(), info, reloading, obs(7, healthy=False), now=70.0, tuning=tuning)
    assert d.badData is None and d.state.badStreak == 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_straggler_probe_is_judged_by_its_own_effect_not_by_the_edge_the_cap_stage_left(seed: int) -> None:
    # With 5% allowed, the cap stage puts the common cap near the slowdown limit. A lower cap on
    # the waiting rank does not slow the job until that rank becomes the slowest, so it must pass:
    # judged against the policy's limit less the noise margin, it failed about half the time.
    pol = policy(maxSlowdownPercent=5, groupByLabel="job")
    spec = SimWorkloadSpec("job", gpusim.gemm(), 1, "bf16", pol, workPerRank=(8.0, 4.0), reportsBatch=False)
    sim, decisions = drive(spec, seconds=2400, seed=seed)
    d = decisions[-1]
    assert d.phase == "Converged"
    caps = final_caps(sim, d)
    common = gpusim.job_step(H100, spec.profile, "bf16", spec.workPerRank, [caps[0], caps[0]])
    critical_at = min(
        c
        for c in range(200, int(caps[0]) + 1, 5)
        if gpusim.job_step(H100, spec.profile, "bf16", spec.workPerRank, [caps[0], float(c)]).critical_rank
        == 0
    )
    assert caps[1] < caps[0] - 50.0, "the waiting rank kept nearly the common cap"
    assert caps[1] >= critical_at - 5.0, "the waiting rank was capped into the job's critical path"
    after = gpusim.job_step(H100, spec.profile, "bf16", spec.workPerRank, caps)
    assert after.units_per_second >= 0.99 * common.units_per_second


def test_a_slowdown_limit_within_the_noise_probes_no_cap_and_says_so() -> None:
    # Training's throughput noise leaves a margin of about 1% at the most windows: a 0.5% limit
    # can never be shown to hold under a lower cap, so no cap probe slows the job for nothing.
    pol = policy(maxSlowdownPercent=0.5, powerCap=PowerCapSpec(mode="Auto", minPercent=50))
    spec = SimWorkloadSpec("t", gpusim.training(), 16, "bf16", pol, reportsBatch=False)
    _, decisions = drive(spec, seconds=600)
    d = decisions[-1]
    assert d.phase == "Converged"
    assert not [p for p in d.state.probes if p.stage == "cap"]
    assert {c for dd in decisions for c in dd.capWatts.values()} == {700.0}
    margin = d.figures.noiseMarginPercent
    assert margin is not None and margin >= 0.5
    assert any("within the measurement noise" in r for dd in decisions for r in dd.reasons)
    # A limit well above the noise is probed as before.
    roomy = policy(maxSlowdownPercent=10, powerCap=PowerCapSpec(mode="Auto", minPercent=50))
    _, probed = drive(replace(spec, policy=roomy), seconds=600)
    assert [p for p in probed[-1].state.probes if p.stage == "cap"]


def test_the_precision_is_checked_again_at_the_batch_the_batch_stage_chose() -> None:
    # gpusim's projection stack, minimising energy: at batch 8 int4-awq moves the fewest bytes and
    # wins; at the large batch the search then picks, the math dominates and fp8's faster tensor
    # cores win instead (int4-awq dequantises on fp16 math).
    pol = policy(
        objective="Energy",
        batchSize=BatchSizeSpec(mode="Auto", min=8, max=1024, multipleOf=8),
        quantization=QuantizationSpec(
            mode="Auto", allowed=["bf16", "fp8", "int4-awq"], maxAccuracyDropPercent=1.0
        ),
        powerCap=PowerCapSpec(mode="Off"),
    )
    accuracy: dict[Profile, float] = {"bf16": 1.0, "fp8": 0.995, "int4-awq": 0.993}
    spec = SimWorkloadSpec("d", DECODE, 8, "bf16", pol, accuracy)
    _, decisions = drive(spec, seconds=2400)
    d = decisions[-1]
    assert d.phase == "Converged"
    probes = d.state.probes
    first = [p for p in probes if p.stage == "quantization" and p.config.batchSize == 8]
    assert {p.config.quantization for p in first} == {"fp8", "int4-awq"}
    batch = d.figures.batchSize
    assert batch is not None and batch >= 256
    again = [p for p in probes if p.stage == "quantization" and p.config.batchSize == batch]
    assert again, "the precision was not re-checked at the chosen batch"
    assert d.figures.quantization == "fp8"
    best_at_batch = min(
        ("bf16", "fp8", "int4-awq"),
        key=lambda q: gpusim.operating_point(H100, DECODE, batch, q, 700.0).joules_per_unit,
    )
    assert d.figures.quantization == best_at_batch
