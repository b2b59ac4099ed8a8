"""CPU cost of the node agent at 1 Hz sampling with 8 simulated GPUs, as a fraction of one core.

Two measurements, both with the agent's whole tick (read 8 GPUs, read 8 pods' work counters,
plan and apply limits, build the status, report when due) and a /metrics scrape every 15 s:
  1. real time: the agent loop at 1 Hz for --seconds, process CPU time / wall time;
  2. back to back: many ticks with an injected clock, CPU per tick, split into the simulator's
     own physics (which a real node replaces with NVML calls, see nvml_h100.py) and the rest.
The API server is replaced by an in-memory one that still serialises each status to JSON.

    .venv/bin/python bench/agent_overhead.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from edpilot_agent.agent import NodeAgent, SystemClock
from edpilot_agent.kube import InMemoryKube
from edpilot_agent.main import run
from edpilot_agent.metrics import AgentCollector
from edpilot_agent.pods import PodInfo
from edpilot_agent.sim import SIM_WORKLOAD, SimBackend, SimWorkloads
from prometheus_client import CollectorRegistry, generate_latest

from edpilot.models import DesiredPowerLimit, GPUNodeReportSpec, GPUNodeReportStatus, Lease, MeasuredWorkload

RESULTS = Path(__file__).resolve().parent / "results"
NODE = "bench-node"
GPUS = 8


class SerialisingKube(InMemoryKube):
    """Keeps only the last status, after paying for its JSON like the real client does."""

    def write_status(self, status: GPUNodeReportStatus) -> None:
        status.model_dump_json()
        self.statuses = [status]


@dataclass
class InjectedClock:
    t: float = 0.0

    def monotonic(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return datetime(2026, 11, 27, tzinfo=UTC) + timedelta(seconds=self.t)


def node(clock_monotonic: Any, clock: Any, interval: int) -> tuple[NodeAgent, SimBackend, CollectorRegistry]:
    backend = SimBackend(NODE, gpus=GPUS, seed=3, clock=clock_monotonic)
    kinds = ["llm-decode", "training", "gemm", "llm-decode"] * 2
    pods = [
        PodInfo("bench", f"w{i}", phase="Running", gpu_request=1, annotations={SIM_WORKLOAD: k})
        for i, k in enumerate(kinds)
    ]
    spec = GPUNodeReportSpec(
        powerLimits=[
            DesiredPowerLimit(gpuUUID=backend.devices[i].uuid, watts=450, pod=f"bench/w{i}") for i in range(4)
        ],
        workloads=[MeasuredWorkload(namespace="bench", pod=p.name, metricName="units") for p in pods],
        lease=Lease(renewTime=datetime.now(UTC) + timedelta(days=1), leaseSeconds=3600),
        reportIntervalSeconds=interval,
    )
    workloads = SimWorkloads(backend)
    agent = NodeAgent(NODE, backend, workloads, SerialisingKube(spec, pods), clock, allocations=workloads)
    registry = CollectorRegistry()
    registry.register(AgentCollector(NODE, lambda: agent.snapshot, lambda: agent.applier.counts))
    return agent, backend, registry


def real_time(seconds: float) -> dict[str, float]:
    clock = SystemClock()
    agent, _, registry = node(time.monotonic, clock, interval=60)
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(15):
            generate_latest(registry)

    scraper = threading.Thread(target=scrape, daemon=True)
    cpu0, wall0 = time.process_time(), time.monotonic()
    scraper.start()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    run(agent, stop, tick_seconds=1.0)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return {"wall_seconds": wall, "cpu_seconds": cpu, "core_fraction": cpu / wall, "ticks": wall}


def back_to_back(ticks: int, interval: int) -> dict[str, float]:
    clock = InjectedClock()
    agent, _, registry = node(clock.monotonic, clock, interval)
    cpu0 = time.process_time()
    for i in range(ticks):
        clock.t += 1.0
        agent.tick()
        if i % 15 == 0:
            generate_latest(registry)
    per_tick = (time.process_time() - cpu0) / ticks
    # The simulator's own share: advancing 8 simulated GPUs one second and reading them.
    sim_clock = InjectedClock()
    sim, _, _ = node(sim_clock.monotonic, sim_clock, interval)
    sim.tick()  # assign the pods to GPUs
    cpu0 = time.process_time()
    for _ in range(ticks):
        sim_clock.t += 1.0
        for info in sim.gpus:
            sim.backend.read(info.uuid)
    sim_per_tick = (time.process_time() - cpu0) / ticks
    return {
        "ticks": ticks,
        "report_interval_seconds": interval,
        "cpu_ms_per_tick": per_tick * 1000,
        "simulator_cpu_ms_per_tick": sim_per_tick * 1000,
        "agent_cpu_ms_per_tick": (per_tick - sim_per_tick) * 1000,
        "core_fraction_at_1hz": per_tick,
        "agent_core_fraction_at_1hz": per_tick - sim_per_tick,
        "reports": agent.reports,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="length of the real-time run")
    p.add_argument("--ticks", type=int, default=600, help="ticks of the back-to-back runs")
    args = p.parse_args(argv)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "python": sys.version.split()[0],
        "gpus": GPUS,
        "sampling_hz": 1,
        "real_time": real_time(args.seconds),
        "steady": back_to_back(args.ticks, interval=60),
        "exploring": back_to_back(args.ticks, interval=1),
        "goal_core_fraction": 0.01,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "agent_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    rt, steady, exploring = result["real_time"], result["steady"], result["exploring"]
    rows = [
        "# Node agent CPU overhead (8 simulated GPUs, 1 Hz)",
        "",
        f"{result['date']}, {result['machine']}, Python {result['python']}. "
        "Produced by `bench/agent_overhead.py`; the API server is in memory (status still serialised to JSON).",
        "",
        "| run | CPU per tick (ms) | of which simulator (ms) | fraction of one core at 1 Hz |",
        "|---|---|---|---|",
        f"| real time, {rt['wall_seconds']:.0f} s, reports every 60 s | - | - | {rt['core_fraction']:.4%} |",
        f"| back to back, reports every 60 s | {steady['cpu_ms_per_tick']:.2f} | "
        f"{steady['simulator_cpu_ms_per_tick']:.2f} | {steady['core_fraction_at_1hz']:.4%} "
        f"(agent alone {steady['agent_core_fraction_at_1hz']:.4%}) |",
        f"| back to back, reports every 1 s (exploring) | {exploring['cpu_ms_per_tick']:.2f} | "
        f"{exploring['simulator_cpu_ms_per_tick']:.2f} | {exploring['core_fraction_at_1hz']:.4%} "
        f"(agent alone {exploring['agent_core_fraction_at_1hz']:.4%}) |",
        "",
        f"Goal: under {result['goal_core_fraction']:.0%} of one core.",
    ]
    (RESULTS / "agent_overhead.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
