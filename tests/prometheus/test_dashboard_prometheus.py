"""The chart's Grafana dashboard, evaluated by a real Prometheus (issue 18, item 4).

Debian's `prometheus` scrapes what `edpilot demo` runs on the real local control plane: the
operator, one simulated agent per KWOK GPU node and the scheduler extender (consulted by a second
kube-scheduler). The agents serve /metrics only to identities the API server allows `get` on
/metrics, so Prometheus authenticates with the token of a ServiceAccount bound to the chart's
metrics-reader ClusterRole, as the chart's NOTES tell a user to do. The demo's workloads and
policies run until they converge, a PowerBudget covers one extra node (so the budget panels and
the extender's filter have something to show), and one GPU pod is scheduled through the extender.
Then every query of every panel, with Grafana's template variables replaced by what Grafana would
put there, goes through Prometheus's HTTP API: a PromQL error, no series or only NaN fails the
panel, and the test lists every failing panel.

Not part of a plain `pytest` (it needs the `prometheus` binary): `make test-prometheus`.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from edpilot_operator.localrun import Processes, agent_argv, edpilot_argv, operator_argv
from kubetest import Cluster, add_gpu_node, free_port, gpu_pod, print_log_tails, wait_for
from sa_kubeconfig import service_account_token

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "edpilot"
DASHBOARD = CHART / "dashboards" / "edpilot.json"
DEMO = REPO / "deploy" / "demo"
DEMO_NS = "edpilot-demo"
SYSTEM_NS, MONITORING_NS = "edpilot-prom", "monitoring-prom"
RELEASE = "rel"
READER_BINDING = "prom-e2e-reads-agent-metrics"
SCHEDULER = "edpilot-prom-e2e"
# One extra node under a PowerBudget its GPUs cannot meet even at their lowest caps (2 x 200 W >
# 300 W): the operator caps it, and the extender filters it out for the pod scheduled through it.
BUDGET_NODE, BUDGET, MARK = "prom-budget-0", "prom-budget", "edpilot.io/e2e-prometheus"
SCRAPE = "1s"
# What Grafana puts for $__rate_interval: max($__interval + scrape interval, 4 x scrape interval).
# With a 1 s scrape and a few minutes of data, 20 s spans a good number of samples.
BUILTINS = {"__rate_interval": "20s", "__interval": "5s", "__range": "5m"}

pytestmark = [pytest.mark.prometheus, pytest.mark.k8s, pytest.mark.slow, pytest.mark.timeout(900)]


# ---------------------------------------------------------------- Prometheus


@dataclass
class Prometheus:
    url: str

    def get(self, path: str, **params: str | list[str]) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:  # 400/422: the body says why
            return json.load(exc)

    def query(self, expr: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(error, series) of an instant query now."""
        body = self.get("/api/v1/query", query=expr)
        if body.get("status") != "success":
            return f"{body.get('errorType')}: {body.get('error')}", []
        data = body["data"]
        if data["resultType"] != "vector":
            return f"result type {data['resultType']}, a panel wants series", []
        return None, list(data["result"])

    def label_values(self, label: str, metric: str) -> list[str]:
        """What Grafana's label_values(metric, label) lists."""
        body = self.get(f"/api/v1/label/{label}/values", **{"match[]": metric})
        assert body["status"] == "success", body
        return list(body["data"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/targets")["data"]["activeTargets"])


def scrape_config(token_file: Path, operator: str, agents: list[str], extender: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": SCRAPE, "scrape_timeout": SCRAPE, "evaluation_interval": SCRAPE},
        "scrape_configs": [
            {"job_name": "edpilot-operator", "static_configs": [{"targets": [operator]}]},
            {
                # The agents' /metrics: TokenReview + SubjectAccessReview on the bearer token.
                "job_name": "edpilot-agent",
                "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
                "static_configs": [{"targets": agents}],
            },
            {"job_name": "edpilot-extender", "static_configs": [{"targets": [extender]}]},
        ],
    }


# ---------------------------------------------------------------- the dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return [p for p in out if p["type"] != "row"]


def regex_value(values: list[str]) -> str:
    """A multi-value variable as Grafana formats it for Prometheus: (a|b), each value's regex
    metacharacters escaped, the backslash doubled for the PromQL string."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def variable_values(dashboard: dict[str, Any], prom: Prometheus) -> dict[str, str]:
    """Each query variable with every value its label_values() query finds (as "All" would, but
    with the real values rather than allValue's `.*`). A variable that finds none fails."""
    out = dict(BUILTINS)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
        assert m, f"variable {var['name']}: cannot evaluate {var['definition']}"
        values = prom.label_values(m.group(2), m.group(1))
        assert values, f"variable {var['name']}: {var['definition']} lists nothing"
        out[var["name"]] = regex_value(values)
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in variables, f"{expr}: no value for ${name}"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def failing_panels(dashboard: dict[str, Any], prom: Prometheus) -> tuple[list[str], list[str]]:
    """(failures, passed): one line per failing target (panel id, title, refId, why)."""
    variables = variable_values(dashboard, prom)
    failures, passed = [], []
    for p in panels(dashboard):
        ok = True
        for target in p["targets"]:
            expr = substitute(target["expr"], variables)
            error, series = prom.query(expr)
            why = error or (
                "no series"
                if not series
                else "only NaN"
                if all(math.isnan(float(s["value"][1])) for s in series)
                else None
            )
            if why:
                ok = False
                failures.append(f"panel {p['id']} {p['title']!r} {target['refId']}: {why}: {expr}")
        if ok:
            passed.append(f"{p['id']} {p['title']}")
    return failures, passed


# ---------------------------------------------------------------- the demo cluster, scraped


@dataclass
class Stack:
    cluster: Cluster
    prom: Prometheus
    procs: Processes
    workdir: Path


def apply(cluster: Cluster, *docs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))


def unfinalize(cluster: Cluster, name: str, *args: str) -> None:
    patch = '{"metadata":{"finalizers":null}}'
    cluster.kubectl("patch", name, *args, "--type=merge", "-p", patch, check=False)


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def monitoring_token(cluster: Cluster, path: Path) -> Path:
    """A token of a ServiceAccount bound to the chart's metrics-reader ClusterRole (rendered by
    helm with the agent's RBAC, applied as is), in a file for Prometheus."""
    rendered = subprocess.run(
        [str(cluster.bin / "helm"), "template", RELEASE, str(CHART), "-n", SYSTEM_NS,
         "--kube-version", "1.36.3", "--set", "agent.backend=sim",
         "--show-only", "templates/agent/serviceaccount.yaml", "--show-only", "templates/agent/rbac.yaml"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f"{RELEASE}-edpilot-metrics-reader" in rendered
    cluster.kubectl("apply", "-f", "-", input=rendered)
    apply(
        cluster,
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "prometheus", "namespace": MONITORING_NS}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": READER_BINDING},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": f"{RELEASE}-edpilot-metrics-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": MONITORING_NS}],
        },
    )  # fmt: skip
    path.write_text(service_account_token(cluster, MONITORING_NS, "prometheus", duration="2h"))
    path.chmod(0o600)
    return path


def start_scheduler(stack_dir: Path, cluster: Cluster, procs: Processes, extender_port: int) -> None:
    """A second kube-scheduler that consults the extender, as the chart's optional one does."""
    shipped = yaml.safe_load((REPO / "deploy" / "scheduler" / "kube-scheduler-config.yaml").read_text())
    extender = shipped["extenders"][0]
    extender.pop("tlsConfig")  # the extender serves plain HTTP on loopback here (--insecure-http)
    config = {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": str(cluster.kubeconfig)},
        "leaderElection": {"leaderElect": False},
        "profiles": [{"schedulerName": SCHEDULER}],
        "extenders": [{**extender, "urlPrefix": f"http://127.0.0.1:{extender_port}", "httpTimeout": "2s"}],
    }
    path = stack_dir / "scheduler.yaml"
    path.write_text(yaml.safe_dump(config))
    kubeconfig = str(cluster.kubeconfig)
    procs.start(
        "scheduler",
        [str(cluster.bin / "kube-scheduler"), "--config", str(path),
         "--authentication-kubeconfig", kubeconfig, "--authorization-kubeconfig", kubeconfig,
         "--bind-address", "127.0.0.1", "--secure-port", str(free_port())],
    )  # fmt: skip


@pytest.fixture(scope="module")
def stack(crds_installed: Cluster) -> Iterator[Stack]:
    cluster = crds_installed
    binary = shutil.which("prometheus")
    assert binary, "no prometheus binary: `make test-prometheus` installs Debian's package"
    workdir = Path(tempfile.mkdtemp(prefix="edpilot-prom-"))
    procs = Processes(logs=workdir / "logs")
    nodes: dict[str, int] = {}
    try:
        for ns in (SYSTEM_NS, MONITORING_NS):
            cluster.kubectl("create", "namespace", ns)
        token = monitoring_token(cluster, workdir / "token")
        add_gpu_node(cluster, BUDGET_NODE, 2, MARK, {MARK: "true"})
        apply(
            cluster,
            {
                "apiVersion": "edpilot.io/v1alpha1",
                "kind": "PowerBudget",
                "metadata": {"name": BUDGET},
                "spec": {"nodeSelector": {"matchLabels": {MARK: "true"}}, "maxWatts": 300},
            },
        )
        # Each KWOK GPU node with its GPU count: one simulated agent each.
        nodes = {
            n["metadata"]["name"]: int(n["status"]["capacity"]["nvidia.com/gpu"])
            for n in cluster.get_json("nodes", "-l", "type=kwok")["items"]
            if n["metadata"]["name"].startswith("gpu-node-") or n["metadata"]["name"] == BUDGET_NODE
        }
        # The demo's processes (localrun), each serving /metrics on a port of its own.
        operator_port = free_port()
        procs.start("operator", operator_argv(cluster.kubeconfig, f"--metrics-port={operator_port}"))
        agent_ports = {}
        for i, (node, gpus) in enumerate(nodes.items()):
            agent_ports[node] = free_port()
            extra = (f"--metrics-port={agent_ports[node]}", f"--gpus={gpus}")
            procs.start(f"agent-{node}", agent_argv(cluster.kubeconfig, node, i, *extra))
        extender_port, extender_metrics = free_port(), free_port()
        procs.start(
            "extender",
            edpilot_argv("extender", "--host=127.0.0.1", f"--port={extender_port}", "--insecure-http",
                         f"--metrics-port={extender_metrics}", f"--kubeconfig={cluster.kubeconfig}"),
        )  # fmt: skip
        wait_for("the extender's view", lambda: http_ok(f"http://127.0.0.1:{extender_metrics}/readyz"), 60)
        start_scheduler(workdir, cluster, procs, extender_port)
        cluster.kubectl("apply", "-f", str(DEMO))

        config = scrape_config(
            token,
            f"127.0.0.1:{operator_port}",
            [f"127.0.0.1:{p}" for p in agent_ports.values()],
            f"127.0.0.1:{extender_metrics}",
        )
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom_port = free_port()
        procs.start(
            "prometheus",
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        )  # fmt: skip
        prom = Prometheus(f"http://127.0.0.1:{prom_port}")
        wait_for("Prometheus ready", lambda: http_ok(f"{prom.url}/-/ready"), 60)
        yield Stack(cluster, prom, procs, workdir)
    finally:
        procs.stop_all()
        print_log_tails(workdir / "logs")
        # The operator that would release its finalizers is stopped: they are dropped here.
        cluster.kubectl("delete", "-f", str(DEMO), "--ignore-not-found", "--wait=false", check=False)
        for name in cluster.kubectl(
            "get", "energypolicies", "-n", DEMO_NS, "-o", "name", check=False
        ).stdout.split():
            unfinalize(cluster, name, "-n", DEMO_NS)
        unfinalize(cluster, f"powerbudget/{BUDGET}")
        cluster.kubectl("delete", "powerbudget", BUDGET, "--ignore-not-found", "--wait=false", check=False)
        for node in nodes:
            unfinalize(cluster, f"gpunodereport/{node}")
        cluster.kubectl("delete", "gpunodereports", *nodes, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl("delete", "node", BUDGET_NODE, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl("delete", "clusterrolebinding", READER_BINDING, "--ignore-not-found", check=False)
        for ns in (SYSTEM_NS, MONITORING_NS):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def converged(cluster: Cluster) -> bool:
    items = cluster.get_json("energypolicies", "-n", DEMO_NS)["items"]
    rows = [row for item in items for row in (item.get("status") or {}).get("workloads") or []]
    return bool(rows) and all(row.get("phase") == "Converged" for row in rows)


def schedule_through_extender(cluster: Cluster) -> str:
    """A GPU pod for the extender's scheduler that tolerates the budget node's taint: the extender
    filters that node out (its budget is broken), so the pod lands on a demo node."""
    pod = gpu_pod(
        DEMO_NS,
        "via-extender",
        image="registry.example/idle:1",
        schedulerName=SCHEDULER,
        terminationGracePeriodSeconds=0,
        tolerations=[{"key": MARK, "operator": "Exists", "effect": "NoSchedule"}],
    )
    apply(cluster, pod)
    return str(
        wait_for(
            "the pod bound through the extender",
            lambda: cluster.get_json("pod", "-n", DEMO_NS, "via-extender")["spec"].get("nodeName"),
            60,
        )
    )


@pytest.fixture(scope="module")
def ready(stack: Stack) -> Stack:
    """Every target up, the demo's policies converged, one pod placed through the extender, and a
    few scrapes after that."""
    prom, cluster = stack.prom, stack.cluster
    try:
        wait_for(
            "every scrape target up",
            lambda: (t := prom.targets()) and all(x["health"] == "up" for x in t),
            60,
        )
        # Prometheus gets in with its token only: the agents' /metrics are not open.
        for target in prom.targets():
            if target["labels"]["job"] == "edpilot-agent":
                assert status_of(target["scrapeUrl"]) == 401, target["scrapeUrl"]
        wait_for("the demo's policies converged", lambda: converged(cluster), 600)
        assert schedule_through_extender(cluster) != BUDGET_NODE
    except AssertionError:
        print(json.dumps(prom.targets(), indent=1)[:4000])
        raise
    time.sleep(5)
    return stack


# ---------------------------------------------------------------- tests


def test_every_panel_of_the_dashboard_has_data(ready: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    failures, passed = failing_panels(dashboard, ready.prom)
    print("panels with data:\n  " + "\n  ".join(passed))
    assert not failures, "panels without data in Prometheus:\n" + "\n".join(failures)
    assert len(passed) == len(panels(dashboard))


def test_a_misspelled_metric_and_a_syntax_error_are_reported(ready: Stack) -> None:
    """The check can fail: the same dashboard with one metric misspelled and one query broken."""
    dashboard = json.loads(DASHBOARD.read_text())
    broken = copy.deepcopy(dashboard)
    by_id = {p["id"]: p for p in panels(broken)}
    power = next(
        p for p in panels(broken) if p["targets"][0]["expr"].startswith("sum(edpilot_gpu_power_watts")
    )
    power["targets"][0]["expr"] = power["targets"][0]["expr"].replace("power_watts", "powr_watts")
    edp = next(p for p in panels(broken) if "edp_reduction_ratio" in p["targets"][0]["expr"])
    edp["targets"][0]["expr"] += " by"
    failures, passed = failing_panels(broken, ready.prom)
    assert len(failures) == 2, failures
    assert f"panel {power['id']} " in failures[0] and "no series" in failures[0]
    assert f"panel {edp['id']} " in failures[1] and "bad_data" in failures[1]
    assert len(passed) == len(by_id) - 2
