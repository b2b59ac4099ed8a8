"""A PowerBudget on the real control plane: KWOK GPU nodes, simulated agents, the operator.

Four sim pods converge under a policy that only tunes the power cap; then a PowerBudget over
their two nodes is created with room to spare and shrunk below what their GPUs commit. The
operator must bring the sum of limits under the budget within two report intervals, share the
watts about as well as the water-filling optimum on gpusim's true curves, say so in the budget's
status, and give the policy's caps back when the budget goes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from edpilot_agent.sim import PROFILES
from edpilot_operator.budgets import IDLE_RESERVE_FRACTION
from edpilot_operator.localrun import Processes, agent_argv, operator_argv, wait_until
from kubetest import Cluster, gpu_pod, policy_rows_with_states, print_log_tails

from edpilot import gpusim
from edpilot.budget import grid_optimum
from edpilot.contract import committed_watts
from edpilot.models import GPUNodeReportStatus, GPUStatus

NAMESPACE = "e2e-budget"
NODES = ("gpu-node-0", "gpu-node-1")
RACK_LABEL = "e2e.edpilot.io/rack"
BUDGET = "e2e-rack"
MIN_PERCENT = 40.0
LO = MIN_PERCENT / 100 * 700
SPEED = "--sim-speed=30"
# Converging took 134 s here with the golden-section cap search; the guided search lands more
# probes near the slowdown limit, where the sequential test measures longer (about 20% more time
# to converge in `edpilot simulate`'s training row).
CONVERGE_TIMEOUT = 300.0
# localrun.FAST_OPERATOR_ARGS: the operator's timers (budget and report composer) run every
# second; a converged node's agent reports every 5 s, and sooner (at most every second) once
# a limit changed. Two report intervals, plus slack for a 2-core machine shared by other jobs.
REPORT_INTERVAL = 5.0
SLACK = 5.0
DEADLINE = 2 * REPORT_INTERVAL + SLACK

POLICY = {
    "apiVersion": "edpilot.io/v1alpha1",
    "kind": "EnergyPolicy",
    "metadata": {"name": "cap-only", "namespace": NAMESPACE},
    "spec": {
        "selector": {"matchLabels": {"app": "budgeted"}},
        "objective": "EDP",
        "maxSlowdownPercent": 10,
        "powerCap": {"mode": "Auto", "minPercent": MIN_PERCENT, "maxPercent": 100},
        "workMetric": {"port": 8000, "name": "work_units_total", "unit": "units"},
    },
}


@dataclass(frozen=True)
class SimWork:
    node: str
    kind: str
    precision: str
    batch: int

    def rate(self, cap: float) -> float:
        """What the simulated pod does at this cap: a one-GPU synchronous step, as the sim agent runs it."""
        step = gpusim.job_step(
            gpusim.H100_SXM, PROFILES[self.kind](), self.precision, [self.batch], [cap], batch_size=self.batch
        )
        return step.units_per_second


# Three compute-bound pods whose curves differ a little, and one memory-bound pod whose watts
# buy almost nothing: the allocation has something to get right.
WORK = {
    "train-a": SimWork(NODES[0], "training", "bf16", 8),
    "train-b": SimWork(NODES[0], "training", "bf16", 2),
    "gemm-c": SimWork(NODES[1], "gemm", "bf16", 4),
    "decode-d": SimWork(NODES[1], "llm-decode", "bf16", 64),
}


def sim_pod(name: str, work: SimWork) -> dict[str, Any]:
    annotations = {
        "sim.edpilot.io/workload": work.kind,
        "sim.edpilot.io/precision": work.precision,
        "sim.edpilot.io/batch-size": str(work.batch),
    }
    return gpu_pod(
        NAMESPACE,
        name,
        image="example.com/train:1",
        node=work.node,
        labels={"app": "budgeted"},
        annotations=annotations,
    )


def budget_body(max_watts: float) -> dict[str, Any]:
    return {
        "apiVersion": "edpilot.io/v1alpha1",
        "kind": "PowerBudget",
        "metadata": {"name": BUDGET},
        "spec": {"nodeSelector": {"matchLabels": {RACK_LABEL: "a"}}, "maxWatts": max_watts},
    }


@pytest.fixture(scope="module")
def converged(crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The four pods converged, their chosen caps enforced."""
    cluster = crds_installed
    procs = Processes(logs=tmp_path_factory.mktemp("budget-logs"))
    try:
        for node in NODES:
            cluster.kubectl("label", "node", node, f"{RACK_LABEL}=a", "--overwrite")
        for seed, node in enumerate(NODES):
            procs.start(f"agent-{node}", agent_argv(cluster.kubeconfig, node, seed + 10, SPEED))
        procs.start("operator", operator_argv(cluster.kubeconfig))
        cluster.kubectl("create", "namespace", NAMESPACE)
        cluster.kubectl("apply", "-f", "-", input=json.dumps(POLICY))
        for name, work in WORK.items():
            cluster.kubectl("apply", "-f", "-", input=json.dumps(sim_pod(name, work)))

        def all_converged() -> bool:
            assert not procs.dead(), f"process exited: {procs.dead()}"
            rows = {r["name"]: r for r in policy_rows(cluster)}
            return all(rows.get(n, {}).get("phase") == "Converged" for n in WORK)

        started = time.monotonic()
        wait_until("every pod to converge", all_converged, CONVERGE_TIMEOUT)
        print(f"converged after {time.monotonic() - started:.0f} s")
        wait_until(
            "the chosen caps to be enforced", lambda: same(enforced(cluster), chosen_caps(cluster)), 30
        )
        yield cluster
    finally:
        # While the operator runs: it removes the finalizers its timers put on the budget and policy.
        cluster.kubectl(
            "delete", "powerbudget", BUDGET, "--ignore-not-found", "--wait=true", "--timeout=30s", check=False
        )
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=60s", check=False)
        procs.stop_all()
        for node in NODES:
            cluster.kubectl("label", "node", node, f"{RACK_LABEL}-", check=False)
        print_log_tails(procs.logs, 10)


def policy_rows(cluster: Cluster) -> list[dict[str, Any]]:
    """The policy's rows, each with its optimizer state (its WorkloadOptimizerState's)."""
    return policy_rows_with_states(cluster, NAMESPACE, "cap-only")


def chosen_caps(cluster: Cluster) -> dict[str, float]:
    """The optimizer's cap per pod (its annotation), what the budget may only lower."""
    pods = cluster.get_json("pods", "-n", NAMESPACE)["items"]
    return {
        p["metadata"]["name"]: float(p["metadata"]["annotations"]["edpilot.io/power-cap-watts"])
        for p in pods
        if "edpilot.io/power-cap-watts" in (p["metadata"].get("annotations") or {})
    }


def node_gpus(cluster: Cluster) -> list[GPUStatus]:
    gpus: list[GPUStatus] = []
    for node in NODES:
        report = cluster.get_json("gpunodereport", node)
        gpus.extend(GPUNodeReportStatus.model_validate(report["status"]).gpus)
    return gpus


def enforced(cluster: Cluster, gpus: list[GPUStatus] | None = None) -> dict[str, float]:
    by_pod = {}
    for g in gpus if gpus is not None else node_gpus(cluster):
        for pod in g.pods:
            namespace, name = pod.split("/", 1)
            if namespace == NAMESPACE:
                by_pod[name] = g.enforcedLimitWatts
    return by_pod


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1.0 for k in a)


def optimum_lost(caps_hi: dict[str, float], available: float, step: int = 1) -> float:
    """The least throughput (each pod relative to its rate at 700 W) any caps within [lo, chosen]
    summing to at most `available` lose against the chosen caps, on the true curves."""
    choices = [
        {c: WORK[n].rate(c) / WORK[n].rate(700) for c in range(int(LO), int(hi) + 1, step)}
        for n, hi in caps_hi.items()
    ]
    before = sum(WORK[n].rate(hi) / WORK[n].rate(700) for n, hi in caps_hi.items())
    return before - grid_optimum(choices, available)


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions") or []}


def test_a_shrunk_budget_holds_within_two_report_intervals(converged: Cluster) -> None:
    cluster = converged
    chosen = chosen_caps(cluster)
    assert set(chosen) == set(WORK)
    committed = committed_watts(node_gpus(cluster))

    # Room to spare: the status describes the nodes, no cap moves.
    cluster.kubectl("apply", "-f", "-", input=json.dumps(budget_body(round(committed + 400))))

    def status_with_allocations() -> dict[str, Any] | None:
        status = cluster.get_json("powerbudget", BUDGET).get("status") or {}
        return status if len(status.get("allocations") or []) == len(WORK) else None

    status = wait_until("the budget's first status", status_with_allocations, 20, interval=0.5)
    assert status["nodes"] == list(NODES)
    assert status["gpus"] == 16
    assert conditions(status) == {
        "Feasible": ("True", "AllocationFits"),
        "WithinBudget": ("True", "LimitsWithinBudget"),
        "SlowdownRespected": ("True", "WithinSlowdown"),
    }
    by_gpu = {g.uuid: g for g in node_gpus(cluster)}
    for allocation in status["allocations"]:
        pod = by_gpu[allocation["gpuUUID"]].pods[0].split("/", 1)[1]
        assert allocation["watts"] == chosen[pod]
    assert same(enforced(cluster), chosen)

    # Shrink it below what the GPUs commit now.
    max_watts = round(committed - 500)
    shrunk_at = time.monotonic()
    cluster.kubectl(
        "patch", "powerbudget", BUDGET, "--type=merge", "-p", json.dumps({"spec": {"maxWatts": max_watts}})
    )

    def holding() -> list[GPUStatus] | None:
        gpus = node_gpus(cluster)
        return gpus if committed_watts(gpus) <= max_watts else None

    gpus = wait_until("the budget to hold", holding, DEADLINE + 10, interval=0.25)
    took = time.monotonic() - shrunk_at
    print(f"budget {max_watts} W held after {took:.1f} s (was {committed:.0f} W)")
    assert took <= DEADLINE

    def status_holding() -> dict[str, Any] | None:
        status: dict[str, Any] = cluster.get_json("powerbudget", BUDGET)["status"]
        held = conditions(status).get("WithinBudget") == ("True", "LimitsWithinBudget")
        return status if held and status.get("observedGeneration") == 2 else None

    status = wait_until("the status to see it hold", status_holding, 10, interval=0.5)
    caps = enforced(cluster, gpus)
    for name, cap in caps.items():
        assert LO - 1 <= cap <= chosen[name], (name, cap, chosen[name])
    allocated = {a["gpuUUID"]: a["watts"] for a in status["allocations"]}
    reserved = status["allocatedWatts"] - sum(allocated.values())
    idle = sum(g.powerWatts for g in gpus if not g.pods)
    assert reserved == pytest.approx(idle * (1 + IDLE_RESERVE_FRACTION), abs=30)  # draws move by noise
    assert status["headroomWatts"] == pytest.approx(max_watts - status["allocatedWatts"], abs=0.2)
    assert status["headroomWatts"] >= 0
    assert status["measuredWatts"] > 0
    assert conditions(status)["Feasible"] == ("True", "AllocationFits")
    # 500 W less puts the compute-bound GPUs well below the caps their 10% slowdown allows.
    assert conditions(status)["SlowdownRespected"] == ("False", "SlowdownExceeded")
    # The policy's own choice is untouched: the budget only bounds what the agents are asked for.
    assert chosen_caps(cluster) == chosen

    # Throughput lost against the water-filling optimum, both on gpusim's true curves, with the
    # watts the operator had (one status: its allocations and what it reserved for the rest).
    available = max_watts - reserved
    by_gpu = {g.uuid: g for g in gpus}
    shares = {by_gpu[u].pods[0].split("/", 1)[1]: w for u, w in allocated.items()}
    before = sum(WORK[n].rate(chosen[n]) / WORK[n].rate(700) for n in WORK)
    ours = sum(WORK[n].rate(shares[n]) / WORK[n].rate(700) for n in WORK)
    lost_ours, lost_best = before - ours, optimum_lost(chosen, available)
    print(
        f"shares {shares} (chosen {chosen}); lost {lost_ours:.4f} vs optimum {lost_best:.4f} GPU-equivalents"
    )
    measured = {
        row["name"]: sorted(
            (
                (p["config"].get("capWatts") or 700.0),
                round(p["metrics"]["unitsPerSecond"] / WORK[row["name"]].rate(700), 4),
            )
            for p in [row["optimizer"]["baseline"], *row["optimizer"]["probes"]]
            if p.get("metrics")
        )
        for row in policy_rows(cluster)
    }
    # The curves the operator allocated on are the optimizer's few noisy probes, shaped by the
    # H100's compute-bound curve (edpilot.placement's prior) where no probe reached.
    ratio = lost_ours / lost_best
    print(f"throughput lost vs the water-filling optimum on the true curves: {ratio:.3f}x")
    assert lost_best > 0 and ratio <= 1.05, (lost_ours, lost_best, measured)

    # Below what even the policy's floors need: every GPU at its floor, and the status says why.
    cluster.kubectl(
        "patch", "powerbudget", BUDGET, "--type=merge", "-p", json.dumps({"spec": {"maxWatts": 1000}})
    )

    def infeasible() -> dict[str, Any] | None:
        status: dict[str, Any] = cluster.get_json("powerbudget", BUDGET)["status"]
        return status if status.get("observedGeneration") == 3 else None

    status = wait_until("the infeasible budget's status", infeasible, 10, interval=0.5)
    assert conditions(status)["Feasible"] == ("False", "BudgetInfeasible")
    assert {a["watts"] for a in status["allocations"]} == {LO}
    wait_until("every GPU at its floor", lambda: same(enforced(cluster), dict.fromkeys(WORK, LO)), DEADLINE)
    wait_until(
        "the status to say the budget is broken",
        lambda: (
            conditions(cluster.get_json("powerbudget", BUDGET)["status"])["WithinBudget"]
            == ("False", "OverBudget")
        ),
        10,
        interval=0.5,
    )

    # Gone: the policy's caps come back.
    cluster.kubectl("delete", "powerbudget", BUDGET, "--wait=true", "--timeout=30s")
    wait_until(
        "the chosen caps to come back", lambda: same(enforced(cluster), chosen), DEADLINE + 10, interval=0.5
    )
