"""Tenants for security tests: a namespace owner acting with a ServiceAccount token whose Role
covers its own namespace only (pods, their annotations and EnergyPolicies, status included), never
the admin's credentials.

    from tenancy import make_tenant
    tenant = make_tenant(cluster, "team-a", tmp_path)
    tenant.kubectl("annotate", "pod", "p", "edpilot.io/exclude=true")
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetest import Cluster
from sa_kubeconfig import kubectl_with, service_account_kubeconfig

# What a namespace owner typically holds: its pods (annotations and labels included) and its
# EnergyPolicies. Policy status is included on purpose: the operator must hold even when a platform
# team grants tenants more than edpilot needs them to have.
TENANT_RULES: Sequence[Mapping[str, Any]] = (
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]},
    {"apiGroups": ["apps"], "resources": ["deployments", "replicasets"], "verbs": ["*"]},
    {
        "apiGroups": ["edpilot.io"],
        "resources": ["energypolicies", "energypolicies/status"],
        "verbs": ["*"],
    },
)


@dataclass(frozen=True)
class Tenant:
    cluster: Cluster
    namespace: str
    kubeconfig: Path

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:tenant"

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """kubectl as the tenant, in its namespace; never raises (a refusal is what tests look for)."""
        return kubectl_with(self.cluster, self.kubeconfig, "-n", self.namespace, *args, input=input)

    def apply(self, obj: Mapping[str, Any]) -> subprocess.CompletedProcess[str]:
        return self.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def create(self, obj: Mapping[str, Any]) -> subprocess.CompletedProcess[str]:
        return self.kubectl("create", "-f", "-", input=json.dumps(obj))


def make_tenant(
    cluster: Cluster, namespace: str, workdir: Path, rules: Sequence[Mapping[str, Any]] = TENANT_RULES
) -> Tenant:
    """A namespace and a ServiceAccount `tenant` in it, bound to a Role of `rules` there only."""
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("create", "serviceaccount", "tenant", "-n", namespace)
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "tenant", "namespace": namespace},
        "rules": [dict(r) for r in rules],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "tenant", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": namespace}],
    }
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [role, binding]})
    )
    kubeconfig = service_account_kubeconfig(cluster, namespace, "tenant", workdir / f"{namespace}.kubeconfig")
    return Tenant(cluster, namespace, kubeconfig)
