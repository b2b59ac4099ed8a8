"""/metrics: the agent's latest measurements in Prometheus form, built at scrape time from the
agent's snapshot, so a scrape costs nothing between scrapes and never disagrees with the report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edpilot.models import GPUNodeReportStatus

GPU_LABELS = ["node", "gpu_uuid", "gpu_index", "namespace", "pod"]


def _pod_labels(pods: list[str]) -> tuple[str, str]:
    """namespace and pod of the (first) pod holding a GPU; empty when it is free."""
    if not pods:
        return "", ""
    namespace, _, name = pods[0].partition("/")
    return namespace, name


class AgentCollector(Collector):
    def __init__(
        self,
        node_name: str,
        snapshot: Callable[[], GPUNodeReportStatus | None],
        actuations: Callable[[], Counter[tuple[str, str, str]]],
    ) -> None:
        self.node_name = node_name
        self._snapshot = snapshot
        self._actuations = actuations

    def collect(self) -> Iterator[Metric]:
        energy = CounterMetricFamily(
            "edpilot_gpu_energy_joules",
            "Energy the GPU consumed (hardware counter where it has one).",
            labels=GPU_LABELS,
        )
        power = GaugeMetricFamily("edpilot_gpu_power_watts", "Power the GPU draws now.", labels=GPU_LABELS)
        limit = GaugeMetricFamily(
            "edpilot_gpu_power_limit_watts", "Power limit the GPU enforces.", labels=GPU_LABELS
        )
        util = GaugeMetricFamily(
            "edpilot_gpu_utilization_ratio",
            "Fraction of the last sample period a kernel ran.",
            labels=GPU_LABELS,
        )
        work = CounterMetricFamily(
            "edpilot_workload_work_units",
            "Work the pod reports (its counter, restarts folded in).",
            labels=["node", "namespace", "pod", "unit"],
        )
        status = self._snapshot()
        if status is not None:
            for gpu in status.gpus:
                labels = [self.node_name, gpu.uuid, str(gpu.index), *_pod_labels(gpu.pods)]
                energy.add_metric(labels, gpu.energyJoules)
                power.add_metric(labels, gpu.powerWatts)
                limit.add_metric(labels, gpu.enforcedLimitWatts)
                util.add_metric(labels, gpu.utilizationPercent / 100)
            for w in status.workloads:
                work.add_metric([self.node_name, w.namespace, w.pod, w.unit], w.workUnits)
        actuations = CounterMetricFamily(
            "edpilot_agent_actuations",
            "Power-limit changes the agent made (applied), would have made (dry_run) or failed to make.",
            labels=["node", "gpu_uuid", "reason", "result"],
        )
        for (uuid, reason, result), count in sorted(self._actuations().items()):
            actuations.add_metric([self.node_name, uuid, reason, result], count)
        yield from (energy, power, limit, util, work, actuations)


def serve(collector: AgentCollector, port: int, addr: str = "0.0.0.0") -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    start_http_server(port, addr=addr, registry=registry)
    return registry
