"""The scraper against real HTTP servers that expose metrics with prometheus-client."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from edpilot_agent.counters import CounterTracker
from edpilot_agent.pods import PodInfo
from edpilot_agent.reporter import workload_sample
from edpilot_agent.scraper import HttpScraper, MetricsParser, histogram_quantile
from kubetest import free_port
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, Summary, start_http_server

from edpilot.models import MeasuredWorkload


@dataclass
class Workload:
    """A process exposing a work counter, its configuration and a latency histogram, as a pod would."""

    port: int
    registry: CollectorRegistry
    tokens: Counter
    config: Info
    latency: Histogram
    server: Any

    @classmethod
    def start(cls, port: int) -> Workload:
        registry = CollectorRegistry()
        tokens = Counter("tokens", "Tokens generated.", registry=registry)
        config = Info("edpilot_workload_config", "What the workload runs.", registry=registry)
        config.info({"batch_size": "32", "quantization": "bf16"})
        latency = Histogram(
            "time_per_token_seconds", "TPOT.", buckets=(0.01, 0.02, 0.05, 0.1), registry=registry
        )
        server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
        return cls(port, registry, tokens, config, latency, server)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def workload() -> Iterator[Workload]:
    w = Workload.start(free_port())
    yield w
    w.stop()


POD = PodInfo("default", "llm-0", ip="127.0.0.1", phase="Running")


def spec_for(w: Workload, **kw: Any) -> MeasuredWorkload:
    return MeasuredWorkload(namespace="default", pod="llm-0", port=w.port, metricName="tokens_total", **kw)


def test_reads_the_counter_and_the_configuration_the_workload_reports(workload: Workload) -> None:
    workload.tokens.inc(1234)
    r = HttpScraper().scrape_now(spec_for(workload), POD)
    assert r.error == ""
    assert r.work_units == 1234
    assert (r.batch_size, r.quantization) == (32, "bf16")


def test_a_restarted_workload_is_a_reset_folded_into_the_cumulative_count(workload: Workload) -> None:
    scraper, tracker = HttpScraper(), CounterTracker()
    workload.tokens.inc(500)
    reading = scraper.scrape_now(spec_for(workload), POD)
    assert reading.work_units is not None and tracker.update(reading.work_units, 0)
    workload.stop()  # the container restarts on the same port with a fresh counter
    restarted = Workload.start(workload.port)
    try:
        restarted.tokens.inc(30)
        reading = scraper.scrape_now(spec_for(restarted), POD)
        assert reading.work_units is not None and tracker.update(reading.work_units, 1)
    finally:
        restarted.stop()
    assert tracker.total == 530
    assert tracker.resets == 1


def test_a_counter_that_stops_makes_the_sample_unhealthy(workload: Workload) -> None:
    scraper, tracker = HttpScraper(), CounterTracker()
    spec = spec_for(workload)
    workload.tokens.inc(10)
    for t in (0.0, 5.0, 20.0):
        reading = scraper.scrape_now(spec, POD)
        accepted = reading.work_units is not None and tracker.update(reading.work_units, t)
    sample = workload_sample(spec, reading, accepted, tracker, ["GPU-a"], 20.0, silent_after_seconds=10.0)
    assert not sample.healthy
    assert "has not increased for 20 s" in sample.message
    assert sample.workUnits == 10


def test_an_unreachable_or_wrong_endpoint_is_an_error_not_an_exception(workload: Workload) -> None:
    scraper = HttpScraper(timeout_seconds=1.0)
    gone = MeasuredWorkload(namespace="default", pod="llm-0", port=free_port(), metricName="tokens")
    assert "failed" in scraper.scrape_now(gone, POD).error
    missing = spec_for(workload).model_copy(update={"metricName": "no_such_metric"})
    assert "not exposed" in scraper.scrape_now(missing, POD).error
    assert "no IP" in scraper.scrape_now(spec_for(workload), PodInfo("default", "llm-0")).error
    assert "not on this node" in scraper.scrape_now(spec_for(workload), None).error


def test_latency_quantile_covers_the_window_since_the_last_scrape(workload: Workload) -> None:
    scraper = HttpScraper()
    spec = spec_for(workload, latencyMetric="time_per_token_seconds", latencyQuantile=0.5)
    for _ in range(100):
        workload.latency.observe(0.015)
    assert scraper.scrape_now(spec, POD).latency_seconds == pytest.approx(0.015)
    for _ in range(100):
        workload.latency.observe(0.08)  # the workload got slower: the window shows it at once
    assert scraper.scrape_now(spec, POD).latency_seconds == pytest.approx(0.075)
    assert scraper.scrape_now(spec, POD).latency_seconds is None  # no observations in this window


def test_gauge_and_summary_latency() -> None:
    registry = CollectorRegistry()
    Gauge("tpot_seconds", "TPOT.", registry=registry).set(0.021)
    s = Summary("req_seconds", "Request time.", registry=registry)
    s.observe(0.2)
    s.observe(0.4)
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        Counter("tokens", "Tokens.", registry=registry).inc(3)
        scraper = HttpScraper()
        gauge = MeasuredWorkload(
            namespace="d", pod="p", port=port, metricName="tokens", latencyMetric="tpot_seconds"
        )
        assert scraper.scrape_now(gauge, POD).latency_seconds == pytest.approx(0.021)
        mean = gauge.model_copy(update={"latencyMetric": "req_seconds"})
        assert scraper.scrape_now(mean, POD).latency_seconds == pytest.approx(0.3)
    finally:
        server.shutdown()
        server.server_close()


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    buckets = [(0.1, 10.0), (0.2, 30.0), (float("inf"), 40.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.2)  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def test_text_that_is_not_prometheus_format_is_an_error() -> None:
    spec = MeasuredWorkload(namespace="d", pod="p", metricName="tokens")
    assert "not Prometheus text format" in MetricsParser().parse(spec, "tokens{ 12 garbage\n").error


def test_more_wanted_samples_than_the_limit_are_refused_not_parsed() -> None:
    spec = MeasuredWorkload(namespace="d", pod="p", metricName="tokens")
    lines = [f'tokens{{shard="{i}"}} 1' for i in range(1025)]
    assert MetricsParser().parse(spec, "\n".join(lines[:1024])).work_units == 1024
    assert "more than 1024 samples" in MetricsParser().parse(spec, "\n".join(lines)).error
