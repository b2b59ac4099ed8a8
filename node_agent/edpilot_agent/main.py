"""`edpilot agent`: the node agent for one GPU node (a DaemonSet pod in a cluster)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

from edpilot_agent.agent import NodeAgent, SystemClock
from edpilot_agent.backend import GpuBackendError
from edpilot_agent.kube import KubeClient
from edpilot_agent.metrics import AgentCollector, serve

log = logging.getLogger("edpilot_agent")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="edpilot agent", description="Measure and cap the GPUs of one node.")
    p.add_argument(
        "--node-name", default=os.environ.get("NODE_NAME", ""), help="this node (default $NODE_NAME)"
    )
    p.add_argument("--backend", choices=("nvml", "sim"), default="nvml")
    p.add_argument("--dry-run", action="store_true", help="log and count power-limit changes, set none")
    p.add_argument("--metrics-port", type=int, default=9464, help="serve /metrics here; 0 turns it off")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None, help="default: in-cluster")
    p.add_argument("--gpus", type=int, default=8, help="sim: GPUs on the node")
    p.add_argument("--seed", type=int, default=0, help="sim: noise seed")
    p.add_argument("--sim-speed", type=float, default=1.0, help="sim: simulated seconds per real second")
    p.add_argument("--default-interval", type=float, default=60.0, help="longest report interval, seconds")
    p.add_argument("--min-interval", type=float, default=1.0, help="shortest report interval, seconds")
    p.add_argument("--tick", type=float, default=1.0, help="seconds between measurements and actuation")
    p.add_argument(
        "--silent-after", type=float, default=30.0, help="a work counter still this long is unhealthy"
    )
    p.add_argument(
        "--energy-period", type=float, default=10.0, help="read energy counters at least this often, seconds"
    )
    p.add_argument("--pod-resources-socket", default="/var/lib/kubelet/pod-resources/kubelet.sock")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if not args.node_name:
        p.error("--node-name (or $NODE_NAME) is required")
    return args


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM (kubelet stopping the pod) and SIGINT end the loop; the caller restores defaults."""

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: restoring default power limits and stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def run(agent: NodeAgent, stop: threading.Event, tick_seconds: float) -> int:
    """Tick until `stop` is set, then give the GPUs back their default limits."""
    next_at = time.monotonic()
    try:
        while not stop.is_set():
            agent.tick()
            next_at = max(next_at + tick_seconds, time.monotonic())
            stop.wait(next_at - time.monotonic())
    finally:
        agent.shutdown()
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    clock = SystemClock()
    try:
        if args.backend == "sim":
            from edpilot_agent.sim import SimBackend, SimWorkloads

            sim = SimBackend(args.node_name, gpus=args.gpus, seed=args.seed, speed=args.sim_speed)
            backend, work, allocations = sim, SimWorkloads(sim), SimWorkloads(sim)
        else:
            from edpilot_agent.nvml import NvmlBackend
            from edpilot_agent.podresources import PodResourcesClient
            from edpilot_agent.scraper import HttpScraper

            backend = NvmlBackend(read_only=args.dry_run)  # type: ignore[assignment]
            work, allocations = HttpScraper(), PodResourcesClient(args.pod_resources_socket)  # type: ignore[assignment]
    except GpuBackendError as exc:
        print(f"edpilot agent: {exc}", file=sys.stderr)
        return 1
    try:
        kube = KubeClient(args.node_name, args.kubeconfig)
    except Exception as exc:  # no kubeconfig and not in a pod: nothing to report to
        print(f"edpilot agent: cannot reach Kubernetes: {exc}", file=sys.stderr)
        backend.close()
        return 1
    agent = NodeAgent(
        args.node_name,
        backend,
        work,
        kube,
        clock,
        allocations=allocations,
        dry_run=args.dry_run,
        default_interval_seconds=args.default_interval,
        min_interval_seconds=args.min_interval,
        silent_after_seconds=args.silent_after,
        energy_period_seconds=args.energy_period,
        time_scale=args.sim_speed if args.backend == "sim" else 1.0,
    )
    if args.metrics_port:
        serve(
            AgentCollector(args.node_name, lambda: agent.snapshot, lambda: agent.applier.counts),
            args.metrics_port,
        )
    stop = threading.Event()
    install_signal_handlers(stop)
    log.info(
        "agent for node %s: %d GPUs, backend %s%s",
        args.node_name,
        len(agent.gpus),
        backend.name,
        ", dry-run" if args.dry_run else "",
    )
    try:
        return run(agent, stop, args.tick)
    finally:
        kube.close()
        backend.close()
