"""Locked SM clocks through the whole loop on the real control plane: a policy that opts in
(`smClock.mode: Auto`, caps Off) steers a simulated decode pod; the operator's decided ceiling
reaches the node report's `lockedClocks`, the agent locks the simulated GPU and reports the lock,
the optimizer measures it and converges; deleting the policy unlocks the GPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from edpilot_operator.localrun import Processes, agent_argv, operator_argv, wait_until
from kubetest import Cluster, gpu_pod, print_log_tails

from edpilot import gpusim

NAMESPACE = "e2e-clock"
NODE = "gpu-node-2"
MIN_PERCENT = 40.0
TIMEOUT = 420.0

POLICY = {
    "apiVersion": "edpilot.io/v1alpha1",
    "kind": "EnergyPolicy",
    "metadata": {"name": "clocks", "namespace": NAMESPACE},
    "spec": {
        "selector": {"matchLabels": {"app": "decode-clock"}},
        "objective": "EDP",
        "maxSlowdownPercent": 10,
        "powerCap": {"mode": "Off"},
        "smClock": {"mode": "Auto", "minPercent": MIN_PERCENT},
        "workMetric": {"port": 8000, "name": "generated_tokens_total", "unit": "tokens"},
    },
}


@pytest.fixture(scope="module")
def loop(crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = crds_installed
    procs = Processes(logs=tmp_path_factory.mktemp("clock-logs"))
    procs.start(f"agent-{NODE}", agent_argv(cluster.kubeconfig, NODE, 11, "--sim-speed=30"))
    procs.start("operator", operator_argv(cluster.kubeconfig))
    cluster.kubectl("create", "namespace", NAMESPACE)
    try:
        yield cluster
    finally:
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=60s", check=False)
        procs.stop_all()
        print_log_tails(procs.logs, 15)


def report_gpu(cluster: Cluster, uuid: str) -> dict[str, Any]:
    report = cluster.get_json("gpunodereport", NODE)
    (gpu,) = [g for g in report["status"]["gpus"] if g["uuid"] == uuid]
    return gpu  # type: ignore[no-any-return]


def test_a_policy_that_opts_in_converges_on_a_lock_and_its_deletion_unlocks(loop: Cluster) -> None:
    cluster = loop
    annotations = {
        "sim.edpilot.io/workload": "llm-decode",
        "sim.edpilot.io/precision": "bf16",
        "sim.edpilot.io/batch-size": "8",
    }
    pod = gpu_pod(
        NAMESPACE, "decode-0", image="example.com/llm:1", node=NODE, labels={"app": "decode-clock"},
        annotations=annotations,
    )  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    cluster.kubectl("apply", "-f", "-", input=json.dumps(POLICY))

    def converged() -> dict[str, Any] | None:
        policy = cluster.get_json("energypolicy", "clocks", "-n", NAMESPACE)
        rows = (policy.get("status") or {}).get("workloads") or []
        return next((r for r in rows if r.get("phase") == "Converged"), None)

    row = wait_until("the clock policy to converge", converged, TIMEOUT)
    clock = row.get("smClockMHz")
    spec = gpusim.H100_SXM
    assert clock is not None, f"converged without a lock: {row}"
    assert MIN_PERCENT / 100 * spec.max_sm_clock_mhz - 15 <= clock < spec.max_sm_clock_mhz
    assert row.get("powerCapWatts") is None  # caps Off: the limit is left alone

    # The operator writes the policy's status before the node's spec, and the agent reports on its
    # own interval: each shows the kept lock within a few seconds of the other.
    def spec_lock() -> dict[str, Any] | None:
        locks = cluster.get_json("gpunodereport", NODE)["spec"].get("lockedClocks") or []
        return locks[0] if len(locks) == 1 and locks[0]["maxMHz"] == clock else None

    lock = wait_until("the node's spec to ask for the kept lock", spec_lock, 30)
    assert lock["pod"] == f"{NAMESPACE}/decode-0"
    report = cluster.get_json("gpunodereport", NODE)
    assert not [p for p in report["spec"].get("powerLimits") or [] if p["pod"] == lock["pod"]]
    gpu = wait_until(
        "the agent to report the kept lock",
        lambda: (g := report_gpu(cluster, lock["gpuUUID"])).get("lockedSmClockMHz") == int(clock) and g,
        30,
    )
    assert gpu["smClockMHz"] <= clock
    assert "ApplicationsClocksSetting" in gpu["throttleReasons"]

    # In truth (gpusim, noiseless): the lock lowers the decode's EDP and keeps the slowdown limit.
    decode = gpusim.llama_decode()
    free = gpusim.operating_point(spec, decode, 8, "bf16", spec.default_power_limit_watts)
    locked = gpusim.operating_point(spec, decode, 8, "bf16", spec.default_power_limit_watts, clock)
    assert locked.edp_per_unit < free.edp_per_unit
    assert locked.units_per_second >= 0.9 * free.units_per_second * 0.99

    cluster.kubectl("delete", "energypolicy", "clocks", "-n", NAMESPACE, "--timeout=60s")
    wait_until(
        "the GPU to be unlocked",
        lambda: report_gpu(cluster, lock["gpuUUID"]).get("lockedSmClockMHz") is None,
        60,
    )
