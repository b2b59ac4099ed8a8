"""Issue 14, finding 2: the agent's liveness probe must see its main loop. In the issue the probe
hit /metrics, served by its own thread, and stayed green while a tenant's endpoint held the tick."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

from edpilot_agent.agent import NodeAgent, SystemClock
from edpilot_agent.kube import InMemoryKube
from edpilot_agent.main import run
from edpilot_agent.metrics import AgentCollector, Heartbeat, serve
from edpilot_agent.pods import PodInfo
from edpilot_agent.sim import SimBackend, SimWorkloads

NODE = "gpu-node-0"


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


class StallingKube(InMemoryKube):
    """The loop stalls (here in a kube call; in the issue, in a tenant's scrape) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = threading.Event()
        self.release = threading.Event()

    def pods(self) -> list[PodInfo] | None:
        if self.stalled.is_set():
            self.release.wait(30)
        return super().pods()


def test_liveness_fails_when_the_main_loop_stalls() -> None:
    backend = SimBackend(NODE, gpus=1)
    kube = StallingKube()
    agent = NodeAgent(NODE, backend, SimWorkloads(backend), kube, SystemClock())
    heartbeat = Heartbeat(max_age_seconds=1.0)
    server = serve(
        AgentCollector(NODE, lambda: agent.snapshot, lambda: agent.applier.counts),
        0,
        addr="127.0.0.1",
        liveness=heartbeat,
    )
    url = f"http://127.0.0.1:{server.server_port}/healthz"
    stop = threading.Event()
    loop = threading.Thread(target=run, args=(agent, stop, 0.1), kwargs={"heartbeat": heartbeat}, daemon=True)
    loop.start()
    try:
        time.sleep(0.5)
        assert _get(url) == 200
        kube.stalled.set()
        time.sleep(1.5)
        assert _get(url) == 503
        kube.stalled.clear()
        kube.release.set()
        time.sleep(0.5)
        assert _get(url) == 200
    finally:
        stop.set()
        kube.release.set()
        loop.join(5)
        server.shutdown()
