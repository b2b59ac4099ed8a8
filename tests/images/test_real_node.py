"""A real node beside the KWOK ones (hack/real-node.sh): a kubelet built from the pinned Kubernetes,
containerd with runc and a CNI bridge, and gpu-device-plugin advertising simulated GPUs. The kubelet
must register the node, take the plugin's nvidia.com/gpu devices, run a pod from the local agent
image under the chart's agent securityContext with two of them allocated, and report that
allocation in its real pod-resources API, where the agent's own client reads it.

Needs root and Debian's containerd (`make test-images` runs it).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from edpilot_agent.podresources import PodResourcesClient
from edpilot_agent.pods import PodInfo
from edpilot_operator.localrun import FAST_AGENT_ARGS, FAST_OPERATOR_ARGS
from images_common import AGENT, OPERATOR, REPO, TAG, Podman
from kubetest import SIM_TRAINER, Cluster, training_policy, wait_for

from edpilot.gpusim import gpu_uuid

pytestmark = [pytest.mark.images, pytest.mark.timeout(1800)]

NODE = "real-node-0"
GPUS = 4
NAMESPACE = "edpilot-real-node"


@pytest.fixture(scope="module")
def real_node(podman: Podman, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Adds the real node to the session's control plane; its socket for pod-resources."""
    archives = []
    for image in (AGENT, OPERATOR):
        archives.append(tmp_path_factory.mktemp("images") / "image.tar")
        podman("save", "--format=docker-archive", f"--output={archives[-1]}", image)
    env = {
        **podman.env,
        "CLUSTER_DIR": str(cluster.dir),
        "GPUS": str(GPUS),
        "IMAGES": " ".join(str(a) for a in archives),
    }
    proc = subprocess.run(
        [str(REPO / "hack" / "real-node.sh"), NODE], env=env, capture_output=True, text=True, timeout=1200
    )
    if proc.returncode != 0:
        pytest.fail(f"hack/real-node.sh exited {proc.returncode}:\n{proc.stderr[-6000:]}")
    cluster.kubectl("create", "namespace", NAMESPACE)
    return Path(proc.stdout.strip().splitlines()[-1])


def test_the_kubelet_registers_the_node_with_the_plugins_gpus(real_node: Path, cluster: Cluster) -> None:
    node = cluster.get_json("node", NODE)
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.36.3"
    assert info["containerRuntimeVersion"].startswith("containerd://")
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(GPUS)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert ready["Ready"] == "True"


def gpu_pod() -> dict[str, Any]:
    """The agent image under the chart's agent securityContext, printing the devices it was given."""
    script = "import os, time; print(os.environ['NVIDIA_VISIBLE_DEVICES'], flush=True); time.sleep(3600)"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "gpu-probe", "namespace": NAMESPACE},
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "probe",
                    "image": AGENT,
                    "imagePullPolicy": "Never",
                    "command": ["/opt/edpilot/bin/python3", "-c", script],
                    "resources": {"limits": {"nvidia.com/gpu": "2"}},
                    "securityContext": {
                        "readOnlyRootFilesystem": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def container_output(pod: dict[str, Any]) -> str:
    """The container's log, read where the kubelet writes it (the API server cannot reach this
    kubelet's port by the node's name)."""
    uid = pod["metadata"]["uid"]
    path = Path(f"/var/log/pods/{NAMESPACE}_gpu-probe_{uid}/probe/0.log")
    return path.read_text() if path.exists() else ""


def test_a_pod_gets_two_gpus_and_pod_resources_reports_them(real_node: Path, cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(gpu_pod()))
    try:
        cluster.kubectl("wait", "--for=condition=Ready", "--timeout=180s", "-n", NAMESPACE, "pod/gpu-probe")
        pod = cluster.get_json("pod", "gpu-probe", "-n", NAMESPACE)
        line = wait_for("the container's output", lambda: container_output(pod).strip(), 30)
        given = line.split()[-1].split(",")  # "<time> stdout F <ids>"
        client = PodResourcesClient(str(real_node))
        allocations = client.allocations(
            [PodInfo(NAMESPACE, "gpu-probe", ip="", phase="Running", gpu_request=2)]
        )
        devices = allocations[f"{NAMESPACE}/gpu-probe"].plugin
        assert sorted(devices) == sorted(given) and len(devices) == 2
        # The plugin's IDs are the simulated backend's UUIDs for this node: a sim agent would agree.
        assert set(devices) <= {gpu_uuid(NODE, i) for i in range(GPUS)}
    finally:
        cluster.kubectl("delete", "pod", "gpu-probe", "-n", NAMESPACE, "--wait=false", check=False)


def test_deleting_the_pod_frees_its_gpus(real_node: Path, cluster: Cluster) -> None:
    cluster.kubectl("delete", "pod", "gpu-probe", "-n", NAMESPACE, "--ignore-not-found", "--timeout=60s")
    client = PodResourcesClient(str(real_node))
    deadline = time.monotonic() + 60
    while True:
        left = client.allocations([PodInfo(NAMESPACE, "gpu-probe", ip="", phase="Running", gpu_request=2)])
        if not left.get(f"{NAMESPACE}/gpu-probe"):
            break
        assert time.monotonic() < deadline, f"the kubelet still reports {left}"
        time.sleep(1)


# ---------------------------------------------------------------- the chart on the real node

RELEASE = "realnode"
POLICY_NAME = "real-node-power"
POLICY = training_policy(NAMESPACE, POLICY_NAME, "real-trainer")


def trainer_pod() -> dict[str, Any]:
    """A training pod the simulated agent plays (sim.edpilot.io annotations) on the two GPUs the
    real kubelet gives it; its container is the local pause image."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "trainer",
            "namespace": NAMESPACE,
            "labels": {"app": "real-trainer"},
            "annotations": SIM_TRAINER,
        },
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "trainer",
                    "image": "localhost/edpilot/pause:local",
                    "imagePullPolicy": "Never",
                    "resources": {"limits": {"nvidia.com/gpu": "2"}},
                }
            ],
        },
    }


def chart_values(pod_resources: Path) -> dict[str, Any]:
    """The local images, never pulled; simulated GPUs whose allocation the real kubelet makes."""
    image = {"tag": TAG, "pullPolicy": "Never"}
    operator = {"repository": OPERATOR.rsplit(":", 1)[0], **image}
    # The session's KWOK nodes would take the Deployments' pods and run nothing.
    here = {"kubernetes.io/hostname": NODE}
    return {
        "operator": {"image": operator, "extraArgs": list(FAST_OPERATOR_ARGS), "nodeSelector": here},
        "extender": {"image": operator, "nodeSelector": here},
        "agent": {
            "image": {"repository": AGENT.rsplit(":", 1)[0], **image},
            "backend": "sim",
            "sim": {"gpus": GPUS, "podResources": True},
            "podResourcesPath": str(pod_resources.parent),
            "extraArgs": [a for a in FAST_AGENT_ARGS if not a.startswith("--backend")],
        },
    }


def test_the_chart_runs_on_the_real_node_and_converges_a_policy(
    real_node: Path, cluster: Cluster, tmp_path: Path
) -> None:
    values = tmp_path / "values.json"
    values.write_text(json.dumps(chart_values(real_node)))
    release_namespace = f"{NAMESPACE}-system"
    cluster.kubectl("create", "namespace", release_namespace)
    try:
        cluster.helm(
            "install", RELEASE, str(REPO / "charts" / "edpilot"), "-n", release_namespace,
            "-f", str(values), "--wait", "--timeout=5m",
        )  # fmt: skip

        def ready() -> dict[str, bool]:
            pods = cluster.get_json("pods", "-n", release_namespace, f"--field-selector=spec.nodeName={NODE}")
            return {
                p["metadata"]["labels"]["app.kubernetes.io/component"]: all(
                    c["ready"] for c in p["status"].get("containerStatuses", [])
                )
                for p in pods["items"]
            }

        everything = {"operator": True, "extender": True, "agent": True}
        wait_for("the operator, extender and agent pods to be Ready", lambda: ready() == everything, 180)
        cluster.kubectl("apply", "-f", "-", input=json.dumps(trainer_pod()))
        cluster.kubectl("apply", "-f", "-", input=json.dumps(POLICY))
        cluster.kubectl("wait", "--for=condition=Ready", "--timeout=120s", "-n", NAMESPACE, "pod/trainer")

        def converged() -> dict[str, Any] | None:
            policy = cluster.get_json("energypolicy", POLICY_NAME, "-n", NAMESPACE)
            rows = (policy.get("status") or {}).get("workloads") or []
            return rows[0] if len(rows) == 1 and rows[0].get("phase") == "Converged" else None

        row = wait_for("the trainer's workload to converge", converged, 600)
        assert row["pods"] == [f"{NAMESPACE}/trainer"] and row["powerCapWatts"]
        # The agent's report names the GPUs the real kubelet gave the pod, and caps them.
        given = PodResourcesClient(str(real_node)).allocations([])[f"{NAMESPACE}/trainer"].plugin
        report = cluster.get_json("gpunodereport", NODE)["status"]
        held = {g["uuid"]: g for g in report["gpus"] if f"{NAMESPACE}/trainer" in g["pods"]}
        assert report["backend"] == "sim" and sorted(held) == sorted(given) and len(given) == 2
        assert all(g["enforcedLimitWatts"] < g["defaultLimitWatts"] for g in held.values())
    finally:
        print(cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout)
        for pod in cluster.get_json("pods", "-n", release_namespace)["items"]:
            uid = pod["metadata"]["uid"]
            for log in sorted(Path("/var/log/pods").glob(f"{release_namespace}_*_{uid}/*/*.log")):
                print(f"----- {log}\n" + "\n".join(log.read_text().splitlines()[-40:]))
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        cluster.helm("uninstall", RELEASE, "-n", release_namespace, "--wait", check=False)
        cluster.kubectl("delete", "namespace", release_namespace, "--wait=false", check=False)
