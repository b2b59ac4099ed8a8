"""Issue 14, finding 6: the privileged half of the agent. The setter, the only process with
CAP_SYS_ADMIN, takes one strict request per connection from the agent's uid alone, re-checks every
limit against its own GPU inventory ([min constraint, default], never above), refuses anything else
without touching the GPU, and on stop restores what it changed. The agent reaches it through its
socket only."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from agent_helpers import FakeClock
from edpilot_agent.agent import NodeAgent
from edpilot_agent.backend import GpuBackendError, GpuInfo, GpuReading
from edpilot_agent.holdings import PodDevices
from edpilot_agent.kube import InMemoryKube
from edpilot_agent.pods import PodInfo
from edpilot_agent.setter import SetterBackend, SetterClient, SetterError, SetterServer

from edpilot.models import DesiredLockedClock, DesiredPowerLimit, GPUNodeReportSpec, Lease

# An H100 PCIe-like GPU: NVML would allow 400 W, the default is 350 W; SM clocks 345-1755 MHz.
CLOCKS = {"min_sm_clock_mhz": 345.0, "max_sm_clock_mhz": 1755.0}
GPU = GpuInfo(0, "GPU-0a1b2c3d-aaaa-bbbb-cccc-000000000000", "H100 PCIe", 200, 400, 350, **CLOCKS)  # type: ignore[arg-type]
MIG = GpuInfo(
    1,
    "GPU-0a1b2c3d-aaaa-bbbb-cccc-111111111111",
    "H100 PCIe",
    200,
    400,
    350,
    mig_enabled=True,
    **CLOCKS,  # type: ignore[arg-type]
)
# A GPU whose driver lists no supported clocks: its clocks are never locked.
OLD = GpuInfo(2, "GPU-0a1b2c3d-aaaa-bbbb-cccc-222222222222", "P100", 125, 250, 250)


@dataclass
class FakeNvml:
    """Records every setter call; limits as NVML would enforce them."""

    limits: dict[str, float] = field(
        default_factory=lambda: {GPU.uuid: 350.0, MIG.uuid: 350.0, OLD.uuid: 250.0}
    )
    calls: list[tuple[str, float]] = field(default_factory=list)
    locks: dict[str, float | None] = field(default_factory=dict)
    clock_calls: list[tuple[str, float | None]] = field(default_factory=list)

    @property
    def name(self) -> Literal["nvml"]:
        return "nvml"

    def gpus(self) -> list[GpuInfo]:
        return [GPU, MIG, OLD]

    def read(self, uuid: str, energy: bool = True) -> GpuReading:
        return GpuReading(uuid, 0.0 if energy else None, 100.0, self.limits[uuid])

    def set_power_limit(self, uuid: str, watts: float) -> None:
        if not 200 <= watts <= 400:
            raise GpuBackendError("outside NVML's constraints")
        self.calls.append((uuid, watts))
        self.limits[uuid] = watts

    def set_locked_sm_clock(self, uuid: str, max_mhz: float | None) -> None:
        if max_mhz is not None and not 345 <= max_mhz <= 1755:
            raise GpuBackendError("outside the supported clocks")
        self.clock_calls.append((uuid, max_mhz))
        self.locks[uuid] = max_mhz

    def close(self) -> None:
        pass


@dataclass
class Running:
    server: SetterServer
    nvml: FakeNvml
    path: str
    stop: threading.Event
    thread: threading.Thread

    def ask(self, request: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(self.path)
            try:
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # a refusal can be answered and closed before the request is sent; it is still read
            return sock.recv(4096)


def start(tmp_path: Path, allowed_uid: int | None = None, read_only: bool = False) -> Running:
    nvml = FakeNvml()
    path = str(tmp_path / "setter.sock")
    uid = os.getuid() if allowed_uid is None else allowed_uid
    server = SetterServer(nvml, path, uid, read_only=read_only)
    server.bind()
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    return Running(server, nvml, path, stop, thread)


@pytest.fixture
def setter(tmp_path: Path) -> Iterator[Running]:
    running = start(tmp_path)
    yield running
    running.stop.set()
    running.thread.join(5)


def test_a_cap_within_min_and_default_is_set(setter: Running) -> None:
    assert setter.ask(f"SET {GPU.uuid} 250000\n".encode()) == b"OK 250000\n"
    assert setter.nvml.calls == [(GPU.uuid, 250.0)]
    assert setter.ask(f"RESTORE {GPU.uuid}\n".encode()) == b"OK 350000\n"
    assert setter.nvml.limits[GPU.uuid] == 350.0


@pytest.mark.parametrize(
    "request_line",
    [
        f"SET {GPU.uuid} 400000\n",  # NVML allows it; above the default, edpilot never does
        f"SET {GPU.uuid} 350001\n",
        f"SET {GPU.uuid} 199999\n",
        f"SET {GPU.uuid} 0\n",
        f"SET {MIG.uuid} 250000\n",
        "SET GPU-not-on-this-node 250000\n",
        f"SET {GPU.uuid} 250.5\n",
        f"SET {GPU.uuid} -250000\n",
        f"SET {GPU.uuid} 250000 \n",
        f"SET {GPU.uuid} 250000\nSET {GPU.uuid} 200000\n",
        f"set {GPU.uuid} 250000\n",
        f"SET {GPU.uuid} 250000",  # no end of line
        f"SET {GPU.uuid} ２５００００\n",
        f"SET ../../{GPU.uuid} 250000\n",
        '{"uuid": "x", "watts": 250}\n',
        "RESET ALL\n",
        "A" * 4096 + "\n",
        "",
    ],
)
def test_anything_else_is_refused_without_touching_the_gpu(setter: Running, request_line: str) -> None:
    answer = setter.ask(request_line.encode())
    assert answer.startswith(b"ERR "), answer
    assert setter.nvml.calls == [] and setter.nvml.clock_calls == []


def test_a_clock_lock_within_the_supported_clocks_is_set_and_reset(setter: Running) -> None:
    assert setter.ask(f"LOCK {GPU.uuid} 1200\n".encode()) == b"OK 1200\n"
    assert setter.ask(f"UNLOCK {GPU.uuid}\n".encode()) == b"OK 0\n"
    assert setter.nvml.clock_calls == [(GPU.uuid, 1200.0), (GPU.uuid, None)]
    assert setter.nvml.calls == []  # no power limit touched


@pytest.mark.parametrize(
    "request_line",
    [
        f"LOCK {GPU.uuid} 1756\n",  # above the highest supported clock
        f"LOCK {GPU.uuid} 344\n",  # below the lowest
        f"LOCK {GPU.uuid} 0\n",
        f"LOCK {GPU.uuid} 99999\n",
        f"LOCK {GPU.uuid} 999999\n",
        f"LOCK {MIG.uuid} 1200\n",
        f"UNLOCK {MIG.uuid}\n",
        f"LOCK {OLD.uuid} 1000\n",  # its supported clocks are unknown
        "LOCK GPU-not-on-this-node 1200\n",
        "UNLOCK GPU-not-on-this-node\n",
        f"LOCK {GPU.uuid} 1200.5\n",
        f"LOCK {GPU.uuid} -1200\n",
        f"LOCK {GPU.uuid} 1200 \n",
        f"LOCK {GPU.uuid}\n",
        f"LOCK {GPU.uuid} 1200 345\n",  # the floor is the setter's, never the caller's
        f"LOCK {GPU.uuid} 1200\nUNLOCK {GPU.uuid}\n",
        f"lock {GPU.uuid} 1200\n",
        f"LOCK {GPU.uuid} 1200",  # no end of line
        f"LOCK {GPU.uuid} １２００\n",
        f"LOCK ../../{GPU.uuid} 1200\n",
        f"UNLOCK {GPU.uuid} 1200\n",
        "UNLOCK ALL\n",
        "UNLOCK *\n",
    ],
)
def test_a_clock_request_outside_the_rules_is_refused_without_touching_the_gpu(
    setter: Running, request_line: str
) -> None:
    answer = setter.ask(request_line.encode())
    assert answer.startswith(b"ERR "), answer
    assert setter.nvml.calls == [] and setter.nvml.clock_calls == []


def test_only_the_agents_uid_may_ask(tmp_path: Path) -> None:
    running = start(tmp_path, allowed_uid=os.getuid() + 1)
    try:
        assert running.ask(f"SET {GPU.uuid} 250000\n".encode()).startswith(b"ERR ")
        assert running.ask(f"LOCK {GPU.uuid} 1200\n".encode()).startswith(b"ERR ")
        assert running.nvml.calls == [] and running.nvml.clock_calls == []
    finally:
        running.stop.set()
        running.thread.join(5)


def test_the_client_reports_the_refusal_even_when_the_setter_closes_first(tmp_path: Path) -> None:
    """A setter that refuses the caller's uid answers and closes without reading the request: the
    client's write can fail (EPIPE) before the answer is read. The agent must still log the
    refusal, not "did not answer"."""
    running = start(tmp_path, allowed_uid=os.getuid() + 1)
    client = SetterClient(running.path, timeout_seconds=2)
    try:
        for _ in range(200):
            with pytest.raises(SetterError, match="refused"):
                client.set_power_limit(GPU.uuid, 250.0)
    finally:
        running.stop.set()
        running.thread.join(5)


def test_a_read_only_setter_changes_nothing(tmp_path: Path) -> None:
    running = start(tmp_path, read_only=True)
    try:
        assert running.ask(f"SET {GPU.uuid} 250000\n".encode()).startswith(b"ERR ")
        assert running.ask(f"RESTORE {GPU.uuid}\n".encode()).startswith(b"ERR ")
        assert running.ask(f"LOCK {GPU.uuid} 1200\n".encode()).startswith(b"ERR ")
        assert running.ask(f"UNLOCK {GPU.uuid}\n".encode()).startswith(b"ERR ")
        assert running.nvml.calls == [] and running.nvml.clock_calls == []
    finally:
        running.stop.set()
        running.thread.join(5)


def test_on_stop_it_restores_what_it_changed_and_takes_no_more_caps(setter: Running) -> None:
    assert setter.ask(f"SET {GPU.uuid} 250000\n".encode()) == b"OK 250000\n"
    assert setter.ask(f"LOCK {GPU.uuid} 1200\n".encode()) == b"OK 1200\n"
    setter.stop.set()
    setter.thread.join(5)
    assert not setter.thread.is_alive()
    assert setter.nvml.limits[GPU.uuid] == 350.0
    assert setter.nvml.locks[GPU.uuid] is None  # the lock it made is reset too
    assert not Path(setter.path).exists()
    with pytest.raises(SetterError):
        SetterClient(setter.path, timeout_seconds=1).set_power_limit(GPU.uuid, 250)


def test_while_stopping_it_resets_locks_but_takes_no_new_one(setter: Running) -> None:
    assert setter.ask(f"LOCK {GPU.uuid} 1200\n".encode()) == b"OK 1200\n"
    setter.server.draining.set()
    assert setter.ask(f"LOCK {GPU.uuid} 1000\n".encode()).startswith(b"ERR ")
    assert setter.ask(f"UNLOCK {GPU.uuid}\n".encode()) == b"OK 0\n"
    assert setter.nvml.clock_calls == [(GPU.uuid, 1200.0), (GPU.uuid, None)]


def test_the_unprivileged_agent_caps_and_restores_through_the_socket(setter: Running) -> None:
    clock = FakeClock()
    pod = PodInfo("tenant-a", "p", ip="10.0.0.5", phase="Running", gpu_request=1)
    spec = GPUNodeReportSpec(
        powerLimits=[DesiredPowerLimit(gpuUUID=GPU.uuid, watts=999, pod=pod.key)],
        lockedClocks=[DesiredLockedClock(gpuUUID=GPU.uuid, maxMHz=1200, pod=pod.key)],
        lease=Lease(holderIdentity="op", renewTime=clock.wall(), leaseSeconds=30),
    )

    class Held:
        def allocations(self, pods: object) -> dict[str, PodDevices]:
            return {pod.key: PodDevices(plugin=(GPU.uuid,))}

    class ReadOnlyNvml(FakeNvml):
        def set_power_limit(self, uuid: str, watts: float) -> None:
            raise AssertionError("the agent's own NVML must not set anything")

        def set_locked_sm_clock(self, uuid: str, max_mhz: float | None) -> None:
            raise AssertionError("the agent's own NVML must not set anything")

    reader = ReadOnlyNvml(limits=setter.nvml.limits)  # what NVML reports is what the setter set
    backend = SetterBackend(reader, SetterClient(setter.path))
    agent = NodeAgent("n", backend, Held(), InMemoryKube(spec, [pod]), clock, allocations=Held())  # type: ignore[arg-type]
    agent.tick()
    assert agent.last_plan is not None and agent.last_plan.targets[GPU.uuid] == 350.0  # 999 W: the default
    assert setter.nvml.calls == []
    # Its clocks are locked at once; at start the state of a lockable GPU is unknown: reset.
    assert setter.nvml.clock_calls == [(GPU.uuid, 1200.0)]
    spec.powerLimits[0].watts = 300
    agent.tick()
    assert setter.nvml.calls == [(GPU.uuid, 300.0)]
    agent.shutdown()
    assert setter.nvml.limits[GPU.uuid] == 350.0
    assert setter.nvml.clock_calls == [(GPU.uuid, 1200.0), (GPU.uuid, None)]
