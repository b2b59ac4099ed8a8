"""Windows over cumulative counters: figures, and every kind of bad data."""

from __future__ import annotations

import math

import pytest

from edpilot.edp import (
    Accumulator,
    BadData,
    MemberSample,
    Sample,
    Window,
    objective_value,
    pooled_relative_std,
    relative_std,
    significance_threshold,
    window,
    windows_to_beat_noise,
)


def member(**kw: object) -> MemberSample:
    values: dict[str, object] = {
        "member": "GPU-a",
        "energyJoules": 1000.0,
        "workUnits": 500.0,
        "powerWatts": 400.0,
        "capWatts": 700.0,
        "batchSize": 8,
        "quantization": "bf16",
        "latencySeconds": 0.01,
    }
    values.update(kw)
    return MemberSample.model_validate(values)


def sample(time: float, *members: MemberSample, restarts: int = 0, image: str = "img:1") -> Sample:
    return Sample(time=time, members=members or (member(),), restarts=restarts, image=image)


START = sample(100.0, member())
LATER = sample(110.0, member(energyJoules=5000.0, workUnits=2500.0))


def test_a_sound_window_gives_per_unit_figures() -> None:
    w = window(START, LATER)
    assert isinstance(w, Window)
    assert w.seconds == 10.0
    assert w.joules == 4000.0
    assert w.units == 2000.0
    assert w.joulesPerUnit == 2.0
    assert w.unitsPerSecond == 200.0
    # batch 8: a unit of work waits a whole step of 8 units
    assert w.secondsPerUnit == pytest.approx(8 / 200.0)
    assert w.latencySeconds == 0.01


def test_an_unbatched_workload_waits_one_unit() -> None:
    start = sample(0.0, member(batchSize=None))
    end = sample(10.0, member(batchSize=None, energyJoules=5000.0, workUnits=2500.0))
    w = window(start, end)
    assert isinstance(w, Window)
    assert w.secondsPerUnit == pytest.approx(1 / 200.0)


@pytest.mark.parametrize(
    ("objective", "expected"),
    [("Energy", 2.0), ("EDP", 2.0 * 0.04), ("ED2P", 2.0 * 0.04**2)],
)
def test_objectives(objective: str, expected: float) -> None:
    assert objective_value(objective, 2.0, 0.04) == pytest.approx(expected)  # type: ignore[arg-type]


def test_a_job_is_as_fast_as_its_slowest_member_and_spends_all_members_energy() -> None:
    start = sample(0.0, member(member="GPU-a"), member(member="GPU-b", energyJoules=0.0, workUnits=0.0))
    end = sample(
        10.0,
        member(member="GPU-a", energyJoules=8000.0, workUnits=1500.0),  # +7000 J, +1000 units
        member(member="GPU-b", energyJoules=3000.0, workUnits=800.0),  # +3000 J, +800 units
    )
    w = window(start, end)
    assert isinstance(w, Window)
    assert w.units == 800.0
    assert w.joules == 10000.0
    assert dict(w.joulesByMember) == {"GPU-a": 7000.0, "GPU-b": 3000.0}


NAN = math.nan
BAD_WINDOWS: list[tuple[str, Sample, Sample, BadData]] = [
    (
        "energy counter reset",
        START,
        sample(110.0, member(energyJoules=10.0, workUnits=2500.0)),
        BadData.COUNTER_RESET,
    ),
    (
        "work counter reset",
        START,
        sample(110.0, member(energyJoules=5000.0, workUnits=3.0)),
        BadData.COUNTER_RESET,
    ),
    (
        "energy counter wrapped",
        sample(0.0, member(energyJoules=1.8e16)),
        sample(10.0, member(energyJoules=500.0, workUnits=2500.0)),
        BadData.COUNTER_RESET,
    ),
    (
        "agent saw a counter reset",
        START,
        sample(110.0, member(energyJoules=5000.0, workUnits=2500.0, counterResets=1)),
        BadData.COUNTER_RESET,
    ),
    ("NaN energy", START, sample(110.0, member(energyJoules=NAN, workUnits=2500.0)), BadData.NOT_FINITE),
    ("inf work", START, sample(110.0, member(energyJoules=5000.0, workUnits=math.inf)), BadData.NOT_FINITE),
    ("NaN time", START, sample(NAN, member(energyJoules=5000.0, workUnits=2500.0)), BadData.NOT_FINITE),
    (
        "NaN latency",
        START,
        sample(110.0, member(energyJoules=5000.0, workUnits=2500.0, latencySeconds=NAN)),
        BadData.NOT_FINITE,
    ),
    ("negative energy", sample(100.0, member(energyJoules=-5.0)), LATER, BadData.NEGATIVE_VALUE),
    (
        "negative power",
        START,
        sample(110.0, member(energyJoules=5000.0, workUnits=2500.0, powerWatts=-1.0)),
        BadData.NEGATIVE_VALUE,
    ),
    (
        "zero-length window",
        START,
        sample(100.0, member(energyJoules=5000.0, workUnits=2500.0)),
        BadData.ZERO_LENGTH,
    ),
    (
        "clock went backwards",
        START,
        sample(90.0, member(energyJoules=5000.0, workUnits=2500.0)),
        BadData.CLOCK_WENT_BACKWARDS,
    ),
    ("silent work counter", START, sample(110.0, member(energyJoules=5000.0)), BadData.SILENT_WORK_COUNTER),
    ("silent energy counter", START, sample(110.0, member(workUnits=2500.0)), BadData.SILENT_ENERGY_COUNTER),
    (
        "megawatts",
        START,
        sample(110.0, member(energyJoules=1e6, workUnits=2500.0)),
        BadData.IMPLAUSIBLE_POWER,
    ),
    (
        "batch changed mid-window",
        START,
        sample(110.0, member(energyJoules=5000.0, workUnits=2500.0, batchSize=16)),
        BadData.CONFIG_CHANGED,
    ),
    (
        "quantization changed mid-window",
        START,
        sample(110.0, member(energyJoules=5000.0, workUnits=2500.0, quantization="fp8")),
        BadData.CONFIG_CHANGED,
    ),
    (
        "cap changed mid-window",
        START,
        sample(110.0, member(energyJoules=5000.0, workUnits=2500.0, capWatts=500.0)),
        BadData.CONFIG_CHANGED,
    ),
    (
        "restart",
        START,
        sample(110.0, member(energyJoules=5000.0, workUnits=2500.0), restarts=1),
        BadData.RESTARTED,
    ),
    (
        "new image",
        START,
        sample(110.0, member(energyJoules=5000.0, workUnits=2500.0), image="img:2"),
        BadData.RESTARTED,
    ),
    (
        "members changed",
        START,
        sample(110.0, member(member="GPU-b", energyJoules=5000.0, workUnits=2500.0)),
        BadData.MEMBERS_CHANGED,
    ),
    (
        "agent flagged the counter at the end",
        START,
        sample(110.0, member(energyJoules=5000.0, workUnits=2500.0, healthy=False)),
        BadData.UNHEALTHY_SAMPLE,
    ),
    (
        # a failed scrape leaves a stale total: the next window would count the missed work
        "agent flagged the counter at the start",
        sample(100.0, member(healthy=False)),
        LATER,
        BadData.UNHEALTHY_SAMPLE,
    ),
    (
        "members disagree on their config",
        sample(0.0, member(member="GPU-a"), member(member="GPU-b")),
        sample(
            10.0,
            member(member="GPU-a", energyJoules=2000.0, workUnits=600.0),
            member(member="GPU-b", energyJoules=2000.0, workUnits=600.0, batchSize=16),
        ),
        BadData.INCONSISTENT_CONFIG,
    ),
]


@pytest.mark.parametrize(
    ("start", "end", "expected"), [c[1:] for c in BAD_WINDOWS], ids=[c[0] for c in BAD_WINDOWS]
)
def test_bad_data_is_a_typed_reason_never_a_window(start: Sample, end: Sample, expected: BadData) -> None:
    assert window(start, end, min_seconds=5.0) == expected


def test_an_unhealthy_sample_inside_a_window_too_short_to_use_is_passed_over() -> None:
    # Shorter than a window: wait for the next sample, which then spans it with healthy ends.
    flagged = sample(102.0, member(energyJoules=1800.0, workUnits=500.0, healthy=False))
    assert window(START, flagged, min_seconds=5.0) is None
    assert isinstance(window(START, LATER, min_seconds=5.0), Window)


def test_a_cap_within_rounding_is_the_same_config() -> None:
    end = sample(110.0, member(energyJoules=5000.0, workUnits=2500.0, capWatts=700.4))
    assert isinstance(window(START, end), Window)


def test_a_short_window_waits_for_more() -> None:
    assert window(START, LATER, min_seconds=30.0) is None


def test_a_short_window_still_reports_a_reset_at_once() -> None:
    assert window(START, sample(101.0, member(energyJoules=1.0)), min_seconds=30.0) == BadData.COUNTER_RESET


def test_noise_statistics() -> None:
    assert relative_std([1.0]) == 0.0
    assert relative_std([1.0, 1.0, 1.0]) == 0.0
    assert relative_std([0.9, 1.1]) == pytest.approx(math.sqrt(0.02) / 1.0)
    assert pooled_relative_std([(0.02, 5), (0.04, 5)]) == pytest.approx(math.sqrt((0.02**2 + 0.04**2) / 2))
    assert pooled_relative_std([(0.5, 1)]) == 0.0
    # never below the floor, and grows with the noise
    assert significance_threshold(0.0, 3, 2.0, 0.02) == 0.02
    assert significance_threshold(0.05, 2, 2.0, 0.02) == pytest.approx(0.1)
    # more windows shrink the threshold down to the floor
    assert windows_to_beat_noise(0.0, 2.0, 0.02, 3, 12) == 3
    n = windows_to_beat_noise(0.02, 2.0, 0.02, 3, 12)
    assert significance_threshold(0.02, n, 2.0, 0.02) == pytest.approx(0.02)
    assert windows_to_beat_noise(0.5, 2.0, 0.02, 3, 12) == 12


def test_accumulator_is_a_ratio_of_sums_and_restarts_on_another_config() -> None:
    w1 = window(START, LATER)
    w2 = window(
        LATER, sample(130.0, member(energyJoules=7000.0, workUnits=2600.0))
    )  # 2000 J, 100 units, 20 s
    assert isinstance(w1, Window) and isinstance(w2, Window)
    acc = Accumulator().add(w1, "Energy").add(w2, "Energy")
    m = acc.metrics("Energy")
    assert m.windows == 2
    assert m.joulesPerUnit == pytest.approx(6000.0 / 2100.0)
    assert m.unitsPerSecond == pytest.approx(2100.0 / 30.0)
    assert m.objective == m.joulesPerUnit
    assert m.wattsByMember == {"GPU-a": pytest.approx(200.0)}
    assert m.noise > 0.5  # 2 J/unit vs 20 J/unit
    other = sample(140.0, member(energyJoules=9000.0, workUnits=2700.0, batchSize=16))
    w3 = window(sample(130.0, member(energyJoules=7000.0, workUnits=2600.0, batchSize=16)), other)
    assert isinstance(w3, Window)
    fresh = acc.add(w3, "Energy")
    assert fresh.windows == 1 and fresh.batchSize == 16
