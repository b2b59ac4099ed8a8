"""Two operator replicas in one kopf peering on the real control plane: only one acts.

The chart runs the operator with `--peering` so that a second replica (a rolling update, or
replicas > 1) never decides alongside the first. The replica with the lower priority must pause
while the other lives, take no policy or budget action meanwhile, and take over when the other
leaves the peering.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from edpilot_operator.localrun import Processes, agent_argv, operator_argv, repo_root, wait_until
from kubetest import Cluster, gpu_pod

NAMESPACE = "e2e-peering"
NODE = "gpu-node-0"
PEERING = "e2e-peering"
HIGH, LOW = "operator-high", "operator-low"
LEASE = "peering-operator"  # the replicas' liveness Lease, in NAMESPACE
# A handler run logs "Timer 'reconcile_policy' succeeded." (kopf), once per policy and interval.
ACTION = re.compile(r"(Timer|Handler) '[a-z_]+' (succeeded|failed)")


def policy(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "edpilot.io/v1alpha1",
        "kind": "EnergyPolicy",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "objective": "EDP",
            "maxSlowdownPercent": 10,
            "powerCap": {"mode": "Auto", "minPercent": 40},
            "workMetric": {"port": 8000, "name": "work_units_total"},
        },
    }


def pod(name: str) -> dict[str, Any]:
    annotations = {"sim.edpilot.io/workload": "training"}
    return gpu_pod(
        NAMESPACE, name, image="example.com/train:1", node=NODE, labels={"app": name}, annotations=annotations
    )


def replica(cluster: Cluster, name: str, priority: int) -> list[str]:
    return operator_argv(
        cluster.kubeconfig,
        f"--peering={PEERING}",
        f"--priority={priority}",
        f"--identity={name}",
        f"--lease-namespace={NAMESPACE}",
        f"--lease-name={LEASE}",
    )


def lease_holder(cluster: Cluster) -> str:
    proc = cluster.kubectl("get", "lease", LEASE, "-n", NAMESPACE, "-o", "json", check=False)
    return str(json.loads(proc.stdout)["spec"].get("holderIdentity", "")) if proc.returncode == 0 else ""


def _cached(cluster: Cluster) -> bool:
    listed = cluster.kubectl(
        "get", "--raw", "/apis/kopf.dev/v1/clusterkopfpeerings?resourceVersion=0", check=False
    )
    return listed.returncode == 0 and PEERING in listed.stdout


def log_of(procs: Processes, name: str) -> str:
    path = procs.logs / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def observed(cluster: Cluster, name: str) -> bool:
    status = cluster.get_json("energypolicy", name, "-n", NAMESPACE).get("status") or {}
    return bool(status.get("workloads"))


@pytest.fixture(scope="module")
def replicas(
    crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, Processes]]:
    cluster = crds_installed
    procs = Processes(logs=tmp_path_factory.mktemp("peering-logs"))
    peering = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}}
    try:
        cluster.kubectl(
            "apply", "-f", str(repo_root() / "charts" / "edpilot" / "crds" / "kopf-peerings.yaml")
        )
        cluster.kubectl(
            "wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=30s"
        )
        cluster.kubectl("apply", "-f", "-", input=json.dumps(peering))
        # As after a chart install: the API server serves the peering from its watch cache. Right
        # after the CRD is created it may not yet, and a replica's watch then hears nothing for a
        # minute, so it neither pauses nor resumes.
        wait_until("the peering to be served from the watch cache", lambda: _cached(cluster), 60)
        cluster.kubectl("create", "namespace", NAMESPACE)
        procs.start("agent", agent_argv(cluster.kubeconfig, NODE, 3))
        # The active replica first, as in a rolling update that adds a lower-priority one.
        procs.start(HIGH, replica(cluster, HIGH, 900))
        wait_until(
            "the first replica to resume",
            lambda: "Resuming operations" in log_of(procs, HIGH),
            60,
            interval=0.5,
        )
        procs.start(LOW, replica(cluster, LOW, 100))
        # A replica starts paused and only logs when that changes: its start-up is all it logs.
        wait_until(
            "the second replica to start",
            lambda: "Initial authentication has finished" in log_of(procs, LOW),
            60,
            interval=0.5,
        )
        yield cluster, procs
    finally:
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=60s", check=False)
        procs.stop_all()
        cluster.kubectl("delete", "clusterkopfpeering", PEERING, "--ignore-not-found", check=False)
        for name in (HIGH, LOW):
            print(f"--- {name}.log (last lines)\n" + "\n".join(log_of(procs, name).splitlines()[-10:]))


def test_the_lower_priority_replica_pauses_and_takes_over_when_the_other_leaves(
    replicas: tuple[Cluster, Processes],
) -> None:
    cluster, procs = replicas
    # The active replica reconciles a new policy; the paused one takes no action at all.
    cluster.kubectl("apply", "-f", "-", input=json.dumps(policy("first")))
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod("first")))
    wait_until("the active replica to reconcile the policy", lambda: observed(cluster, "first"), 60)
    time.sleep(3)  # several reconcile intervals (1 s)
    assert not procs.dead(), procs.dead()
    assert ACTION.search(log_of(procs, HIGH)), "the active replica logged no handler run"
    assert not ACTION.search(log_of(procs, LOW)), "the paused replica acted"
    assert "Resuming operations" not in log_of(procs, LOW)
    # Only the active replica renews the agents' Lease: a paused one's timers do not run.
    wait_until("the active replica to hold the Lease", lambda: lease_holder(cluster) == HIGH, 30, 0.5)
    holders = set()
    for _ in range(12):  # more than two renewal periods (FAST_OPERATOR_ARGS: 15 s lease, 5 s)
        holders.add(lease_holder(cluster))
        time.sleep(1)
    assert holders == {HIGH}, holders

    # The active replica leaves (SIGTERM: kopf removes it from the peering): the other resumes.
    left_at = time.monotonic()
    procs.stop(HIGH, signal.SIGTERM)
    wait_until(
        "the low-priority replica to resume",
        lambda: "Resuming operations" in log_of(procs, LOW),
        30,
        interval=0.5,
    )
    cluster.kubectl("apply", "-f", "-", input=json.dumps(policy("second")))
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod("second")))
    wait_until("the remaining replica to reconcile a new policy", lambda: observed(cluster, "second"), 60)
    print(f"took over and reconciled a new policy {time.monotonic() - left_at:.1f} s after the other left")
    assert ACTION.search(log_of(procs, LOW))
    wait_until("the new active replica to renew the Lease", lambda: lease_holder(cluster) == LOW, 30, 0.5)
