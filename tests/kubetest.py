"""The real local control plane as tests see it: the pinned binaries and its kubeconfig."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edpilot.contract import state_name

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO / "crds"


# A bf16 training job at batch 256, as the simulated agent plays it (sim.edpilot.io annotations).
SIM_TRAINER = {
    "sim.edpilot.io/workload": "training",
    "sim.edpilot.io/precision": "bf16",
    "sim.edpilot.io/batch-size": "256",
}


def training_policy(namespace: str, name: str, app: str) -> dict[str, Any]:
    """An EDP policy with an automatic power cap over the training pods labelled app=`app`."""
    return {
        "apiVersion": "edpilot.io/v1alpha1",
        "kind": "EnergyPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "objective": "EDP",
            "maxSlowdownPercent": 5,
            "powerCap": {"mode": "Auto", "minPercent": 40, "maxPercent": 100},
            "workMetric": {"port": 9400, "name": "training_samples_total", "unit": "samples"},
        },
    }


def gpu_pod(
    namespace: str,
    name: str,
    *,
    image: str,
    node: str | None = None,
    gpus: int = 1,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A pod asking for `gpus` nvidia.com/gpu: bound to `node` when given (KWOK then runs it), else
    left to a scheduler. Further keyword arguments are fields of its spec."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if annotations:
        metadata["annotations"] = dict(annotations)
    if node is not None:
        spec = {"nodeName": node, **spec}
    container = {"name": "main", "image": image, "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {**spec, "containers": [container]},
    }


@dataclass(frozen=True)
class Cluster:
    """A running local control plane and the pinned binaries that drive it."""

    dir: Path
    kubeconfig: Path
    bin: Path

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bin / "helm"), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc


def kwok_gpu_nodes(count: int, gpus: int, prefix: str, product: str | None = None) -> str:
    """The manifest of `count` KWOK GPU nodes named `<prefix>-<i>` (hack/gpu-nodes.sh)."""
    args = [
        str(REPO / "hack" / "gpu-nodes.sh"),
        str(count),
        str(gpus),
        prefix,
        *([product] if product else []),
    ]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def add_gpu_node(cluster: Cluster, name: str, gpus: int, taint: str, labels: Mapping[str, str] = {}) -> None:
    """One KWOK GPU node `name` (`<prefix>-0`), labelled, and tainted so only this test's pods land."""
    cluster.kubectl("apply", "-f", "-", input=kwok_gpu_nodes(1, gpus, name.rsplit("-", 1)[0]))
    if labels:
        cluster.kubectl("label", "node", name, *(f"{k}={v}" for k, v in labels.items()), "--overwrite")
    cluster.kubectl("taint", "node", name, f"{taint}=true:NoSchedule", "--overwrite")


def remove_gpu_nodes(cluster: Cluster, *nodes: str) -> None:
    """Delete test GPU nodes and their reports. The operator that would release a report's
    finalizer may already be stopped, so the finalizer is dropped first."""
    for node in nodes:
        cluster.kubectl(
            "patch",
            "gpunodereport",
            node,
            "--type=merge",
            "-p",
            '{"metadata":{"finalizers":null}}',
            check=False,
        )
    cluster.kubectl("delete", "gpunodereports", *nodes, "--ignore-not-found", "--wait=false", check=False)
    cluster.kubectl("delete", "node", *nodes, "--ignore-not-found", check=False)


def print_log_tails(logs: Path, lines: int = 20) -> None:
    """The last lines of each process log, for the failure report pytest shows."""
    for log in sorted(logs.glob("*.log")):
        print(
            f"--- {log.name} (last lines)\n"
            + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], seconds: float = 60) -> Any:
    """Poll `check` every half second until it returns something truthy, and return that."""
    deadline = time.monotonic() + seconds
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out after {seconds:.0f} s waiting for {what}"
        time.sleep(0.5)
    return result


def tool_dir() -> Path:
    proc = subprocess.run([str(REPO / "hack" / "build-tools.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"building the control-plane binaries failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def with_states(
    rows: Iterable[Mapping[str, Any]], objects: Iterable[Mapping[str, Any]], policy: str
) -> list[dict[str, Any]]:
    """A policy's status rows, each with the optimizer state its WorkloadOptimizerState holds (of
    `objects`, the namespace's) under "optimizer", where the status kept it before the states moved
    to their own objects; None where it has none."""
    held = {
        o["spec"]["workload"]: o["spec"]["state"]
        for o in objects
        if (o.get("spec") or {}).get("policy") == policy
        and o["metadata"]["name"] == state_name(policy, o["spec"]["workload"])
    }
    return [{**r, "optimizer": held.get(r["name"], r.get("optimizer"))} for r in rows]


def policy_rows_with_states(cluster: Cluster, namespace: str, policy: str) -> list[dict[str, Any]]:
    """The policy's status rows with their optimizer states (`with_states`), read from the API."""
    body = cluster.get_json("energypolicy", policy, "-n", namespace)
    rows = (body.get("status") or {}).get("workloads") or []
    return with_states(rows, cluster.get_json("workloadoptimizerstates", "-n", namespace)["items"], policy)
