"""The closed loop on the real control plane: KWOK GPU nodes, simulated agents, the operator.

One module-scoped run per scenario keeps the suite inside CI's budget: the uninterrupted run, a
run whose operator is SIGKILLed mid-exploration, then the policy's deletion.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from edpilot_operator.localrun import Processes, agent_argv, operator_argv, wait_until
from kubetest import Cluster, gpu_pod, policy_rows_with_states, print_log_tails

from edpilot import gpusim
from edpilot.contract import HINT_ANNOTATIONS

NAMESPACE = "e2e-loop"
NODES = ("gpu-node-0", "gpu-node-1")
MAX_SLOWDOWN = 10.0
MIN_PERCENT = 40.0
CONVERGE_TIMEOUT = 420.0
SPEED = "--sim-speed=30"

POLICY = {
    "apiVersion": "edpilot.io/v1alpha1",
    "kind": "EnergyPolicy",
    "metadata": {"name": "decode", "namespace": NAMESPACE},
    "spec": {
        "selector": {"matchLabels": {"app": "decode"}},
        "objective": "EDP",
        "maxSlowdownPercent": MAX_SLOWDOWN,
        "powerCap": {"mode": "Auto", "minPercent": MIN_PERCENT, "maxPercent": 100},
        "batchSize": {"mode": "Auto", "min": 8, "max": 256, "multipleOf": 8},
        "quantization": {"mode": "Auto", "allowed": ["bf16", "fp8"], "maxAccuracyDropPercent": 1.0},
        "workMetric": {"port": 8000, "name": "generated_tokens_total", "unit": "tokens"},
    },
}


def decode_pod(name: str, node: str) -> dict[str, Any]:
    annotations = {
        "sim.edpilot.io/workload": "llm-decode",
        "sim.edpilot.io/precision": "bf16",
        "sim.edpilot.io/batch-size": "8",
        "edpilot.io/quantization-accuracy": json.dumps({"bf16": 1.0, "fp8": 0.995}),
    }
    return gpu_pod(
        NAMESPACE,
        name,
        image="example.com/llm:1",
        node=node,
        labels={"app": "decode"},
        annotations=annotations,
    )


@dataclass
class BoundsWatch:
    """Samples every GPU's desired and enforced limit throughout a run, in the background."""

    cluster: Cluster
    checks: int = 0
    violations: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        lo = MIN_PERCENT / 100 * 700
        while not self.stop.wait(0.5):
            proc = self.cluster.kubectl("get", "gpunodereports", "-o", "json", check=False)
            if proc.returncode != 0:
                continue
            for report in json.loads(proc.stdout)["items"]:
                for cap in (report.get("spec") or {}).get("powerLimits") or []:
                    self.checks += 1
                    if not lo - 1e-6 <= cap["watts"] <= 700:
                        self.violations.append(f"{report['metadata']['name']} desired {cap}")
                for gpu in (report.get("status") or {}).get("gpus") or []:
                    self.checks += 1
                    if not gpu["minLimitWatts"] <= gpu["enforcedLimitWatts"] <= gpu["maxLimitWatts"]:
                        self.violations.append(
                            f"{report['metadata']['name']} enforced {gpu['enforcedLimitWatts']}"
                        )
                    if gpu["enforcedLimitWatts"] < lo - 1e-6:
                        self.violations.append(
                            f"{report['metadata']['name']} below policy {gpu['enforcedLimitWatts']}"
                        )


@pytest.fixture(scope="module")
def loop(
    crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, Processes]]:
    cluster = crds_installed
    procs = Processes(logs=tmp_path_factory.mktemp("loop-logs"))
    for seed, node in enumerate(NODES):
        procs.start(f"agent-{node}", agent_argv(cluster.kubeconfig, node, seed, SPEED))
    procs.start("operator", operator_argv(cluster.kubeconfig))
    cluster.kubectl("create", "namespace", NAMESPACE)
    try:
        yield cluster, procs
    finally:
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=60s", check=False)
        procs.stop_all()
        print_log_tails(procs.logs, 15)


def policy_rows(cluster: Cluster) -> list[dict[str, Any]]:
    """The policy's rows, each with its optimizer state (its WorkloadOptimizerState's)."""
    return policy_rows_with_states(cluster, NAMESPACE, "decode")


def converged(cluster: Cluster, procs: Processes, pod: str) -> dict[str, Any] | None:
    assert not procs.dead(), f"process exited: {procs.dead()}"
    for row in policy_rows(cluster):
        if row["name"] == pod and row.get("phase") == "Converged":
            return row
    return None


def true_point(row: dict[str, Any], precision: str | None, batch: int | None) -> gpusim.OperatingPoint:
    cap = row.get("powerCapWatts") or 700.0
    return gpusim.operating_point(
        gpusim.H100_SXM, gpusim.llama_decode(), batch or 8, precision or "bf16", cap
    )


def true_edp(point: gpusim.OperatingPoint, batch: int) -> float:
    # The optimizer's delay per token is the decode step (batch / throughput).
    return point.joules_per_unit * batch / point.units_per_second


def test_policy_converges_within_bounds_and_matches_the_simulator(loop: tuple[Cluster, Processes]) -> None:
    cluster, procs = loop
    watch = BoundsWatch(cluster)
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    try:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(POLICY))
        cluster.kubectl("apply", "-f", "-", input=json.dumps(decode_pod("decode-a", NODES[0])))
        row = wait_until(
            "decode-a to converge", lambda: converged(cluster, procs, "decode-a"), CONVERGE_TIMEOUT
        )
    finally:
        watch.stop.set()
        thread.join()
    assert watch.checks > 50, "the bounds were hardly sampled"
    assert watch.violations == []

    batch, precision = row["batchSize"], row["quantization"]
    chosen = true_point(row, precision, batch)
    baseline = gpusim.operating_point(gpusim.H100_SXM, gpusim.llama_decode(), 8, "bf16", 700.0)
    expected_reduction = 100 * (1 - true_edp(chosen, batch) / true_edp(baseline, 8))
    expected_slowdown = 100 * (1 - chosen.units_per_second / baseline.units_per_second)
    # The status is measured through noisy simulated counters; the simulator knows the truth.
    assert row["edpReductionPercent"] == pytest.approx(expected_reduction, abs=5.0)
    assert row["slowdownPercent"] == pytest.approx(
        expected_slowdown, abs=max(5.0, abs(expected_slowdown) * 0.1)
    )
    assert expected_slowdown <= MAX_SLOWDOWN + 1.0
    assert expected_reduction >= 50.0, row

    pod = cluster.get_json("pod", "decode-a", "-n", NAMESPACE)
    annotations = pod["metadata"]["annotations"]
    assert annotations["edpilot.io/policy"] == "decode"
    assert int(annotations["edpilot.io/batch-size"]) == batch
    assert annotations["edpilot.io/quantization"] == precision

    def enforced() -> list[float]:
        report = cluster.get_json("gpunodereport", NODES[0])
        return [
            g["enforcedLimitWatts"] for g in report["status"]["gpus"] if f"{NAMESPACE}/decode-a" in g["pods"]
        ]

    # The agent applies the chosen cap at its next report after the operator writes the spec.
    wait_until(
        "the chosen cap to be enforced",
        lambda: enforced() == [pytest.approx(row["powerCapWatts"], abs=1.0)],
        20,
    )
    status = cluster.get_json("energypolicy", "decode", "-n", NAMESPACE)["status"]
    ready = {c["type"]: c["status"] for c in status["conditions"]}
    assert ready["Ready"] == "True"
    test_policy_converges_within_bounds_and_matches_the_simulator.result = true_edp(chosen, batch)  # type: ignore[attr-defined]


def test_operator_killed_mid_exploration_resumes_from_stored_state(loop: tuple[Cluster, Processes]) -> None:
    cluster, procs = loop
    reference = getattr(test_policy_converges_within_bounds_and_matches_the_simulator, "result", None)
    if reference is None:
        pytest.fail("needs the uninterrupted run of the previous test as its reference")
    cluster.kubectl("apply", "-f", "-", input=json.dumps(decode_pod("decode-b", NODES[1])))

    def exploring_with_probes() -> dict[str, Any] | None:
        row = next((r for r in policy_rows(cluster) if r["name"] == "decode-b"), None)
        return row if row and row.get("phase") == "Exploring" and row.get("probes", 0) >= 2 else None

    before = wait_until("decode-b to explore", exploring_with_probes, CONVERGE_TIMEOUT, interval=0.5)
    procs.stop("operator", sig=signal.SIGKILL)
    killed_at = time.monotonic()
    stored = next(r for r in policy_rows(cluster) if r["name"] == "decode-b")
    assert stored["optimizer"]["probes"], "the exploration's probes are in its WorkloadOptimizerState"
    procs.start("operator-restarted", operator_argv(cluster.kubeconfig))

    def resumed() -> dict[str, Any] | None:
        row = next((r for r in policy_rows(cluster) if r["name"] == "decode-b"), None)
        return row if row and row.get("probes", 0) > before["probes"] else None

    after = wait_until("the restarted operator to go on exploring", resumed, 120, interval=0.5)
    # It went on from the stored probes rather than starting a new baseline.
    assert after["probes"] > before["probes"] >= 2
    assert after["phase"] in ("Exploring", "Converged")
    print(f"resumed {time.monotonic() - killed_at:.1f} s after SIGKILL, at probe {after['probes']}")
    row = wait_until("decode-b to converge", lambda: converged(cluster, procs, "decode-b"), CONVERGE_TIMEOUT)
    result = true_edp(true_point(row, row["quantization"], row["batchSize"]), row["batchSize"])
    assert result <= reference * 1.02, (result, reference)


def test_deleting_the_policy_restores_defaults_and_removes_hints(loop: tuple[Cluster, Processes]) -> None:
    cluster, _ = loop
    if not policy_rows(cluster):
        pytest.fail("needs the policy of the previous tests")
    cluster.kubectl("delete", "energypolicy", "decode", "-n", NAMESPACE, "--wait=true", "--timeout=60s")

    def released() -> bool:
        pods = cluster.get_json("pods", "-n", NAMESPACE)["items"]
        if any(set(HINT_ANNOTATIONS) & set(p["metadata"].get("annotations") or {}) for p in pods):
            return False
        for node in NODES:
            report = cluster.get_json("gpunodereport", node)
            if report["spec"].get("powerLimits"):
                return False
            if any(g["enforcedLimitWatts"] != g["defaultLimitWatts"] for g in report["status"]["gpus"]):
                return False
        return True

    wait_until("every hint removed and every GPU at its default limit", released, 30, interval=0.5)
