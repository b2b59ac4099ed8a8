"""The agent against the real control plane: a NodeAgent (simulated backend) for KWOK node
gpu-node-0 reports, applies a spec (caps and locked clocks), restores defaults (and resets locks)
when the lease runs out or the pod goes away, and never acts on another node's spec; `edpilot
agent` restores defaults and resets locks on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from edpilot_agent.agent import NodeAgent, SystemClock
from edpilot_agent.kube import KubeClient
from edpilot_agent.main import run
from edpilot_agent.sim import SimBackend, SimWorkloads

T = TypeVar("T")
NODE, OTHER_NODE, CLI_NODE = "gpu-node-0", "gpu-node-1", "gpu-node-2"
NAMESPACE = "agent-test"
LEASE_SECONDS = 5


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class RunningAgent:
    cluster: Any
    agent: NodeAgent
    backend: SimBackend

    def report(self, node: str = NODE) -> dict[str, Any]:
        proc = self.cluster.kubectl("get", "gpunodereport", node, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else {}

    def limit(self, index: int) -> float:
        return self.backend.devices[index].power_limit_watts

    def locked(self, index: int) -> float | None:
        return self.backend.devices[index].locked_clock_mhz

    def uuid(self, index: int) -> str:
        return self.backend.devices[index].uuid

    def patch_spec(self, spec: dict[str, Any], node: str = NODE) -> None:
        self.cluster.kubectl(
            "patch", "gpunodereport", node, "--type", "merge", "-p", json.dumps({"spec": spec})
        )


def fresh_lease(seconds: int = LEASE_SECONDS) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {"holderIdentity": "agent-test", "renewTime": now, "leaseSeconds": seconds}


def gpu_pod(name: str, node: str = NODE) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "annotations": {"sim.edpilot.io/workload": "llm-decode", "sim.edpilot.io/batch-size": "16"},
            },
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "containers": [
                    {
                        "name": "llm",
                        "image": "example.com/llm:1",
                        "resources": {"limits": {"nvidia.com/gpu": "1"}},
                    }
                ],
            },
        }
    )


@pytest.fixture(scope="module")
def running(crds_installed: Any) -> Iterator[RunningAgent]:
    cluster = crds_installed
    cluster.kubectl("create", "namespace", NAMESPACE)
    backend = SimBackend(NODE, gpus=8, seed=7, speed=10.0, reload_delay_seconds=1.0)
    workloads = SimWorkloads(backend)
    kube = KubeClient(NODE, str(cluster.kubeconfig))
    agent = NodeAgent(
        NODE,
        backend,
        workloads,
        kube,
        SystemClock(),
        allocations=workloads,
        default_interval_seconds=2.0,
        min_interval_seconds=0.5,
    )
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(agent, stop, 0.2), daemon=True)
    thread.start()
    try:
        yield RunningAgent(cluster, agent, backend)
    finally:
        stop.set()
        thread.join(timeout=10)
        kube.close()
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        cluster.kubectl(
            "delete", "gpunodereport", NODE, OTHER_NODE, CLI_NODE, "--ignore-not-found", check=False
        )


def gpu_holding(report: dict[str, Any], pod: str) -> dict[str, Any] | None:
    return next((g for g in report.get("status", {}).get("gpus", []) if pod in g.get("pods", [])), None)


def condition(report: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in report.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def test_the_agent_creates_its_report_and_writes_status(running: RunningAgent) -> None:
    report = wait_for(
        "a status with 8 GPUs", lambda: (r := running.report()).get("status", {}).get("gpus") and r
    )
    status = report["status"]
    assert status["nodeName"] == NODE and status["backend"] == "sim"
    assert [g["index"] for g in status["gpus"]] == list(range(8))
    assert {g["uuid"] for g in status["gpus"]} == {running.uuid(i) for i in range(8)}
    assert all(g["enforcedLimitWatts"] == g["defaultLimitWatts"] == 700 for g in status["gpus"])
    assert condition(report, "LeaseValid")["reason"] == "NoLease"
    first = {g["uuid"]: g["energyJoules"] for g in status["gpus"]}
    later = wait_for(
        "a newer status", lambda: (r := running.report())["status"]["time"] != status["time"] and r
    )
    assert all(g["energyJoules"] > first[g["uuid"]] for g in later["status"]["gpus"])


def test_a_spec_cap_and_lock_are_applied_then_restored_when_the_lease_expires(running: RunningAgent) -> None:
    running.cluster.kubectl("apply", "-f", "-", input=gpu_pod("llm-0"))
    gpu = wait_for("the pod to hold a GPU", lambda: gpu_holding(running.report(), f"{NAMESPACE}/llm-0"), 60)
    index = gpu["index"]
    assert 0 < gpu["minSmClockMHz"] < 1200 < gpu["maxSmClockMHz"] and "lockedSmClockMHz" not in gpu
    running.patch_spec(
        {
            "powerLimits": [{"gpuUUID": gpu["uuid"], "watts": 450, "pod": f"{NAMESPACE}/llm-0"}],
            "lockedClocks": [{"gpuUUID": gpu["uuid"], "maxMHz": 1200, "pod": f"{NAMESPACE}/llm-0"}],
            "workloads": [{"namespace": NAMESPACE, "pod": "llm-0", "metricName": "tokens", "unit": "token"}],
            "lease": fresh_lease(),
            "reportIntervalSeconds": 1,
        }
    )
    written = time.monotonic()
    wait_for("the cap on the simulated GPU", lambda: running.limit(index) == 450, 10)
    assert running.locked(index) == 1200
    report = wait_for(
        "the cap and the lock in the status",
        lambda: (
            (g := (r := running.report())["status"]["gpus"][index])["enforcedLimitWatts"] == 450
            and g.get("lockedSmClockMHz") == 1200
            and r
        ),
    )
    assert condition(report, "SpecApplied")["status"] == "True"
    [work] = report["status"]["workloads"]
    assert work["pod"] == "llm-0" and work["unit"] == "token" and work["gpuUUIDs"] == [gpu["uuid"]]
    assert work["batchSize"] == 16 and work["healthy"]

    wait_for("the default after the lease expired", lambda: running.limit(index) == 700, LEASE_SECONDS + 5)
    # The agent judges the lease from when it saw renewTime; one report interval (1 s) of slack.
    assert time.monotonic() - written <= LEASE_SECONDS + 1 + 0.5
    assert running.locked(index) is None  # reset in the same tick
    report = wait_for(
        "LeaseExpired in the status",
        lambda: condition(r := running.report(), "LeaseValid").get("reason") == "LeaseExpired" and r,
    )
    assert report["status"]["gpus"][index]["enforcedLimitWatts"] == 700
    assert "lockedSmClockMHz" not in report["status"]["gpus"][index]


def renew_lease(cluster: Any, name: str = "op-lease", seconds: int = LEASE_SECONDS) -> None:
    """Create or renew a coordination.k8s.io Lease as the operator does (MicroTime renewTime)."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"holderIdentity": "operator-0", "leaseDurationSeconds": seconds, "renewTime": now},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(lease))


def test_a_cap_holds_while_the_named_lease_object_is_renewed_and_goes_when_it_lapses_or_goes(
    running: RunningAgent,
) -> None:
    """The agent watches the Lease its spec names: each renewal reaches it (a cap outlives several
    lease lengths while renewed), a lapse or a deleted Lease restores the default."""
    pod = f"{NAMESPACE}/llm-0"
    gpu = wait_for("the pod to hold a GPU", lambda: gpu_holding(running.report(), pod), 60)
    index = gpu["index"]
    renew_lease(running.cluster)
    running.patch_spec(
        {
            "powerLimits": [{"gpuUUID": gpu["uuid"], "watts": 450, "pod": pod}],
            "lockedClocks": [],
            "lease": None,
            "operatorLease": {"namespace": NAMESPACE, "name": "op-lease"},
            "reportIntervalSeconds": 1,
        }
    )
    wait_for("the cap under the named Lease", lambda: running.limit(index) == 450, 10)
    wait_for("LeaseHeld", lambda: condition(running.report(), "LeaseValid").get("reason") == "LeaseHeld")
    held_until = time.monotonic() + 2.5 * LEASE_SECONDS
    while time.monotonic() < held_until:  # renewed every 2 s: the cap stays
        renew_lease(running.cluster)
        last = time.monotonic()
        assert running.limit(index) == 450
        time.sleep(2)
    assert running.limit(index) == 450
    wait_for("the default after the Lease lapsed", lambda: running.limit(index) == 700, LEASE_SECONDS + 5)
    # Judged from when the agent saw the last renewTime: not before the lease, within a tick after.
    assert LEASE_SECONDS - 0.5 <= time.monotonic() - last <= LEASE_SECONDS + 1.5
    wait_for(
        "LeaseExpired", lambda: condition(running.report(), "LeaseValid").get("reason") == "LeaseExpired"
    )

    renew_lease(running.cluster)
    wait_for("the cap back after a renewal", lambda: running.limit(index) == 450, 10)
    running.cluster.kubectl("delete", "lease", "op-lease", "-n", NAMESPACE)
    wait_for("the default once the Lease is gone", lambda: running.limit(index) == 700, 10)
    gone = wait_for(
        "NoLease", lambda: (c := condition(running.report(), "LeaseValid")).get("reason") == "NoLease" and c
    )
    assert f"{NAMESPACE}/op-lease does not exist" in gone["message"]
    running.patch_spec({"powerLimits": [], "operatorLease": None})


def test_deleting_the_pod_restores_the_default(running: RunningAgent) -> None:
    running.cluster.kubectl("apply", "-f", "-", input=gpu_pod("llm-1"))
    gpu = wait_for("the pod to hold a GPU", lambda: gpu_holding(running.report(), f"{NAMESPACE}/llm-1"), 60)
    index = gpu["index"]
    running.patch_spec(
        {
            "powerLimits": [{"gpuUUID": gpu["uuid"], "watts": 380, "pod": f"{NAMESPACE}/llm-1"}],
            "lockedClocks": [{"gpuUUID": gpu["uuid"], "maxMHz": 1000, "pod": f"{NAMESPACE}/llm-1"}],
            "lease": fresh_lease(600),
        }
    )
    wait_for(
        "the cap and the lock", lambda: running.limit(index) == 380 and running.locked(index) == 1000, 10
    )
    running.cluster.kubectl("delete", "pod", "-n", NAMESPACE, "llm-1", "--wait=false")
    wait_for("the default after the pod went away", lambda: running.limit(index) == 700, 30)
    assert running.locked(index) is None
    running.patch_spec({"powerLimits": [], "lockedClocks": [], "lease": None})


def test_another_nodes_spec_is_never_applied_and_a_foreign_uuid_is_refused(running: RunningAgent) -> None:
    pod = f"{NAMESPACE}/llm-0"
    gpu = wait_for("llm-0 on a GPU", lambda: gpu_holding(running.report(), pod), 30)
    other = {"apiVersion": "edpilot.io/v1alpha1", "kind": "GPUNodeReport", "metadata": {"name": OTHER_NODE}}
    running.cluster.kubectl("apply", "-f", "-", input=json.dumps(other))
    running.patch_spec(
        {
            "powerLimits": [
                {"gpuUUID": gpu["uuid"], "watts": 300, "pod": pod}
            ],  # this node's GPU, in node-1's report
            "lease": fresh_lease(600),
        },
        node=OTHER_NODE,
    )
    running.patch_spec(
        {
            "powerLimits": [{"gpuUUID": "GPU-00000000-not-on-this-node", "watts": 300, "pod": pod}],
            "lease": fresh_lease(600),
        }
    )

    # Wait for this refusal itself: an earlier test's refusal may still be in the status.
    def refused_foreign_uuid() -> dict[str, Any] | None:
        report = running.report()
        message = condition(report, "SpecApplied").get("message", "")
        return report if "GPU-00000000-not-on-this-node" in message else None

    report = wait_for("the refusal in the status", refused_foreign_uuid)
    assert condition(report, "SpecApplied")["reason"] == "Refused"
    assert "GPU-00000000-not-on-this-node is not on this node" in condition(report, "SpecApplied")["message"]
    time.sleep(2)  # several ticks: nothing may change
    assert [running.limit(i) for i in range(8)] == [700] * 8
    running.patch_spec({"powerLimits": [], "lease": None})


def test_a_fast_simulated_node_writes_wall_clock_timestamps(running: RunningAgent) -> None:
    """`edpilot agent --sim-speed 30`: kubectl shows the report's age, not `<invalid>` (a time in
    the future); the simulated clock runs 30x in status.counterTime."""
    cluster = running.cluster
    proc = subprocess.Popen(
        [sys.executable, "-m", "edpilot.cli", "agent", "--backend=sim", f"--node-name={CLI_NODE}",
         f"--kubeconfig={cluster.kubeconfig}", "--metrics-port=0", "--tick=0.2", "--default-interval=1",
         "--min-interval=1", "--sim-speed=30"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    started = time.time()
    try:
        first = wait_for(
            "a report of this agent",
            lambda: (
                (s := running.report(CLI_NODE).get("status", {})) and stamp(s["time"]) >= started - 1 and s
            ),
            60,
        )
        last = wait_for(
            "a report 3 s later",
            lambda: (
                (s := running.report(CLI_NODE).get("status", {}))
                and stamp(s["time"]) >= stamp(first["time"]) + 3
                and s
            ),
            30,
        )
        shown = cluster.kubectl("get", "gpunodereport", CLI_NODE, "--no-headers").stdout.split()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert abs(stamp(last["time"]) - time.time()) < 15  # the wall clock, give or take a report
    assert shown[-1] != "<invalid>" and shown[-1].endswith("s"), shown  # UPDATED: an age in seconds
    wall = stamp(last["time"]) - stamp(first["time"])
    simulated = stamp(last["counterTime"]) - stamp(first["counterTime"])
    assert simulated == pytest.approx(30 * wall, rel=0.05)


def stamp(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def test_the_agent_command_restores_defaults_on_sigterm(running: RunningAgent) -> None:
    cluster = running.cluster
    cluster.kubectl("apply", "-f", "-", input=gpu_pod("llm-2", node=CLI_NODE))
    env = {**os.environ, "NODE_NAME": CLI_NODE}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edpilot.cli",
            "agent",
            "--backend",
            "sim",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--metrics-port",
            "0",
            "--tick",
            "0.2",
            "--default-interval",
            "2",
            "--sim-speed",
            "10",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        gpu = wait_for(
            "llm-2 on a GPU of the CLI agent",
            lambda: gpu_holding(running.report(CLI_NODE), f"{NAMESPACE}/llm-2"),
            60,
        )
        running.patch_spec(
            {
                "powerLimits": [{"gpuUUID": gpu["uuid"], "watts": 420, "pod": f"{NAMESPACE}/llm-2"}],
                "lockedClocks": [{"gpuUUID": gpu["uuid"], "maxMHz": 1100, "pod": f"{NAMESPACE}/llm-2"}],
                "lease": fresh_lease(600),
            },
            node=CLI_NODE,
        )
        wait_for(
            "the cap and the lock in the CLI agent's status",
            lambda: (
                (g := running.report(CLI_NODE)["status"]["gpus"][gpu["index"]])["enforcedLimitWatts"] == 420
                and g.get("lockedSmClockMHz") == 1100
            ),
            15,
        )
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "received SIGTERM" in output
    report = running.report(CLI_NODE)
    assert report["status"]["gpus"][gpu["index"]]["enforcedLimitWatts"] == 700
    assert "lockedSmClockMHz" not in report["status"]["gpus"][gpu["index"]]  # reset on SIGTERM
    assert condition(report, "Ready")["reason"] == "AgentStopped"
