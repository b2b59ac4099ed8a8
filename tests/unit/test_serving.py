"""The simulated serving engine: offered load, continuous batching, KV memory, latencies, metrics."""

from __future__ import annotations

import math
import random

import pytest
from edpilot_agent.scraper import MetricsParser

from edpilot import gpusim
from edpilot.models import MeasuredWorkload
from edpilot.serving import (
    EngineConfig,
    LengthDistribution,
    ServedModel,
    ServingEngine,
    diurnal_rate,
    exposition,
    fine_bin,
    fine_upper,
    quantile,
)

H100 = ServedModel()


def _engine(rate: float, seconds: float = 120.0, seed: int = 1, **config: object) -> ServingEngine:
    settings: dict[str, object] = {"max_num_seqs": 256, "precision": "bf16", "cap_watts": 700.0} | config
    engine = ServingEngine(H100, EngineConfig(**settings), random.Random(seed))  # type: ignore[arg-type]
    engine.run(seconds, rate)
    return engine


@pytest.mark.parametrize("rate", [2.0, 10.0, 18.0])
def test_littles_law_holds_in_flight_equals_arrival_rate_times_time_in_system(rate: float) -> None:
    engine = _engine(rate, seconds=300.0)
    c = engine.counters
    in_flight = c.in_system_seconds / c.time
    arrival_rate = c.arrived / c.time
    time_in_system = c.sojourn_sum / c.finished
    assert in_flight == pytest.approx(arrival_rate * time_in_system, rel=0.05)
    assert arrival_rate == pytest.approx(rate, rel=0.1)


def test_demand_sets_the_work_rate_below_capacity() -> None:
    low, high = _engine(4.0), _engine(12.0)
    mean_output = H100.outputs.mean
    for engine, rate in ((low, 4.0), (high, 12.0)):
        tokens_per_s = engine.counters.generation_tokens / engine.counters.time
        assert tokens_per_s == pytest.approx(rate * mean_output, rel=0.15)
        assert engine.waiting <= 2
    # Bigger running batches share each weight read: energy per token falls with load.
    j_low = low.counters.energy_joules / low.counters.generation_tokens
    j_high = high.counters.energy_joules / high.counters.generation_tokens
    assert j_high < 0.7 * j_low


def test_the_batch_knob_is_a_limit_not_the_batch_that_runs() -> None:
    roomy, tight = _engine(6.0, max_num_seqs=256), _engine(6.0, max_num_seqs=8, seed=1)
    # At this load fewer than 256 are in flight: the limit changes nothing about the work rate,
    assert roomy.counters.generation_tokens == pytest.approx(tight.counters.generation_tokens, rel=0.5)
    # but a limit of 8 makes requests queue for a slot, which shows in the time to first token.
    assert quantile(tight.counters.ttft_fine, 0.99) > 3 * quantile(roomy.counters.ttft_fine, 0.99)  # type: ignore[operator]
    assert max(roomy.running, 1) <= 256 and tight.running <= 8


def test_past_capacity_the_queue_grows_and_first_tokens_wait() -> None:
    engine = _engine(40.0, seconds=60.0)
    assert engine.waiting > 100
    assert engine.running == 256 or engine.kv_usage > 0.9
    p99 = quantile(engine.counters.ttft_fine, 0.99)
    assert p99 is not None and p99 > 5.0


def test_the_kv_cache_bounds_what_runs_when_the_limit_does_not() -> None:
    long = ServedModel(
        prompts=LengthDistribution(16000, 0.0, 16000, 16000), outputs=LengthDistribution(500, 0.0, 500, 500)
    )
    capacity = long.kv_capacity_tokens("bf16")
    engine = ServingEngine(long, EngineConfig(1024, "bf16", 700.0), random.Random(2))
    engine.run(60.0, 20.0)
    assert engine.running <= capacity // 16500
    assert engine.waiting > 0
    assert long.kv_capacity_tokens("fp8") > capacity  # smaller weights leave the cache more room


def test_a_cap_below_the_natural_draw_saves_energy_per_token_and_slows_tokens_a_little() -> None:
    free, capped = _engine(10.0, seed=3), _engine(10.0, seed=3, cap_watts=420.0)
    j_free = free.counters.energy_joules / free.counters.generation_tokens
    j_capped = capped.counters.energy_joules / capped.counters.generation_tokens
    assert j_capped < 0.9 * j_free
    assert capped.counters.energy_joules / capped.counters.time <= 420.0 + 1e-6
    itl_free, itl_capped = quantile(free.counters.itl_fine, 0.5), quantile(capped.counters.itl_fine, 0.5)
    assert itl_free is not None and itl_capped is not None
    assert itl_free <= itl_capped <= 1.3 * itl_free


def test_a_precision_switch_reloads_and_requests_queue_meanwhile() -> None:
    engine = _engine(8.0, seconds=30.0)
    served = engine.counters.generation_tokens
    engine.configure(EngineConfig(256, "fp8", 700.0), reload_seconds=20.0)
    engine.run(10.0, 8.0)
    assert engine.counters.generation_tokens == served
    assert engine.waiting > 40
    engine.run(60.0, 8.0)
    assert engine.counters.generation_tokens > served
    assert engine.config.precision == "fp8"


def test_the_exposition_reads_through_the_agents_parser_like_vllm() -> None:
    engine = _engine(10.0, seconds=30.0)
    text = exposition(engine)
    workload = MeasuredWorkload(
        namespace="ns",
        pod="p",
        metricName="vllm:generation_tokens_total",
        latencyMetric="vllm:inter_token_latency_seconds",
        latencyQuantile=0.99,
    )
    reading = MetricsParser().parse(workload, text)
    assert reading.error == ""
    assert reading.work_units == engine.counters.generation_tokens
    assert reading.latency_seconds is not None
    true_p99 = quantile(engine.counters.itl_fine, 0.99)
    assert true_p99 is not None
    # The exposition's buckets are coarser than the engine's own; interpolation stays near.
    assert reading.latency_seconds == pytest.approx(true_p99, rel=0.35)
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert f"\n{gauge}{{" in text


def test_fine_bins_are_2_percent_wide_and_quantiles_find_them() -> None:
    for seconds in (0.0003, 0.0071, 0.25, 3.0):
        b = fine_bin(seconds)
        assert fine_upper(b - 1) <= seconds * (1 + 1e-9) and seconds <= fine_upper(b) * (1 + 1e-9)
    counts = {fine_bin(0.01): 99.0, fine_bin(1.0): 1.0}
    assert quantile(counts, 0.5) == pytest.approx(0.01, rel=0.03)
    assert quantile(counts, 0.995) == pytest.approx(1.0, rel=0.03)
    assert quantile({}, 0.5) is None


def test_a_diurnal_trace_peaks_at_its_hour_and_troughs_at_the_fraction() -> None:
    assert diurnal_rate(15 * 3600, 20.0) == pytest.approx(20.0)
    assert diurnal_rate(3 * 3600, 20.0) == pytest.approx(4.0)
    assert all(4.0 - 1e-9 <= diurnal_rate(h * 600, 20.0) <= 20.0 + 1e-9 for h in range(144))
    with pytest.raises(ValueError):
        diurnal_rate(0.0, 10.0, trough_fraction=1.5)


def test_the_engine_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(0, "bf16", 700.0)
    with pytest.raises(ValueError, match="precision"):
        ServingEngine(ServedModel(gpu=gpusim.A100_SXM), EngineConfig(8, "fp8", 400.0), random.Random(0))
    engine = _engine(1.0, seconds=1.0)
    for bad in (math.nan, -1.0, math.inf):
        with pytest.raises(ValueError, match="finite"):
            engine.run(1.0, bad)
