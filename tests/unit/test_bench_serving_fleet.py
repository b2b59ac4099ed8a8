"""bench/serving_fleet.py: its accounting, its oracle and a short run of the whole comparison."""

from __future__ import annotations

import pytest

from bench import serving_fleet as bench
from edpilot import gpusim, serving


def test_a_minute_is_in_violation_when_its_p99_itl_or_ttft_breaks_the_slo() -> None:
    minutes = bench.Minutes()
    counters = serving.Counters()
    counters.itl_fine = {serving.fine_bin(0.02): 990.0, serving.fine_bin(0.05): 10.0}
    counters.ttft_fine = {serving.fine_bin(0.2): 100.0}
    minutes.close(counters)
    assert (minutes.minutes, minutes.violations) == (1, 0)
    # The next minute only sees what happened since: 2% of its tokens waited 200 ms.
    counters.itl_fine = {
        serving.fine_bin(0.02): 1970.0,
        serving.fine_bin(0.05): 10.0,
        serving.fine_bin(0.2): 20.0,
    }
    minutes.close(counters)
    assert (minutes.minutes, minutes.violations) == (2, 1)
    counters.ttft_fine = {serving.fine_bin(0.2): 100.0, serving.fine_bin(3.0): 50.0}
    minutes.close(counters)
    assert minutes.violations == 2


def test_the_hourly_rate_is_the_hours_peak_on_a_half_request_grid() -> None:
    replica = bench.FLEET[0]
    assert bench.hourly_peak(replica, 15) == pytest.approx(replica.peak)
    assert bench.hourly_peak(replica, 3) >= bench.TROUGH * replica.peak
    assert all(2 * bench.hourly_peak(replica, h) == int(2 * bench.hourly_peak(replica, h)) for h in range(24))


def test_the_job_oracle_keeps_the_slowdown_limit_and_lowers_the_waiting_ranks_cap() -> None:
    training, job = bench.JOBS
    (cap,) = bench.job_oracle_caps(training)
    assert 350.0 <= cap < 700.0
    base = gpusim.operating_point(training.gpu, training.profile, training.batchSize, "bf16", 700.0)
    capped = gpusim.operating_point(training.gpu, training.profile, training.batchSize, "bf16", cap)
    assert capped.units_per_second >= 0.9 * base.units_per_second
    fast, slow = bench.job_oracle_caps(job)
    assert slow < fast  # rank 1 does half the work and waits: it needs less power


def test_the_serving_oracle_meets_the_slos_it_is_held_to() -> None:
    _, rate, (limit, precision, cap) = bench.oracle_config((gpusim.H100_SXM.name, 8.0, 60.0))
    assert rate == 8.0
    assert limit == 256 and precision in ("bf16", "fp8")
    assert 280.0 <= cap < 700.0  # a moderately loaded replica needs far less than its default


def test_a_short_run_prints_every_strategy_as_a_ratio_to_the_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = bench.main(
        [
            "--hours",
            "0.5",
            "--replicas",
            "1",
            "--jobs",
            "1",
            "--processes",
            "1",
            "--oracle-seconds",
            "60",
            "--no-write",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| (")]
    assert [r.split("|")[1].strip() for r in rows] == [
        f"({label}) {name}" for label, name in zip("abcde", bench.STRATEGIES, strict=True)
    ]
    assert rows[0].split("|")[3].strip() == "1.000"  # (a) against itself
    assert "(d) uses" in out and "(goal: at least 30%)" in out
