"""GPUs allocated through DRA on the real control plane (issue 19).

A KWOK GPU node gets ResourceSlices as NVIDIA's DRA driver would publish them (devices `gpu-<i>`
with `type` and `uuid` attributes: the UUIDs of the node's simulated GPUs), a DeviceClass selects
them, and the REAL kube-scheduler allocates a ResourceClaimTemplate's claim for a pod that names no
node. Beside it on the same node runs a device-plugin pod (nvidia.com/gpu), and two pods share one
ResourceClaim. The simulated agent plays the node's kubelet (it hands each pod the devices of the
claims reserved for it) and the real operator governs all four: it plans and the agent enforces caps
for the two pods that hold their GPUs alone, and the two that share a GPU are report-only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from edpilot_operator.localrun import Processes, agent_argv, operator_argv, wait_until
from kubetest import Cluster, add_gpu_node, gpu_pod, print_log_tails, remove_gpu_nodes

from edpilot import gpusim

NAMESPACE = "e2e-dra"
NODE = "dra-node-0"
DRIVER = "gpu.nvidia.com"
# The DRA driver manages GPUs 4-7 of the node; the device plugin hands out the others.
DRA_GPUS = (4, 5, 6, 7)
DEFAULT_W = 700.0
TOLERATION = {"key": "edpilot.io/e2e-dra", "operator": "Exists"}
SIM = {
    "sim.edpilot.io/workload": "llm-decode",
    "sim.edpilot.io/precision": "bf16",
    "sim.edpilot.io/batch-size": "8",
}


def uuid(index: int) -> str:
    """The UUID the simulated agent of NODE reports for GPU `index` (what NVML would say)."""
    return gpusim.gpu_uuid(NODE, index)


def dra_objects() -> list[dict[str, Any]]:
    resource_slice = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{NODE}-{DRIVER}"},
        "spec": {
            "driver": DRIVER,
            "nodeName": NODE,
            "pool": {"name": NODE, "generation": 1, "resourceSliceCount": 1},
            "devices": [
                {"name": f"gpu-{i}", "attributes": {"type": {"string": "gpu"}, "uuid": {"string": uuid(i)}}}
                for i in DRA_GPUS
            ],
        },
    }
    device_class = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": DRIVER},
        "spec": {"selectors": [{"cel": {"expression": f"device.driver == '{DRIVER}'"}}]},
    }
    request = {"name": "gpu", "exactly": {"deviceClassName": DRIVER}}
    template = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": "one-gpu", "namespace": NAMESPACE},
        "spec": {"spec": {"devices": {"requests": [request]}}},
    }
    shared = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": "shared-gpu", "namespace": NAMESPACE},
        "spec": {"devices": {"requests": [request]}},
    }
    return [resource_slice, device_class, template, shared]


POLICY = {
    "apiVersion": "edpilot.io/v1alpha1",
    "kind": "EnergyPolicy",
    "metadata": {"name": "decode", "namespace": NAMESPACE},
    "spec": {
        "selector": {"matchLabels": {"app": "decode"}},
        "objective": "EDP",
        "maxSlowdownPercent": 10,
        # Caps only: the optimizer goes from the baseline straight to power-cap probes.
        "powerCap": {"mode": "Auto", "minPercent": 40, "maxPercent": 100},
        "batchSize": {"mode": "Off"},
        "quantization": {"mode": "Off"},
        "workMetric": {"port": 8000, "name": "generated_tokens_total", "unit": "tokens"},
    },
}


def dra_pod(name: str, claim: dict[str, str]) -> dict[str, Any]:
    """A pod whose GPU comes from a claim; it names no node: the scheduler places it."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "decode"}, "annotations": SIM},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "tolerations": [TOLERATION],
            "terminationGracePeriodSeconds": 0,
            "resourceClaims": [{"name": "gpu", **claim}],
            "containers": [
                {"name": "main", "image": "example.com/llm:1", "resources": {"claims": [{"name": "gpu"}]}}
            ],
        },
    }


def plugin_pod() -> dict[str, Any]:
    return gpu_pod(
        NAMESPACE,
        "plugin-decode",
        image="example.com/llm:1",
        labels={"app": "decode"},
        annotations=SIM,
        nodeSelector={"kubernetes.io/hostname": NODE},
        tolerations=[TOLERATION],
        terminationGracePeriodSeconds=0,
    )


@dataclass
class Run:
    cluster: Cluster
    procs: Processes

    def report(self) -> dict[str, Any]:
        """The node's GPUNodeReport ({} until its agent created it)."""
        proc = self.cluster.kubectl("get", "gpunodereport", NODE, "-o", "json", check=False)
        body: dict[str, Any] = json.loads(proc.stdout) if proc.returncode == 0 else {}
        return body

    def holders(self) -> dict[str, list[str]]:
        """GPU UUID -> the pods the agent reports on it."""
        return {g["uuid"]: g["pods"] for g in (self.report().get("status") or {}).get("gpus") or []}

    def desired(self) -> dict[str, tuple[float, str]]:
        return {
            c["gpuUUID"]: (c["watts"], c["pod"])
            for c in (self.report().get("spec") or {}).get("powerLimits") or []
        }

    def rows(self) -> dict[str, dict[str, Any]]:
        assert not self.procs.dead(), f"process exited: {self.procs.dead()}"
        status = self.cluster.get_json("energypolicy", "decode", "-n", NAMESPACE).get("status") or {}
        return {r["name"]: r for r in status.get("workloads") or []}

    def conditions(self) -> dict[str, dict[str, Any]]:
        status = self.cluster.get_json("energypolicy", "decode", "-n", NAMESPACE).get("status") or {}
        return {c["type"]: c for c in status.get("conditions") or []}


@pytest.fixture(scope="module")
def run(crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    cluster = crds_installed
    work = tmp_path_factory.mktemp("dra")
    add_gpu_node(cluster, NODE, 8, "edpilot.io/e2e-dra")
    cluster.kubectl("create", "namespace", NAMESPACE)
    procs = Processes(logs=work / "logs")
    try:
        cluster.kubectl(
            "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": dra_objects()})
        )
        procs.start("agent", agent_argv(cluster.kubeconfig, NODE, 7, "--sim-speed=30"))
        procs.start("operator", operator_argv(cluster.kubeconfig, f"--namespace={NAMESPACE}"))
        cluster.kubectl("apply", "-f", "-", input=json.dumps(POLICY))
        yield Run(cluster, procs)
    finally:
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=60s", check=False)
        procs.stop_all()
        print_log_tails(procs.logs, 25)
        cluster.kubectl("delete", "resourceslice", f"{NODE}-{DRIVER}", "--ignore-not-found", check=False)
        cluster.kubectl("delete", "deviceclass", DRIVER, "--ignore-not-found", check=False)
        remove_gpu_nodes(cluster, NODE)


def allocated_device(cluster: Cluster, pod: str) -> str:
    """The device kube-scheduler allocated to the claim of `pod` (through pod.status)."""
    body = cluster.get_json("pod", pod, "-n", NAMESPACE)
    (status,) = body["status"]["resourceClaimStatuses"]
    claim = cluster.get_json("resourceclaim", status["resourceClaimName"], "-n", NAMESPACE)
    (result,) = claim["status"]["allocation"]["devices"]["results"]
    assert result["driver"] == DRIVER and result["pool"] == NODE
    return str(result["device"])


def test_the_scheduler_allocates_a_claim_template_and_the_operator_caps_its_gpu(run: Run) -> None:
    cluster = run.cluster
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps(dra_pod("dra-decode", {"resourceClaimTemplateName": "one-gpu"}))
    )
    cluster.kubectl("apply", "-f", "-", input=json.dumps(plugin_pod()))

    def scheduled() -> bool:
        pods = cluster.get_json("pods", "-n", NAMESPACE)["items"]
        return len(pods) == 2 and all(p["spec"].get("nodeName") == NODE for p in pods)

    wait_until("the scheduler to place both pods", scheduled, 60, interval=0.5)
    device = allocated_device(cluster, "dra-decode")
    index = int(device.removeprefix("gpu-"))
    assert index in DRA_GPUS, device
    dra_gpu = uuid(index)

    # The agent maps the claim's device to the GPU the slice names; the device-plugin pod gets a
    # GPU the DRA driver does not manage.
    wait_until(
        "the agent to report both pods",
        lambda: (
            run.holders().get(dra_gpu) == [f"{NAMESPACE}/dra-decode"]
            and any(p == [f"{NAMESPACE}/plugin-decode"] for p in run.holders().values())
        ),
        60,
        interval=0.5,
    )
    plugin_gpu = next(u for u, p in run.holders().items() if p == [f"{NAMESPACE}/plugin-decode"])
    assert plugin_gpu in {uuid(i) for i in range(8) if i not in DRA_GPUS}

    # The operator governs both and plans caps below the default as it probes.
    def probing() -> bool:
        desired = run.desired()
        return all(
            u in desired and desired[u][0] < DEFAULT_W - 1 and desired[u][1] == f"{NAMESPACE}/{pod}"
            for u, pod in ((dra_gpu, "dra-decode"), (plugin_gpu, "plugin-decode"))
        )

    wait_until("caps below the default for both GPUs", probing, 240, interval=1)
    rows = run.rows()
    assert rows["dra-decode"]["gpus"] == 1 and rows["dra-decode"]["nodes"] == [NODE]
    assert rows["plugin-decode"]["gpus"] == 1
    assert not rows["dra-decode"]["message"].startswith("report-only")
    pod = cluster.get_json("pod", "dra-decode", "-n", NAMESPACE)
    assert pod["metadata"]["annotations"]["edpilot.io/policy"] == "decode"

    # The agent enforces what the operator planned on the GPU DRA allocated.
    def enforced() -> bool:
        gpus = {g["uuid"]: g for g in run.report()["status"]["gpus"]}
        desired = run.desired()
        return dra_gpu in desired and gpus[dra_gpu]["enforcedLimitWatts"] == pytest.approx(
            desired[dra_gpu][0], abs=1
        )

    wait_until("the DRA GPU's cap to be enforced", enforced, 30, interval=0.5)
    assert run.conditions()["ExclusiveGPUs"]["status"] == "True"


def test_pods_sharing_a_claim_are_measured_but_never_capped(run: Run) -> None:
    cluster = run.cluster
    for name in ("shared-a", "shared-b"):
        cluster.kubectl(
            "apply", "-f", "-", input=json.dumps(dra_pod(name, {"resourceClaimName": "shared-gpu"}))
        )
    wait_until(
        "the scheduler to place the sharing pods",
        lambda: all(
            cluster.get_json("pod", n, "-n", NAMESPACE)["spec"].get("nodeName") == NODE
            for n in ("shared-a", "shared-b")
        ),
        60,
        interval=0.5,
    )
    claim = cluster.get_json("resourceclaim", "shared-gpu", "-n", NAMESPACE)
    assert {r["name"] for r in claim["status"]["reservedFor"]} == {"shared-a", "shared-b"}
    (result,) = claim["status"]["allocation"]["devices"]["results"]
    shared_gpu = uuid(int(result["device"].removeprefix("gpu-")))
    both = sorted(f"{NAMESPACE}/{n}" for n in ("shared-a", "shared-b"))
    wait_until(
        "the agent to report both on one GPU", lambda: run.holders().get(shared_gpu) == both, 60, interval=0.5
    )

    def report_only() -> bool:
        rows = run.rows()
        return all(
            n in rows and rows[n]["message"].startswith(f"report-only, no power cap: GPU {shared_gpu}")
            for n in ("shared-a", "shared-b")
        )

    wait_until("both sharing workloads to be report-only", report_only, 60, interval=1)
    condition = run.conditions()["ExclusiveGPUs"]
    assert condition["status"] == "False" and condition["reason"] == "SharedGPUs"
    # Measured (the optimizer takes its baseline) and never capped, while the others still are.
    for _ in range(10):
        assert shared_gpu not in run.desired()
        gpu = next(g for g in run.report()["status"]["gpus"] if g["uuid"] == shared_gpu)
        assert gpu["enforcedLimitWatts"] == pytest.approx(DEFAULT_W)
        wait_until("a report cycle", lambda: True, 1)
    rows = run.rows()
    assert rows["shared-a"]["gpus"] == 1 and rows["shared-a"]["phase"] in (
        "Baseline",
        "Exploring",
        "Converged",
    )
    assert len(run.desired()) >= 2  # the exclusive pods' GPUs keep theirs
