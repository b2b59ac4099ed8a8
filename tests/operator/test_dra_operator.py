"""The operator with GPUs allocated through DRA, and with GPUs its pods do not hold alone: a DRA pod
counts the GPUs its claims hold, is governed like a device-plugin pod, and a shared or partitioned
GPU is measured and reported but never capped (by a policy or a budget)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from builders import h100_status
from edpilot_operator.budgets import reconcile_budget
from edpilot_operator.extender_view import BUDGETS, CLAIMS, KINDS, NODES, PODS, TEMPLATES, ClusterView
from edpilot_operator.reports import ReportTiming, desired_spec
from edpilot_operator.selection import (
    Governed,
    PodInfo,
    PolicyRef,
    governance,
    may_hold_gpus,
    pod_info,
    select,
    with_dra,
)
from edpilot_operator.services import REPORT_ONLY, reconcile_policy, snapshot

from edpilot.dra import AllocatedDevice, ClaimView, DraHoldings, SliceDevice, device_catalog, holdings
from edpilot.models import (
    EnergyPolicySpec,
    GPUNodeReportStatus,
    LeaseRef,
    PowerBudgetSpec,
    WorkloadSample,
)
from edpilot.optimizer import Config

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
DRIVER = "gpu.nvidia.com"
CATALOG = device_catalog(SliceDevice((DRIVER, "n0", f"gpu-{i}"), "n0", 1, f"GPU-n0-{i}") for i in range(2))


def dra_pod_body(name: str = "a", uid: str = "uid-a", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "uid": uid, "labels": {"app": "llm"}},
        "spec": {
            "nodeName": "n0",
            "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "one-gpu"}],
            "containers": [{"image": "llm:1", "resources": {"claims": [{"name": "gpu"}]}}],
        },
        "status": {"phase": "Running", **status},
    }


def claim(name: str, *uids: str, device: str = "gpu-0", **allocated: Any) -> ClaimView:
    return ClaimView("ns", name, uids, (AllocatedDevice((DRIVER, "n0", device), **allocated),))


def test_a_dra_pod_counts_the_gpus_its_claims_hold() -> None:
    body = dra_pod_body()
    assert may_hold_gpus(body["spec"])
    bare = pod_info(body)
    assert bare.gpus == 0  # what its spec says: no nvidia.com/gpu
    pod = with_dra(bare, [claim("a-gpu-x", "uid-a"), claim("b-gpu", "uid-b", device="gpu-1")], CATALOG)
    assert pod.gpus == 1 and [g.uuid for g in pod.dra_gpus] == ["GPU-n0-0"]
    assert with_dra(pod, [claim("a-gpu-x", "uid-a")], CATALOG) == pod  # idempotent
    # Governed like any GPU pod once its GPUs are known.
    p = policy()
    assert [w.name for w in select(p, [pod], governance([pod], [p])).workloads] == ["a"]
    assert select(p, [bare], governance([bare], [p])).workloads == ()


def test_a_claim_made_for_an_extended_resource_is_counted_once() -> None:
    """kube-scheduler serves `nvidia.com/gpu: 1` from a DRA driver through a claim it makes: the
    request counts the GPU, the claim names its device."""
    body = dra_pod_body(extendedResourceClaimStatus={"resourceClaimName": "a-extended-resources-h7s"})
    body["spec"].pop("resourceClaims")
    body["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    pod = with_dra(pod_info(body), [claim("a-extended-resources-h7s", "uid-a")], CATALOG)
    assert pod.gpus == 1 and [g.uuid for g in pod.dra_gpus] == ["GPU-n0-0"]


def policy() -> PolicyRef:
    spec = {"selector": {"matchLabels": {"app": "llm"}}, "workMetric": {"name": "tokens_total"}}
    return PolicyRef("ns", "p", EnergyPolicySpec.model_validate(spec))


def pod(name: str) -> PodInfo:
    return PodInfo("ns", name, f"uid-{name}", "n0", "Running", 1, {"app": "llm"})


def report(gpu0_pods: tuple[str, ...], shared: bool = False) -> GPUNodeReportStatus:
    gpus = [
        h100_status(
            i, f"GPU-n0-{i}", powerWatts=400, pods=list(gpu0_pods) if i == 0 else [], shared=shared and i == 0
        )
        for i in range(2)
    ]
    work = [
        WorkloadSample(namespace="ns", pod=p.split("/")[1], workUnits=10.0, batchSize=8) for p in gpu0_pods
    ]
    return GPUNodeReportStatus(
        nodeName="n0", agentVersion="t", backend="sim", time=NOW, gpus=gpus, workloads=work
    )


def limits(status: GPUNodeReportStatus, dra: DraHoldings, budget: float | None = None) -> dict[str, float]:
    spec = desired_spec(
        pods=[pod("a"), pod("b")],
        status=status,
        governed={k: Governed(policy(), Config(capWatts=450)) for k in ("ns/a", "ns/b")},
        lease=LeaseRef(namespace="edpilot", name="op"),
        timing=ReportTiming(),
        budget_caps={"GPU-n0-0": budget} if budget is not None else None,
        dra=dra,
    )
    return {limit.gpuUUID: limit.watts for limit in spec.powerLimits}


EXCLUSIVE = holdings({"ns/a": (with_dra(pod("a"), [claim("c", "uid-a")], CATALOG).dra_gpus)})


@pytest.mark.parametrize(
    ("status", "dra", "capped"),
    [
        pytest.param(report(("ns/a",)), DraHoldings(), True, id="device plugin, alone"),
        pytest.param(report(("ns/a",)), EXCLUSIVE, True, id="DRA, alone"),
        pytest.param(report(("ns/a", "ns/b")), DraHoldings(), False, id="two pods (time-slicing)"),
        pytest.param(report(("ns/a",), shared=True), DraHoldings(), False, id="a replica, one pod now"),
        pytest.param(
            report(("ns/a",)), DraHoldings({"GPU-n0-0": frozenset({"x/z"})}), False, id="DRA: another pod"
        ),
        pytest.param(
            report(("ns/a",)),
            holdings({"ns/a": with_dra(pod("a"), [claim("c", "uid-a", "uid-b")], CATALOG).dra_gpus}),
            False,
            id="DRA claim of two pods",
        ),
    ],
)
def test_only_a_gpu_its_pod_holds_alone_gets_a_cap(
    status: GPUNodeReportStatus, dra: DraHoldings, capped: bool
) -> None:
    assert limits(status, dra) == ({"GPU-n0-0": 450.0} if capped else {})
    # Nor does a budget cap a shared GPU: no policy speaks for all of its pods.
    assert ("GPU-n0-0" in limits(status, dra, budget=300.0)) is capped


def test_mig_gpus_get_no_cap_either() -> None:
    status = report(("ns/a",))
    status.gpus[0] = status.gpus[0].model_copy(update={"migEnabled": True})
    assert limits(status, DraHoldings()) == {}


def test_a_workload_on_a_shared_gpu_is_report_only_and_says_why() -> None:
    mine = policy()
    pods = [pod("a"), pod("b")]
    outcome = reconcile_policy(
        policy=mine,
        status={},
        generation=1,
        pods=pods,
        governance=governance(pods, [mine]),
        reports={"n0": report(("ns/a", "ns/b"))},
        now=NOW,
    )
    rows = {r["name"]: r for r in outcome.status["workloads"]}
    assert all(r["message"].startswith(f"{REPORT_ONLY}: GPU GPU-n0-0: used by 2 pods") for r in rows.values())
    assert all(r["phase"] == "Baseline" for r in rows.values())  # measured nonetheless
    conditions = {c["type"]: c for c in outcome.status["conditions"]}
    assert conditions["ExclusiveGPUs"]["status"] == "False"
    assert conditions["ExclusiveGPUs"]["reason"] == "SharedGPUs"
    assert "a: report-only" in conditions["ExclusiveGPUs"]["message"]
    # The optimizer sees no limits for the GPU, so it never proposes a cap there.
    work = select(mine, pods, governance(pods, [mine])).workloads[0]
    info = snapshot(work, {"n0": report(("ns/a", "ns/b"))}).info
    assert info is not None and info.members[0].minWatts is None


def test_a_workload_holding_its_gpus_alone_may_be_capped() -> None:
    mine = policy()
    outcome = reconcile_policy(
        policy=mine,
        status={},
        generation=1,
        pods=[pod("a")],
        governance=governance([pod("a")], [mine]),
        reports={"n0": report(("ns/a",))},
        now=NOW,
        dra=EXCLUSIVE,
    )
    conditions = {c["type"]: c for c in outcome.status["conditions"]}
    assert conditions["ExclusiveGPUs"]["status"] == "True"
    assert not outcome.status["workloads"][0]["message"].startswith(REPORT_ONLY)


def test_a_budget_never_steers_a_shared_gpu_and_counts_it_at_its_default() -> None:
    status = report(("ns/a", "ns/b"))
    budget = PowerBudgetSpec.model_validate({"nodeSelector": {}, "maxWatts": 2000, "scope": "AllGPUs"})
    result = reconcile_budget(
        spec=budget,
        generation=1,
        previous=None,
        node_labels={"n0": {}},
        reports={"n0": status},
        pods={"ns/a": pod("a"), "ns/b": pod("b")},
        governed={k: Governed(policy(), Config(capWatts=450)) for k in ("ns/a", "ns/b")},
        curves={},
        now=NOW,
    )
    assert result.allocations == []
    # 700 W for the shared board (its default), the idle one at its draw plus the reserve.
    assert result.allocatedWatts >= 700.0


# ---------------------------------------------------------------- the extender


def template(name: str, device_class: str = "gpu.nvidia.com", count: int = 1) -> dict[str, Any]:
    request = {"name": "gpu", "exactly": {"deviceClassName": device_class, "count": count}}
    return {
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"spec": {"devices": {"requests": [request]}}},
    }


def dra_view() -> ClusterView:
    view = ClusterView()
    for kind in KINDS:
        view.replace_all(kind, [])
    view.apply(TEMPLATES, "ADDED", template("two-gpus", count=2))
    view.apply(TEMPLATES, "ADDED", template("a-nic", device_class="rdma.example.com"))
    return view


def pending(*claims: dict[str, str], gpus: int = 0, node: str = "", **status: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "llm:1"}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "uid-p", "labels": {"app": "llm"}},
        "spec": {"nodeName": node, "resourceClaims": list(claims), "containers": [container]},
        "status": {"phase": "Pending", **status},
    }


@pytest.mark.parametrize(
    ("claims", "plugin", "gpus"),
    [
        pytest.param([{"name": "g", "resourceClaimTemplateName": "two-gpus"}], 0, 2, id="template"),
        pytest.param([{"name": "n", "resourceClaimTemplateName": "a-nic"}], 0, 0, id="not a GPU class"),
        pytest.param([{"name": "g", "resourceClaimTemplateName": "two-gpus"}], 1, 3, id="both styles"),
        pytest.param([{"name": "g", "resourceClaimTemplateName": "unknown"}], 0, 0, id="unknown template"),
        pytest.param([{"name": "c", "resourceClaimName": "team-gpu"}], 0, 1, id="an allocated claim"),
    ],
)
def test_a_pod_that_will_get_gpus_through_a_claim_is_a_gpu_pod_for_the_extender(
    claims: list[dict[str, str]], plugin: int, gpus: int
) -> None:
    view = dra_view()
    allocated = {
        "metadata": {"name": "team-gpu", "namespace": "ns"},
        "spec": {
            "devices": {
                "requests": [{"name": "g", "exactly": {"deviceClassName": "gpu.nvidia.com", "count": 4}}]
            }
        },
        "status": {
            "allocation": {
                "devices": {"results": [{"request": "g", "driver": DRIVER, "pool": "n0", "device": "gpu-0"}]}
            }
        },
    }
    view.apply(CLAIMS, "ADDED", allocated)
    assert view.demand(pending(*claims, gpus=plugin)).gpus == gpus


def test_a_bound_dra_pod_commits_its_gpus_to_the_budget() -> None:
    view = dra_view()
    view.apply(
        NODES,
        "ADDED",
        {
            "metadata": {
                "name": "n0",
                "labels": {"rack": "a", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            }
        },
    )
    view.apply(
        BUDGETS,
        "ADDED",
        {
            "metadata": {"name": "b"},
            "spec": {"nodeSelector": {"matchLabels": {"rack": "a"}}, "maxWatts": 5000},
        },
    )
    assert view.budget_views["b"].committed_watts == 0
    # The resource-claim controller made claim p-g-x from the template; the scheduler bound the pod.
    view.apply(
        CLAIMS,
        "ADDED",
        {"metadata": {"name": "p-g-x", "namespace": "ns"}, **template("p-g-x", count=2)["spec"]},
    )
    bound = pending(
        {"name": "g", "resourceClaimTemplateName": "two-gpus"},
        node="n0",
        resourceClaimStatuses=[{"name": "g", "resourceClaimName": "p-g-x"}],
    )
    view.apply(PODS, "ADDED", bound)
    assert view.budget_views["b"].committed_watts == pytest.approx(2 * 700)  # unreported: default limits
