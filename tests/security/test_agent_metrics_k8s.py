"""Issue 14, findings 6 and 7 (agent side), on the real control plane. The agent runs as `edpilot
agent` with the chart's RBAC (rendered by helm, applied as is). Its /metrics names every pod of the
node and what it draws: a tenant (a ServiceAccount with a namespaced Role) must not read it, nor
anyone without credentials; a monitoring identity allowed `get` on /metrics may. The agent's own
credentials create no events and read no single pod."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubetest import Cluster, free_port
from sa_kubeconfig import service_account_kubeconfig, service_account_token

CHART = Path(__file__).resolve().parents[2] / "charts" / "edpilot"
SYSTEM_NS, TENANT_NS, MONITORING_NS = "edpilot-sec", "tenant-sec", "monitoring-sec"
AGENT_SA = "rel-edpilot-agent"
NODE = "sec-metrics-node"  # no such node: the agent only needs a report name of its own


def status_of(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def apply(cluster: Cluster, *docs: dict[str, object]) -> None:
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))


@pytest.fixture(scope="module")
def identities(cluster: Cluster) -> Iterator[Cluster]:
    """The chart's agent RBAC, a tenant with a namespaced Role, and a monitoring identity."""
    for ns in (SYSTEM_NS, TENANT_NS, MONITORING_NS):
        cluster.kubectl("create", "namespace", ns)
    rendered = subprocess.run(
        [str(cluster.bin / "helm"), "template", "rel", str(CHART), "-n", SYSTEM_NS,
         "--kube-version", "1.36.3", "--set", "agent.backend=sim",
         "--show-only", "templates/agent/serviceaccount.yaml", "--show-only", "templates/agent/rbac.yaml"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=rendered)
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "tenant", "namespace": TENANT_NS},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "tenant", "namespace": TENANT_NS},
            "rules": [{"apiGroups": ["", "edpilot.io"], "resources": ["*"], "verbs": ["*"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "tenant", "namespace": TENANT_NS},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
            "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": TENANT_NS}],
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "prometheus", "namespace": MONITORING_NS},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "sec-prometheus-reads-agent-metrics"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "rel-edpilot-metrics-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": MONITORING_NS}],
        },
    )
    try:
        yield cluster
    finally:
        cluster.kubectl("delete", "clusterrolebinding", "sec-prometheus-reads-agent-metrics", check=False)
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=rendered, check=False)
        cluster.kubectl("delete", "gpunodereport", NODE, "--ignore-not-found", check=False)
        for ns in (SYSTEM_NS, TENANT_NS, MONITORING_NS):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_agent_metrics_answer_only_identities_allowed_to_read_them(
    identities: Cluster, tmp_path: Path
) -> None:
    cluster = identities
    kubeconfig = service_account_kubeconfig(cluster, SYSTEM_NS, AGENT_SA, tmp_path / "agent.kubeconfig")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edpilot.cli", "agent", "--backend", "sim", "--node-name", NODE,
         "--kubeconfig", str(kubeconfig), "--metrics-port", str(port), "--tick", "0.5"],
        env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                first = status_of(url)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the agent did not start"
                time.sleep(0.2)
        tenant = service_account_token(cluster, TENANT_NS, "tenant")
        prometheus = service_account_token(cluster, MONITORING_NS, "prometheus")

        assert first[0] == 401, "no credentials"
        assert status_of(url, "not-a-token")[0] == 401
        assert status_of(url, tenant)[0] == 403, "a tenant may not read every tenant's pods and power"
        code, text = status_of(url, prometheus)
        assert code == 200
        assert "edpilot_gpu_power_watts" in text
        # The liveness probe needs no credentials and tells nothing.
        assert status_of(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def can_i(cluster: Cluster, verb: str, resource: str, namespace: str | None = None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as=system:serviceaccount:{SYSTEM_NS}:{AGENT_SA}"]
    args += [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
    return cluster.kubectl(*args, check=False).stdout.strip() == "yes"


def test_the_agents_credentials_create_no_events_and_get_no_single_pod(identities: Cluster) -> None:
    cluster = identities
    assert not can_i(cluster, "create", "events", TENANT_NS)
    assert not can_i(cluster, "create", "events.events.k8s.io", TENANT_NS)
    assert not can_i(cluster, "get", "pods", TENANT_NS)
    assert can_i(cluster, "create", "tokenreviews.authentication.k8s.io")
    # Residual, documented: RBAC cannot restrict list/watch to a field selector.
    assert can_i(cluster, "list", "pods")
