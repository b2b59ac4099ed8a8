"""Credentials of a ServiceAccount, for running a component (or kubectl) exactly as the chart's RBAC
allows: a fresh token from the TokenRequest API in a kubeconfig of its own.

    from sa_kubeconfig import service_account_kubeconfig  # tests/chart on sys.path
    path = service_account_kubeconfig(cluster, "edpilot", "edpilot-operator", tmp_path / "kc")
    subprocess.run(["edpilot", "operator", ...], env={**os.environ, "KUBECONFIG": str(path)})

A token bound to a pod (`bound_pod=`) carries the pod's node name in the user's extra
`authentication.kubernetes.io/node-name`, like the token the kubelet mounts into that pod.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from kubetest import Cluster


def service_account_token(
    cluster: Cluster,
    namespace: str,
    service_account: str,
    *,
    bound_pod: str | None = None,
    duration: str = "1h",
) -> str:
    """A token of the ServiceAccount, bound to the named pod (in the same namespace) if given."""
    args = ["create", "token", service_account, "-n", namespace, f"--duration={duration}"]
    if bound_pod is not None:
        uid = cluster.kubectl(
            "get", "pod", bound_pod, "-n", namespace, "-o", "jsonpath={.metadata.uid}"
        ).stdout
        args += ["--bound-object-kind=Pod", f"--bound-object-name={bound_pod}", f"--bound-object-uid={uid}"]
    return cluster.kubectl(*args).stdout.strip()


def agent_pod_on(cluster: Cluster, namespace: str, release: str, node: str) -> str:
    """The name of the release's agent DaemonSet pod on `node` (what an agent's token is bound to)."""
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=agent"
    items = cluster.get_json(
        "pods", "-n", namespace, "-l", selector, "--field-selector", f"spec.nodeName={node}"
    )
    (pod,) = items["items"]
    name: str = pod["metadata"]["name"]
    return name


def token_kubeconfig(cluster: Cluster, token: str, path: Path, *, namespace: str = "default") -> Path:
    """Writes a kubeconfig for the cluster's API server that authenticates with `token` only."""
    admin: dict[str, Any] = yaml.safe_load(cluster.kubeconfig.read_text())
    server_cluster = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "edpilot-local", "cluster": server_cluster}],
        "users": [{"name": "service-account", "user": {"token": token}}],
        "contexts": [
            {
                "name": "service-account",
                "context": {"cluster": "edpilot-local", "user": "service-account", "namespace": namespace},
            }
        ],
        "current-context": "service-account",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def service_account_kubeconfig(
    cluster: Cluster,
    namespace: str,
    service_account: str,
    path: Path,
    *,
    bound_pod: str | None = None,
    duration: str = "1h",
) -> Path:
    """A kubeconfig that acts as system:serviceaccount:<namespace>:<service_account>."""
    token = service_account_token(cluster, namespace, service_account, bound_pod=bound_pod, duration=duration)
    return token_kubeconfig(cluster, token, path, namespace=namespace)


def kubectl_with(
    cluster: Cluster, kubeconfig: Path, *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the pinned kubectl with another identity's kubeconfig; never raises on failure."""
    return subprocess.run(
        [str(cluster.bin / "kubectl"), "--kubeconfig", str(kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )
