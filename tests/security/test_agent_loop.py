"""Issue 14, finding 2 (agent side) and "the agent clamps": whatever a tenant's endpoint does, the
agent's own loop keeps its promises. A lease that runs out is restored on time, SIGTERM restores
at once, the liveness probe sees a stalled loop, totals stay finite, and no spec entry takes a GPU
above its default limit."""

from __future__ import annotations

import json
import math
import threading
import time

from agent_helpers import FakeClock
from edpilot_agent.actuator import plan_limits
from edpilot_agent.agent import NodeAgent, SystemClock
from edpilot_agent.backend import GpuInfo
from edpilot_agent.kube import InMemoryKube
from edpilot_agent.main import run
from edpilot_agent.pods import PodInfo
from edpilot_agent.scraper import HttpScraper, WorkReading
from edpilot_agent.sim import SIM_WORKLOAD, SimBackend, SimWorkloads

from bench.hostile_http import body, drip, hang, hostile_server
from edpilot.models import DesiredPowerLimit, GPUNodeReportSpec, Lease, MeasuredWorkload

NODE = "gpu-node-0"
CAP_WATTS = 400.0


def hostile_node(
    port: int, clock: FakeClock | SystemClock, lease_seconds: int = 30
) -> tuple[NodeAgent, SimBackend]:
    """A node whose one pod is capped and whose work counter is served by the hostile `port`."""
    monotonic = clock.monotonic
    backend = SimBackend(NODE, gpus=1, seed=1, clock=monotonic)
    pod = PodInfo(
        "tenant-a",
        "hostile-0",
        ip="127.0.0.1",
        phase="Running",
        gpu_request=1,
        annotations={SIM_WORKLOAD: "llm-decode"},
    )
    spec = GPUNodeReportSpec(
        powerLimits=[DesiredPowerLimit(gpuUUID=backend.devices[0].uuid, watts=CAP_WATTS, pod=pod.key)],
        workloads=[MeasuredWorkload(namespace="tenant-a", pod="hostile-0", port=port, metricName="tokens")],
        lease=Lease(holderIdentity="op", renewTime=clock.wall(), leaseSeconds=lease_seconds),
        reportIntervalSeconds=5,
    )
    agent = NodeAgent(
        NODE,
        backend,
        HttpScraper(timeout_seconds=2.0),
        InMemoryKube(spec, [pod]),
        clock,
        allocations=SimWorkloads(backend),
    )
    return agent, backend


def timed_tick(agent: NodeAgent, bound: float) -> float:
    """Runs one tick; fails when it does not finish within `bound` seconds."""
    done = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        agent.tick()
        done.set()

    threading.Thread(target=tick, daemon=True).start()
    assert done.wait(bound), f"the tick took longer than {bound} s"
    return time.monotonic() - start


def test_the_lease_expiry_restore_is_on_time_while_a_tenant_endpoint_drips() -> None:
    with hostile_server(drip(period_seconds=0.5, for_seconds=15)) as server:
        clock = FakeClock()
        agent, backend = hostile_node(server.port, clock, lease_seconds=5)
        timed_tick(agent, 0.5)
        assert backend.devices[0].power_limit_watts == CAP_WATTS
        clock.advance(6)  # the operator is gone
        timed_tick(agent, 0.5)
        assert backend.devices[0].power_limit_watts == 700.0


def test_sigterm_restores_defaults_without_waiting_on_a_scrape() -> None:
    with hostile_server(drip(period_seconds=0.5, for_seconds=15)) as server:
        agent, backend = hostile_node(server.port, SystemClock())
        stop = threading.Event()
        loop = threading.Thread(target=run, args=(agent, stop, 0.2), daemon=True)
        loop.start()
        time.sleep(1.0)
        stop.set()  # what the SIGTERM handler does
        start = time.monotonic()
        loop.join(5.0)
        assert not loop.is_alive() and time.monotonic() - start < 1.5
        assert backend.devices[0].power_limit_watts == 700.0


class AbsurdCounter:
    """A work source whose counter alternates between 1e308 and 0 (a reset each time)."""

    def __init__(self) -> None:
        self.calls = 0

    def read(self, workload: MeasuredWorkload, pod: PodInfo | None) -> WorkReading:
        self.calls += 1
        return WorkReading(1e308 if self.calls % 2 else 0.0)


def test_absurd_counters_never_make_a_total_infinite_nor_the_json_invalid() -> None:
    clock = FakeClock()
    backend = SimBackend(NODE, gpus=1, clock=clock.monotonic)
    pod = PodInfo("tenant-a", "hostile-0", ip="127.0.0.1", phase="Running", gpu_request=1)
    spec = GPUNodeReportSpec(
        workloads=[MeasuredWorkload(namespace="tenant-a", pod="hostile-0", metricName="tokens")]
    )
    kube = InMemoryKube(spec, [pod])
    agent = NodeAgent(NODE, backend, AbsurdCounter(), kube, clock, allocations=SimWorkloads(backend))
    for _ in range(5):  # the last read is 1e308 again
        agent.tick()
        clock.advance(2)
    assert agent.snapshot is not None
    (sample,) = agent.snapshot.workloads
    assert math.isfinite(sample.workUnits) and sample.workUnits <= 2**53
    assert not sample.healthy
    for status in kube.statuses:
        json.dumps(status.model_dump(mode="json"), allow_nan=False)


def test_no_spec_entry_takes_a_gpu_above_its_default_limit() -> None:
    # An H100 PCIe-like GPU whose NVML maximum is above its default.
    gpu = GpuInfo(0, "GPU-a", "H100", min_limit_watts=200, max_limit_watts=750, default_limit_watts=700)

    def target(watts: float) -> float:
        entry = DesiredPowerLimit(gpuUUID="GPU-a", watts=watts, pod="tenant-a/p")
        plan = plan_limits([entry], [gpu], {}, {"tenant-a/p"}, {"GPU-a": {"tenant-a/p"}}, None)
        return plan.targets["GPU-a"]

    assert target(99_999) == 700
    assert target(720) == 700
    assert target(100) == 200
    assert target(450) == 450


def test_a_hanging_pod_does_not_delay_another_pods_reading() -> None:
    with hostile_server(hang()) as bad, hostile_server(body("tokens 7\n")) as good:
        clock = SystemClock()
        agent, _ = hostile_node(bad.port, clock)
        kube = agent.kube
        assert isinstance(kube, InMemoryKube) and kube.spec is not None
        kube.pod_list.append(PodInfo("tenant-b", "good-0", ip="127.0.0.1", phase="Running"))
        kube.spec.workloads.append(
            MeasuredWorkload(namespace="tenant-b", pod="good-0", port=good.port, metricName="tokens")
        )
        start = time.monotonic()
        while time.monotonic() - start < 1.5:
            timed_tick(agent, 0.5)
            assert agent.snapshot is not None
            samples = {s.pod: s for s in agent.snapshot.workloads}
            if samples["good-0"].healthy and samples["good-0"].workUnits == 7:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the good pod's counter was not read within 1.5 s")
