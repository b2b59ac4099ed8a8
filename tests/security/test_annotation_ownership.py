"""Finding 1 (HIGH) of issue 14, the API server's wall: only the operator's ServiceAccount may set,
change or remove the annotations the operator owns (edpilot.io/policy, power-cap-watts, batch-size,
quantization) on pods, at creation and afterwards, the way NodeRestriction keeps
node-restriction.kubernetes.io/ labels to the kubelets.

The chart is rendered with the real helm and every ValidatingAdmissionPolicy it has for pods is
applied to the real API server; their bindings are scoped to this module's namespace so that other
tests' operators (which run with the admin's credentials) are not affected. The tenant acts with a
ServiceAccount token and a namespaced Role (tests/tenancy.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetest import REPO, Cluster
from sa_kubeconfig import kubectl_with, service_account_kubeconfig
from tenancy import Tenant, make_tenant

from edpilot.contract import HINT_ANNOTATIONS

TENANT_NS = "sec-own-tenant"
RELEASE_NS = "sec-own-system"
OPERATOR_SA = "edpilot-operator"  # the chart's operator ServiceAccount for release "edpilot"
PREFIX = "sec-own-"


@dataclass(frozen=True)
class Setup:
    cluster: Cluster
    tenant: Tenant
    operator: Path  # kubeconfig of the operator's ServiceAccount


def chart_pod_policies(cluster: Cluster) -> list[dict[str, Any]]:
    """The chart's admission policies that match pods, and their bindings, scoped to TENANT_NS."""
    chart = str(REPO / "charts" / "edpilot")
    rendered = cluster.helm(
        "template", "edpilot", chart, "--namespace", RELEASE_NS, "--kube-version", "1.36.3"
    )
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    policies = {
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "ValidatingAdmissionPolicy"
        and any("pods" in r.get("resources", []) for r in d["spec"]["matchConstraints"]["resourceRules"])
    }
    chosen: list[dict[str, Any]] = []
    for d in docs:
        if d["kind"] == "ValidatingAdmissionPolicy" and d["metadata"]["name"] in policies:
            d["metadata"]["name"] = PREFIX + d["metadata"]["name"]
            chosen.append(d)
        elif d["kind"] == "ValidatingAdmissionPolicyBinding" and d["spec"]["policyName"] in policies:
            d["metadata"]["name"] = PREFIX + d["metadata"]["name"]
            d["spec"]["policyName"] = PREFIX + d["spec"]["policyName"]
            d["spec"]["matchResources"] = {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": TENANT_NS}}
            }
            chosen.append(d)
    return chosen


def pod(name: str, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A pod that stays Pending (no node matches it): only admission matters here."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "train"}, "annotations": dict(annotations or {})},
        "spec": {
            "nodeSelector": {"edpilot.io/sec-own": "nowhere"},
            "containers": [{"name": "main", "image": "example.invalid/train:1"}],
        },
    }


@pytest.fixture(scope="module")
def setup(crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    cluster = crds_installed
    work = tmp_path_factory.mktemp("sec-own")
    policies = chart_pod_policies(cluster)
    tenant = make_tenant(cluster, TENANT_NS, work)
    cluster.kubectl("create", "namespace", RELEASE_NS)
    cluster.kubectl("create", "serviceaccount", OPERATOR_SA, "-n", RELEASE_NS)
    cluster.kubectl("create", "role", "hints", "-n", TENANT_NS, "--verb=get,patch", "--resource=pods")
    cluster.kubectl(
        "create",
        "rolebinding",
        "hints",
        "-n",
        TENANT_NS,
        "--role=hints",
        f"--serviceaccount={RELEASE_NS}:{OPERATOR_SA}",
    )
    operator = service_account_kubeconfig(cluster, RELEASE_NS, OPERATOR_SA, work / "operator.kubeconfig")
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": policies})
    )
    try:
        yield Setup(cluster, tenant, operator)
    finally:
        cluster.kubectl(
            "delete",
            "-f",
            "-",
            "--ignore-not-found",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": policies}),
            check=False,
        )
        cluster.kubectl(
            "delete", "namespace", TENANT_NS, RELEASE_NS, "--wait=false", "--ignore-not-found", check=False
        )


def refused(proc: Any, key: str) -> bool:
    return bool(proc.returncode != 0 and "only the edpilot operator" in proc.stderr and key in proc.stderr)


def eventually_refused(setup: Setup, key: str) -> None:
    """Admission policies take effect a moment after they are created."""
    deadline = time.monotonic() + 30
    while True:
        proc = setup.tenant.create(pod("probe", {key: "1"}))
        if refused(proc, key):
            return
        setup.tenant.kubectl("delete", "pod", "probe", "--ignore-not-found", "--wait=false")
        assert time.monotonic() < deadline, f"the tenant still creates pods with {key}: {proc.stderr}"
        time.sleep(1)


def test_a_tenant_cannot_create_a_pod_carrying_an_operator_owned_annotation(setup: Setup) -> None:
    eventually_refused(setup, "edpilot.io/power-cap-watts")
    for key in HINT_ANNOTATIONS:
        created = setup.tenant.create(pod("forged", {key: "99999"}))
        assert refused(created, key), (key, created.stderr)
    # What the tenant owns stays the tenant's.
    own = {"edpilot.io/exclude": "true", "edpilot.io/quantization-accuracy": '{"bf16": 1.0}'}
    created = setup.tenant.create(pod("honest", own))
    assert created.returncode == 0, created.stderr


def test_once_bound_a_tenant_cannot_set_change_or_remove_them_but_the_operator_can(setup: Setup) -> None:
    """The pod was admitted (and, in a cluster, placed by the extender) while its policy would cap
    it; afterwards the tenant tries to move it under another policy or to a huge cap."""
    eventually_refused(setup, "edpilot.io/policy")
    assert setup.tenant.create(pod("bound")).returncode == 0
    by_operator = kubectl_with(
        setup.cluster,
        setup.operator,
        "-n",
        TENANT_NS,
        "annotate",
        "pod",
        "bound",
        "edpilot.io/policy=train",
        "edpilot.io/power-cap-watts=300",
        "edpilot.io/batch-size=64",
    )
    assert by_operator.returncode == 0, by_operator.stderr
    attempts = {
        "edpilot.io/policy": ("edpilot.io/policy=off", "--overwrite"),
        "edpilot.io/power-cap-watts": ("edpilot.io/power-cap-watts=99999", "--overwrite"),
        "edpilot.io/batch-size": ("edpilot.io/batch-size-",),
        "edpilot.io/quantization": ("edpilot.io/quantization=int4-awq",),
    }
    for key, args in attempts.items():
        proc = setup.tenant.kubectl("annotate", "pod", "bound", *args)
        assert refused(proc, key), (key, proc.stderr)
    # Opting out, relabelling and other annotations remain the tenant's to change.
    for args in (
        ("annotate", "pod", "bound", "edpilot.io/exclude=true"),
        ("annotate", "pod", "bound", "team=ml"),
        ("label", "pod", "bound", "app=other", "--overwrite"),
    ):
        proc = setup.tenant.kubectl(*args)
        assert proc.returncode == 0, (args, proc.stderr)
    annotations = setup.cluster.get_json("pod", "bound", "-n", TENANT_NS)["metadata"]["annotations"]
    assert annotations["edpilot.io/power-cap-watts"] == "300" and annotations["edpilot.io/policy"] == "train"
    # The operator still writes (and removes) its own hints.
    removed = kubectl_with(
        setup.cluster,
        setup.operator,
        "-n",
        TENANT_NS,
        "annotate",
        "pod",
        "bound",
        "edpilot.io/power-cap-watts-",
    )
    assert removed.returncode == 0, removed.stderr


def test_a_pod_template_cannot_smuggle_them_in(setup: Setup) -> None:
    """Pods created by a controller from a tenant's template are refused too: the controller is not
    the operator."""
    eventually_refused(setup, "edpilot.io/quantization")
    template = pod("ignored", {"edpilot.io/power-cap-watts": "99999"})
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "smuggler"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "smuggler"}},
            "template": {
                "metadata": {
                    "labels": {"app": "smuggler"},
                    "annotations": template["metadata"]["annotations"],
                },
                "spec": template["spec"],
            },
        },
    }
    assert setup.tenant.create(deployment).returncode == 0
    deadline = time.monotonic() + 60
    failure = ""
    while not failure:
        assert time.monotonic() < deadline, "the ReplicaSet never reported its refused pod"
        sets = setup.cluster.get_json("replicasets", "-n", TENANT_NS, "-l", "app=smuggler")["items"]
        for rs in sets:
            for cond in (rs.get("status") or {}).get("conditions") or []:
                if cond.get("reason") == "FailedCreate":
                    failure = cond.get("message", "")
        time.sleep(1)
    assert "only the edpilot operator" in failure and "edpilot.io/power-cap-watts" in failure, failure
    assert setup.cluster.get_json("pods", "-n", TENANT_NS, "-l", "app=smuggler")["items"] == []
