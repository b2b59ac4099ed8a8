"""Work counters of selected pods, scraped from their Prometheus text endpoints.

A `WorkSource` returns the raw counter as the workload exposes it; the agent folds resets into a
cumulative value with `CounterTracker`. Simulated workloads implement the same interface.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edpilot.models import MeasuredWorkload
from edpilot_agent.pods import PodInfo

# Labels of the workload's config info metric (edpilot.workload exposes them).
BATCH_SIZE_LABEL = "batch_size"
QUANTIZATION_LABEL = "quantization"


@dataclass(frozen=True)
class WorkReading:
    """One read of a workload: its raw work counter and what it says it runs.
    `work_units` is None when the counter could not be read; `error` then says why."""

    work_units: float | None
    batch_size: int | None = None
    quantization: str | None = None
    latency_seconds: float | None = None
    error: str = ""


class WorkSource(Protocol):
    def read(self, workload: MeasuredWorkload, pod: PodInfo | None) -> WorkReading: ...


def _counter_names(name: str) -> set[str]:
    names = {name, f"{name}_total"}
    if name.endswith("_total"):
        names.add(name.removesuffix("_total"))
    return names


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of cumulative (upper bound, count) buckets, interpolating linearly inside
    the bucket, as Prometheus' histogram_quantile does. None without observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for upper_bound, count in buckets:
        if count >= rank:
            if math.isinf(upper_bound):
                return lower_bound
            if count == lower_count:
                return upper_bound
            return lower_bound + (upper_bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = upper_bound, count
    return buckets[-1][0]


@dataclass
class _LatencyState:
    buckets: dict[float, float]
    total: float
    count: float


class MetricsParser:
    """Turns one scrape's text into a `WorkReading`. It keeps the previous histogram of each
    workload, so latency quantiles cover the last scrape interval rather than the pod's lifetime."""

    def __init__(self) -> None:
        self._latency: dict[str, _LatencyState] = {}

    def parse(self, workload: MeasuredWorkload, text: str) -> WorkReading:
        try:
            samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
        except ValueError as exc:
            return WorkReading(
                None, error=f"the metrics endpoint returned text that is not Prometheus format: {exc}"
            )
        names = _counter_names(workload.metricName)
        work = [s.value for s in samples if s.name in names]
        batch, quant = self._config(workload.configMetric, samples)
        latency = self._latency_seconds(workload, samples)
        if not work:
            return WorkReading(
                None, batch, quant, latency, error=f"metric {workload.metricName} is not exposed by the pod"
            )
        return WorkReading(sum(work), batch, quant, latency)

    @staticmethod
    def _config(name: str, samples: Iterable[Sample]) -> tuple[int | None, str | None]:
        names = {name, f"{name}_info"}
        for s in samples:
            if s.name in names and s.value == 1:
                raw_batch = s.labels.get(BATCH_SIZE_LABEL, "")
                batch = int(raw_batch) if raw_batch.isdigit() and int(raw_batch) > 0 else None
                return batch, s.labels.get(QUANTIZATION_LABEL) or None
        return None, None

    def _latency_seconds(self, workload: MeasuredWorkload, samples: list[Sample]) -> float | None:
        name, q = workload.latencyMetric, workload.latencyQuantile
        if name is None:
            return None
        if q is not None:
            for s in samples:
                if s.name == name and "quantile" in s.labels and math.isclose(float(s.labels["quantile"]), q):
                    return s.value if math.isfinite(s.value) else None
        buckets = {
            float(s.labels["le"]): s.value for s in samples if s.name == f"{name}_bucket" and "le" in s.labels
        }
        total = next((s.value for s in samples if s.name == f"{name}_sum"), None)
        count = next((s.value for s in samples if s.name == f"{name}_count"), None)
        if total is None or count is None:
            plain = next((s.value for s in samples if s.name == name and not s.labels), None)
            return plain if plain is not None and math.isfinite(plain) and plain >= 0 else None
        key = f"{workload.namespace}/{workload.pod}"
        previous = self._latency.get(key)
        self._latency[key] = _LatencyState(buckets, total, count)
        if previous is not None and count >= previous.count:
            # The window since the last scrape; on a counter reset the whole new histogram is the window.
            buckets = {le: c - previous.buckets.get(le, 0.0) for le, c in buckets.items()}
            total, count = total - previous.total, count - previous.count
        if count <= 0:
            return None
        if q is not None and buckets:
            return histogram_quantile(q, list(buckets.items()))
        return total / count


class HttpScraper:
    """A `WorkSource` for real pods: GET http://<pod IP>:<port><path>."""

    def __init__(self, timeout_seconds: float = 2.0) -> None:
        self.timeout_seconds = timeout_seconds
        self._parser = MetricsParser()

    def url(self, workload: MeasuredWorkload, pod: PodInfo) -> str:
        host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
        return f"http://{host}:{workload.port}{workload.path}"

    def read(self, workload: MeasuredWorkload, pod: PodInfo | None) -> WorkReading:
        if pod is None:
            return WorkReading(None, error=f"pod {workload.namespace}/{workload.pod} is not on this node")
        if not pod.ip:
            return WorkReading(None, error=f"pod {pod.key} has no IP yet")
        url = self.url(workload, pod)
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_seconds) as response:
                text = response.read(8 * 1024 * 1024).decode("utf-8", errors="replace")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return WorkReading(None, error=f"scraping {url} failed: {exc}")
        return self._parser.parse(workload, text)
