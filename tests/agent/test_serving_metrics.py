"""Serving engines through the agent: vLLM's metrics parsed, simulated serving pods, reports."""

from __future__ import annotations

import random

from agent_helpers import lease, sim_node
from edpilot_agent.pods import PodInfo
from edpilot_agent.scraper import MetricsParser
from edpilot_agent.sim import SIM_REQUESTS_PER_SECOND, SIM_WORKLOAD

from edpilot import serving
from edpilot.contract import ANNOTATION_QUANTIZATION
from edpilot.models import (
    EnergyPolicySpec,
    GPUNodeReportSpec,
    LatencySLO,
    LoadMetrics,
    MeasuredWorkload,
    WorkMetric,
)

POLICY = EnergyPolicySpec(
    selector={},
    latencySLO=LatencySLO(metricName="vllm:inter_token_latency_seconds", quantile=0.5, maxSeconds=0.05),
    firstTokenSLO=LatencySLO(metricName="vllm:time_to_first_token_seconds", quantile=0.99, maxSeconds=1.0),
    workMetric=WorkMetric(port=8000, name="vllm:generation_tokens_total", unit="tokens", load=LoadMetrics()),
)


def test_a_policy_tells_the_agent_every_serving_metric_to_read() -> None:
    w = MeasuredWorkload.of_policy("ns", "pod", POLICY)
    assert (w.port, w.metricName, w.latencyMetric, w.latencyQuantile) == (
        8000,
        "vllm:generation_tokens_total",
        "vllm:inter_token_latency_seconds",
        0.5,
    )
    assert (w.firstTokenMetric, w.firstTokenQuantile) == ("vllm:time_to_first_token_seconds", 0.99)
    assert (w.runningMetric, w.waitingMetric, w.finishedMetric) == (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:request_success_total",
    )
    plain = MeasuredWorkload.of_policy("ns", "pod", POLICY.model_copy(update={"firstTokenSLO": None}))
    assert plain.firstTokenMetric is None


def test_vllms_metrics_parse_into_both_latencies_the_load_and_the_finished_requests() -> None:
    engine = serving.ServingEngine(
        serving.ServedModel(), serving.EngineConfig(256, "bf16", 700.0), random.Random(4)
    )
    engine.run(30.0, 18.0)
    parser = MetricsParser()
    workload = MeasuredWorkload.of_policy("ns", "pod", POLICY)
    first = parser.parse(workload, serving.exposition(engine))
    engine.run(10.0, 18.0)
    reading = parser.parse(workload, serving.exposition(engine))
    c = engine.counters
    assert reading.error == "" and first.error == ""
    assert reading.work_units == c.generation_tokens
    assert reading.requests_running == engine.running
    assert reading.requests_waiting == engine.waiting
    assert reading.requests_finished == c.finished
    # The quantiles cover the last scrape interval, from the histograms' increase.
    assert reading.latency_seconds is not None and 0.005 < reading.latency_seconds < 0.05
    assert reading.first_token_seconds is not None and 0.02 < reading.first_token_seconds < 5.0
    assert reading.first_token_seconds != reading.latency_seconds


def test_absurd_load_values_are_refused_not_reported() -> None:
    workload = MeasuredWorkload.of_policy("ns", "pod", POLICY)
    text = "vllm:generation_tokens_total 100\nvllm:num_requests_waiting 1e308\n"
    reading = MetricsParser().parse(workload, text)
    assert reading.work_units is None
    assert "load metric" in reading.error


def serving_pod(rate: str = "6", annotations: dict[str, str] | None = None) -> PodInfo:
    return PodInfo(
        "default",
        "chat-0",
        ip="10.0.0.9",
        phase="Running",
        gpu_request=1,
        annotations={SIM_WORKLOAD: "llm-serving", SIM_REQUESTS_PER_SECOND: rate, **(annotations or {})},
    )


def test_a_simulated_serving_pod_reports_what_a_vllm_engine_exposes() -> None:
    node = sim_node(pods=[serving_pod()])
    spec = GPUNodeReportSpec(
        workloads=[MeasuredWorkload.of_policy("default", "chat-0", POLICY)],
        lease=lease(node.clock),
        reportIntervalSeconds=5,
    )
    node.kube.spec = spec
    for _ in range(12):
        node.agent.tick()
        node.clock.advance(5)
    node.agent.tick()
    assert node.agent.snapshot is not None
    (sample,) = node.agent.snapshot.workloads
    assert sample.healthy, sample.message
    assert sample.workUnits > 6 * 50 * 150  # ~6 requests/s of ~250 tokens for a minute
    assert sample.batchSize == 256 and sample.quantization == "bf16"
    assert sample.latencySeconds is not None and sample.firstTokenSeconds is not None
    assert sample.requestsFinished is not None and sample.requestsFinished > 200
    assert sample.requestsRunning is not None and sample.requestsWaiting is not None
    # Its GPU draws what the engine spends: well over idle, under the limit.
    gpu = next(g for g in node.agent.snapshot.gpus if "default/chat-0" in g.pods)
    assert 200.0 < gpu.powerWatts < 700.0


def test_a_simulated_serving_pod_reloads_to_change_precision_and_serves_nothing_meanwhile() -> None:
    node = sim_node(pods=[serving_pod()])
    node.kube.spec = GPUNodeReportSpec(
        workloads=[MeasuredWorkload.of_policy("default", "chat-0", POLICY)], lease=lease(node.clock)
    )
    node.agent.tick()
    node.clock.advance(5)
    node.agent.tick()
    node.kube.pod_list = [serving_pod(annotations={ANNOTATION_QUANTIZATION: "fp8"})]
    # The hint applies after the 2 s reload delay; the engine then loads for 2 s more.
    for _ in range(10):
        node.clock.advance(0.5)
        node.agent.tick()
        assert node.agent.snapshot is not None
        if node.agent.snapshot.workloads[0].quantization == "fp8":
            break
    assert node.agent.snapshot is not None
    before = node.agent.snapshot.workloads[0].workUnits
    node.clock.advance(1.5)
    node.agent.tick()
    reloading = node.agent.snapshot.workloads[0]
    assert reloading.quantization == "fp8"
    assert reloading.workUnits == before
    assert reloading.requestsWaiting is not None and reloading.requestsWaiting > 0
    node.clock.advance(3)
    node.agent.tick()
    assert node.agent.snapshot.workloads[0].workUnits > before
