"""The images on the local control plane: the operator image and the agent image (simulated
backend) run as containers under podman with runc, as their non-root users, with read-only root
filesystems, no capabilities, and the chart's ServiceAccounts' credentials mounted where the
kubelet mounts them (in-cluster configuration, not a kubeconfig). They must steer a sample policy
to convergence without a refused request.

The chart is installed for its RBAC, admission policies and the agents' DaemonSet pods (on KWOK
nodes they run nothing; each agent's token is bound to its node's pod, so the node restriction
applies to the container as it would to the pod). `make test-images` runs this.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from edpilot_operator.localrun import FAST_AGENT_ARGS, FAST_OPERATOR_ARGS
from images_common import AGENT, OPERATOR, Podman
from kubetest import (
    REPO,
    SIM_TRAINER,
    Cluster,
    gpu_pod,
    kwok_gpu_nodes,
    remove_gpu_nodes,
    training_policy,
    wait_for,
)
from sa_kubeconfig import agent_pod_on, service_account_token

pytestmark = [pytest.mark.images, pytest.mark.timeout(1800)]

NAMESPACE = "edpilot-images"
WORKLOADS = "edpilot-images-workloads"
RELEASE = "imagetest"
PREFIX = f"{RELEASE}-edpilot"
NODES = ("image-gpu-0", "image-gpu-1")
CHART = REPO / "charts" / "edpilot"


def trainer_pod(name: str, node: str) -> dict[str, Any]:
    """A simulated training pod: the agent on its node plays it from the sim.edpilot.io annotations."""
    return gpu_pod(
        WORKLOADS, name, image="example.invalid/trainer:1", node=node, labels={"app": "image-trainer"},
        annotations=SIM_TRAINER,
    )  # fmt: skip


POLICY = training_policy(WORKLOADS, "image-power", "image-trainer")


@pytest.fixture
def release(cluster: Cluster) -> Iterator[Cluster]:
    cluster.kubectl("apply", "-f", "-", input=kwok_gpu_nodes(len(NODES), 8, "image-gpu"))
    cluster.kubectl("wait", "--for=condition=Ready", "--timeout=60s", "node", *NODES)
    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.kubectl("create", "namespace", WORKLOADS)
    try:
        cluster.helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--set", "agent.backend=sim")
        yield cluster
    finally:
        cluster.kubectl("delete", "namespace", WORKLOADS, "--wait=true", "--timeout=60s", check=False)
        cluster.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--ignore-not-found", check=False)
        cluster.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=false", check=False)
        remove_gpu_nodes(cluster, *NODES)


def secrets_dir(cluster: Cluster, path: Path, token: str) -> Path:
    """The files the kubelet mounts into a pod for its ServiceAccount: token, ca.crt, namespace,
    readable by the image's non-root user."""
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    ca = admin["clusters"][0]["cluster"]["certificate-authority-data"]
    path.mkdir(mode=0o755)
    (path / "ca.crt").write_bytes(base64.b64decode(ca))
    (path / "token").write_text(token)
    (path / "namespace").write_text(NAMESPACE)
    for file in path.iterdir():
        file.chmod(0o644)
    return path


def api_server(cluster: Cluster) -> dict[str, str]:
    """The environment the kubelet gives every container to find the API server."""
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    url = urlsplit(admin["clusters"][0]["cluster"]["server"])
    assert url.hostname and url.port
    return {"KUBERNETES_SERVICE_HOST": url.hostname, "KUBERNETES_SERVICE_PORT": str(url.port)}


def converged(cluster: Cluster) -> bool:
    policy = cluster.get_json("energypolicy", "image-power", "-n", WORKLOADS)
    rows = (policy.get("status") or {}).get("workloads") or []
    return len(rows) == 1 and rows[0].get("phase") == "Converged" and bool(rows[0].get("powerCapWatts"))


def test_the_images_converge_a_policy_with_the_charts_credentials(
    podman: Podman, release: Cluster, tmp_path: Path
) -> None:
    node = NODES[0]
    containers = {"operator": f"edpilot-operator-{os.getpid()}", "agent": f"edpilot-agent-{os.getpid()}"}
    env = api_server(release)
    output: dict[str, str] = {}
    try:
        release.kubectl("create", "-f", "-", input=json.dumps(trainer_pod("trainer-0", node)))
        release.kubectl("create", "-f", "-", input=json.dumps(POLICY))
        operator_token = service_account_token(release, NAMESPACE, f"{PREFIX}-operator")
        podman.start(
            containers["operator"],
            OPERATOR,
            # As the chart's Deployment runs it: its RBAC names the Lease it renews.
            [
                "operator",
                "--all-namespaces",
                f"--peering={PREFIX}",
                f"--lease-name={PREFIX}-operator",
                *FAST_OPERATOR_ARGS,
            ],
            {**env, "POD_NAME": "operator-container", "POD_NAMESPACE": NAMESPACE},
            secrets_dir(release, tmp_path / "operator", operator_token),
        )
        wait_for("the agent's DaemonSet pod", lambda: agent_pod_on(release, NAMESPACE, RELEASE, node), 60)
        agent_pod = agent_pod_on(release, NAMESPACE, RELEASE, node)
        agent_token = service_account_token(release, NAMESPACE, f"{PREFIX}-agent", bound_pod=agent_pod)
        podman.start(
            containers["agent"],
            AGENT,
            ["agent", f"--node-name={node}", "--metrics-port=0", "--metrics-auth=none", *FAST_AGENT_ARGS],
            {**env, "NODE_NAME": node, "POD_NAME": agent_pod, "POD_NAMESPACE": NAMESPACE},
            secrets_dir(release, tmp_path / "agent", agent_token),
        )

        def done() -> bool:
            for name in containers.values():
                state = podman("inspect", "--format={{.State.Status}}", name).stdout.strip()
                assert state == "running", f"container {name} is {state}:\n{logs(podman, name)}"
            return converged(release)

        wait_for("the policy's workload to converge", done, 600)
        (row,) = release.get_json("energypolicy", "image-power", "-n", WORKLOADS)["status"]["workloads"]
        assert row["pods"] == [f"{WORKLOADS}/trainer-0"]
        report = release.get_json("gpunodereport", node)
        assert report["status"]["backend"] == "sim"
        assert any(gpu["enforcedLimitWatts"] < gpu["defaultLimitWatts"] for gpu in report["status"]["gpus"])
    finally:
        for name in containers.values():
            output[name] = logs(podman, name)
            print(f"----- {name}\n{output[name][-3000:]}")
            podman("rm", "--force", "--time=10", name, check=False)
    refused = [
        f"{name}: {line.strip()}"
        for name, text in output.items()
        for line in text.splitlines()
        if " 403" in line or "forbidden" in line.lower()
    ]
    assert not refused, "refused requests:\n" + "\n".join(refused[:20])


def logs(podman: Podman, name: str) -> str:
    proc = podman("logs", name, check=False)
    return proc.stdout + proc.stderr
