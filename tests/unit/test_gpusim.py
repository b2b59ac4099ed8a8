"""The simulated GPU physics (edpilot.gpusim) against the H100 probe and the published shape of capping."""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import math
import random
import re
import statistics
from dataclasses import replace
from importlib import resources
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edpilot import gpusim
from edpilot.contract import ThrottleReason
from edpilot.gpusim import (
    A100_SXM,
    H100_SXM,
    PRECISIONS,
    OperatingPoint,
    SimulatedGpu,
    WorkloadProfile,
    gemm,
    job_step,
    llm_decode,
    operating_point,
    sweep_caps,
    throttled,
    training,
)


def _packaged(name: str) -> Any:
    # The copies shipped in the package; tests never read ../shared.
    return json.loads((resources.files("edpilot") / "data" / name).read_text(encoding="utf-8"))


PROBE = _packaged("h100_probe.json")
STRAGGLER = _packaged("h100x2_straggler.json")
TOLERANCE = 0.15
CAPS = [float(c) for c in range(200, 701, 25)]


def _argmin(values: list[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)


# ---------------------------------------------------------------- calibration at the 700 W limit


def test_decode_joules_per_token_match_the_probe_within_15_percent() -> None:
    rows = []
    for r in PROBE["decode"]:
        p = operating_point(H100_SXM, llm_decode(params=r["params"]), r["batch"], r["dtype"], 700.0)
        rows.append((r["dtype"], r["batch"], p.joules_per_unit / r["J_per_tok"] - 1.0))
    table = "\n".join(f"{d:5} batch {b:5}: {100 * e:+6.1f}%" for d, b, e in rows)
    worst = max(abs(e) for _, _, e in rows)
    print(f"decode J/token, simulated vs measured (worst {100 * worst:.1f}%):\n{table}")
    assert len(rows) == 24
    assert worst <= TOLERANCE, table


def test_gemm_tflop_per_joule_match_the_probe_within_15_percent() -> None:
    rows = []
    for r in PROBE["gemm"]:
        prof = gemm(n=r["n"])
        p = operating_point(H100_SXM, prof, 1, r["dtype"], 700.0)
        tflop_per_j = prof.flops_per_unit / 1e12 / p.joules_per_unit
        rows.append((r["dtype"], r["n"], tflop_per_j / r["tflop_per_J"] - 1.0))
    table = "\n".join(f"{d:5} n {n:5}: {100 * e:+6.1f}%" for d, n, e in rows)
    worst = max(abs(e) for _, _, e in rows)
    print(f"GEMM TFLOP/J, simulated vs measured (worst {100 * worst:.1f}%):\n{table}")
    assert len(rows) == 8
    assert worst <= TOLERANCE, table


@pytest.mark.parametrize("dtype", ["tf32", "bf16", "fp8"])
def test_large_gemms_are_already_power_limited_at_700_watts(dtype: str) -> None:
    # Probe: n = 8192 sits at the limit with the SM clock down to 1260-1440 MHz.
    p = operating_point(H100_SXM, gemm(8192), 1, dtype, 700.0)
    assert p.throttle_reasons == (ThrottleReason.SW_POWER_CAP,)
    assert p.power_watts == pytest.approx(700.0, rel=1e-6)
    assert 1200.0 <= p.sm_clock_mhz <= 1500.0


def test_small_batch_decode_draws_well_under_the_limit() -> None:
    # Probe: bf16 batch 8 draws 485 W at full clock.
    p = operating_point(H100_SXM, llm_decode(), 8, "bf16", 700.0)
    assert p.throttle_reasons == ()
    assert p.sm_clock_mhz == H100_SXM.max_sm_clock_mhz
    assert p.power_watts == pytest.approx(485.0, rel=0.10)


# ---------------------------------------------------------------- behaviour under a cap


def test_a_cap_above_the_natural_draw_changes_nothing() -> None:
    free = operating_point(H100_SXM, llm_decode(), 8, "bf16", 700.0)
    for cap in (free.power_watts + 0.5, 550.0, 600.0, 650.0):
        capped = operating_point(H100_SXM, llm_decode(), 8, "bf16", cap)
        assert capped.units_per_second == free.units_per_second
        assert capped.power_watts == free.power_watts
        assert capped.sm_clock_mhz == free.sm_clock_mhz
        assert capped.throttle_reasons == ()


@pytest.mark.parametrize(
    ("profile", "batch", "precision"),
    [(gemm(), 1, "bf16"), (training(), 16, "bf16"), (llm_decode(), 8, "bf16"), (llm_decode(), 512, "fp8")],
    ids=["gemm-bf16", "training-bf16", "decode-bf16-b8", "decode-fp8-b512"],
)
def test_below_the_natural_draw_clock_and_throughput_fall_with_the_cap(
    profile: WorkloadProfile, batch: int, precision: str
) -> None:
    natural = operating_point(H100_SXM, profile, batch, precision, 700.0).power_watts
    points = sweep_caps(H100_SXM, profile, batch, precision, sorted(CAPS, reverse=True))
    for higher, lower in itertools.pairwise(points):
        assert lower.sm_clock_mhz <= higher.sm_clock_mhz
        assert lower.units_per_second <= higher.units_per_second
    binding = [p for p in points if p.cap_watts < natural - 1e-6]
    assert binding, "every profile here draws more than 200 W"
    for p in binding:
        assert ThrottleReason.SW_POWER_CAP in p.throttle_reasons
        assert p.power_watts <= p.cap_watts + 1e-6
    assert binding[-1].sm_clock_mhz < points[0].sm_clock_mhz
    assert binding[-1].units_per_second < points[0].units_per_second


@pytest.mark.parametrize(
    ("profile", "batch"), [(gemm(), 1), (training(), 16)], ids=["gemm-bf16", "training-bf16"]
)
def test_energy_per_unit_is_u_shaped_in_the_cap_for_compute_bound_work(
    profile: WorkloadProfile, batch: int
) -> None:
    points = sweep_caps(H100_SXM, profile, batch, "bf16", CAPS)
    energy = [p.joules_per_unit for p in points]
    edp = [p.edp_per_unit for p in points]
    best = _argmin(energy)
    assert 0 < best < len(CAPS) - 1, f"energy minimum at the edge: {CAPS[best]} W"
    assert energy[0] > energy[best] and energy[-1] > energy[best]
    assert CAPS[_argmin(edp)] >= CAPS[best]
    # Published capping studies: the energy optimum sits well below TDP and
    # saves on the order of 10-30%.
    assert 0.45 <= CAPS[best] / 700.0 <= 0.75
    assert 0.05 <= 1.0 - energy[best] / energy[-1] <= 0.35


def test_switching_power_goes_as_the_cube_of_the_clock_above_the_voltage_floor() -> None:
    # CMOS: P_dyn = C f V**2. At low clocks V sits at its floor (P_dyn ~ f); in the
    # DVFS range V rises at least in proportion to f (P_dyn ~ f**3 or steeper),
    # from just below the ~1420 MHz where large GEMMs run at the 700 W limit.
    def exponent(f_mhz: float) -> float:
        step = 1.01
        up = gpusim._dynamic_scale(H100_SXM, f_mhz * step)
        down = gpusim._dynamic_scale(H100_SXM, f_mhz / step)
        return math.log(up / down) / math.log(step * step)

    assert gpusim._dynamic_scale(H100_SXM, H100_SXM.max_sm_clock_mhz) == pytest.approx(1.0)
    assert exponent(600.0) == pytest.approx(1.0, abs=0.05)
    assert all(3.0 <= exponent(f) <= 3.5 for f in range(1350, 1981, 10))
    clocks = [float(f) for f in range(345, 1981, 15)]
    volts = [gpusim._voltage(H100_SXM, f) for f in clocks]
    assert all(b >= a for a, b in itertools.pairwise(volts))
    assert volts[0] == pytest.approx(H100_SXM.voltage_floor, rel=0.01)


@pytest.mark.parametrize(
    ("profile", "batch"), [(gemm(), 1), (training(), 16)], ids=["gemm-bf16", "training-bf16"]
)
def test_a_cap_below_the_default_lowers_the_edp_of_compute_bound_work(
    profile: WorkloadProfile, batch: int
) -> None:
    # Zeus (NSDI 2023) and other capping studies: for compute-bound training a
    # moderate cap costs little time and saves more energy than that, so EDP has
    # its minimum below the default limit and the energy minimum lies lower still.
    caps = [float(c) for c in range(200, 701, 5)]
    points = sweep_caps(H100_SXM, profile, batch, "bf16", caps)
    default = points[-1]
    edp = [p.edp_per_unit for p in points]
    energy = [p.joules_per_unit for p in points]
    best_edp = _argmin(edp)
    assert 0 < best_edp < len(caps) - 1, f"EDP minimum at the edge: {caps[best_edp]} W"
    assert caps[_argmin(energy)] < caps[best_edp]
    within_slowdown = [
        p
        for p in points
        if 450.0 <= p.cap_watts <= 650.0
        and p.units_per_second > 0.90 * default.units_per_second
        and p.edp_per_unit <= 0.95 * default.edp_per_unit
    ]
    assert within_slowdown, "no cap in 450-650 W saves 5% EDP for less than 10% throughput"


def test_memory_bound_decode_keeps_its_throughput_under_a_moderate_cap() -> None:
    free = operating_point(H100_SXM, llm_decode(), 8, "bf16", 700.0)
    capped = operating_point(H100_SXM, llm_decode(), 8, "bf16", 400.0)
    assert capped.units_per_second == pytest.approx(free.units_per_second, rel=0.01)
    assert capped.sm_clock_mhz < free.sm_clock_mhz
    assert capped.joules_per_unit < 0.9 * free.joules_per_unit


def test_memory_bound_work_at_a_very_low_cap_is_slowed_on_the_memory_side() -> None:
    # On the H100 the SM side stops saturating HBM at low clocks, which is enough.
    p = operating_point(H100_SXM, llm_decode(), 1, "bf16", 200.0)
    assert p.power_watts <= 200.0 + 1e-6
    assert p.units_per_second < operating_point(H100_SXM, llm_decode(), 1, "bf16", 700.0).units_per_second
    # A GPU whose SMs could saturate HBM at any clock, and whose HBM alone draws more than
    # the cap allows, has its memory slowed instead.
    strong_sms = replace(H100_SXM, onchip_bandwidth_ratio=50.0, hbm_watts=250.0)
    p = operating_point(strong_sms, llm_decode(), 1, "bf16", 200.0)
    assert p.power_watts <= 200.0 + 1e-6
    assert p.sm_clock_mhz == H100_SXM.min_sm_clock_mhz
    assert p.mem_clock_mhz < H100_SXM.mem_clock_mhz


def test_a_thermally_throttled_workload_runs_slower_and_says_why() -> None:
    hot = operating_point(H100_SXM, throttled(llm_decode(), 1500.0), 8, "bf16", 700.0)
    cool = operating_point(H100_SXM, llm_decode(), 8, "bf16", 700.0)
    assert hot.throttle_reasons == (ThrottleReason.HW_THERMAL_SLOWDOWN,)
    assert hot.sm_clock_mhz == 1500.0
    assert hot.power_watts < cool.power_watts
    both = operating_point(H100_SXM, throttled(gemm(), 1800.0), 1, "bf16", 300.0)
    assert both.throttle_reasons == (ThrottleReason.SW_POWER_CAP, ThrottleReason.HW_THERMAL_SLOWDOWN)


def test_the_a100_prior_is_less_efficient_than_the_h100() -> None:
    assert not A100_SXM.calibrated and H100_SXM.calibrated

    def ratio(gpu_profile: WorkloadProfile, batch: int) -> float:
        h100 = operating_point(H100_SXM, gpu_profile, batch, "bf16", H100_SXM.default_power_limit_watts)
        a100 = operating_point(A100_SXM, gpu_profile, batch, "bf16", A100_SXM.default_power_limit_watts)
        assert a100.power_watts <= A100_SXM.max_power_limit_watts + 1e-6
        return a100.joules_per_unit / h100.joules_per_unit

    # Compute-bound work: far more energy per unit. Memory-bound decode: about
    # the same (HBM bandwidth per watt improved less), never better.
    assert ratio(gemm(), 1) > 1.3
    assert ratio(training(), 16) > 1.3
    assert ratio(llm_decode(), 1024) > 1.3
    assert all(ratio(llm_decode(), 2**k) > 0.95 for k in range(11))
    assert not A100_SXM.supports("fp8") and A100_SXM.supports("int8")
    with pytest.raises(ValueError, match="fp8"):
        operating_point(A100_SXM, gemm(), 1, "fp8", 400.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cap_watts": 199.0}, "constraints"),
        ({"cap_watts": 701.0}, "constraints"),
        ({"cap_watts": math.nan}, "constraints"),
        ({"precision": "fp4"}, "unknown precision"),
        ({"batch_size": 0}, "batch size"),
    ],
)
def test_operating_point_rejects_nonsense(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"batch_size": 8, "precision": "bf16", "cap_watts": 700.0} | kwargs
    with pytest.raises(ValueError, match=message):
        operating_point(H100_SXM, llm_decode(), **args)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["decode", "gemm", "training"]),
    precision=st.sampled_from(PRECISIONS),
    log2_batch=st.integers(min_value=0, max_value=10),
    cap=st.floats(min_value=200.0, max_value=700.0),
)
def test_power_never_exceeds_the_cap_and_work_always_progresses(
    kind: str, precision: str, log2_batch: int, cap: float
) -> None:
    profile = {"decode": llm_decode(), "gemm": gemm(), "training": training()}[kind]
    p = operating_point(H100_SXM, profile, 2**log2_batch, precision, cap)
    assert p.power_watts <= cap + 1e-6
    assert p.units_per_second > 0.0
    assert 0.0 < p.joules_per_unit < math.inf
    assert H100_SXM.min_sm_clock_mhz <= p.sm_clock_mhz <= H100_SXM.max_sm_clock_mhz
    assert 0.0 <= p.utilization <= 1.0


# ---------------------------------------------------------------- multi-GPU jobs and stragglers


@pytest.mark.parametrize(
    "run",
    [r for r in STRAGGLER["runs"] if r["work"][0] != r["work"][1]],
    ids=lambda r: f"work-{r['work'][0]}-{r['work'][1]}",
)
def test_the_waiting_rank_draws_what_the_straggler_probe_measured(run: dict[str, Any]) -> None:
    jp = job_step(H100_SXM, gemm(8192), "bf16", run["work"], [700.0, 700.0])
    measured = run["ranks"]
    assert jp.critical_rank == 0
    assert jp.step_seconds == pytest.approx(measured[0]["step_s"], rel=0.10)
    assert jp.per_rank_power_watts[1] < jp.per_rank_power_watts[0]
    assert jp.per_rank_power_watts[1] == pytest.approx(measured[1]["W"], rel=0.25)
    assert jp.per_rank_power_watts[0] == pytest.approx(measured[0]["W"], rel=0.25)
    # While it waits it neither idles (72-124 W) nor runs flat out: 190-350 W in the probe.
    assert 190.0 * 0.75 <= jp.per_rank_wait_watts[1] <= 350.0 * 1.25


def test_lowering_the_waiting_ranks_cap_saves_energy_until_it_becomes_critical() -> None:
    base = job_step(H100_SXM, gemm(), "bf16", [8, 4], [700.0, 700.0])
    base_rank1_j = base.per_rank_power_watts[1] * base.step_seconds
    became_critical = False
    savings = 0.0
    for cap in sorted(CAPS, reverse=True):
        jp = job_step(H100_SXM, gemm(), "bf16", [8, 4], [700.0, cap])
        if jp.critical_rank == 0:
            assert not became_critical, "a rank that became the slowest cannot stop being it at a lower cap"
            assert jp.step_seconds == base.step_seconds
            rank1_j = jp.per_rank_power_watts[1] * jp.step_seconds
            assert rank1_j <= base_rank1_j + 1e-9
            savings = max(savings, 1.0 - rank1_j / base_rank1_j)
        else:
            became_critical = True
            assert jp.step_seconds > base.step_seconds
    assert became_critical
    assert savings >= 0.2


def test_job_ranks_feed_a_simulated_gpu() -> None:
    jp = job_step(H100_SXM, gemm(), "bf16", [8, 4], [700.0, 500.0])
    gpu = SimulatedGpu(H100_SXM, index=1)
    window = gpu.advance_at(jp.ranks[1], 10.0, random.Random(1))
    assert window.work_units == pytest.approx(4 / jp.step_seconds * 10.0, rel=0.05)
    assert window.energy_joules == pytest.approx(jp.per_rank_power_watts[1] * 10.0, rel=0.05)


# ---------------------------------------------------------------- the stateful simulated device


def test_set_power_limit_rejects_values_outside_the_constraints() -> None:
    gpu = SimulatedGpu()
    assert gpu.power_limit_watts == 700.0
    for bad in (199.9, 700.1, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"outside the constraints .*\[200, 700\] W"):
            gpu.set_power_limit(bad)
        assert gpu.power_limit_watts == 700.0
    gpu.set_power_limit(200.0)
    assert gpu.power_limit_watts == 200.0
    gpu.reset_power_limit()
    assert gpu.power_limit_watts == H100_SXM.default_power_limit_watts


def test_the_enforced_limit_governs_the_running_workload() -> None:
    gpu = SimulatedGpu()
    gpu.assign(gemm(), 1, "bf16")
    gpu.set_power_limit(300.0)
    window = gpu.advance(5.0, random.Random(0))
    assert window.point is not None
    assert window.point.power_watts <= 300.0 + 1e-6
    assert window.throttle_reasons == (ThrottleReason.SW_POWER_CAP,)
    assert window.power_limit_watts == 300.0


def test_energy_counter_is_monotonic_integer_millijoules() -> None:
    gpu = SimulatedGpu()
    rng = random.Random(3)
    last_mj, last_work = gpu.energy_counter_mj, gpu.work_counter
    for i in range(60):
        if i % 20 == 0:
            gpu.assign(llm_decode(), 2 ** (i // 10), "bf16")
        if i % 20 == 15:
            gpu.clear()
        window = gpu.advance(0.05 + (i % 7) * 0.3, rng)
        assert isinstance(window.energy_counter_mj, int)
        assert window.energy_counter_mj >= last_mj
        assert window.energy_joules == pytest.approx((window.energy_counter_mj - last_mj) / 1000.0)
        assert window.work_counter >= last_work
        last_mj, last_work = window.energy_counter_mj, window.work_counter


def test_an_idle_gpu_draws_idle_power_and_does_no_work() -> None:
    window = SimulatedGpu().advance(10.0, random.Random(0))
    assert window.point is None
    assert window.work_units == 0.0
    assert window.utilization_percent == 0
    assert window.sm_clock_mhz == pytest.approx(H100_SXM.min_sm_clock_mhz, abs=15)
    assert window.energy_joules == pytest.approx(H100_SXM.idle_watts * 10.0, rel=0.05)


def _readings(seed: int) -> list[tuple[Any, ...]]:
    gpu = SimulatedGpu(seed_name="node-a")
    gpu.assign(llm_decode(), 64, "fp8")
    rng = random.Random(seed)
    out = []
    for _ in range(5):
        w = gpu.advance(1.0, rng)
        out.append((w.energy_counter_mj, w.work_counter, w.power_watts, w.sm_clock_mhz, w.temperature_c))
    return out


def test_same_seed_same_readings_and_a_different_seed_different_ones() -> None:
    assert _readings(42) == _readings(42)
    assert _readings(42) != _readings(43)


def test_reading_noise_has_the_documented_size_and_at_least_the_probes() -> None:
    gpu = SimulatedGpu()
    gpu.assign(gemm(), 1, "bf16")
    point = gpu.current_point()
    assert point is not None
    rng = random.Random(11)
    window_s = gpusim.NOISE_REFERENCE_WINDOW_S
    windows = [gpu.advance(window_s, rng) for _ in range(600)]
    energy = [w.energy_joules / (point.power_watts * window_s) for w in windows]
    work = [w.work_units / (point.units_per_second * window_s) for w in windows]
    gauge = [w.power_watts / point.power_watts for w in windows]
    probe_spread = statistics.pstdev(r["sampled_err_pct"] for r in PROBE["gemm"] + PROBE["decode"]) / 100
    assert statistics.pstdev(energy) >= probe_spread
    assert statistics.pstdev(energy) == pytest.approx(gpusim.ENERGY_NOISE_REL, rel=0.2)
    assert statistics.pstdev(work) == pytest.approx(gpusim.WORK_NOISE_REL, rel=0.2)
    assert statistics.pstdev(gauge) == pytest.approx(gpusim.POWER_READING_NOISE_REL, rel=0.2)
    # Mean-one noise: long runs converge on the true figures.
    assert statistics.fmean(energy) == pytest.approx(1.0, abs=0.005)
    assert statistics.fmean(work) == pytest.approx(1.0, abs=0.003)


def test_window_noise_does_not_depend_on_how_finely_time_is_stepped() -> None:
    def spread(step_s: float, steps: int, seed: int) -> float:
        totals = []
        rng = random.Random(seed)
        for _ in range(300):
            gpu = SimulatedGpu()
            gpu.assign(gemm(), 1, "bf16")
            for _ in range(steps):
                gpu.advance(step_s, rng)
            totals.append(gpu.energy_counter_mj)
        return statistics.pstdev(totals) / statistics.fmean(totals)

    assert spread(0.35, 10, 1) == pytest.approx(spread(3.5, 1, 2), rel=0.25)


def test_uuids_are_stable_nvml_style_and_distinct() -> None:
    a, b = SimulatedGpu(index=0, seed_name="node-a"), SimulatedGpu(index=1, seed_name="node-a")
    assert a.uuid == SimulatedGpu(index=0, seed_name="node-a").uuid
    assert a.uuid != b.uuid != SimulatedGpu(index=1, seed_name="node-b").uuid
    assert re.fullmatch(r"GPU-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", a.uuid)


def test_assign_rejects_what_the_gpu_cannot_run() -> None:
    with pytest.raises(ValueError, match="fp8"):
        SimulatedGpu(A100_SXM).assign(gemm(), 1, "fp8")
    with pytest.raises(ValueError, match="batch size"):
        SimulatedGpu().assign(gemm(), 0, "bf16")


def test_operating_point_is_deterministic() -> None:
    first: OperatingPoint = operating_point(H100_SXM, training(), 32, "fp8", 450.0)
    assert first == operating_point(H100_SXM, training(), 32, "fp8", 450.0)


def test_gpusim_imports_only_pure_standard_modules_and_the_contract() -> None:
    tree = ast.parse(inspect.getsource(gpusim))
    imported = {
        name if name.startswith("edpilot.") else name.split(".")[0]
        for node in ast.walk(tree)
        for name in (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
    }
    # The contract: its throttle reasons are the names the agent reports for gpusim's GPUs.
    pure = {"__future__", "hashlib", "math", "random", "collections", "dataclasses", "typing"}
    assert imported <= pure | {"edpilot.contract"}


# ---------------------------------------------------------------- locked SM clocks


def test_a_locked_clock_lands_where_a_cap_at_that_clock_lands() -> None:
    """The power model is calibrated on clocks that caps chose: a lock at the clock a cap settled
    on gives the same point, and below a cap's reach a lock still lowers power and speed."""
    decode = gpusim.llama_decode(4096)
    capped = gpusim.operating_point(H100_SXM, decode, 64, "bf16", 400.0)
    assert ThrottleReason.SW_POWER_CAP in capped.throttle_reasons
    locked = gpusim.operating_point(H100_SXM, decode, 64, "bf16", 700.0, capped.sm_clock_mhz)
    assert locked.power_watts == pytest.approx(capped.power_watts, rel=1e-3)
    assert locked.units_per_second == pytest.approx(capped.units_per_second, rel=1e-3)
    assert locked.throttle_reasons == (ThrottleReason.APPLICATIONS_CLOCKS_SETTING,)

    small = gpusim.operating_point(H100_SXM, decode, 8, "bf16", 700.0)
    slow = gpusim.operating_point(H100_SXM, decode, 8, "bf16", 700.0, 1500.0)
    assert slow.power_watts < 0.7 * small.power_watts
    assert small.units_per_second > slow.units_per_second > 0.85 * small.units_per_second
    assert slow.joules_per_unit < 0.75 * small.joules_per_unit


def test_a_cap_below_the_locked_clock_still_binds() -> None:
    decode = gpusim.llama_decode(4096)
    both = gpusim.operating_point(H100_SXM, decode, 64, "bf16", 300.0, 1800.0)
    assert both.power_watts <= 300.0 + 1e-6
    assert ThrottleReason.SW_POWER_CAP in both.throttle_reasons


@pytest.mark.parametrize("mhz", [100.0, 5000.0, math.nan])
def test_a_lock_outside_the_supported_clocks_is_refused(mhz: float) -> None:
    gpu = SimulatedGpu(H100_SXM)
    with pytest.raises(ValueError, match="supported clocks"):
        gpu.lock_sm_clock(mhz)
    assert gpu.locked_clock_mhz is None


def test_a_simulated_gpu_runs_at_its_locked_clock_until_reset() -> None:
    gpu = SimulatedGpu(H100_SXM)
    gpu.assign(gpusim.llama_decode(4096), 8, "bf16")
    free = gpu.current_point()
    gpu.lock_sm_clock(1200.0)
    locked = gpu.current_point()
    assert free is not None and locked is not None
    assert locked.sm_clock_mhz == pytest.approx(1200.0) and locked.power_watts < free.power_watts
    gpu.reset_locked_clock()
    assert gpu.locked_clock_mhz is None and gpu.current_point() == free


def test_a_locked_rank_of_a_job_runs_slower_and_draws_less() -> None:
    decode = gpusim.llama_decode(4096)
    free = gpusim.job_step(H100_SXM, decode, "bf16", [8.0], [700.0], batch_size=8)
    locked = gpusim.job_step(H100_SXM, decode, "bf16", [8.0], [700.0], batch_size=8, locked_clocks=[1200.0])
    assert locked.per_rank_power_watts[0] < free.per_rank_power_watts[0]
    assert locked.units_per_second < free.units_per_second
    with pytest.raises(ValueError, match="one locked clock"):
        gpusim.job_step(H100_SXM, decode, "bf16", [8.0], [700.0], locked_clocks=[])
