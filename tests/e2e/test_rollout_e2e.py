"""Delivery by rollout on the real control plane: the operator changes a Deployment's pod template,
kube-controller-manager's Deployment controller rolls the KWOK pods, a simulated agent runs each
pod's engine with the arguments its template gave it.

One module-scoped operator and agent; each test has its own Deployment and policy:
- a hint changes the template once, the new pods are measured and the old pods' numbers are not;
- a configuration whose pods never become Ready (no GPU left for the surge pod) is rolled back
  and marked failed;
- a policy deleted mid-rollout leaves the template as it was before edpilot touched it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from edpilot_operator.localrun import Processes, agent_argv, operator_argv, wait_until
from kubetest import Cluster, gpu_pod, policy_rows_with_states, print_log_tails

from edpilot import gpusim

NAMESPACE = "e2e-rollout"
NODE = "gpu-node-2"
TIMEOUT = 300.0


def deployment(name: str, replicas: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": {"app": name},
                    "annotations": {
                        "sim.edpilot.io/workload": "llm-decode",
                        "sim.edpilot.io/precision": "bf16",
                    },
                },
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": NODE},
                    "containers": [
                        {
                            "name": "engine",
                            "image": "example.com/llm:1",
                            "args": ["--port=8000", "--batch-size=8"],
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        }
                    ],
                },
            },
        },
    }


def policy(name: str, ready_timeout: int) -> dict[str, Any]:
    return {
        "apiVersion": "edpilot.io/v1alpha1",
        "kind": "EnergyPolicy",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "objective": "EDP",
            "maxSlowdownPercent": 10,
            "powerCap": {"mode": "Off"},
            "batchSize": {"mode": "Auto", "min": 8, "max": 16, "multipleOf": 8},
            "workMetric": {"port": 8000, "name": "generated_tokens_total", "unit": "tokens"},
            "delivery": {
                "mode": "Rollout",
                "batchSize": {"arg": "--batch-size"},
                "readyTimeoutSeconds": ready_timeout,
            },
        },
    }


@pytest.fixture(scope="module")
def loop(
    crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, Processes]]:
    cluster = crds_installed
    procs = Processes(logs=tmp_path_factory.mktemp("rollout-logs"))
    procs.start(f"agent-{NODE}", agent_argv(cluster.kubeconfig, NODE, 7, "--sim-speed=30"))
    procs.start("operator", operator_argv(cluster.kubeconfig, "--rollout-delivery"))
    cluster.kubectl("create", "namespace", NAMESPACE)
    try:
        yield cluster, procs
    finally:
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=90s", check=False)
        procs.stop_all()
        print_log_tails(procs.logs, 20)


def apply(cluster: Cluster, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))


def row_of(cluster: Cluster, name: str) -> dict[str, Any] | None:
    rows = policy_rows_with_states(cluster, NAMESPACE, name)  # with each row's optimizer state
    return next((r for r in rows if r["name"] == f"Deployment/{name}"), None)


def replica_sets(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json("replicasets", "-n", NAMESPACE, "-l", f"app={name}")[
        "items"
    ]
    return items


def template(cluster: Cluster, name: str) -> dict[str, Any]:
    body: dict[str, Any] = cluster.get_json("deployment", name, "-n", NAMESPACE)
    return body


def engine_args(cluster: Cluster, name: str) -> list[str]:
    args: list[str] = template(cluster, name)["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def running_pods(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    pods = cluster.get_json("pods", "-n", NAMESPACE, "-l", f"app={name}")["items"]
    return [
        p
        for p in pods
        if not p["metadata"].get("deletionTimestamp") and p["status"].get("phase") == "Running"
    ]


def ups(batch: int) -> float:
    return gpusim.operating_point(
        gpusim.H100_SXM, gpusim.llama_decode(), batch, "bf16", 700.0
    ).units_per_second


def test_a_hint_changes_the_template_once_and_only_the_new_pods_are_measured(
    loop: tuple[Cluster, Processes],
) -> None:
    cluster, procs = loop
    apply(cluster, deployment("decode"))
    wait_until("decode's pods to run", lambda: len(running_pods(cluster, "decode")) == 2, 60)
    (original,) = replica_sets(cluster, "decode")
    apply(cluster, policy("decode", ready_timeout=120))

    def converged() -> dict[str, Any] | None:
        assert not procs.dead(), f"process exited: {procs.dead()}"
        row = row_of(cluster, "decode")
        return row if row and row.get("phase") == "Converged" else None

    row = wait_until("decode to converge", converged, TIMEOUT)
    # Batch 16 nearly doubles a memory-bound decode's tokens for the same watts: kept, in one rollout.
    assert row["batchSize"] == 16 and row["rollouts"] == 1, row
    assert engine_args(cluster, "decode") == ["--port=8000", "--batch-size=16"]
    sets = replica_sets(cluster, "decode")
    assert len(sets) == 2, "the template changed exactly once"
    (new,) = [rs for rs in sets if rs["metadata"]["uid"] != original["metadata"]["uid"]]
    assert new["spec"]["template"]["metadata"]["annotations"]["edpilot.io/rollout-config"] == "batch=16"
    assert row["rollout"]["owner"] == "Deployment/decode" and "startedAt" not in row["rollout"]
    # The workload is the new template's pods.
    new_hash = new["metadata"]["labels"]["pod-template-hash"]
    pods = running_pods(cluster, "decode")
    assert {p["metadata"]["labels"]["pod-template-hash"] for p in pods} == {new_hash}
    assert sorted(row["pods"]) == sorted(f"{NAMESPACE}/{p['metadata']['name']}" for p in pods)
    # The probe was measured on the new pods alone: batch 16's throughput over batch 8's is the
    # simulator's ratio, where a window mixing the old pods in would fall about halfway.
    state = row["optimizer"]
    (probe,) = [p for p in state["probes"] if p["stage"] == "batch"]
    assert probe["config"]["batchSize"] == 16 and not probe.get("failed")
    measured = probe["metrics"]["unitsPerSecond"] / state["baseline"]["metrics"]["unitsPerSecond"]
    assert measured == pytest.approx(ups(16) / ups(8), rel=0.08), measured
    # Live hints are not written for a rolled-out workload.
    for pod in pods:
        assert "edpilot.io/batch-size" not in (pod["metadata"].get("annotations") or {})
    cluster.kubectl("delete", "energypolicy", "decode", "-n", NAMESPACE, "--wait=true", "--timeout=60s")
    wait_until(
        "decode's template to be restored", lambda: engine_args(cluster, "decode")[-1] == "--batch-size=8", 60
    )
    cluster.kubectl("delete", "deployment", "decode", "-n", NAMESPACE, "--wait=true", "--timeout=60s")


def fill_the_node(cluster: Cluster, name: str) -> None:
    """Take every GPU of the node but the stuck Deployment's: its surge pod can never be placed."""
    filler = gpu_pod(NAMESPACE, f"{name}-filler", image="example.com/idle:1", node=NODE, gpus=7)
    apply(cluster, filler)


def test_a_configuration_whose_pods_never_become_ready_is_rolled_back_and_marked_failed(
    loop: tuple[Cluster, Processes],
) -> None:
    cluster, procs = loop
    apply(cluster, deployment("stuck", replicas=1))
    wait_until("stuck's pod to run", lambda: len(running_pods(cluster, "stuck")) == 1, 60)
    fill_the_node(cluster, "stuck")
    (first_pod,) = running_pods(cluster, "stuck")
    before = template(cluster, "stuck")["spec"]["template"]
    apply(cluster, policy("stuck", ready_timeout=15))
    wait_until(
        "the template to carry batch 16",
        lambda: engine_args(cluster, "stuck")[-1] == "--batch-size=16",
        TIMEOUT,
    )

    def rolled_back() -> dict[str, Any] | None:
        assert not procs.dead(), f"process exited: {procs.dead()}"
        row = row_of(cluster, "stuck")
        failed = [p for p in (row or {}).get("optimizer", {}).get("probes", []) if p.get("failed")]
        return row if row and failed and engine_args(cluster, "stuck")[-1] == "--batch-size=8" else None

    row = wait_until("the rollout to be rolled back", rolled_back, TIMEOUT)
    (failed,) = [p for p in row["optimizer"]["probes"] if p.get("failed")]
    assert failed["config"]["batchSize"] == 16 and "not Ready within 15 s" in failed["failed"]
    # Back to what it carried before: the template as it was, and the pod that served all along.
    assert template(cluster, "stuck")["spec"]["template"] == before
    wait_until(
        "the surge pod to go",
        lambda: len(cluster.get_json("pods", "-n", NAMESPACE, "-l", "app=stuck")["items"]) == 1,
        60,
    )
    assert [p["metadata"]["uid"] for p in running_pods(cluster, "stuck")] == [first_pod["metadata"]["uid"]]
    converged = wait_until(
        "stuck to converge",
        lambda: (r := row_of(cluster, "stuck")) and r.get("phase") == "Converged" and r,
        TIMEOUT,
    )
    assert converged["batchSize"] == 8 and converged["rollouts"] == 2
    events = cluster.get_json("events", "-n", NAMESPACE, "--field-selector", "involvedObject.name=stuck")[
        "items"
    ]
    assert any(e["reason"] == "ProbeFailed" and "not Ready" in e["message"] for e in events)
    cluster.kubectl("delete", "energypolicy", "stuck", "-n", NAMESPACE, "--wait=true", "--timeout=60s")


def test_a_policy_deleted_mid_rollout_leaves_the_template_as_it_was(loop: tuple[Cluster, Processes]) -> None:
    cluster, _ = loop
    before = template(cluster, "stuck")
    assert "edpilot.io/original-template" not in (before["metadata"].get("annotations") or {})
    apply(cluster, policy("stuck", ready_timeout=3600))
    wait_until("a rollout to start", lambda: engine_args(cluster, "stuck")[-1] == "--batch-size=16", TIMEOUT)
    row = row_of(cluster, "stuck")
    assert row is not None and row["rollout"].get("startedAt"), (
        "the rollout is in flight (its pod cannot be placed)"
    )
    cluster.kubectl("delete", "energypolicy", "stuck", "-n", NAMESPACE, "--wait=true", "--timeout=60s")
    after = template(cluster, "stuck")
    assert after["spec"]["template"] == before["spec"]["template"]
    assert "edpilot.io/original-template" not in (after["metadata"].get("annotations") or {})
