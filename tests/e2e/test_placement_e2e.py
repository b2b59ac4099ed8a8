"""Energy-aware placement end to end: the real kube-scheduler, configured with edpilot's extender
(a second scheduler, like the chart's optional one), places GPU pods on KWOK GPU nodes whose
GPUNodeReports say what simulated agents would measure.

Two node groups: H100 SXM (the more efficient) and A100 SXM. The extender's prior and the
EnergyPolicy's measured rows both favour the H100s. Nodes are tainted so that no other test's pod
lands on them, and everything created here is removed at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kubetest import free_port, gpu_pod, kwok_gpu_nodes, wait_for
from pki import make_pki

from edpilot import gpusim
from edpilot.models import GPUNodeReportStatus, GPUStatus

if TYPE_CHECKING:
    from kubetest import Cluster

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "edp-placement"
SCHEDULER = "edpilot-placement-e2e"  # unique: the chart's tests may run an "edpilot-scheduler"
MARK = "edpilot.io/e2e-placement"
GPUS_PER_NODE = 4
GROUPS = {
    "h100": (gpusim.H100_SXM, "NVIDIA-H100-80GB-HBM3"),
    "a100": (gpusim.A100_SXM, "NVIDIA-A100-SXM4-80GB"),
}
NODES = [f"edp-place-{group}-{i}" for group in GROUPS for i in range(2)]
BUDGET = "edp-place-a100-pool"


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


# ---------------------------------------------------------------- objects


def node_manifests(group: str, product: str) -> list[dict[str, Any]]:
    out = kwok_gpu_nodes(2, GPUS_PER_NODE, f"edp-place-{group}", product)
    nodes = [doc for doc in yaml.safe_load_all(out) if doc]
    for n in nodes:
        n["metadata"]["labels"].update({MARK: "true", "edpilot.io/pool": group})
        n["spec"] = {"taints": [{"key": MARK, "value": "true", "effect": "NoSchedule"}]}
    return nodes


def report_status(name: str, spec: gpusim.GpuSpec) -> dict[str, Any]:
    """What a simulated agent reports for idle GPUs of this model."""
    gpus = [
        GPUStatus(
            index=i,
            uuid=gpusim.gpu_uuid(name, i),
            model=spec.name,
            minLimitWatts=spec.min_power_limit_watts,
            maxLimitWatts=spec.max_power_limit_watts,
            defaultLimitWatts=spec.default_power_limit_watts,
            enforcedLimitWatts=spec.default_power_limit_watts,
            powerWatts=spec.idle_watts,
            energyJoules=1000.0,
            temperatureC=spec.ambient_c,
        )
        for i in range(GPUS_PER_NODE)
    ]
    status = GPUNodeReportStatus(
        nodeName=name,
        agentVersion="e2e-sim",
        backend="sim",
        time="2026-11-27T00:00:00Z",
        gpus=gpus,
    )
    return status.model_dump(mode="json", exclude_none=True)


def measured_rows() -> list[dict[str, Any]]:
    """EnergyPolicy rows as the operator writes them: J/sample of bf16 training (compute-bound,
    where the H100 does clearly more work per joule), one row per GPU model."""
    rows = []
    for group, (spec, _) in GROUPS.items():
        point = gpusim.operating_point(spec, gpusim.training(), 8, "bf16", spec.default_power_limit_watts)
        rows.append(
            {
                "name": f"earlier-{group}",
                "pods": [f"earlier-{group}"],
                "nodes": [f"edp-place-{group}-0"],
                "gpus": 2,
                "phase": "Converged",
                "current": {
                    "joulesPerUnit": point.joules_per_unit,
                    "secondsPerUnit": 1 / point.units_per_second,
                    "edp": point.joules_per_unit / point.units_per_second,
                    "unitsPerSecond": point.units_per_second,
                },
            }
        )
    return rows


def llm_pod(name: str, gpus: int = 2) -> dict[str, Any]:
    return gpu_pod(
        NAMESPACE,
        name,
        image="registry.example/llm:1",
        gpus=gpus,
        labels={"app": "llm"},
        schedulerName=SCHEDULER,
        nodeSelector={MARK: "true"},
        terminationGracePeriodSeconds=0,
        tolerations=[{"key": MARK, "operator": "Exists", "effect": "NoSchedule"}],
    )


def apply(cluster: Cluster, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))


def node_of(cluster: Cluster, pod: str) -> str:
    return str(cluster.get_json("pod", "-n", NAMESPACE, pod)["spec"].get("nodeName") or "")


def schedule(cluster: Cluster, name: str, gpus: int = 2) -> str:
    apply(cluster, llm_pod(name, gpus))
    return str(wait_for(f"pod {name} bound", lambda: node_of(cluster, name), 60))


def failed_scheduling(cluster: Cluster, pod: str) -> str:
    events = cluster.get_json("events", "-n", NAMESPACE, "--field-selector", f"involvedObject.name={pod}")
    return "\n".join(e.get("message", "") for e in events["items"] if e.get("reason") == "FailedScheduling")


# ---------------------------------------------------------------- processes


class Placement:
    def __init__(self, cluster: Cluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.extender_port = free_port()
        self.metrics_port = free_port()
        # The scheduler authenticates to the extender with a client certificate, as in a cluster.
        self.pki = make_pki(workdir / "pki")
        self.extender: subprocess.Popen[bytes] | None = None
        self.scheduler: subprocess.Popen[bytes] | None = None

    def start_extender(self) -> None:
        log = open(self.workdir / "extender.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.extender = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edpilot.cli",
                "extender",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.extender_port),
                "--metrics-port",
                str(self.metrics_port),
                "--tls-cert-file",
                str(self.pki.server.cert),
                "--tls-private-key-file",
                str(self.pki.server.key),
                "--client-ca-file",
                str(self.pki.ca),
                "--kubeconfig",
                str(self.cluster.kubeconfig),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        wait_for("the extender's view", lambda: http_ok(f"http://127.0.0.1:{self.metrics_port}/readyz"), 60)

    def stop_extender(self) -> None:
        if self.extender is not None:
            self.extender.terminate()
            self.extender.wait(timeout=20)
            self.extender = None

    def start_scheduler(self) -> None:
        config = {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(self.cluster.kubeconfig)},
            "leaderElection": {"leaderElect": False},
            "profiles": [{"schedulerName": SCHEDULER}],
            "extenders": [
                {
                    **yaml.safe_load((REPO / "deploy/scheduler/kube-scheduler-config.yaml").read_text())[
                        "extenders"
                    ][0],
                    "urlPrefix": f"https://127.0.0.1:{self.extender_port}",
                    "httpTimeout": "2s",
                    "tlsConfig": {
                        "certFile": str(self.pki.client.cert),
                        "keyFile": str(self.pki.client.key),
                        "caFile": str(self.pki.ca),
                    },
                }
            ],
        }
        path = self.workdir / "scheduler.yaml"
        path.write_text(yaml.safe_dump(config))
        kubeconfig = str(self.cluster.kubeconfig)
        log = open(self.workdir / "scheduler.log", "ab")  # noqa: SIM115
        self.scheduler = subprocess.Popen(
            [
                str(self.cluster.bin / "kube-scheduler"),
                "--config",
                str(path),
                "--authentication-kubeconfig",
                kubeconfig,
                "--authorization-kubeconfig",
                kubeconfig,
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                str(free_port()),
                "-v",
                "2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        self.stop_extender()
        if self.scheduler is not None:
            self.scheduler.terminate()
            self.scheduler.wait(timeout=20)


@pytest.fixture(scope="module")
def placement(crds_installed: Cluster) -> Iterator[Placement]:
    cluster = crds_installed
    workdir = Path(tempfile.mkdtemp(prefix="edp-placement-"))
    env = Placement(cluster, workdir)
    try:
        cluster.kubectl("create", "namespace", NAMESPACE)
        for group, (spec, product) in GROUPS.items():
            for n in node_manifests(group, product):
                apply(cluster, n)
                name = n["metadata"]["name"]
                apply(
                    cluster,
                    {
                        "apiVersion": "edpilot.io/v1alpha1",
                        "kind": "GPUNodeReport",
                        "metadata": {"name": name},
                    },
                )
                cluster.kubectl(
                    "patch",
                    "gpunodereport",
                    name,
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    json.dumps({"status": report_status(name, spec)}),
                )
        wait_for(
            "the placement nodes Ready",
            lambda: (
                all(
                    any(
                        c["type"] == "Ready" and c["status"] == "True"
                        for c in n["status"].get("conditions", [])
                    )
                    for n in cluster.get_json("nodes", "-l", MARK)["items"]
                )
                and len(cluster.get_json("nodes", "-l", MARK)["items"]) == len(NODES)
            ),
            60,
        )
        apply(
            cluster,
            {
                "apiVersion": "edpilot.io/v1alpha1",
                "kind": "EnergyPolicy",
                "metadata": {"name": "llm", "namespace": NAMESPACE},
                "spec": {
                    "selector": {"matchLabels": {"app": "llm"}},
                    "powerCap": {"minPercent": 50},
                    "workMetric": {"name": "tokens_total", "unit": "tokens"},
                },
            },
        )
        cluster.kubectl(
            "patch",
            "energypolicy",
            "llm",
            "-n",
            NAMESPACE,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": {"workloads": measured_rows()}}),
        )
        env.start_extender()
        env.start_scheduler()
        yield env
    finally:
        env.stop()
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", "--ignore-not-found", check=False)
        cluster.kubectl("delete", "powerbudget", BUDGET, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "gpunodereport", *NODES, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "node", *NODES, "--ignore-not-found", check=False)
        for name in ("extender.log", "scheduler.log"):
            text = (workdir / name).read_text(errors="replace") if (workdir / name).exists() else ""
            print(f"--- {name} (last lines)\n" + "\n".join(text.splitlines()[-15:]))


# ---------------------------------------------------------------- tests (in order: they share the nodes)


def test_gpu_pods_go_to_the_efficient_group_while_it_has_room(placement: Placement) -> None:
    cluster = placement.cluster
    rows = {r["name"]: r["current"]["joulesPerUnit"] for r in measured_rows()}
    assert rows["earlier-h100"] < rows["earlier-a100"]  # the premise: measured, not assumed
    # Four 2-GPU pods fill both H100 nodes (4 GPUs each). Without the extender the scheduler's
    # least-allocated scoring would spread them onto the empty A100 nodes from the second pod on.
    placed = [schedule(cluster, f"llm-{i}") for i in range(4)]
    assert all(n.startswith("edp-place-h100-") for n in placed), placed
    assert sorted(placed) == sorted(["edp-place-h100-0", "edp-place-h100-1"] * 2)
    # The H100 group is full: the next pod goes to the A100 group.
    assert schedule(cluster, "llm-4").startswith("edp-place-a100-")


def test_a_pod_that_would_break_a_full_budget_stays_pending_with_the_extenders_reason(
    placement: Placement,
) -> None:
    cluster = placement.cluster
    # The A100 pool commits 6 idle GPUs (55 W each) + llm-4's 2 GPUs at their 400 W default:
    # 1130 W. A 1000 W budget is already full.
    apply(
        cluster,
        {
            "apiVersion": "edpilot.io/v1alpha1",
            "kind": "PowerBudget",
            "metadata": {"name": BUDGET},
            "spec": {"nodeSelector": {"matchLabels": {"edpilot.io/pool": "a100"}}, "maxWatts": 1000},
        },
    )
    time.sleep(1)  # the watch event reaches the extender
    apply(cluster, llm_pod("llm-over-budget"))
    message = wait_for("a FailedScheduling event", lambda: failed_scheduling(cluster, "llm-over-budget"), 60)
    assert "PowerBudget edp-place-a100-pool cannot take 2 GPU(s)" in message, message
    assert "at the lowest allowed cap of 200 W" in message
    time.sleep(3)
    assert node_of(cluster, "llm-over-budget") == ""
    assert cluster.get_json("pod", "-n", NAMESPACE, "llm-over-budget")["status"]["phase"] == "Pending"


def test_with_the_extender_stopped_pods_still_schedule(placement: Placement) -> None:
    cluster = placement.cluster
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, "llm-over-budget", "--wait=true")
    placement.stop_extender()
    # ignorable: true: the scheduler carries on without it (and without the budget's veto).
    assert schedule(cluster, "llm-no-extender").startswith("edp-place-a100-")
