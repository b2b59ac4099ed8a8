"""Scheduler-extender latency and throughput at 1,000 and 5,000 nodes.

For each fleet size the extender's HTTP server runs in its own process pinned to one CPU core,
its view filled with a synthetic fleet (half H100, half A100 nodes of 8 GPUs, in racks of 50
nodes with one PowerBudget each, some racks full, 1% of nodes throttling, measured history for
the policy). A client pinned to another core sends what kube-scheduler sends:

* `nodeCacheCapable: true`: node names only (the configuration edpilot ships);
* `nodeCacheCapable: false`: whole Node objects (for comparison).

It reports, per verb: the server's own time (parse, decide, serialise; in-process, no HTTP), the
HTTP round trip on loopback (p50/p99 over sequential requests), and requests per second with 4
concurrent connections (server on one core). Results: bench/results/extender_latency.{json,md}.

    .venv/bin/python bench/extender_latency.py [--sizes 1000 5000] [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from edpilot_operator.extender import Extender, ExtenderArgs, host_priority_list
from edpilot_operator.extender_view import BUDGETS, NODES, PODS, POLICIES, REPORTS, ClusterView

RESULTS = Path(__file__).resolve().parent / "results"
RACK_SIZE = 50
GPUS = 8
MODELS = {
    "NVIDIA-H100-80GB-HBM3": ("NVIDIA H100 80GB HBM3", 200.0, 700.0, 72.0),
    "NVIDIA-A100-SXM4-80GB": ("NVIDIA A100-SXM4-80GB", 100.0, 400.0, 55.0),
}


# ---------------------------------------------------------------- the synthetic fleet


def node_name(i: int) -> str:
    return f"gpu-{i:05d}"


def node_object(i: int) -> dict[str, Any]:
    """A Node as the API server returns it (trimmed of managedFields), about 2 KB of JSON."""
    product = list(MODELS)[i % 2]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node_name(i),
            "uid": f"00000000-0000-0000-0000-{i:012d}",
            "resourceVersion": str(1000 + i),
            "labels": {
                "kubernetes.io/hostname": node_name(i),
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node-role.kubernetes.io/gpu": "",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": product,
                "nvidia.com/gpu.count": str(GPUS),
                "topology.edpilot.io/rack": f"r{i // RACK_SIZE:03d}",
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"podCIDR": f"10.{i // 250}.{i % 250}.0/24"},
        "status": {
            "capacity": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(GPUS)},
            "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(GPUS)},
            "conditions": [
                {
                    "type": t,
                    "status": "False",
                    "reason": f"Kubelet{t}Ok",
                    "message": "ok",
                    "lastHeartbeatTime": "2026-11-27T00:00:00Z",
                    "lastTransitionTime": "2026-11-27T00:00:00Z",
                }
                for t in ("MemoryPressure", "DiskPressure", "PIDPressure")
            ]
            + [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": "2026-11-27T00:00:00Z",
                    "lastTransitionTime": "2026-11-27T00:00:00Z",
                }
            ],
            "addresses": [{"type": "InternalIP", "address": f"10.0.{i // 250}.{i % 250}"}],
            "nodeInfo": {
                "architecture": "amd64",
                "kubeletVersion": "v1.36.3",
                "operatingSystem": "linux",
                "containerRuntimeVersion": "containerd://2.1.0",
                "kernelVersion": "6.8.0",
            },
        },
    }


def report_object(i: int) -> dict[str, Any]:
    model, low, high, idle = MODELS[list(MODELS)[i % 2]]
    busy = i % 3  # 0-2 busy GPUs per node
    throttled = i % 100 == 7
    return {
        "metadata": {"name": node_name(i)},
        "status": {
            "nodeName": node_name(i),
            "agentVersion": "bench",
            "backend": "sim",
            "time": "2026-11-27T00:00:00Z",
            "gpus": [
                {
                    "index": g,
                    "uuid": f"GPU-{i:05d}-{g}",
                    "model": model,
                    "minLimitWatts": low,
                    "maxLimitWatts": high,
                    "defaultLimitWatts": high,
                    "enforcedLimitWatts": high * 0.7 if g < busy else high,
                    "powerWatts": high * 0.6 if g < busy else idle,
                    "energyJoules": 1e6,
                    "throttleReasons": ["HwThermalSlowdown"] if throttled and g == 0 else [],
                    "pods": [f"ml/w-{i}-{g}"] if g < busy else [],
                }
                for g in range(GPUS)
            ],
        },
    }


def fill(view: ClusterView, size: int) -> None:
    racks = (size + RACK_SIZE - 1) // RACK_SIZE
    view.replace_all(NODES, [node_object(i) for i in range(size)])
    view.replace_all(REPORTS, [report_object(i) for i in range(size)])
    view.replace_all(PODS, [])
    # Every fifth rack's budget is full; the rest have room.
    view.replace_all(
        BUDGETS,
        [
            {
                "metadata": {"name": f"rack-r{r:03d}"},
                "spec": {
                    "nodeSelector": {"matchLabels": {"topology.edpilot.io/rack": f"r{r:03d}"}},
                    "maxWatts": 12_000 if r % 5 == 0 else 200_000,
                },
            }
            for r in range(racks)
        ],
    )
    rows = [
        {
            "name": f"w-{i}",
            "pods": [],
            "nodes": [node_name(i)],
            "gpus": 1,
            "current": {
                "joulesPerUnit": 0.01 * (1 + i % 2),
                "secondsPerUnit": 1e-3,
                "edp": 1e-5,
                "unitsPerSecond": 1e3,
            },
        }
        for i in range(0, min(size, 400), 3)
    ]
    view.replace_all(
        POLICIES,
        [
            {
                "metadata": {"name": "llm", "namespace": "ml"},
                "spec": {"selector": {"matchLabels": {"app": "llm"}}, "workMetric": {"name": "tokens_total"}},
                "status": {"workloads": rows},
            }
        ],
    )


def pod_body() -> dict[str, Any]:
    return {
        "metadata": {"name": "llm-new", "namespace": "ml", "uid": "u-new", "labels": {"app": "llm"}},
        "spec": {
            "containers": [
                {
                    "name": "llm",
                    "image": "registry.example/llm:1",
                    "resources": {"limits": {"nvidia.com/gpu": "2"}},
                }
            ]
        },
        "status": {"phase": "Pending"},
    }


def request_bodies(size: int) -> dict[str, bytes]:
    names = [node_name(i) for i in range(size)]
    return {
        "names": json.dumps({"Pod": pod_body(), "NodeNames": names}).encode(),
        "nodes": json.dumps(
            {"Pod": pod_body(), "Nodes": {"items": [node_object(i) for i in range(size)]}}
        ).encode(),
    }


# ---------------------------------------------------------------- server process


def serve(size: int, port: int, core: int) -> None:
    os.sched_setaffinity(0, {core})
    view = ClusterView()
    fill(view, size)
    gc.freeze()  # as the extender's watcher does after every full list

    async def run() -> None:
        # Whole-Node bodies of large fleets pass the extender's default limit (sized for node names,
        # what the chart asks for); the bench measures them anyway, so it lifts the limit.
        runner = web.AppRunner(Extender(view, max_body_bytes=64 * 2**20).app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


# ---------------------------------------------------------------- client


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def in_process(size: int, bodies: dict[str, bytes], repeats: int) -> dict[str, dict[str, float]]:
    """The server's own work per request: parse the body, decide, serialise the answer."""
    view = ClusterView()
    fill(view, size)
    gc.freeze()  # as the extender's watcher does after every full list
    extender = Extender(view)
    out: dict[str, dict[str, float]] = {}
    for mode, body in bodies.items():
        for verb in ("filter", "prioritize"):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                args = ExtenderArgs.model_validate_json(body)
                if verb == "filter":
                    extender.filter(args).model_dump_json(exclude_none=True)
                else:
                    host_priority_list(extender.prioritize(args))
                times.append(time.perf_counter() - start)
            out[f"{verb}/{mode}"] = {
                "p50_ms": 1e3 * statistics.median(times),
                "p99_ms": 1e3 * percentile(times, 0.99),
            }
    return out


def round_trips(port: int, path: str, body: bytes, count: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        times.append(time.perf_counter() - start)
        if resp.status != 200 or b'"Error":"edpilot' in data:
            raise RuntimeError(f"{path}: HTTP {resp.status} {data[:200]!r}")
    conn.close()
    return times


def throughput(port: int, path: str, body: bytes, seconds: float, connections: int = 4) -> float:
    done = [0] * connections
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.perf_counter() < stop:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            conn.getresponse().read()
            done[k] += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(size: int, requests: int, rps_seconds: float) -> dict[str, Any]:
    cores = sorted(os.sched_getaffinity(0))
    server_core, client_core = cores[0], cores[-1]
    bodies = request_bodies(size)
    result: dict[str, Any] = {
        "nodes": size,
        "body_bytes": {mode: len(b) for mode, b in bodies.items()},
        "in_process": in_process(size, bodies, max(50, requests // 3)),
        "http": {},
    }
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(size), "--port", str(port), "--core", str(server_core)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        os.sched_setaffinity(0, {client_core})
        for mode, body in bodies.items():
            n = requests if mode == "names" else max(30, requests // 10)
            for verb in ("filter", "prioritize"):
                round_trips(port, f"/{verb}", body, 10)  # warm up
                times = round_trips(port, f"/{verb}", body, n)
                result["http"][f"{verb}/{mode}"] = {
                    "requests": n,
                    "p50_ms": 1e3 * statistics.median(times),
                    "p99_ms": 1e3 * percentile(times, 0.99),
                    "max_ms": 1e3 * max(times),
                    "rps_one_core": throughput(port, f"/{verb}", body, rps_seconds),
                }
    finally:
        os.sched_setaffinity(0, set(cores))
        server.terminate()
        server.wait()
    return result


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Scheduler extender latency",
        "",
        f"Machine: {results['machine']}. Server: one process pinned to one core (aiohttp); client on another core.",
        "Goal: p99 under 5 ms at 5,000 nodes with `nodeCacheCapable` (node names).",
        "`server` = the extender's own work per request (parse, decide, serialise), in process;",
        "`HTTP` = round trip on loopback, sequential; `req/s` = 4 concurrent connections, server on one core.",
        "",
        "| nodes | verb | request | body | server p50 / p99 ms | HTTP p50 / p99 ms | req/s (1 core) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        for key, http_row in run["http"].items():
            verb, mode = key.split("/")
            srv = run["in_process"][key]
            body_kib = run["body_bytes"][mode] / 1024
            request = "node names (nodeCacheCapable)" if mode == "names" else "whole Nodes"
            lines.append(
                f"| {run['nodes']:,} | {verb} | {request} | {body_kib:,.0f} KiB | "
                f"{srv['p50_ms']:.2f} / {srv['p99_ms']:.2f} | {http_row['p50_ms']:.2f} / {http_row['p99_ms']:.2f} | "
                f"{http_row['rps_one_core']:,.0f} |"
            )
    lines += ["", "Command: `.venv/bin/python bench/extender_latency.py`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rps-seconds", type=float, default=3.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.core)
        return 0
    runs = [measure(size, args.requests, args.rps_seconds) for size in args.sizes]
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "extender_latency.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "extender_latency.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
