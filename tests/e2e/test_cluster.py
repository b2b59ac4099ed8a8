"""The local control plane that every Kubernetes test stands on: pinned versions, KWOK GPU nodes
that look like NVIDIA GPU nodes, and a real kube-scheduler that binds GPU pods to them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from kubetest import gpu_pod, wait_for

if TYPE_CHECKING:
    from kubetest import Cluster

REPO = Path(__file__).resolve().parents[2]
GPU = "nvidia.com/gpu"
PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPUS_PER_NODE = 8  # tests/conftest.py starts the cluster with GPUS=8


def pinned(name: str) -> str:
    for line in (REPO / "hack" / "versions.env").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == name:
            return value
    raise KeyError(name)


def cluster_pod(name: str, gpus: int) -> dict[str, Any]:
    return gpu_pod(
        "default",
        name,
        image="registry.example/cuda-app:1.0",
        gpus=gpus,
        labels={"test": "edpilot-cluster"},
        terminationGracePeriodSeconds=0,
    )


@pytest.fixture(scope="module")
def gpu_pods(cluster: Cluster) -> Any:
    """A pod that fits (2 GPUs) and one that fits no node (9 GPUs), created together."""
    pods = {
        "fits": cluster_pod("edpilot-cluster-two-gpus", 2),
        "too-big": cluster_pod("edpilot-cluster-nine-gpus", 9),
    }
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(pods.values())}),
    )
    yield {key: pod["metadata"]["name"] for key, pod in pods.items()}
    cluster.kubectl(
        "delete", "pods", "-n", "default", "-l", "test=edpilot-cluster", "--wait=false", check=False
    )


def test_kwok_nodes_are_ready_gpu_nodes(cluster: Cluster) -> None:
    nodes = cluster.get_json("nodes", "-l", "type=kwok")["items"]
    assert len(nodes) >= 1
    for node in nodes:
        name = node["metadata"]["name"]
        ready = [c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready == ["True"], name
        assert node["status"]["allocatable"][GPU] == str(GPUS_PER_NODE), name
        assert node["status"]["capacity"][GPU] == str(GPUS_PER_NODE), name
        labels = node["metadata"]["labels"]
        assert labels["nvidia.com/gpu.product"] == PRODUCT, name
        assert labels["nvidia.com/gpu.present"] == "true", name
        assert labels["nvidia.com/gpu.count"] == str(GPUS_PER_NODE), name


def test_the_controller_manager_lifts_the_not_ready_taints(cluster: Cluster) -> None:
    """Nodes start tainted not-ready; kube-controller-manager's node lifecycle controller lifts the
    taint once KWOK reports them Ready, so nothing but GPUs limits where pods go."""

    def untainted() -> bool:
        nodes = cluster.get_json("nodes", "-l", "type=kwok")["items"]
        return all(not node["spec"].get("taints") for node in nodes)

    wait_for("the not-ready taints to go", untainted)


def test_a_pod_asking_for_two_gpus_is_scheduled_and_runs(cluster: Cluster, gpu_pods: dict[str, str]) -> None:
    name = gpu_pods["fits"]
    cluster.kubectl(
        "wait", "--for=jsonpath={.status.phase}=Running", "--timeout=60s", f"pod/{name}", "-n", "default"
    )
    pod = cluster.get_json("pod", name, "-n", "default")
    node = cluster.get_json("node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["type"] == "kwok"
    scheduled = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert scheduled["PodScheduled"] == "True" and scheduled["Ready"] == "True"
    # The binding came from kube-scheduler, not from anyone setting nodeName directly.
    events = cluster.get_json("events", "-n", "default", "--field-selector", f"involvedObject.name={name}")[
        "items"
    ]
    assert any(
        e["reason"] == "Scheduled" and e.get("reportingComponent") == "default-scheduler" for e in events
    ), events


def test_a_pod_asking_for_more_gpus_than_any_node_has_stays_pending(
    cluster: Cluster, gpu_pods: dict[str, str]
) -> None:
    name = gpu_pods["too-big"]

    def unschedulable() -> dict[str, Any] | None:
        pod = cluster.get_json("pod", name, "-n", "default")
        conditions = [c for c in pod["status"].get("conditions", []) if c["type"] == "PodScheduled"]
        return conditions[0] if conditions and conditions[0]["status"] == "False" else None

    condition = wait_for("the scheduler to give up on the 9-GPU pod", unschedulable)
    assert condition["reason"] == "Unschedulable"
    assert f"Insufficient {GPU}" in condition["message"], condition
    pod = cluster.get_json("pod", name, "-n", "default")
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")


def test_kubectl_and_the_server_are_the_pinned_version(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["clientVersion"]["gitVersion"] == pinned("KUBE_VERSION") == "v1.36.3"
    assert version["serverVersion"]["gitVersion"] == pinned("KUBE_VERSION")


@pytest.mark.parametrize("binary", ["kube-apiserver", "kube-controller-manager", "kube-scheduler"])
def test_control_plane_binaries_print_the_pinned_version(cluster: Cluster, binary: str) -> None:
    printed = subprocess.run(
        [str(cluster.bin / binary), "--version"], capture_output=True, text=True, check=True
    )
    assert printed.stdout.strip() == f"Kubernetes {pinned('KUBE_VERSION')}"


def test_helm_etcd_and_kwok_are_the_pinned_versions(cluster: Cluster) -> None:
    def version_of(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    assert version_of(str(cluster.bin / "helm"), "version", "--short").startswith(pinned("HELM_VERSION"))
    assert f"etcd Version: {pinned('ETCD_VERSION').lstrip('v')}" in version_of(
        str(cluster.bin / "etcd"), "--version"
    )
    assert f"kwok version {pinned('KWOK_VERSION')}" in version_of(str(cluster.bin / "kwok"), "--version")


def make(target: str, args: str, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
    """`make -s <target> ARGS=...` as a user runs it after the demo's `export KUBECONFIG=...`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}  # not a sub-make of CI's
    return subprocess.run(
        ["make", "-s", "-C", str(REPO), target, f"ARGS={args}"],
        env={**env, "KUBECONFIG": str(kubeconfig)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_make_kubectl_uses_the_exported_kubeconfig_and_prints_only_kubectl(cluster: Cluster) -> None:
    proc = make("kubectl", "get nodes -l type=kwok -o name", cluster.kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == cluster.kubectl("get", "nodes", "-l", "type=kwok", "-o", "name").stdout
    assert proc.stdout.startswith("node/")


def test_make_helm_uses_the_exported_kubeconfig_and_prints_only_helm(cluster: Cluster) -> None:
    proc = make("helm", "list -A -o json", cluster.kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(cluster.helm("list", "-A", "-o", "json").stdout)
