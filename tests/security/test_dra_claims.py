"""A tenant's ResourceClaims never move another tenant's GPU (issue 19, docs/security.md "GPUs
allocated through DRA"), on the real control plane.

Two tenants with namespaced Roles (tests/tenancy.py; they may write ResourceClaims and templates,
not their status) share one KWOK node whose GPUs a DRA driver publishes. The REAL kube-scheduler
allocates each tenant one GPU through a claim template. The victim's policy fixes its cap at 650 W;
the attacker's policy caps at most 60% of the default (420 W). The attacker then tries every field it
can write to reach the victim's GPU:
- a claim whose request selects the victim's GPU by its UUID, for a pod it binds to the node itself
  (the scheduler never allocates it);
- a claim of its own named like the victim's generated claim, for another such pod;
- writing the allocation into its claim's status (refused: the scheduler's field);
- a claim with admin access, which would share the victim's device (refused: only namespaces an
  admin labelled may ask for it).
The simulated agent plays the node's kubelet (devices of the claims reserved for each pod) and the
real operator governs both namespaces: the victim's GPU keeps exactly its own policy's cap, the
attacker's pods get no GPU of anyone else's, and the attacker's own GPU is capped by its policy.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from edpilot_operator.localrun import Processes, agent_argv, operator_argv, wait_until
from kubetest import Cluster, add_gpu_node, print_log_tails, remove_gpu_nodes
from tenancy import TENANT_RULES, Tenant, make_tenant

from edpilot import gpusim

NODE = "sec-dra-0"
ATTACKER, VICTIM = "sec-dra-attacker", "sec-dra-victim"
DRIVER = "gpu.nvidia.com"
CLASS = "sec-dra-gpu"
FIXED_W, DEFAULT_W = 650.0, 700.0
TOLERATION = {"key": "edpilot.io/sec-dra", "operator": "Exists"}
SIM = {"sim.edpilot.io/workload": "llm-decode", "sim.edpilot.io/batch-size": "8"}
# What a namespace owner holds, plus DRA claims and templates (never their status).
DRA_TENANT_RULES = (
    *TENANT_RULES,
    {
        "apiGroups": ["resource.k8s.io"],
        "resources": ["resourceclaims", "resourceclaimtemplates"],
        "verbs": ["*"],
    },
)


def uuid(index: int) -> str:
    return gpusim.gpu_uuid(NODE, index)


def policy(name: str, app: str, **power_cap: Any) -> dict[str, Any]:
    return {
        "apiVersion": "edpilot.io/v1alpha1",
        "kind": "EnergyPolicy",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "powerCap": power_cap,
            "batchSize": {"mode": "Off"},
            "quantization": {"mode": "Off"},
            "workMetric": {"name": "generated_tokens_total"},
        },
    }


def request(selector: str | None = None, admin: bool = False) -> dict[str, Any]:
    exactly: dict[str, Any] = {"deviceClassName": CLASS}
    if selector:
        exactly["selectors"] = [{"cel": {"expression": selector}}]
    if admin:
        exactly["adminAccess"] = True
    return {"name": "gpu", "exactly": exactly}


def claim(name: str, **req: Any) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name},
        "spec": {"devices": {"requests": [request(**req)]}},
    }


def template() -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": "one-gpu"},
        "spec": {"spec": {"devices": {"requests": [request()]}}},
    }


def pod(name: str, app: str, source: Mapping[str, str], bind: bool = False) -> dict[str, Any]:
    """A pod with one claim. `bind`: it names the node itself, so no scheduler allocates its claim."""
    placement: dict[str, Any] = (
        {"nodeName": NODE} if bind else {"nodeSelector": {"kubernetes.io/hostname": NODE}}
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}, "annotations": SIM},
        "spec": {
            **placement,
            "tolerations": [TOLERATION],
            "terminationGracePeriodSeconds": 0,
            "resourceClaims": [{"name": "gpu", **source}],
            "containers": [
                {"name": "main", "image": "example.invalid/llm:1", "resources": {"claims": [{"name": "gpu"}]}}
            ],
        },
    }


def ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr


@dataclass
class Setup:
    cluster: Cluster
    attacker: Tenant
    victim: Tenant
    victim_gpu: str
    attacker_gpu: str

    def report(self) -> dict[str, Any]:
        proc = self.cluster.kubectl("get", "gpunodereport", NODE, "-o", "json", check=False)
        body: dict[str, Any] = json.loads(proc.stdout) if proc.returncode == 0 else {}
        return body

    def limits(self) -> dict[str, tuple[float, str]]:
        spec = self.report().get("spec") or {}
        return {c["gpuUUID"]: (float(c["watts"]), c["pod"]) for c in spec.get("powerLimits") or []}

    def holders(self) -> dict[str, list[str]]:
        return {g["uuid"]: g["pods"] for g in (self.report().get("status") or {}).get("gpus") or []}

    def rows(self, namespace: str, name: str) -> dict[str, dict[str, Any]]:
        body = self.cluster.get_json("energypolicy", name, "-n", namespace)
        return {r["name"]: r for r in (body.get("status") or {}).get("workloads") or []}


def allocated_gpu(cluster: Cluster, namespace: str, pod_name: str) -> tuple[str, str]:
    """(the pod's generated claim, the UUID of the device the scheduler allocated to it)."""
    body = cluster.get_json("pod", pod_name, "-n", namespace)
    (status,) = body["status"]["resourceClaimStatuses"]
    name = status["resourceClaimName"]
    (result,) = cluster.get_json("resourceclaim", name, "-n", namespace)["status"]["allocation"]["devices"][
        "results"
    ]
    return name, uuid(int(result["device"].removeprefix("gpu-")))


@pytest.fixture(scope="module")
def setup(crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    cluster = crds_installed
    work = tmp_path_factory.mktemp("sec-dra")
    add_gpu_node(cluster, NODE, 4, "edpilot.io/sec-dra")
    driver_objects = [
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {"name": f"{NODE}-gpus"},
            "spec": {
                "driver": DRIVER,
                "nodeName": NODE,
                "pool": {"name": NODE, "generation": 1, "resourceSliceCount": 1},
                "devices": [
                    {
                        "name": f"gpu-{i}",
                        "attributes": {"type": {"string": "gpu"}, "uuid": {"string": uuid(i)}},
                    }
                    for i in range(4)
                ],
            },
        },
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": CLASS},
            "spec": {"selectors": [{"cel": {"expression": f"device.driver == '{DRIVER}'"}}]},
        },
    ]
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": driver_objects})
    )
    attacker = make_tenant(cluster, ATTACKER, work, DRA_TENANT_RULES)
    victim = make_tenant(cluster, VICTIM, work, DRA_TENANT_RULES)
    procs = Processes(logs=work / "logs")
    try:
        ok(victim.apply(policy("fixed", "victim", mode="Fixed", watts=FIXED_W)))
        ok(attacker.apply(policy("auto", "attacker", mode="Auto", minPercent=40, maxPercent=60)))
        for tenant, name, app in ((victim, "victim", "victim"), (attacker, "legit", "attacker")):
            ok(tenant.apply(template()))
            ok(tenant.create(pod(name, app, {"resourceClaimTemplateName": "one-gpu"})))
        wait_until(
            "the scheduler to allocate both tenants a GPU",
            lambda: all(
                (cluster.get_json("pod", p, "-n", ns)["status"].get("resourceClaimStatuses") or [{}])[0].get(
                    "resourceClaimName"
                )
                and cluster.get_json("pod", p, "-n", ns)["spec"].get("nodeName") == NODE
                for ns, p in ((VICTIM, "victim"), (ATTACKER, "legit"))
            ),
            60,
            interval=0.5,
        )
        _, victim_gpu = allocated_gpu(cluster, VICTIM, "victim")
        _, attacker_gpu = allocated_gpu(cluster, ATTACKER, "legit")
        assert victim_gpu != attacker_gpu
        procs.start("agent", agent_argv(cluster.kubeconfig, NODE, 3, "--sim-speed=30"))
        procs.start(
            "operator", operator_argv(cluster.kubeconfig, f"--namespace={ATTACKER}", f"--namespace={VICTIM}")
        )
        yield Setup(cluster, attacker, victim, victim_gpu, attacker_gpu)
    finally:
        cluster.kubectl(
            "delete", "namespace", ATTACKER, VICTIM, "--ignore-not-found", "--timeout=60s", check=False
        )
        procs.stop_all()
        print_log_tails(procs.logs)
        cluster.kubectl("delete", "resourceslice", f"{NODE}-gpus", "--ignore-not-found", check=False)
        cluster.kubectl("delete", "deviceclass", CLASS, "--ignore-not-found", check=False)
        remove_gpu_nodes(cluster, NODE)


def test_a_tenants_claims_never_reach_another_tenants_gpu(setup: Setup) -> None:
    s, attacker = setup, setup.attacker
    victim_claim = s.cluster.get_json("pod", "victim", "-n", VICTIM)["status"]["resourceClaimStatuses"][0][
        "resourceClaimName"
    ]
    by_uuid = f'device.attributes["{DRIVER}"].uuid == "{s.victim_gpu}"'
    # Claims and pods the attacker may write: they name the victim's GPU and the victim's claim.
    ok(attacker.create(claim("grab", selector=by_uuid)))
    ok(attacker.create(pod("thief", "attacker", {"resourceClaimName": "grab"}, bind=True)))
    ok(attacker.create(claim(victim_claim, selector=by_uuid)))
    ok(attacker.create(pod("copycat", "attacker", {"resourceClaimName": victim_claim}, bind=True)))
    # What it may not write: the allocation (the scheduler's) and admin access to a device in use.
    forged = {
        "status": {
            "allocation": {
                "devices": {
                    "results": [{"request": "gpu", "driver": DRIVER, "pool": NODE, "device": "gpu-0"}]
                }
            },
            "reservedFor": [
                {"resource": "pods", "name": "thief", "uid": "00000000-0000-0000-0000-000000000000"}
            ],
        }
    }
    refused = attacker.kubectl(
        "patch", "resourceclaim", "grab", "--subresource=status", "--type=merge", "-p", json.dumps(forged)
    )
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower(), refused.stderr
    admin = attacker.create(claim("admin", admin=True))
    assert admin.returncode != 0 and "admin-access" in admin.stderr, admin.stderr
    assert not s.cluster.get_json("resourceclaim", "grab", "-n", ATTACKER).get("status", {}).get("allocation")

    victim_key, legit_key = f"{VICTIM}/victim", f"{ATTACKER}/legit"

    def both_capped() -> bool:
        limits = s.limits()
        return (
            limits.get(s.victim_gpu) == (FIXED_W, victim_key)
            and s.attacker_gpu in limits
            and limits[s.attacker_gpu][1] == legit_key
        )

    wait_until("the victim's fixed cap and the attacker's own cap", both_capped, 120, interval=0.5)
    for _ in range(8):  # several operator and agent cycles
        limits, holders = s.limits(), s.holders()
        # The victim's GPU: its own policy's cap, for its own pod, held by it alone.
        assert limits[s.victim_gpu] == (FIXED_W, victim_key), limits
        assert holders[s.victim_gpu] == [victim_key], holders
        # The attacker's policy reaches its own GPU only, within its bounds.
        assert set(limits) == {s.victim_gpu, s.attacker_gpu}, limits
        assert limits[s.attacker_gpu][0] <= 0.6 * DEFAULT_W + 1e-6, limits
        # The pods whose claims name the victim's GPU or claim hold no GPU at all.
        assert not any(p.endswith(("/thief", "/copycat")) for pods in holders.values() for p in pods), holders
        assert set(s.rows(ATTACKER, "auto")) == {"legit"}
        time.sleep(1)
    gpus = {g["uuid"]: g for g in s.report()["status"]["gpus"]}
    assert gpus[s.victim_gpu]["enforcedLimitWatts"] == pytest.approx(FIXED_W, abs=1)
