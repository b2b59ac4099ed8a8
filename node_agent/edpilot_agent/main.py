"""`edpilot agent`: the node agent for one GPU node (a DaemonSet pod in a cluster).

With `--setter-socket` (the Helm chart's way) this process holds no privilege: it reads NVML
read-only and asks `edpilot agent-setter`, in its own container, to set limits and to read the
kubelet's pod-resources socket. Without it, it does both itself and needs root and CAP_SYS_ADMIN.
With `--backend sim` the GPUs are simulated; a setter then only relays what a real kubelet
allocated (a setter started with `--allocations-only`), and the simulated pods play on those GPUs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

from edpilot import dra
from edpilot_agent.agent import NodeAgent, SystemClock
from edpilot_agent.backend import GpuBackend, GpuBackendError
from edpilot_agent.holdings import GpuAllocations
from edpilot_agent.kube import KubeClient
from edpilot_agent.kube_auth import KubeAuthorizer
from edpilot_agent.metrics import AgentCollector, Heartbeat, serve
from edpilot_agent.scraper import HttpScraper, WorkSource
from edpilot_agent.setter import SetterBackend, SetterClient

log = logging.getLogger("edpilot_agent")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="edpilot agent", description="Measure and cap the GPUs of one node.")
    p.add_argument(
        "--node-name", default=os.environ.get("NODE_NAME", ""), help="this node (default $NODE_NAME)"
    )
    p.add_argument("--backend", choices=("nvml", "sim"), default="nvml")
    p.add_argument("--dry-run", action="store_true", help="log and count power-limit changes, set none")
    p.add_argument(
        "--metrics-port", type=int, default=9464, help="serve /metrics and /healthz here; 0 turns it off"
    )
    p.add_argument(
        "--metrics-auth",
        choices=("kube", "none"),
        default="kube",
        help="kube: /metrics only for callers the API server allows `get` on /metrics (TokenReview and "
        "SubjectAccessReview); none: anyone who reaches the port",
    )
    p.add_argument(
        "--liveness-max-age",
        type=float,
        default=60.0,
        help="/healthz fails when the main loop has not finished a tick for this many seconds",
    )
    p.add_argument(
        "--setter-socket",
        default="",
        help="nvml: set limits and read GPU allocations through `edpilot agent-setter` on this socket; "
        "sim: read only the allocations (a simulated node with a real kubelet)",
    )
    p.add_argument("--scrape-timeout", type=float, default=2.0, help="seconds for one whole scrape of a pod")
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
    dra.add_arguments(p)
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


def run(
    agent: NodeAgent, stop: threading.Event, tick_seconds: float, heartbeat: Heartbeat | None = None
) -> int:
    """Tick until `stop` is set, then give the GPUs back their default limits."""
    next_at = time.monotonic()
    try:
        while not stop.is_set():
            agent.tick()
            if heartbeat is not None:
                heartbeat.beat()
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
    scraper: HttpScraper | None = None
    backend: GpuBackend
    work: WorkSource
    allocations: GpuAllocations
    dra_config = dra.config_from(args)
    try:
        # A simulated node plays its kubelet, which hands out the devices of the claims reserved
        # for its pods: it reads ResourceClaims, a real node's agent never does.
        kube = KubeClient(args.node_name, args.kubeconfig, dra=dra_config, watch_claims=args.backend == "sim")
    except Exception as exc:  # no kubeconfig and not in a pod: nothing to report to
        print(f"edpilot agent: cannot reach Kubernetes: {exc}", file=sys.stderr)
        return 1
    try:
        if args.backend == "sim":
            from edpilot_agent.sim import SimBackend, SimWorkloads

            sim = SimBackend(args.node_name, gpus=args.gpus, seed=args.seed, speed=args.sim_speed)
            # With a setter, the node has a real kubelet: pods play on the GPUs it gave them.
            kubelet = SetterClient(args.setter_socket) if args.setter_socket else None
            workloads = SimWorkloads(
                sim, claims=kube.claims, slices=kube.slice_devices, dra=dra_config, kubelet=kubelet
            )
            backend, work, allocations = sim, workloads, workloads
        else:
            from edpilot_agent.nvml import NvmlBackend

            scraper = HttpScraper(timeout_seconds=args.scrape_timeout, interval_seconds=args.tick)
            work = scraper
            if args.setter_socket:
                setter = SetterClient(args.setter_socket)
                backend, allocations = SetterBackend(NvmlBackend(read_only=True), setter), setter
            else:
                from edpilot_agent.podresources import PodResourcesClient

                backend = NvmlBackend(read_only=args.dry_run)
                allocations = PodResourcesClient(args.pod_resources_socket)
    except GpuBackendError as exc:
        print(f"edpilot agent: {exc}", file=sys.stderr)
        kube.close()
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
        dra=dra_config,
        slices=kube,
    )
    heartbeat = Heartbeat(args.liveness_max_age)
    if args.metrics_port:
        serve(
            AgentCollector(
                args.node_name,
                lambda: agent.snapshot,
                lambda: agent.applier.counts,
                lambda: agent.applier.clock_counts,
            ),
            args.metrics_port,
            liveness=heartbeat,
            authorizer=KubeAuthorizer(kube.api) if args.metrics_auth == "kube" else None,
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
        return run(agent, stop, args.tick, heartbeat)
    finally:
        if scraper is not None:
            scraper.close()
        kube.close()
        backend.close()
