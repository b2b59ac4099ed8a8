"""Shared harness of the fleet benchmarks: a dedicated local control plane with many KWOK GPU
nodes, simulated node agents in ONE process, the operator as a subprocess, and the probes
that measure them.

The agents are the real `NodeAgent` with the simulated GPU backend; only their link to the API
server is pooled: one pod watch and one report watch feed every node's view (instead of two
watches per node: 4,000 at 2,000 nodes), and status writes share one connection pool. Each
agent still reads its own node's pods and spec, and writes its own report's status subresource.

Run as modules from the repository root (`python -m bench.operator_scale`), so `bench.fleet`
imports without path tricks.
"""

from __future__ import annotations

import base64
import heapq
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import urllib3
import yaml
from edpilot_agent.agent import NodeAgent, SystemClock
from edpilot_agent.kube import KubeError, lease_of
from edpilot_agent.kube import pod_info as agent_pod_info
from edpilot_agent.pods import PodInfo as AgentPodInfo
from edpilot_agent.sim import SIM_BATCH_SIZE, SIM_PRECISION, SIM_WORKLOAD, SimBackend, SimWorkloads
from edpilot_operator.selection import PolicyRef, governance, pod_info, select
from pydantic import ValidationError

import edpilot
from edpilot.contract import ANNOTATION_POLICY, HINT_ANNOTATIONS, STATE_KIND, STATE_PLURAL, gpu_request
from edpilot.models import (
    GROUP,
    VERSION,
    EnergyPolicySpec,
    GPUNodeReportSpec,
    GPUNodeReportStatus,
    Lease,
    LeaseRef,
)
from edpilot.textnum import ascii_int

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
REPORTS_PATH = f"/apis/{GROUP}/{VERSION}/gpunodereports"


# ---------------------------------------------------------------- pure helpers (unit-tested)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def linear_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ys over xs; None with fewer than two distinct xs."""
    n = len(xs)
    if n < 2 or n != len(ys):
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


RequestKey = tuple[str, str, str]  # verb, resource (with group), subresource


def parse_request_totals(metrics_text: str) -> dict[RequestKey, float]:
    """`apiserver_request_total` summed over codes, scopes and components, by verb and resource."""
    totals: dict[RequestKey, float] = {}
    for line in metrics_text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_text, _, value = line[len("apiserver_request_total{") :].rpartition("} ")
        labels = _parse_labels(labels_text)
        group = labels.get("group", "")
        resource = labels.get("resource", "") + (f".{group}" if group else "")
        key = (labels.get("verb", ""), resource, labels.get("subresource", ""))
        totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def metric_sum(metrics_text: str, name: str) -> float:
    """The sum of every sample of one metric family (counters or gauges without a suffix)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric_by_label(metrics_text: str, name: str, label: str) -> dict[str, float]:
    """One metric family summed by the value of one label."""
    totals: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith(name + "{"):
            labels_text, _, value = line[len(name) + 1 :].rpartition("} ")
            key = _parse_labels(labels_text).get(label, "")
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def terminated_watchers(before: str, after: str) -> dict[str, float]:
    """Watchers the API server closed because they did not keep up, by resource, between scrapes."""
    name = "apiserver_terminated_watchers_total"
    start = metric_by_label(before, name, "resource")
    grown = {k: v - start.get(k, 0.0) for k, v in metric_by_label(after, name, "resource").items()}
    return {k: v for k, v in grown.items() if v > 0}


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    i = 0
    while i < len(text):
        eq = text.index("=", i)
        key = text[i:eq].strip(", ")
        j = eq + 2  # past ="
        value = []
        while text[j] != '"':
            if text[j] == "\\":
                j += 1
            value.append(text[j])
            j += 1
        labels[key] = "".join(value)
        i = j + 1
    return labels


def request_rates(
    before: Mapping[RequestKey, float], after: Mapping[RequestKey, float], seconds: float
) -> dict[RequestKey, float]:
    """Requests per second by (verb, resource, subresource) between two scrapes; idle kinds left out."""
    rates = {k: (v - before.get(k, 0.0)) / seconds for k, v in after.items()}
    return {k: r for k, r in sorted(rates.items(), key=lambda kv: -kv[1]) if r > 0}


def single_pod_rows(policy: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Workload name -> (pod key, node) of each row of the policy's status with one pod on one node."""
    out = {}
    for row in (policy.get("status") or {}).get("workloads") or []:
        pods, nodes = row.get("pods") or [], row.get("nodes") or []
        if len(pods) == 1 and len(nodes) == 1 and row.get("phase") != "Conflict":
            out[str(row.get("name"))] = (str(pods[0]), str(nodes[0]))
    return out


def last_observation(state: Mapping[str, Any] | None) -> float | None:
    """The report time of the last observation an optimizer state used (`last.time`): a state
    carrying time t is the decision made on the report stamped t."""
    last = (state or {}).get("last") or {}
    return float(last["time"]) if "time" in last else None


def observation_times(policy: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """(pod key, node, observation time) of each single-pod row whose state, still embedded in the
    status (operators before WorkloadOptimizerState objects), consumed a report."""
    rows = {r.get("name"): r for r in (policy.get("status") or {}).get("workloads") or []}
    out = []
    for name, (pod, node) in single_pod_rows(policy).items():
        t = last_observation(rows[name].get("optimizer"))
        if t is not None:
            out.append((pod, node, t))
    return out


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


def machine() -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "edpilot": edpilot.__version__,
        "commit": _commit(),
        "load_average_at_start": list(os.getloadavg()),
    }


def _commit() -> str:
    """The checkout's commit, marked dirty when files differ from it (benches run on work in progress)."""
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------- the API server, lean


class Api:
    """A bare HTTP client of the API server (admin token from the kubeconfig), shared by threads.

    The kubernetes client deserialises every object into models; at hundreds of requests per
    second from one process that costs more CPU than the operator under test.
    """

    def __init__(self, kubeconfig: Path, pool_size: int = 48) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        server = urlsplit(cluster["server"])
        self.token = config["users"][0]["user"]["token"]
        # Verified like every other client: the kubeconfig carries the cluster's CA.
        ca_pem = base64.b64decode(cluster["certificate-authority-data"]).decode()
        self.pool = urllib3.HTTPSConnectionPool(
            server.hostname or "127.0.0.1",
            server.port or 443,
            maxsize=pool_size,
            block=True,
            ca_cert_data=ca_pem,
            retries=False,
        )

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        resp = self.pool.request(method, path, body=data, headers=headers, timeout=timeout)
        payload = json.loads(resp.data) if resp.data and resp.data[:1] == b"{" else resp.data
        return resp.status, payload

    def ok(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        status, payload = self.request(method, path, body, content_type)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {str(payload)[:300]}")
        return payload

    def text(self, path: str) -> str:
        resp = self.pool.request("GET", path, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)
        return str(resp.data.decode())

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 300) -> Iterator[dict[str, Any]]:
        sep = "&" if "?" in path else "?"
        url = (
            f"{path}{sep}watch=1&resourceVersion={resource_version}"
            f"&allowWatchBookmarks=true&timeoutSeconds={timeout_seconds}"
        )
        resp = self.pool.urlopen(
            "GET",
            url,
            headers={"Authorization": f"Bearer {self.token}"},
            preload_content=False,
            timeout=urllib3.Timeout(connect=10, read=timeout_seconds + 30),
        )
        try:
            if resp.status != 200:
                raise RuntimeError(f"watch {path}: {resp.status} {resp.data[:300]!r}")
            buffer = b""
            for chunk in resp.stream(65536, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release_conn()


EventHandler = Callable[[str, dict[str, Any], float], None]
WATCH_SECONDS = 300


class Watcher:
    """List, then watch (relist when the watch expires), keeping `items` by key; calls
    `on_event(type, object, received_wall_time)` for every change, after `items` is updated."""

    def __init__(
        self,
        api: Api,
        path: str,
        key: Callable[[dict[str, Any]], str],
        on_event: EventHandler | None = None,
    ) -> None:
        self.api = api
        self.path = path
        self.key = key
        self.on_event = on_event
        self.items: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.synced = threading.Event()
        self.stopped = threading.Event()
        self.events = 0
        self.relists = 0
        self.cut_off = 0
        self.thread = threading.Thread(target=self._run, name=f"watch {path}", daemon=True)

    def start(self) -> Watcher:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                self._list_and_watch()
            except Exception as exc:  # the API server may be busy or restarting: relist
                print(f"fleet: watch {self.path}: {exc}", file=sys.stderr)
                self.stopped.wait(1.0)

    def _list_and_watch(self) -> None:
        listed = self.api.ok("GET", self.path)
        now = time.time()
        fresh = {self.key(o): o for o in listed.get("items") or []}
        with self.lock:
            gone = [o for k, o in self.items.items() if k not in fresh]
            self.items = fresh
        self.relists += 1
        self.synced.set()
        if self.on_event is not None:
            # Deletions while the watch was down show only as absences from the new list.
            for obj in gone:
                self.on_event("DELETED", obj, now)
            for obj in fresh.values():
                self.on_event("LISTED", obj, now)
        version = listed["metadata"]["resourceVersion"]
        # A watch that ends on its own time resumes from the last version seen; one that ends
        # early was cut off (the API server drops watchers that fall behind) and relists.
        while not self.stopped.is_set():
            opened = time.monotonic()
            for event in self.api.watch(self.path, version, WATCH_SECONDS):
                if self.stopped.is_set():
                    return
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    return  # 410 Gone and friends: relist
                version = obj.get("metadata", {}).get("resourceVersion", version)
                if kind == "BOOKMARK":
                    continue
                received = time.time()
                self.events += 1
                with self.lock:
                    if kind == "DELETED":
                        self.items.pop(self.key(obj), None)
                    else:
                        self.items[self.key(obj)] = obj
                if self.on_event is not None:
                    self.on_event(kind, obj, received)
            if time.monotonic() - opened < WATCH_SECONDS - 5:
                self.cut_off += 1
                return


def object_key(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else str(meta["name"])


# ---------------------------------------------------------------- simulated agents in one process


class PodsByNode:
    """One pod watch for the whole fleet, indexed by node for the agents."""

    def __init__(self, api: Api) -> None:
        self.by_node: dict[str, dict[str, AgentPodInfo]] = {}
        self.lock = threading.Lock()
        self.watcher = Watcher(api, "/api/v1/pods", object_key, self._on_event)

    def _on_event(self, kind: str, obj: dict[str, Any], _: float) -> None:
        node = (obj.get("spec") or {}).get("nodeName")
        if not node:
            return
        key = object_key(obj)
        info = None if kind == "DELETED" else agent_pod_info(obj)
        with self.lock:
            pods = self.by_node.setdefault(node, {})
            if info is None:
                pods.pop(key, None)
            else:
                pods[key] = info

    def pods(self, node: str) -> list[AgentPodInfo] | None:
        if not self.watcher.synced.is_set():
            return None
        with self.lock:
            return list(self.by_node.get(node, {}).values())


class ReportWrites:
    """When each report status was written (by node and status time), for the decision lag."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.written: dict[tuple[str, float], float] = {}
        self.count = 0
        self.errors = 0

    def record(self, node: str, status_time: float, wall: float) -> None:
        with self.lock:
            self.written[(node, status_time)] = wall
            self.count += 1

    def written_at(self, node: str, status_time: float) -> float | None:
        with self.lock:
            return self.written.get((node, status_time))

    def forget_before(self, wall: float) -> None:
        with self.lock:
            self.written = {k: v for k, v in self.written.items() if v >= wall}


class SharedLeases:
    """The operator's Lease as every agent of the fleet reads it: one shared watch per namespace,
    started when a spec first names a Lease there (a real agent watches the one Lease by name)."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.lock = threading.Lock()
        self.watchers: dict[str, Watcher] = {}

    def lease(self, ref: LeaseRef) -> tuple[Lease | None, str]:
        with self.lock:
            watcher = self.watchers.get(ref.namespace)
            if watcher is None:
                path = f"/apis/coordination.k8s.io/v1/namespaces/{ref.namespace}/leases"
                watcher = self.watchers[ref.namespace] = Watcher(self.api, path, object_key).start()
        if not watcher.synced.is_set():
            return None, f"the operator's Lease {ref.namespace}/{ref.name} has not been read yet"
        with watcher.lock:
            obj = watcher.items.get(f"{ref.namespace}/{ref.name}")
        if obj is None:
            return None, f"the operator's Lease {ref.namespace}/{ref.name} does not exist"
        return lease_of(obj)

    def stop(self) -> None:
        with self.lock:
            for watcher in self.watchers.values():
                watcher.stop()


class FleetKube:
    """The agent's `KubeApi` for one node, over the fleet's shared watches and connection pool."""

    def __init__(
        self,
        node: str,
        api: Api,
        pods: PodsByNode,
        reports: Watcher,
        writes: ReportWrites,
        leases: SharedLeases,
    ) -> None:
        self.node = node
        self.leases = leases
        self.api = api
        self.shared_pods = pods
        self.reports = reports
        self.writes = writes
        self._exists = False
        self._spec_cache: tuple[str, GPUNodeReportSpec] | None = None

    def report_spec(self) -> tuple[GPUNodeReportSpec | None, str]:
        if not self.reports.synced.is_set():
            return None, "the GPUNodeReport has not been read yet"
        with self.reports.lock:
            obj = self.reports.items.get(self.node)
        if obj is None:
            return None, ""
        version = obj["metadata"].get("resourceVersion", "")
        if self._spec_cache is not None and self._spec_cache[0] == version:
            return self._spec_cache[1], ""
        try:
            spec = GPUNodeReportSpec.model_validate(obj.get("spec") or {})
        except ValidationError as exc:
            return None, f"GPUNodeReport {self.node} has a spec the agent cannot read: {exc.errors()[:3]}"
        self._spec_cache = (version, spec)
        return spec, ""

    def pods(self) -> list[AgentPodInfo] | None:
        return self.shared_pods.pods(self.node)

    def operator_lease(self, ref: LeaseRef) -> tuple[Lease | None, str]:
        return self.leases.lease(ref)

    def write_status(self, status: GPUNodeReportStatus) -> None:
        body = {"status": status.model_dump(mode="json", exclude_none=True)}
        try:
            if not self._exists:
                self._create()
            code, payload = self.api.request(
                "PATCH", f"{REPORTS_PATH}/{self.node}/status", body, "application/merge-patch+json", 10
            )
        except Exception as exc:  # timeouts and refused connections: the agent backs off
            self.writes.errors += 1
            raise KubeError(f"writing GPUNodeReport {self.node} status failed: {exc}") from exc
        if code == 404:
            self._exists = False
        if code >= 300:
            self.writes.errors += 1
            raise KubeError(f"writing GPUNodeReport {self.node} status failed: {code} {str(payload)[:200]}")
        # The optimizer keeps the report's counter time (its steady clock) as the observation's.
        # Written when the API server says (as decisions are timed), not when this busy process
        # got the answer back, which would shorten the lag.
        written = server_write_time(payload) if isinstance(payload, Mapping) else None
        self.writes.record(self.node, (status.counterTime or status.time).timestamp(), written or time.time())

    def _create(self) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "GPUNodeReport",
            "metadata": {"name": self.node, "labels": {"app.kubernetes.io/managed-by": "edpilot-agent"}},
            "spec": {},
        }
        code, payload = self.api.request("POST", REPORTS_PATH, body, timeout=10)
        if code not in (201, 409):
            raise KubeError(f"creating GPUNodeReport {self.node}: {code} {str(payload)[:200]}")
        self._exists = True

    def close(self) -> None:
        pass


@dataclass
class TickStats:
    ticks: int = 0
    lateness: list[float] = field(default_factory=list)  # seconds a tick started after it was due

    def reset(self) -> None:
        self.ticks = 0
        self.lateness = []


class Fleet:
    """Simulated agents of many nodes, each ticking and reporting every `interval` seconds,
    staggered evenly, run by a few worker threads. With `follow_spec` a node ticks at its report
    spec's interval instead, never sooner than `interval`: as often as a real agent reports (fast
    only while something on the node explores). A real agent also ticks between reports, on its
    own node's CPU; here those ticks would only compete with the operator for this machine's."""

    def __init__(
        self, api: Api, interval: float = 10.0, workers: int = 32, follow_spec: bool = False
    ) -> None:
        self.api = api
        self.interval = interval
        self.follow_spec = follow_spec
        self.workers = workers
        self.pods = PodsByNode(api)
        self.reports = Watcher(api, REPORTS_PATH, object_key)
        self.leases = SharedLeases(api)
        self.writes = ReportWrites()
        self.agents: dict[str, NodeAgent] = {}
        self.stats = TickStats()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start_watches(self) -> None:
        self.pods.watcher.start()
        self.reports.start()
        self.pods.watcher.synced.wait(60)
        self.reports.synced.wait(60)

    def wait_reported(self, timeout: float) -> tuple[int, float]:
        """Wait until every node's report exists with a status, at most `timeout` seconds: an
        operator started then meets a fleet that runs (a restart), not agents still creating their
        reports. Returns how many had one and the seconds waited."""
        started = time.monotonic()
        while True:
            with self.reports.lock:
                reported = sum(
                    1 for name, o in self.reports.items.items() if name in self.agents and o.get("status")
                )
            waited = time.monotonic() - started
            if reported >= len(self.agents) or waited >= timeout:
                return reported, waited
            time.sleep(1.0)

    def add_nodes(self, nodes: Iterable[str]) -> None:
        clock = SystemClock()
        for node in nodes:
            if node in self.agents:
                continue
            seed = ascii_int(node.rsplit("-", 1)[-1]) or 0
            sim = SimBackend(node, gpus=8, seed=seed)
            workloads = SimWorkloads(sim)
            self.agents[node] = NodeAgent(
                node,
                sim,
                workloads,
                FleetKube(node, self.api, self.pods, self.reports, self.writes, self.leases),
                clock,
                allocations=workloads,
                # A report is due at every tick, whatever the spec asks: `_work` spaces the ticks.
                default_interval_seconds=self.interval * 0.9,
                min_interval_seconds=self.interval * 0.9,
            )

    def start(self) -> None:
        self._stop.clear()
        nodes = sorted(self.agents)
        t0 = time.monotonic() + 0.5
        # Node i is due at t0 + i * interval / n, then every interval: writes spread evenly.
        plans: list[list[tuple[float, str]]] = [[] for _ in range(self.workers)]
        for i, node in enumerate(nodes):
            plans[i % self.workers].append((t0 + i * self.interval / len(nodes), node))
        self._threads = [
            threading.Thread(target=self._work, args=(plan,), name=f"fleet-{w}", daemon=True)
            for w, plan in enumerate(plans)
            if plan
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self._threads = []

    def _work(self, plan: list[tuple[float, str]]) -> None:
        heapq.heapify(plan)
        while not self._stop.is_set():
            due, node = plan[0]
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            started = time.monotonic()
            self.agents[node].tick()
            with self._lock:
                self.stats.ticks += 1
                self.stats.lateness.append(max(0.0, started - due))
            # A late tick keeps its slot: the next one is due one period after the planned time,
            # unless it is already more than one period late.
            period = self._period(node)
            heapq.heapreplace(plan, (max(due + period, started), node))

    def _period(self, node: str) -> float:
        if not self.follow_spec:
            return self.interval
        spec, _ = self.agents[node].kube.report_spec()
        return max(self.interval, float(spec.reportIntervalSeconds)) if spec else self.interval

    def shutdown(self) -> None:
        self.stop()
        self.pods.watcher.stop()
        self.reports.stop()
        self.leases.stop()


# ---------------------------------------------------------------- the control plane


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP end a bench as Ctrl-C does, through its `finally` blocks, which stop the
    operator and the control plane: Python's default for them exits without running any, and left
    an operator running against a dead API server."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)


def tool_dir() -> Path:
    out = subprocess.run([str(REPO / "hack" / "build-tools.sh")], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class ControlPlane:
    """A dedicated control plane (hack/cluster-up.sh) whose GPU nodes are added in batches."""

    dir: Path
    bin: Path
    nodes: int = 0

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @classmethod
    def start(cls) -> ControlPlane:
        exit_on_signals()
        state = Path(tempfile.mkdtemp(prefix="edpilot-bench-"))
        env = {**os.environ, "CLUSTER_DIR": str(state), "NODES": "0", "GPUS": "8"}
        proc = subprocess.run([str(REPO / "hack" / "cluster-up.sh")], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the control plane did not start:\n{proc.stderr[-4000:]}")
        cp = cls(dir=state, bin=tool_dir())
        cp.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        return cp

    def stop(self) -> None:
        env = {**os.environ, "CLUSTER_DIR": str(self.dir)}
        subprocess.run([str(REPO / "hack" / "cluster-down.sh")], env=env, capture_output=True)

    def kubectl(self, *args: str, input: str | None = None) -> str:
        proc = subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def grow(self, api: Api, total: int, batch: int = 250, timeout: float = 180) -> float:
        """Add KWOK GPU nodes (hack/gpu-nodes.sh) up to `total` and wait until they are Ready.
        Returns the seconds it took."""
        started = time.monotonic()
        manifests = subprocess.run(
            [str(REPO / "hack" / "gpu-nodes.sh"), str(total), "8"], capture_output=True, text=True, check=True
        ).stdout
        docs = [d for d in manifests.split("---\n") if d.strip()][self.nodes :]
        for i in range(0, len(docs), batch):
            self.kubectl("create", "-f", "-", input="---\n".join(docs[i : i + batch]))
        self.nodes = total
        # On a busy machine KWOK leaves some nodes NotReady at thousands of nodes (its heartbeats
        # fall behind): after a grace period 99% Ready is enough, and after `timeout` whatever is
        # Ready. Each result reports how many nodes were Ready.
        deadline, grace = time.monotonic() + timeout, time.monotonic() + 60
        while (ready := ready_nodes(api)) < total and time.monotonic() < deadline:
            if ready >= 0.99 * total and time.monotonic() > grace:
                break
            time.sleep(2)
        return time.monotonic() - started


def ready_nodes(api: Api) -> int:
    nodes = api.ok("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")
    return sum(
        1
        for n in nodes.get("items") or []
        if any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (n.get("status") or {}).get("conditions") or []
        )
    )


def node_names(count: int) -> list[str]:
    return [f"gpu-node-{i}" for i in range(count)]


# ---------------------------------------------------------------- workloads and policies


def ensure_namespace(api: Api, name: str) -> None:
    code, payload = api.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    if code not in (201, 409):
        raise RuntimeError(f"creating namespace {name}: {code} {payload}")


def gpu_pod(namespace: str, name: str, node: str, labels: Mapping[str, str]) -> dict[str, Any]:
    """A 1-GPU pod bound to `node` that the simulated agent runs as an LLM decode server."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(labels),
            "annotations": {SIM_WORKLOAD: "llm-decode", SIM_PRECISION: "bf16", SIM_BATCH_SIZE: "8"},
        },
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "c", "image": "example.com/llm:1", "resources": {"limits": {"nvidia.com/gpu": 1}}}
            ],
        },
    }


def cap_policy(
    namespace: str, name: str, selector: Mapping[str, str], max_slowdown: float = 10.0
) -> dict[str, Any]:
    """A narrow policy: power cap only, the shape a fleet operator starts with."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "EnergyPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": dict(selector)},
            "objective": "EDP",
            "maxSlowdownPercent": max_slowdown,
            "powerCap": {"mode": "Auto", "minPercent": 50, "maxPercent": 100},
            "workMetric": {"port": 8000, "name": "generated_tokens_total", "unit": "tokens"},
        },
    }


def policies_path(namespace: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/energypolicies"


def create_all(api: Api, items: Sequence[tuple[str, dict[str, Any]]], threads: int = 8) -> None:
    """POST (path, body) pairs concurrently; AlreadyExists is fine."""
    errors: list[str] = []

    def post(chunk: Sequence[tuple[str, dict[str, Any]]]) -> None:
        for path, body in chunk:
            code, payload = api.request("POST", path, body)
            if code not in (201, 409):
                errors.append(f"POST {path}: {code} {str(payload)[:200]}")

    workers = [threading.Thread(target=post, args=(items[i::threads],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise RuntimeError("; ".join(errors[:5]))


# ---------------------------------------------------------------- the operator under test


class ProcessProbe:
    """CPU time and memory of one process, from /proc, sampled in the background."""

    def __init__(self, pid: int, period: float = 2.0) -> None:
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, float, float]] = []  # (monotonic, cpu seconds, RSS MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ProcessProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime

    def memory_mb(self, field_name: str) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.cpu_seconds(), self.memory_mb("VmRSS")))
            except (FileNotFoundError, ProcessLookupError):
                return
            self._stop.wait(self.period)


def operator_command(kubeconfig: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edpilot.cli", "operator", f"--kubeconfig={kubeconfig}", *extra]


# ---------------------------------------------------------------- decision lag


def server_write_time(obj: Mapping[str, Any]) -> float | None:
    """When the API server took the object's latest write: the newest `time` of its managedFields
    (whole seconds, set by the server), or None where it has none."""
    times = [
        datetime.fromisoformat(str(entry["time"])).timestamp()
        for entry in (obj.get("metadata") or {}).get("managedFields") or []
        if isinstance(entry, Mapping) and entry.get("time")
    ]
    return max(times) if times else None


class DecisionLag:
    """Fed with EnergyPolicy watch events: a workload row that first carries the observation time
    t of a report the fleet wrote is a decision on that report, lag = decision time - write time.

    The decision time is the API server's (`server_write_time`), not when this process read the
    event: with 2,000 simulated agents in this process, its watches fall behind, and that delay
    is the harness's, not the operator's. Whole seconds: a decision is counted up to 1 s early."""

    def __init__(self, writes: ReportWrites) -> None:
        self.writes = writes
        # (namespace, policy, workload) -> (pod key, node), from the policies' status rows: a
        # WorkloadOptimizerState names its policy and workload only.
        self.placed: dict[tuple[str, str, str], tuple[str, str]] = {}
        self.lock = threading.Lock()
        self.seen: set[tuple[str, float]] = set()
        self.lags: list[tuple[float, float]] = []  # (decision wall time, lag seconds)
        self.unmatched = 0

    def on_event(self, kind: str, obj: dict[str, Any], received: float) -> None:
        """Fed with EnergyPolicy and WorkloadOptimizerState events (`policy_watcher`,
        `state_watcher`): the decision is the state object's write carrying the report's time."""
        if kind == "DELETED":
            return
        received = server_write_time(obj) or received
        namespace = str((obj.get("metadata") or {}).get("namespace", ""))
        if obj.get("kind") == STATE_KIND:
            spec = obj.get("spec") or {}
            with self.lock:
                where = self.placed.get((namespace, str(spec.get("policy")), str(spec.get("workload"))))
            t = last_observation(spec.get("state"))
            if where is not None and t is not None:
                self._decided(kind, where[0], where[1], t, received)
            return
        name = str((obj.get("metadata") or {}).get("name", ""))
        with self.lock:
            for workload, where in single_pod_rows(obj).items():
                self.placed[(namespace, name, workload)] = where
        for pod, node, t in observation_times(obj):
            self._decided(kind, pod, node, t, received)

    def _decided(self, kind: str, pod: str, node: str, t: float, received: float) -> None:
        with self.lock:
            if (pod, t) in self.seen:
                return
            self.seen.add((pod, t))
            if kind == "LISTED":
                return  # written before this watch began: its time of writing is unknown
        written = self.writes.written_at(node, t)
        with self.lock:
            if written is None:
                self.unmatched += 1
            else:
                self.lags.append((received, received - written))

    def between(self, start: float, end: float) -> list[float]:
        with self.lock:
            return [lag for at, lag in self.lags if start <= at < end]

    def wait_for_first(self, timeout: float) -> float | None:
        """Seconds until the first decision on a report written by the fleet, or None."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            with self.lock:
                if self.lags:
                    return time.monotonic() - started
            time.sleep(0.5)
        return None


def policy_watcher(api: Api, *handlers: EventHandler) -> Watcher:
    """One watch on every EnergyPolicy, fanned out to `handlers`."""

    def fan_out(kind: str, obj: dict[str, Any], received: float) -> None:
        for handle in handlers:
            handle(kind, obj, received)

    return Watcher(api, f"/apis/{GROUP}/{VERSION}/energypolicies", object_key, fan_out)


def state_watcher(api: Api, handler: EventHandler) -> Watcher:
    """One watch on every WorkloadOptimizerState (each workload's optimizer state)."""
    return Watcher(api, f"/apis/{GROUP}/{VERSION}/{STATE_PLURAL}", object_key, handler)


def policy_status_problems(
    policies: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Everything wrong with the policies' statuses and the pods' hints against what the policies
    should govern now: rows (governed and lost to another policy), generation, Ready, and no hints
    left on pods that no live policy governs."""
    infos = [pod_info(p) for p in pods if gpu_request(p.get("spec") or {}) > 0]
    live: list[PolicyRef] = []
    problems: list[str] = []
    for p in policies:
        meta = p["metadata"]
        if meta.get("deletionTimestamp"):
            problems.append(f"{meta['namespace']}/{meta['name']}: still being deleted")
            continue
        live.append(PolicyRef(meta["namespace"], meta["name"], EnergyPolicySpec.model_validate(p["spec"])))
    shared = governance(infos, live)
    governed: set[str] = set()
    statuses = {object_key(p): p.get("status") or {} for p in policies}
    generations = {object_key(p): p["metadata"].get("generation") for p in policies}
    for ref in live:
        status = statuses[ref.key]
        if status.get("observedGeneration") != generations[ref.key]:
            problems.append(
                f"{ref.key}: observedGeneration {status.get('observedGeneration')} != {generations[ref.key]}"
            )
        ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
        if not ready or ready[0].get("status") != "True":
            problems.append(f"{ref.key}: not Ready")
        chosen = select(ref, infos, shared)
        expected = {w.name: sorted(pod.key for pod in w.pods) for w in chosen.workloads}
        rows = [r for r in status.get("workloads") or [] if isinstance(r, Mapping)]
        actual = {
            str(r.get("name")): sorted(r.get("pods") or []) for r in rows if r.get("phase") != "Conflict"
        }
        if actual != expected:
            problems.append(f"{ref.key}: rows {sorted(actual)} but it governs {sorted(expected)}")
        conflicts = {pod for r in rows if r.get("phase") == "Conflict" for pod in r.get("pods") or []}
        if conflicts != set(chosen.lost_to):
            problems.append(
                f"{ref.key}: Conflict rows {sorted(conflicts)}, expected {sorted(chosen.lost_to)}"
            )
        for workload in chosen.workloads:
            for pod in workload.pods:
                governed.add(pod.key)
                if pod.annotations.get(ANNOTATION_POLICY) != ref.name:
                    problems.append(
                        f"{pod.key}: {ANNOTATION_POLICY}={pod.annotations.get(ANNOTATION_POLICY)!r}, expected {ref.name!r}"
                    )
    for pod in infos:
        left = [a for a in HINT_ANNOTATIONS if a in pod.annotations]
        if pod.key not in governed and left:
            problems.append(f"{pod.key}: governed by no policy but still carries {left}")
    return problems
