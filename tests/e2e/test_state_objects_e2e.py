"""Per-workload optimizer state on the real control plane: the operator keeps each workload's state
in its own WorkloadOptimizerState (owned by the policy), deletes it when the workload leaves, the
real kube-controller-manager's garbage collector deletes the rest with the policy, and a state an
older operator left embedded in the policy's status row is migrated into its object and resumed.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from edpilot_operator.localrun import Processes, agent_argv, operator_argv, wait_until
from kubetest import SIM_TRAINER, Cluster, gpu_pod, print_log_tails, training_policy

from edpilot.contract import LABEL_STATE_POLICY, state_name

NAMESPACE = "e2e-states"
NODE = "gpu-node-2"
POLICY = "trainers"
TIMEOUT = 180.0


def policy_body() -> dict[str, Any]:
    return training_policy(NAMESPACE, POLICY, "trainer")


def trainer(name: str) -> dict[str, Any]:
    return gpu_pod(
        NAMESPACE,
        name,
        image="example.com/train:1",
        node=NODE,
        labels={"app": "trainer"},
        annotations=SIM_TRAINER,
    )


@pytest.fixture(scope="module")
def run(
    crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, Processes]]:
    cluster = crds_installed
    procs = Processes(logs=tmp_path_factory.mktemp("state-logs"))
    cluster.kubectl("create", "namespace", NAMESPACE)
    procs.start(f"agent-{NODE}", agent_argv(cluster.kubeconfig, NODE, 3))
    procs.start("operator", operator_argv(cluster.kubeconfig))
    try:
        yield cluster, procs
    finally:
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=60s", check=False)
        procs.stop_all()
        print_log_tails(procs.logs, 15)


def states(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """The namespace's WorkloadOptimizerStates by workload."""
    items = cluster.get_json("workloadoptimizerstates", "-n", NAMESPACE)["items"]
    return {obj["spec"]["workload"]: obj for obj in items}


def rows(cluster: Cluster) -> dict[str, dict[str, Any]]:
    policy = cluster.get_json("energypolicy", POLICY, "-n", NAMESPACE)
    return {r["name"]: r for r in (policy.get("status") or {}).get("workloads") or []}


def test_each_workload_gets_its_own_state_object_owned_by_the_policy(run: tuple[Cluster, Processes]) -> None:
    cluster, procs = run
    for name in ("trainer-a", "trainer-b"):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(trainer(name)))
    cluster.kubectl("apply", "-f", "-", input=json.dumps(policy_body()))
    uid = cluster.get_json("energypolicy", POLICY, "-n", NAMESPACE)["metadata"]["uid"]

    def both_measured() -> dict[str, dict[str, Any]] | None:
        assert not procs.dead(), f"exited: {procs.dead()}"
        found = states(cluster)
        return (
            found
            if set(found) == {"trainer-a", "trainer-b"}
            and all(s["spec"]["state"].get("last") for s in found.values())
            else None
        )

    found = wait_until("a state object per workload", both_measured, TIMEOUT, interval=0.5)
    for workload, obj in found.items():
        meta = obj["metadata"]
        assert meta["name"] == state_name(POLICY, workload)
        assert meta["labels"][LABEL_STATE_POLICY] == POLICY
        (owner,) = meta["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "EnergyPolicy",
            POLICY,
            uid,
            True,
        )
        assert obj["spec"]["policy"] == POLICY and obj["spec"]["state"]["schemaVersion"] >= 1
        # Stored exactly as written (no null for an empty map), so "unchanged" can be seen; the
        # state is one atomic field to the API server, so managedFields stay small.
        assert "null" not in json.dumps(obj["spec"]["state"])
        assert len(json.dumps(meta.get("managedFields", []))) < 1000, meta.get("managedFields")
    # The status rows keep the figures only.
    assert {name: "optimizer" in row for name, row in rows(cluster).items()} == {
        "trainer-a": False,
        "trainer-b": False,
    }


def test_a_state_embedded_in_the_status_by_an_older_operator_is_migrated_and_resumed(
    run: tuple[Cluster, Processes],
) -> None:
    """The operator is killed once trainer-a has a baseline; its state is put back where older
    operators kept it (the status row) and its object deleted, as after an upgrade. The restarted
    operator resumes from the embedded state (the same baseline, not a new one), writes it to the
    object and drops it from the row."""
    cluster, procs = run

    def with_baseline() -> dict[str, Any] | None:
        obj = states(cluster).get("trainer-a")
        return obj if obj and obj["spec"]["state"].get("baseline") else None

    wait_until("trainer-a's baseline", with_baseline, TIMEOUT, interval=0.5)
    procs.stop("operator", sig=signal.SIGKILL)
    embedded = states(cluster)["trainer-a"]["spec"]["state"]
    status = cluster.get_json("energypolicy", POLICY, "-n", NAMESPACE)["status"]
    for row in status["workloads"]:
        if row["name"] == "trainer-a":
            row["optimizer"] = embedded
    cluster.kubectl(
        "patch", "energypolicy", POLICY, "-n", NAMESPACE, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"workloads": status["workloads"]}}),
    )  # fmt: skip
    cluster.kubectl("delete", "workloadoptimizerstate", state_name(POLICY, "trainer-a"), "-n", NAMESPACE)
    assert rows(cluster)["trainer-a"]["optimizer"] == embedded
    procs.start("operator-restarted", operator_argv(cluster.kubeconfig))

    def migrated() -> dict[str, Any] | None:
        assert not procs.dead(), f"exited: {procs.dead()}"
        obj = states(cluster).get("trainer-a")
        row = rows(cluster).get("trainer-a")
        return obj if obj and row and "optimizer" not in row else None

    obj = wait_until("the embedded state to move to its object", migrated, 60, interval=0.5)
    resumed = obj["spec"]["state"]
    assert resumed["baseline"] == embedded["baseline"], "a new baseline: it restarted instead of resuming"
    assert resumed["exploration"] == embedded["exploration"]
    assert len(resumed.get("probes") or []) >= len(embedded.get("probes") or [])
    log = (procs.logs / "operator-restarted.log").read_text(errors="replace")
    assert "StateDiscarded" not in log and "not stored" not in log


def test_a_workload_that_leaves_loses_its_state_and_the_policy_takes_the_rest_along(
    run: tuple[Cluster, Processes],
) -> None:
    cluster, procs = run
    assert set(states(cluster)) == {"trainer-a", "trainer-b"}
    cluster.kubectl(
        "delete", "pod", "trainer-b", "-n", NAMESPACE, "--grace-period=0", "--force", "--wait=true"
    )
    wait_until("trainer-b's state deleted", lambda: set(states(cluster)) == {"trainer-a"}, 60, interval=0.5)
    # The operator is stopped first: the policy's states go with it through the garbage collector
    # (kube-controller-manager), not through the operator. Its finalizer is removed by hand.
    procs.stop("operator-restarted", sig=signal.SIGKILL)
    cluster.kubectl("delete", "energypolicy", POLICY, "-n", NAMESPACE, "--wait=false")
    cluster.kubectl(
        "patch",
        "energypolicy",
        POLICY,
        "-n",
        NAMESPACE,
        "--type=merge",
        "-p",
        '{"metadata":{"finalizers":null}}',
    )
    wait_until("the policy's states garbage-collected", lambda: states(cluster) == {}, 60, interval=0.5)
