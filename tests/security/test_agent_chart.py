"""Issue 14, findings 2, 6 and 7 (agent side), as the Helm chart deploys the agent: the container
that reads tenants' HTTP holds no privilege, only the setter container may change a power limit, the
liveness probe follows the main loop, /metrics asks for credentials, and the agent's RBAC neither
reads single pods nor creates events."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetest import tool_dir

CHART = Path(__file__).resolve().parents[2] / "charts" / "edpilot"
SETTER_SOCKET = "/run/edpilot/setter.sock"


def render(*args: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [str(tool_dir() / "helm"), "template", "rel", str(CHART), "-n", "gpu-energy",
         "--kube-version", "1.36.3", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def daemonset_pod(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (ds,) = [m for m in manifests if m["kind"] == "DaemonSet"]
    pod: dict[str, Any] = ds["spec"]["template"]["spec"]
    return pod


def containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["containers"]}


def effective_user(pod: dict[str, Any], c: dict[str, Any]) -> Any:
    return c.get("securityContext", {}).get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))


@pytest.mark.parametrize("extra", [[], ["--set", "agent.dryRun=true"]])
def test_the_container_that_reads_tenant_http_holds_no_privilege(extra: list[str]) -> None:
    pod = daemonset_pod(render(*extra))
    agent = containers(pod)["agent"]
    context = agent["securityContext"]
    assert effective_user(pod, agent) not in (None, 0)
    assert context.get("runAsNonRoot") is True or pod["securityContext"].get("runAsNonRoot") is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"] for m in agent.get("volumeMounts", [])}
    assert "/var/lib/kubelet/pod-resources" not in mounts, "the root-only kubelet socket is the setter's"
    assert f"--setter-socket={SETTER_SOCKET}" in agent["args"]


def test_only_the_setter_container_may_change_a_power_limit() -> None:
    pod = daemonset_pod(render())
    setter = containers(pod)["setter"]
    assert setter["args"][0] == "agent-setter"
    assert f"--socket={SETTER_SOCKET}" in setter["args"]
    assert "--allowed-uid=65532" in setter["args"]
    context = setter["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    assert "privileged" not in context
    assert not setter.get("ports"), "the setter listens on its unix socket only"
    # The API token is mounted into the agent container only.
    assert pod["automountServiceAccountToken"] is False
    setter_mounts = {m["mountPath"] for m in setter["volumeMounts"]}
    assert "/var/run/secrets/kubernetes.io/serviceaccount" not in setter_mounts
    agent_mounts = {m["mountPath"] for m in containers(pod)["agent"]["volumeMounts"]}
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in agent_mounts


def test_a_dry_run_setter_gets_no_capability_and_refuses_changes() -> None:
    setter = containers(daemonset_pod(render("--set", "agent.dryRun=true")))["setter"]
    assert setter["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "--read-only" in setter["args"]


def test_the_liveness_probe_follows_the_main_loop_not_the_metrics_thread() -> None:
    agent = containers(daemonset_pod(render()))["agent"]
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--metrics-auth=kube" in agent["args"]


def test_the_agents_rbac_reads_no_single_pod_and_creates_no_event() -> None:
    manifests = render()
    (role,) = [
        m for m in manifests if m["kind"] == "ClusterRole" and m["metadata"]["name"] == "rel-edpilot-agent"
    ]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule["verbs"]
    }
    assert ("", "pods", "get") not in granted
    assert not {g for g in granted if g[1] == "events"}
    assert ("authentication.k8s.io", "tokenreviews", "create") in granted
    assert ("authorization.k8s.io", "subjectaccessreviews", "create") in granted


def test_a_simulated_node_simulates_its_kubelet_without_a_setter() -> None:
    pod = daemonset_pod(render("--set", "agent.backend=sim", "--set", "agent.sim.gpus=4"))
    assert set(containers(pod)) == {"agent"}
    agent = containers(pod)["agent"]
    assert "--gpus=4" in agent["args"]
    assert not any(a.startswith("--setter-socket") for a in agent["args"])
    assert "pod-resources" not in {v["name"] for v in pod["volumes"]}


def test_a_simulated_node_with_a_real_kubelet_reads_it_through_a_read_only_setter() -> None:
    pod = daemonset_pod(
        render(
            "--set", "agent.backend=sim", "--set", "agent.sim.podResources=true", "--set", "agent.sim.gpus=4"
        )
    )
    agent, setter = containers(pod)["agent"], containers(pod)["setter"]
    assert f"--setter-socket={SETTER_SOCKET}" in agent["args"] and "--gpus=4" in agent["args"]
    # It opens no GPU, so it changes none, and needs no capability nor the NVIDIA runtime's devices.
    assert "--allocations-only" in setter["args"]
    assert setter["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "env" not in setter
    (mount,) = [m for m in setter["volumeMounts"] if m["name"] == "pod-resources"]
    assert mount == {"name": "pod-resources", "mountPath": "/var/lib/kubelet/pod-resources", "readOnly": True}
