"""The node agent beside a hostile tenant: tick time, peak memory and the lease-expiry restore, with
and without the hostile pod, side by side (issue 14, finding 2).

Each scenario runs the real agent loop (`edpilot_agent.main.run`, HttpScraper, simulated GPUs, an
in-memory API server) in a fresh process, so its peak RSS is its own: a well-behaved pod serves its
work counter with prometheus-client, and in every scenario but the baseline one or more hostile
pods serve, from this process, on loopback:
  slow-drip        a valid start, then one byte every 0.5 s, forever
  huge-body        8 MiB of valid lines of a series nobody asked for
  redirect         302 to another "internal" service (which counts whether anyone came)
  absurd-values    the work counter at 1e308, NaN, +Inf, -1 and 1e17 in turn
  thousand-series  1,000 unrelated series and 1,000 series of the work counter
  all-at-once      the five above together
Every pod's GPU is capped under a lease of LEASE_SECONDS that nobody renews: the restore must come
within one tick of its expiry, whatever the endpoints do.

    .venv/bin/python -m bench.hostile_endpoint [--seconds 9]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edpilot_agent.agent import NodeAgent, SystemClock
from edpilot_agent.kube import InMemoryKube
from edpilot_agent.main import run
from edpilot_agent.pods import PodInfo
from edpilot_agent.scraper import HttpScraper
from edpilot_agent.sim import SimBackend, SimWorkloads
from prometheus_client import CollectorRegistry, Counter, start_http_server

from bench.hostile_http import Behaviour, body, drip, hostile_server, huge, redirect
from edpilot.models import DesiredPowerLimit, GPUNodeReportSpec, GPUNodeReportStatus, Lease, MeasuredWorkload

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
NODE = "bench-node"
TICK_SECONDS = 0.5
LEASE_SECONDS = 5
CAP_WATTS = 400.0
DEFAULT_WATTS = 700.0
HOSTILE = ("slow-drip", "huge-body", "redirect", "absurd-values", "thousand-series")
SCENARIOS = ("baseline", *HOSTILE, "all-at-once")


def absurd() -> Behaviour:
    values = iter(["1e308", "NaN", "+Inf", "-1", "1e17"] * 1000)
    return lambda sock: body(f"tokens_total {next(values)}\n")(sock)


def thousand_series() -> Behaviour:
    lines = [f'unrelated_metric{{i="{i}"}} {i}' for i in range(1000)]
    lines += [f'tokens_total{{shard="{i}"}} {i}' for i in range(1000)]
    return body("\n".join(lines) + "\n")


@contextmanager
def endpoints(scenario: str) -> Iterator[tuple[dict[str, int], list[Callable[[], int]]]]:
    """Ports of the hostile pods the scenario runs, and probes counting requests to internal services."""
    kinds = HOSTILE if scenario == "all-at-once" else tuple(k for k in HOSTILE if k == scenario)
    ports: dict[str, int] = {}
    internal: list[Callable[[], int]] = []
    with ExitStack() as stack:
        for kind in kinds:
            behaviour: Behaviour
            if kind == "slow-drip":
                behaviour = drip(period_seconds=0.5, for_seconds=600)
            elif kind == "huge-body":
                behaviour = huge(megabytes=8)
            elif kind == "redirect":
                target = stack.enter_context(hostile_server(body("tokens_total 42\n")))
                internal.append(lambda target=target: len(target.requests))  # type: ignore[misc]
                behaviour = redirect(target.url)
            elif kind == "absurd-values":
                behaviour = absurd()
            else:
                behaviour = thousand_series()
            ports[kind] = stack.enter_context(hostile_server(behaviour)).port
        yield ports, internal


# ---------------------------------------------------------------- one scenario, in its own process


class KeepLastKube(InMemoryKube):
    def write_status(self, status: GPUNodeReportStatus) -> None:
        status.model_dump_json()  # the real client pays for the JSON too
        self.statuses = [status]


def child(config: dict[str, Any]) -> dict[str, Any]:
    pods = {"good": config["good_port"], **config["hostile_ports"]}
    backend = SimBackend(NODE, gpus=8, seed=1)
    infos = [
        PodInfo("tenant", name, ip="127.0.0.1", phase="Running", gpu_request=1)
        for name in pods  # the simulator hands GPUs out in name order
    ]
    workloads = SimWorkloads(backend)
    held = workloads.allocations(infos)
    spec = GPUNodeReportSpec(
        powerLimits=[
            DesiredPowerLimit(gpuUUID=held[p.key].plugin[0], watts=CAP_WATTS, pod=p.key) for p in infos
        ],
        workloads=[
            MeasuredWorkload(namespace="tenant", pod=name, port=port, metricName="tokens")
            for name, port in pods.items()
        ],
        lease=Lease(holderIdentity="bench", renewTime=datetime.now(UTC), leaseSeconds=LEASE_SECONDS),
        reportIntervalSeconds=5,
    )
    scraper = HttpScraper(timeout_seconds=2.0, interval_seconds=TICK_SECONDS)
    agent = NodeAgent(
        NODE, backend, scraper, KeepLastKube(spec, infos), SystemClock(), allocations=workloads,
        min_interval_seconds=1.0,
    )  # fmt: skip
    ticks: list[tuple[float, float]] = []  # (start, seconds)
    capped = False
    restored_at: float | None = None
    started = time.monotonic()
    tick = agent.tick

    def timed_tick() -> None:
        nonlocal capped, restored_at
        t0 = time.monotonic()
        tick()
        ticks.append((t0 - started, time.monotonic() - t0))
        at_default = all(d.power_limit_watts == DEFAULT_WATTS for d in backend.devices)
        capped = capped or not at_default
        if capped and restored_at is None and at_default:
            restored_at = time.monotonic() - started

    agent.tick = timed_tick  # type: ignore[method-assign]
    stop = threading.Event()
    threading.Timer(config["seconds"], stop.set).start()
    cpu0 = time.process_time()
    run(agent, stop, TICK_SECONDS)
    cpu = time.process_time() - cpu0
    elapsed = time.monotonic() - started
    scraper.close()
    durations = [d for _, d in ticks]
    first_lease_tick = ticks[0][0]  # the agent starts its lease clock when it first sees the lease
    samples = {s.pod: s for s in (agent.snapshot.workloads if agent.snapshot else [])}
    return {
        "ticks": len(ticks),
        "tick_ms_p50": statistics.median(durations) * 1000,
        "tick_ms_max": max(durations) * 1000,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_core_fraction": cpu / elapsed,
        "lease_expired_at_s": first_lease_tick + LEASE_SECONDS,
        "restored_at_s": restored_at,
        "restore_delay_s": None if restored_at is None else restored_at - (first_lease_tick + LEASE_SECONDS),
        "good_pod_healthy": samples["good"].healthy if "good" in samples else False,
        "good_pod_work": samples["good"].workUnits if "good" in samples else 0.0,
        "scrapes": scraper.scrapes,
        "hostile_messages": {k: samples[k].message for k in config["hostile_ports"] if k in samples},
    }


# ---------------------------------------------------------------- the side-by-side run


def good_endpoint() -> tuple[int, Callable[[], None]]:
    registry = CollectorRegistry()
    tokens = Counter("tokens", "Tokens generated.", registry=registry)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    stop = threading.Event()

    def work() -> None:
        while not stop.wait(0.05):
            tokens.inc(100)

    threading.Thread(target=work, daemon=True).start()

    def close() -> None:
        stop.set()
        server.shutdown()

    return port, close


def scenario(name: str, good_port: int, seconds: float) -> dict[str, Any]:
    with endpoints(name) as (ports, internal):
        config = {"good_port": good_port, "hostile_ports": ports, "seconds": seconds}
        proc = subprocess.run(
            [sys.executable, "-m", "bench.hostile_endpoint", "--child", json.dumps(config)],
            cwd=REPO, capture_output=True, text=True, timeout=seconds + 60, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"scenario {name} failed:\n{proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        result["internal_requests"] = sum(count() for count in internal)
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=9.0, help="agent loop per scenario (lease: 5 s)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    good_port, close = good_endpoint()
    try:
        runs = {name: scenario(name, good_port, args.seconds) for name in SCENARIOS}
    finally:
        close()
    base = runs["baseline"]
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "python": sys.version.split()[0],
        "tick_seconds": TICK_SECONDS,
        "lease_seconds": LEASE_SECONDS,
        "seconds_per_scenario": args.seconds,
        "scenarios": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hostile_endpoint.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        "# The node agent beside a hostile tenant's /metrics",
        "",
        f"{result['date']}, {result['machine']}, Python {result['python']}. Produced by "
        f"`bench/hostile_endpoint.py`: the real agent loop at {TICK_SECONDS:g} s ticks for "
        f"{args.seconds:g} s per scenario, each in its own process, 8 simulated GPUs, every pod capped "
        f"at {CAP_WATTS:.0f} W under a {LEASE_SECONDS} s lease nobody renews.",
        "",
        "| scenario | tick p50 (ms) | tick max (ms) | peak RSS (MiB) | agent CPU (share of a core) "
        "| p50 / baseline | max / baseline | RSS / baseline | CPU / baseline "
        f"| restore after lease expiry (s; goal <= {TICK_SECONDS:g}) | good pod healthy "
        "| requests to the redirect target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        delay = "never" if r["restore_delay_s"] is None else f"{r['restore_delay_s']:.2f}"
        rows.append(
            f"| {name} | {r['tick_ms_p50']:.2f} | {r['tick_ms_max']:.2f} | {r['peak_rss_mib']:.0f} "
            f"| {r['cpu_core_fraction']:.2%} "
            f"| {r['tick_ms_p50'] / base['tick_ms_p50']:.2f} | {r['tick_ms_max'] / base['tick_ms_max']:.2f} "
            f"| {r['peak_rss_mib'] / base['peak_rss_mib']:.2f} "
            f"| {r['cpu_core_fraction'] / base['cpu_core_fraction']:.2f} | {delay} | {r['good_pod_healthy']} "
            f"| {r['internal_requests'] if name in ('redirect', 'all-at-once') else '-'} |"
        )
    rows += [
        "",
        "For scale, the issue measured the agent before the fix: the slow drip held one scrape (and the "
        "whole tick, lease check included) over 25 s, and the 8 MiB body took 7.2 s and 424 MiB.",
        "",
        "What the agent reported about each hostile pod (its own words, nothing the pod sent):",
        "",
    ]
    for name, message in runs["all-at-once"]["hostile_messages"].items():
        rows.append(f"- {name}: {message or '(healthy)'}")
    (RESULTS / "hostile_endpoint.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
