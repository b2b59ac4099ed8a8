"""Finding 4 (HIGH) of issue 14 with the real kube-scheduler: it reaches the extender over TLS with a
client certificate (its extender `tlsConfig`), the PowerBudget filter applies, a client without such
a certificate gets no answer, and with `ignorable: false` (the chart's scheduler.extender.ignorable,
for admins who want budgets to fail closed) no GPU pod is placed while the extender is away."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import h100_status
from kubetest import REPO, Cluster, add_gpu_node, free_port, gpu_pod, wait_for
from pki import Pki, make_pki

from edpilot.models import GPUNodeReportStatus

NODE = "sec-tls-0"
NS = "sec-tls"
SCHEDULER = "edpilot-sec-tls"
POOL = {"edpilot.io/pool": "sec-tls"}
BUDGET = "sec-tls-pool"
TAINT = "edpilot.io/sec-tls"


class Extender:
    def __init__(self, cluster: Cluster, pki: Pki, workdir: Path) -> None:
        self.cluster, self.pki, self.workdir = cluster, pki, workdir
        self.port, self.metrics_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "edpilot.cli", "extender", "--host", "127.0.0.1",
            "--port", str(self.port), "--metrics-port", str(self.metrics_port),
            "--tls-cert-file", str(self.pki.server.cert), "--tls-private-key-file", str(self.pki.server.key),
            "--client-ca-file", str(self.pki.ca), "--kubeconfig", str(self.cluster.kubeconfig),
        ]  # fmt: skip
        log = open(self.workdir / "extender.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for("the extender's view", self.ready)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None


def start_scheduler(cluster: Cluster, extender: Extender, workdir: Path) -> subprocess.Popen[bytes]:
    shipped = yaml.safe_load((REPO / "deploy/scheduler/kube-scheduler-config.yaml").read_text())["extenders"][
        0
    ]
    config = {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": str(cluster.kubeconfig)},
        "leaderElection": {"leaderElect": False},
        "profiles": [{"schedulerName": SCHEDULER}],
        "extenders": [
            {
                **shipped,
                "urlPrefix": f"https://127.0.0.1:{extender.port}",
                "httpTimeout": "2s",
                "ignorable": False,
                "tlsConfig": {
                    "certFile": str(extender.pki.client.cert),
                    "keyFile": str(extender.pki.client.key),
                    "caFile": str(extender.pki.ca),
                },
            }
        ],
    }
    path = workdir / "scheduler.yaml"
    path.write_text(yaml.safe_dump(config))
    kubeconfig = str(cluster.kubeconfig)
    argv = [
        str(cluster.bin / "kube-scheduler"), "--config", str(path),
        "--authentication-kubeconfig", kubeconfig, "--authorization-kubeconfig", kubeconfig,
        "--bind-address", "127.0.0.1", "--secure-port", str(free_port()), "-v", "2",
    ]  # fmt: skip
    log = open(workdir / "scheduler.log", "ab")  # noqa: SIM115
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def pod(name: str) -> dict[str, Any]:
    return gpu_pod(
        NS,
        name,
        image="example.invalid/llm:1",
        schedulerName=SCHEDULER,
        nodeSelector=POOL,
        terminationGracePeriodSeconds=0,
        tolerations=[{"key": TAINT, "operator": "Exists", "effect": "NoSchedule"}],
    )


def apply(cluster: Cluster, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))


def node_of(cluster: Cluster, name: str) -> str:
    return str(cluster.get_json("pod", "-n", NS, name)["spec"].get("nodeName") or "")


def scheduling_failures(cluster: Cluster, name: str) -> str:
    events = cluster.get_json("events", "-n", NS, "--field-selector", f"involvedObject.name={name}")
    return "\n".join(e.get("message", "") for e in events["items"] if e.get("reason") == "FailedScheduling")


@pytest.fixture(scope="module")
def placed(
    crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, Extender]]:
    cluster = crds_installed
    workdir = tmp_path_factory.mktemp("sec-tls")
    add_gpu_node(cluster, NODE, 4, TAINT, POOL)
    cluster.kubectl("create", "namespace", NS)
    apply(cluster, {"apiVersion": "edpilot.io/v1alpha1", "kind": "GPUNodeReport", "metadata": {"name": NODE}})
    status = GPUNodeReportStatus(
        nodeName=NODE,
        agentVersion="sec-test",
        backend="sim",
        time="2026-11-27T00:00:00Z",
        gpus=[h100_status(i, f"GPU-{NODE}-{i}") for i in range(4)],  # idle, 70 W each
    ).model_dump(mode="json", exclude_none=True)
    cluster.kubectl(
        "patch",
        "gpunodereport",
        NODE,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
    # 4 x 70 W idle: 720 W left, room for one GPU at its 700 W default (no policy caps these pods).
    apply(
        cluster,
        {
            "apiVersion": "edpilot.io/v1alpha1",
            "kind": "PowerBudget",
            "metadata": {"name": BUDGET},
            "spec": {"nodeSelector": {"matchLabels": POOL}, "maxWatts": 1000},
        },
    )
    extender = Extender(cluster, make_pki(workdir / "pki"), workdir)
    extender.start()
    scheduler = start_scheduler(cluster, extender, workdir)
    try:
        yield cluster, extender
    finally:
        scheduler.terminate()
        scheduler.wait(timeout=20)
        extender.stop()
        for name in ("extender.log", "scheduler.log"):
            text = (workdir / name).read_text(errors="replace") if (workdir / name).exists() else ""
            print(f"--- {name}\n" + "\n".join(text.splitlines()[-15:]))
        cluster.kubectl("delete", "namespace", NS, "--wait=false", "--ignore-not-found", check=False)
        cluster.kubectl("delete", "powerbudget", BUDGET, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "gpunodereport", NODE, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "node", NODE, "--ignore-not-found", check=False)


def test_the_scheduler_authenticates_and_the_budget_filter_applies(placed: tuple[Cluster, Extender]) -> None:
    cluster, _ = placed
    apply(cluster, pod("first"))
    assert wait_for("the first pod bound", lambda: node_of(cluster, "first")) == NODE
    apply(cluster, pod("second"))
    message = wait_for("the extender's refusal", lambda: scheduling_failures(cluster, "second"))
    assert f"PowerBudget {BUDGET} cannot take 1 GPU(s): 700 W needed" in message, message
    assert node_of(cluster, "second") == ""


def post(url: str, context: ssl.SSLContext | None) -> int:
    body = json.dumps({"Pod": pod("probe"), "NodeNames": [NODE]}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5, context=context) as resp:
        return int(resp.status)


def test_a_client_without_the_schedulers_certificate_gets_no_answer(placed: tuple[Cluster, Extender]) -> None:
    _, extender = placed
    url = f"https://127.0.0.1:{extender.port}/filter"
    scheduler = ssl.create_default_context(cafile=str(extender.pki.ca))
    scheduler.load_cert_chain(str(extender.pki.client.cert), str(extender.pki.client.key))
    assert post(url, scheduler) == 200
    anonymous = ssl.create_default_context(cafile=str(extender.pki.ca))
    stranger = ssl.create_default_context(cafile=str(extender.pki.ca))
    stranger.load_cert_chain(str(extender.pki.stranger.cert), str(extender.pki.stranger.key))
    for context in (anonymous, stranger):
        with pytest.raises((OSError, ssl.SSLError, urllib.error.URLError)):
            post(url, context)
    with pytest.raises((OSError, urllib.error.URLError)):
        post(url.replace("https:", "http:"), None)


def test_fail_closed_places_no_gpu_pod_while_the_extender_is_away(placed: tuple[Cluster, Extender]) -> None:
    cluster, extender = placed
    cluster.kubectl("delete", "pod", "-n", NS, "first", "second", "--wait=true")
    extender.stop()
    apply(cluster, pod("unchecked"))
    message = wait_for("the scheduler's error", lambda: scheduling_failures(cluster, "unchecked"))
    assert f"127.0.0.1:{extender.port}/filter" in message, message  # the scheduler could not ask
    time.sleep(3)
    assert node_of(cluster, "unchecked") == ""  # ignorable: false, so no budget check, no placement
    extender.start()
    assert wait_for("placement once the extender is back", lambda: node_of(cluster, "unchecked"), 90) == NODE
