"""The operator's liveness on the real control plane: one coordination.k8s.io Lease.

With no policy and no budget the operator has nothing to enforce: it writes no report spec and
creates no Lease. Once a policy exists, it creates the Lease it is told to (`--lease-namespace`,
`--lease-name`) and renews it every leaseSeconds/3; every report's spec names it once and is then
left alone: over three lease periods of a steady node, no report spec is written (its generation
stays put) while the Lease is renewed about nine times. No report carries kopf's finalizer, and
one left by an operator that ran a timer per report is removed. SIGKILL the operator and every agent, watching that Lease, declares it
expired no sooner than the lease after the last renewal and within one report interval after.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from edpilot_operator.localrun import Processes, agent_argv, operator_argv, wait_until
from kubetest import Cluster, kwok_gpu_nodes, print_log_tails, remove_gpu_nodes

NAMESPACE = "e2e-lease"
LEASE = "e2e-operator"
NODES = ("lease-gpu-0", "lease-gpu-1")
LEASE_SECONDS = 15  # localrun.FAST_OPERATOR_ARGS
SLOW_REPORT_SECONDS = 5  # the agents' report interval of a node where nothing explores


@dataclass
class Running:
    cluster: Cluster
    procs: Processes

    def lease(self) -> dict[str, str | int]:
        spec: dict[str, str | int] = self.cluster.get_json("lease", LEASE, "-n", NAMESPACE)["spec"]
        return spec

    def lease_valid(self, node: str) -> tuple[str, str]:
        proc = self.cluster.kubectl("get", "gpunodereport", node, "-o", "json", check=False)
        if proc.returncode != 0:
            return "", ""  # the agent has not created its report yet
        status = json.loads(proc.stdout).get("status") or {}
        found = [c for c in status.get("conditions") or [] if c["type"] == "LeaseValid"]
        return (found[0]["status"], found[0]["reason"]) if found else ("", "")


POLICY = {
    "apiVersion": "edpilot.io/v1alpha1",
    "kind": "EnergyPolicy",
    "metadata": {"name": "nothing-yet", "namespace": NAMESPACE},
    "spec": {"selector": {"matchLabels": {"app": "none"}}, "workMetric": {"name": "work_units_total"}},
}
KOPF_FINALIZER = "edpilot.io/finalizer"


def wall(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def running(crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    cluster = crds_installed
    procs = Processes(logs=tmp_path_factory.mktemp("lease-logs"))
    cluster.kubectl("apply", "-f", "-", input=kwok_gpu_nodes(len(NODES), 8, "lease-gpu"))
    cluster.kubectl("create", "namespace", NAMESPACE)
    try:
        procs.start(
            "operator",
            # Its own namespace only: policies other tests left in theirs would give it work.
            operator_argv(
                cluster.kubeconfig,
                f"--namespace={NAMESPACE}",
                f"--lease-namespace={NAMESPACE}",
                f"--lease-name={LEASE}",
            ),
        )
        for seed, node in enumerate(NODES):
            procs.start(f"agent-{node}", agent_argv(cluster.kubeconfig, node, seed + 40))
        yield Running(cluster, procs)
    except BaseException:
        print_log_tails(procs.logs)
        raise
    finally:
        procs.stop_all()
        remove_gpu_nodes(cluster, *NODES)
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def test_with_no_policy_and_no_budget_the_operator_writes_no_spec_and_no_lease(running: Running) -> None:
    cluster = running.cluster
    budgets = cluster.get_json("powerbudgets")["items"]
    assert not budgets, f"PowerBudgets left by another test: {[b['metadata']['name'] for b in budgets]}"
    wait_until("every agent to report", lambda: all(running.lease_valid(n)[0] for n in NODES), 90, 0.5)
    time.sleep(3)  # three of the operator's report intervals (FAST_OPERATOR_ARGS)
    for node in NODES:
        report = cluster.get_json("gpunodereport", node)
        assert "operatorLease" not in (report.get("spec") or {}), report["spec"]
        assert KOPF_FINALIZER not in (report["metadata"].get("finalizers") or [])
        assert running.lease_valid(node) == ("False", "NoLease")
    assert cluster.kubectl("get", "lease", LEASE, "-n", NAMESPACE, check=False).returncode != 0
    cluster.kubectl("apply", "-f", "-", input=json.dumps(POLICY))


def test_the_operator_renews_one_lease_and_leaves_steady_specs_alone(running: Running) -> None:
    cluster = running.cluster
    wait_until(
        "every agent to hold the operator's lease",
        lambda: all(running.lease_valid(n) == ("True", "LeaseHeld") for n in NODES),
        90,
        0.5,
    )
    lease = running.lease()
    assert lease["leaseDurationSeconds"] == LEASE_SECONDS and lease["holderIdentity"]
    for node in NODES:
        spec = cluster.get_json("gpunodereport", node)["spec"]
        assert spec["operatorLease"] == {"namespace": NAMESPACE, "name": LEASE}
        assert "lease" not in spec
    time.sleep(3)  # past the first cycles that write the spec
    before = {n: cluster.get_json("gpunodereport", n)["metadata"]["generation"] for n in NODES}
    renewals: set[str] = set()
    deadline = time.monotonic() + 3 * LEASE_SECONDS
    while time.monotonic() < deadline:
        renewals.add(str(running.lease()["renewTime"]))
        time.sleep(0.5)
    after = {n: cluster.get_json("gpunodereport", n)["metadata"]["generation"] for n in NODES}
    print(
        f"{len(renewals)} Lease renewals seen in {3 * LEASE_SECONDS} s; report generations {before} -> {after}"
    )
    assert after == before, "a steady node's spec was written again"
    # One renewal per leaseSeconds/3: 9 in three lease periods (the first may fall just outside).
    assert 8 <= len(renewals) <= 10, sorted(renewals)
    assert all(running.lease_valid(n) == ("True", "LeaseHeld") for n in NODES)


def test_a_finalizer_of_the_per_report_timers_is_removed(running: Running) -> None:
    """An operator that ran a kopf timer per report put kopf's finalizer on each; once nothing
    needs it, kopf removes it at the report's next event (the agent's next status write)."""
    cluster, node = running.cluster, NODES[0]
    finalizers = json.dumps({"metadata": {"finalizers": [KOPF_FINALIZER]}})
    cluster.kubectl("patch", "gpunodereport", node, "--type=merge", "-p", finalizers)

    def finalizers_left() -> list[str]:
        return list(cluster.get_json("gpunodereport", node)["metadata"].get("finalizers") or [])

    wait_until("kopf to remove its finalizer", lambda: KOPF_FINALIZER not in finalizers_left(), 30, 0.5)


def test_operator_killed_every_agent_lets_the_lease_expire_on_time(running: Running) -> None:
    running.procs.stop("operator", sig=signal.SIGKILL)
    last = wall(str(running.lease()["renewTime"]))
    expired: dict[str, datetime] = {}

    def all_expired() -> bool:
        for node in NODES:
            if node not in expired and running.lease_valid(node) == ("False", "LeaseExpired"):
                expired[node] = datetime.now(UTC)
        return len(expired) == len(NODES)

    wait_until("every agent to find the lease expired", all_expired, LEASE_SECONDS + 30, 0.25)
    late = {n: (expired[n] - last).total_seconds() for n in NODES}
    print(f"LeaseExpired reported {late} s after the last renewal")
    # Not before the lease ran out; within it plus one report interval (polling adds ~1 s).
    assert all(LEASE_SECONDS - 1 <= s <= LEASE_SECONDS + SLOW_REPORT_SECONDS + 2 for s in late.values()), late
