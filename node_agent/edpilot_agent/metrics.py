"""/metrics: the agent's latest measurements in Prometheus form, built at scrape time from the
agent's snapshot, so a scrape costs nothing between scrapes and never disagrees with the report.

The same port serves /healthz for the kubelet's liveness probe: healthy while the agent's main
loop completes ticks, whatever the thread that serves HTTP does. /metrics names every pod of the
node and what it draws, so it answers only callers an `Authorizer` lets in (a TokenReview and a
SubjectAccessReview for `get` on the non-resource URL /metrics, as kube-rbac-proxy does).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edpilot.models import GPUNodeReportStatus

log = logging.getLogger(__name__)

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
        clock_actuations: Callable[[], Counter[tuple[str, str, str]]] | None = None,
    ) -> None:
        self.node_name = node_name
        self._snapshot = snapshot
        self._actuations = actuations
        self._clock_actuations = clock_actuations

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
        locked = GaugeMetricFamily(
            "edpilot_gpu_locked_sm_clock_mhz",
            "SM clock ceiling the agent locked the GPU to, in MHz (no series: not locked).",
            labels=GPU_LABELS,
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
                if gpu.lockedSmClockMHz is not None:
                    locked.add_metric(labels, gpu.lockedSmClockMHz)
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
        clock_actuations = CounterMetricFamily(
            "edpilot_agent_clock_actuations",
            "SM clock locks and resets the agent made (applied), would have made (dry_run) or failed to make.",
            labels=["node", "gpu_uuid", "reason", "result"],
        )
        clock_counts = self._clock_actuations() if self._clock_actuations is not None else Counter()
        for (uuid, reason, result), count in sorted(clock_counts.items()):
            clock_actuations.add_metric([self.node_name, uuid, reason, result], count)
        yield from (energy, power, limit, locked, util, work, actuations, clock_actuations)


class Heartbeat:
    """When the main loop last finished a tick. Alive until `max_age_seconds` pass without one
    (counting from creation, so a starting agent is not killed before its first tick)."""

    def __init__(self, max_age_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._at = clock()

    def beat(self) -> None:
        self._at = self._clock()

    def age(self) -> float:
        return self._clock() - self._at

    def alive(self) -> bool:
        return self.age() <= self.max_age_seconds


class Authorizer(Protocol):
    def check(self, authorization: str | None) -> int:
        """200 to serve /metrics; 401 without valid credentials; 403 when they may not read it."""
        ...


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True
    # A client that stops sending holds one thread for this long at most.
    request_timeout_seconds = 10.0


def serve(
    collector: AgentCollector,
    port: int,
    addr: str = "0.0.0.0",
    *,
    liveness: Heartbeat | None = None,
    authorizer: Authorizer | None = None,
) -> MetricsServer:
    """Serves /metrics and /healthz in a daemon thread; returns the server (`server_port`,
    `shutdown()`). Without an authorizer /metrics is open: only for tests and local demos."""
    registry = CollectorRegistry()
    registry.register(collector)

    class Handler(BaseHTTPRequestHandler):
        timeout = MetricsServer.request_timeout_seconds

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                if liveness is None or liveness.alive():
                    self._answer(200, b"ok\n")
                else:
                    age = liveness.age()
                    self._answer(503, f"the agent's loop has not finished a tick for {age:.0f} s\n".encode())
            elif path == "/metrics":
                status = 200 if authorizer is None else authorizer.check(self.headers.get("Authorization"))
                if status == 200:
                    self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                else:
                    self._answer(status, b"Unauthorized\n" if status == 401 else b"Forbidden\n")
            else:
                self._answer(404, b"not found\n")

        def _answer(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="edpilot-agent"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("metrics %s: " + format, self.client_address[0], *args)

    server = MetricsServer((addr, port), Handler)
    threading.Thread(target=server.serve_forever, name="edpilot-metrics", daemon=True).start()
    return server
