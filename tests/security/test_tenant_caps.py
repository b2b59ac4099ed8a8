"""Finding 1 (HIGH) of issue 14 on the real control plane: a tenant's pod annotations never raise a
GPU's power limit, and PowerBudgets hold against tenants that opt out or change their pods once
bound.

Two tenants with namespaced Roles (tests/tenancy.py) share one KWOK GPU node whose boards allow 700 W
but default to 500 W (the forged cap would otherwise end at the board's maximum). The real operator
runs as in the e2e tests; the GPUNodeReport's status is written the way its agent would. No
admission policy is installed here: the operator itself must not trust what a tenant wrote (the
chart's admission policy, tested in test_annotation_ownership.py, is the second wall).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from builders import h100_status
from edpilot_operator.localrun import Processes, operator_argv, wait_until
from kubetest import (
    Cluster,
    add_gpu_node,
    gpu_pod,
    policy_rows_with_states,
    print_log_tails,
    remove_gpu_nodes,
)
from tenancy import Tenant, make_tenant

from edpilot.models import GPUNodeReportStatus, WorkloadSample

NODE = "sec-caps-0"
RACK = {"edpilot.io/rack": "sec-caps"}
ATTACKER, VICTIM = "sec-caps-attacker", "sec-caps-victim"
DEFAULT_W, MAX_W, MIN_W = 500.0, 700.0, 200.0
BUDGET = "sec-caps-rack"
# GPU index -> (namespace, pod)
HOLDERS = {0: (VICTIM, "victim"), 1: (ATTACKER, "forger"), 2: (ATTACKER, "liar"), 3: (ATTACKER, "late")}
FORGED = {"edpilot.io/policy": "off", "edpilot.io/power-cap-watts": "99999"}


def uuid(index: int) -> str:
    return f"GPU-sec-caps-{index}"


def policy(name: str, app: str, **power_cap: Any) -> dict[str, Any]:
    return {
        "apiVersion": "edpilot.io/v1alpha1",
        "kind": "EnergyPolicy",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "powerCap": power_cap,
            "workMetric": {"name": "samples_total"},
        },
    }


def pod(namespace: str, name: str, app: str, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    return gpu_pod(
        namespace,
        name,
        image="example.invalid/train:1",
        node=NODE,
        labels={"app": app},
        annotations=annotations,
        terminationGracePeriodSeconds=0,
        tolerations=[{"key": "edpilot.io/sec-caps", "operator": "Exists"}],
    )


def report_status(enforced: Mapping[int, float]) -> dict[str, Any]:
    """What the node's agent reports: four boards at 500 W default, each held by one pod."""
    gpus = [
        h100_status(
            i,
            uuid(i),
            minLimitWatts=MIN_W,
            maxLimitWatts=MAX_W,
            defaultLimitWatts=DEFAULT_W,
            enforcedLimitWatts=enforced.get(i, DEFAULT_W),
            powerWatts=300,
            energyJoules=1000.0,
            pods=[f"{ns}/{name}"],
        )
        for i, (ns, name) in HOLDERS.items()
    ]
    work = [
        WorkloadSample(namespace=ns, pod=name, gpuUUIDs=[uuid(i)], workUnits=10.0)
        for i, (ns, name) in HOLDERS.items()
    ]
    status = GPUNodeReportStatus(
        nodeName=NODE,
        agentVersion="sec-test",
        backend="sim",
        time="2026-11-27T00:00:00Z",
        gpus=gpus,
        workloads=work,
    )
    return status.model_dump(mode="json", exclude_none=True)


@dataclass
class Setup:
    cluster: Cluster
    attacker: Tenant
    victim: Tenant

    def spec_limits(self) -> dict[str, float]:
        spec = self.cluster.get_json("gpunodereport", NODE).get("spec") or {}
        return {lim["gpuUUID"]: float(lim["watts"]) for lim in spec.get("powerLimits") or []}

    def rows(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The policy's rows, each with its optimizer state (its WorkloadOptimizerState's)."""
        return policy_rows_with_states(self.cluster, namespace, name)

    def budget_allocations(self) -> dict[str, float]:
        body = self.cluster.get_json("powerbudget", BUDGET)
        return {a["gpuUUID"]: float(a["watts"]) for a in (body.get("status") or {}).get("allocations") or []}


def apply(cluster: Cluster, obj: Mapping[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))


def write_report(cluster: Cluster, enforced: Mapping[int, float]) -> None:
    body = json.dumps({"status": report_status(enforced)})
    cluster.kubectl("patch", "gpunodereport", NODE, "--subresource=status", "--type=merge", "-p", body)


def ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def setup(crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    cluster = crds_installed
    work = tmp_path_factory.mktemp("sec-caps")
    add_gpu_node(cluster, NODE, 4, "edpilot.io/sec-caps", RACK)
    attacker = make_tenant(cluster, ATTACKER, work)
    victim = make_tenant(cluster, VICTIM, work)
    procs = Processes(logs=work / "logs")
    try:
        ok(victim.apply(policy("train", "train", mode="Auto", minPercent=40)))
        ok(attacker.apply(policy("off", "nothing", mode="Off")))
        ok(attacker.apply(policy("auto", "liar", mode="Auto", minPercent=40, maxPercent=60)))
        ok(victim.create(pod(VICTIM, "victim", "train")))
        # Opted out, yet claims an Off policy and a cap far above the board's default.
        ok(attacker.create(pod(ATTACKER, "forger", "nothing", {"edpilot.io/exclude": "true", **FORGED})))
        # Governed by its own policy (at most 60% of the default), claims 99,999 W.
        ok(attacker.create(pod(ATTACKER, "liar", "liar", {"edpilot.io/power-cap-watts": "99999"})))
        # Governed like liar; changes its annotations only once bound (test 3).
        ok(attacker.create(pod(ATTACKER, "late", "liar")))
        apply(
            cluster,
            {"apiVersion": "edpilot.io/v1alpha1", "kind": "GPUNodeReport", "metadata": {"name": NODE}},
        )
        # The forger's board still holds a cap from when it was governed: 250 W.
        write_report(cluster, {1: 250.0})
        procs.start(
            "operator", operator_argv(cluster.kubeconfig, f"--namespace={ATTACKER}", f"--namespace={VICTIM}")
        )
        yield Setup(cluster, attacker, victim)
    finally:
        # While the operator runs: it removes its finalizers from what is deleted.
        cluster.kubectl("delete", "powerbudget", BUDGET, "--ignore-not-found", "--timeout=30s", check=False)
        cluster.kubectl(
            "delete", "namespace", ATTACKER, VICTIM, "--ignore-not-found", "--timeout=60s", check=False
        )
        procs.stop_all()
        print_log_tails(procs.logs)
        remove_gpu_nodes(cluster, NODE)


def settled(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    wait_until(what, check, timeout, interval=0.5)


def governed_rows_decided(s: Setup) -> bool:
    """The operator has decided for every governed pod (its optimizer holds a target)."""
    rows = s.rows(ATTACKER, "auto") + s.rows(VICTIM, "train")
    return len(rows) == 3 and all(r.get("optimizer") for r in rows)


def busy_sum(limits: Mapping[str, float]) -> float:
    """What the node's four busy boards may draw: their desired limit, else their default."""
    return sum(limits.get(uuid(i), DEFAULT_W) for i in HOLDERS)


# ---------------------------------------------------------------- tests, in file order


def test_forged_annotations_never_raise_a_cap(setup: Setup) -> None:
    settled("the operator's decisions for the governed pods", lambda: governed_rows_decided(setup))
    settled("the liar's cap in the node's spec", lambda: uuid(2) in setup.spec_limits())
    for _ in range(6):  # several report cycles
        limits = setup.spec_limits()
        assert all(w <= DEFAULT_W for w in limits.values()), limits
        # Opted out: no cap at all, whatever its annotations claim.
        assert uuid(1) not in limits, limits
        # Governed by a policy that allows at most 60% of the default: 300 W.
        assert limits[uuid(2)] <= 0.6 * DEFAULT_W, limits
        time.sleep(1)


def test_a_budget_counts_an_opted_out_gpu_at_its_default(setup: Setup) -> None:
    """The forger's board enforces 250 W now but goes back to its 500 W default as soon as its agent
    applies a spec without a cap for it: the budget must leave room for 500 W, not 250 W."""
    apply(
        setup.cluster,
        {
            "apiVersion": "edpilot.io/v1alpha1",
            "kind": "PowerBudget",
            "metadata": {"name": BUDGET},
            "spec": {"nodeSelector": {"matchLabels": RACK}, "maxWatts": 1200},
        },
    )
    settled("the budget's allocations", lambda: len(setup.budget_allocations()) == 3)
    settled(
        "the spec to follow the budget",
        lambda: all(setup.spec_limits().get(u, 1e9) <= w for u, w in setup.budget_allocations().items()),
    )
    limits = setup.spec_limits()
    assert uuid(1) not in limits
    assert busy_sum(limits) <= 1200 + 1e-6, limits


def test_all_gpus_budget_caps_a_pod_that_changes_its_annotations_once_bound(setup: Setup) -> None:
    """Admins who want budgets to hold against opt-outs set scope AllGPUs. `late` was placed while its
    policy would cap it; once bound it opts out and forges an Off policy and a huge cap."""
    setup.cluster.kubectl(
        "patch", "powerbudget", BUDGET, "--type=merge", "-p", '{"spec":{"scope":"AllGPUs"}}'
    )
    ok(
        setup.attacker.kubectl(
            "annotate",
            "pod",
            "late",
            "--overwrite",
            "edpilot.io/exclude=true",
            *(f"{k}={v}" for k, v in FORGED.items()),
        )
    )
    settled("an allocation for every busy GPU", lambda: len(setup.budget_allocations()) == 4)
    settled("a cap on every busy GPU", lambda: len(setup.spec_limits()) == 4)
    limits = setup.spec_limits()
    assert busy_sum(limits) <= 1200 + 1e-6, limits
    assert all(MIN_W <= w <= DEFAULT_W for w in limits.values()), limits
