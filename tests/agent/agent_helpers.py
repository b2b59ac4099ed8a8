"""Helpers for the agent's tests: an injectable clock and a simulated node."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from edpilot_agent.agent import NodeAgent
from edpilot_agent.kube import InMemoryKube
from edpilot_agent.pods import PodInfo
from edpilot_agent.sim import SIM_WORKLOAD, SimBackend, SimWorkloads

from edpilot.models import DesiredLockedClock, DesiredPowerLimit, GPUNodeReportSpec, Lease, MeasuredWorkload

NODE = "gpu-node-0"


@dataclass
class FakeClock:
    t: float = 1000.0
    epoch: datetime = field(default_factory=lambda: datetime(2026, 11, 27, tzinfo=UTC))

    def monotonic(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return self.epoch + timedelta(seconds=self.t)

    def advance(self, seconds: float) -> None:
        self.t += seconds


def decode_pod(name: str = "llm-0", gpus: int = 1, annotations: dict[str, str] | None = None) -> PodInfo:
    return PodInfo(
        "default",
        name,
        ip="127.0.0.1",
        phase="Running",
        gpu_request=gpus,
        annotations={SIM_WORKLOAD: "llm-decode", **(annotations or {})},
    )


def lease(clock: FakeClock, seconds: int = 30) -> Lease:
    return Lease(holderIdentity="operator-0", renewTime=clock.wall(), leaseSeconds=seconds)


def cap_spec(
    clock: FakeClock,
    uuid: str,
    watts: float,
    pod: str = "default/llm-0",
    lease_seconds: int = 30,
    interval: int = 5,
) -> GPUNodeReportSpec:
    return GPUNodeReportSpec(
        powerLimits=[DesiredPowerLimit(gpuUUID=uuid, watts=watts, pod=pod)],
        workloads=[MeasuredWorkload(namespace=pod.split("/")[0], pod=pod.split("/")[1], metricName="tokens")],
        lease=lease(clock, lease_seconds),
        reportIntervalSeconds=interval,
    )


def lock_spec(
    clock: FakeClock,
    uuid: str,
    max_mhz: float,
    pod: str = "default/llm-0",
    lease_seconds: int = 30,
    interval: int = 5,
) -> GPUNodeReportSpec:
    """A spec that locks one GPU's SM clock (and caps nothing)."""
    spec = cap_spec(clock, uuid, 700, pod, lease_seconds, interval)
    spec.powerLimits = []
    spec.lockedClocks = [DesiredLockedClock(gpuUUID=uuid, maxMHz=max_mhz, pod=pod)]
    return spec


@dataclass
class SimNode:
    clock: FakeClock
    backend: SimBackend
    kube: InMemoryKube
    agent: NodeAgent

    def uuid(self, index: int) -> str:
        return self.backend.devices[index].uuid

    def limit(self, index: int) -> float:
        return self.backend.devices[index].power_limit_watts

    def locked(self, index: int) -> float | None:
        return self.backend.devices[index].locked_clock_mhz


def sim_node(
    pods: list[PodInfo] | None = None,
    dry_run: bool = False,
    gpus: int = 2,
    default_interval: float = 60.0,
    speed: float = 1.0,
) -> SimNode:
    clock = FakeClock()
    backend = SimBackend(
        NODE, gpus=gpus, seed=1, speed=speed, clock=clock.monotonic, reload_delay_seconds=2.0
    )
    kube = InMemoryKube(pods=pods if pods is not None else [decode_pod()])
    workloads = SimWorkloads(backend)
    agent = NodeAgent(
        NODE,
        backend,
        workloads,
        kube,
        clock,
        allocations=workloads,
        dry_run=dry_run,
        default_interval_seconds=default_interval,
        min_interval_seconds=1.0,
        silent_after_seconds=10.0,
        time_scale=speed,
    )
    return SimNode(clock, backend, kube, agent)
