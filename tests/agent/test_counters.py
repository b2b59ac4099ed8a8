from __future__ import annotations

import math

import pytest
from edpilot_agent.backend import ENERGY_COUNTER_WRAP_JOULES
from edpilot_agent.counters import CounterTracker, PowerIntegrator


def test_total_follows_a_growing_counter_from_its_first_value() -> None:
    c = CounterTracker()
    for t, raw in enumerate([100.0, 110.0, 125.0]):
        assert c.update(raw, t)
    assert c.total == 125.0
    assert c.resets == 0


def test_reset_is_folded_in_and_counted() -> None:
    c = CounterTracker()
    c.update(1000.0, 0)
    c.update(1500.0, 1)
    c.update(40.0, 2)  # the container restarted and has done 40 units since
    c.update(100.0, 3)
    assert c.total == 1600.0
    assert c.resets == 1


def test_wrap_of_a_fixed_width_counter_is_not_a_reset() -> None:
    wrap = ENERGY_COUNTER_WRAP_JOULES
    c = CounterTracker(wrap_at=wrap)
    c.update(wrap - 30.0, 0)
    c.update(20.0, 1)
    assert c.total == pytest.approx(wrap + 20.0)
    assert (c.wraps, c.resets) == (1, 0)


def test_a_fall_far_from_the_top_of_a_wrapping_counter_is_a_reset() -> None:
    c = CounterTracker(wrap_at=2**32)
    c.update(5000.0, 0)
    c.update(10.0, 1)
    assert (c.wraps, c.resets) == (0, 1)
    assert c.total == 5010.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -5.0])
def test_nan_infinite_and_negative_values_are_rejected_without_moving_the_total(bad: float) -> None:
    c = CounterTracker()
    c.update(50.0, 0)
    assert not c.update(bad, 1)
    assert c.total == 50.0
    assert c.rejected == 1
    assert "not a finite non-negative number" in c.problem
    assert c.update(60.0, 2)
    assert c.total == 60.0
    assert c.problem == ""


def test_a_counter_that_stops_is_silent_for_the_time_since_it_last_moved() -> None:
    c = CounterTracker()
    c.update(10.0, 0)
    c.update(20.0, 5)
    c.update(20.0, 9)
    c.update(20.0, 30)
    assert c.silent_for(30) == 25
    c.update(21.0, 31)
    assert c.silent_for(31) == 0


def test_power_integration_is_trapezoidal_and_counts_gaps() -> None:
    p = PowerIntegrator(max_gap_seconds=0.3)
    for i in range(11):  # 100 W -> 200 W over one second, at 10 Hz
        p.add(100.0 + 10.0 * i, i * 0.1)
    assert p.energy_joules == pytest.approx(150.0)
    p.add(200.0, 2.0)  # a 1 s gap
    assert p.gaps == 1
    assert p.energy_joules == pytest.approx(350.0)
    p.add(math.nan, 2.1)
    p.add(200.0, 1.5)  # out of order: ignored
    assert p.energy_joules == pytest.approx(350.0)
