"""The Helm chart on the real control plane, with the real helm CLI: install into a namespace that
enforces the restricted Pod Security Standard, agents on GPU nodes only, least-privilege RBAC checked
by the API server's authorizer, agents restricted to their own node's report by the admission policy
(with real pod-bound tokens), upgrade, and uninstall. The tests run in file order on one release."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetest import SIM_TRAINER, Cluster, kwok_gpu_nodes, remove_gpu_nodes, training_policy, wait_for
from sa_kubeconfig import agent_pod_on, kubectl_with, service_account_kubeconfig

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "edpilot"
KUBE_VERSION = "1.36.3"
NAMESPACE = "edpilot-chart-test"
RELEASE = "charttest"
PREFIX = f"{RELEASE}-edpilot"  # the chart's full name for this release
SA = {component: f"{PREFIX}-{component}" for component in ("operator", "agent", "extender")}
GPU_SELECTOR = "nvidia.com/gpu.present=true"
OWN_GPU_NODES = ("chart-gpu-0", "chart-gpu-1")  # added by this module, so their reports are ours alone
CPU_NODE = "chart-cpu-0"


def cpu_node(name: str) -> str:
    """A KWOK node without any GPU label: an agent must never land there."""
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
        "spec": {},
        "status": {
            "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
            "capacity": {"cpu": "32", "memory": "128Gi", "pods": "110"},
            "nodeInfo": {"architecture": "amd64", "kubeletVersion": "fake", "operatingSystem": "linux"},
            "phase": "Running",
        },
    }
    return json.dumps(node)


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[Cluster]:
    """Extra KWOK nodes, a restricted namespace and the chart installed with the simulated backend."""
    cluster.kubectl("apply", "-f", "-", input=kwok_gpu_nodes(len(OWN_GPU_NODES), 8, "chart-gpu"))
    cluster.kubectl("apply", "-f", "-", input=cpu_node(CPU_NODE))
    cluster.kubectl("wait", "--for=condition=Ready", "--timeout=60s", "node", *OWN_GPU_NODES, CPU_NODE)
    cluster.kubectl("create", "namespace", NAMESPACE)
    # Every pod of the chart (sim backend) must pass the restricted Pod Security Standard.
    cluster.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
    try:
        yield cluster
    finally:
        cluster.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--ignore-not-found", check=False)
        cluster.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=false", check=False)
        remove_gpu_nodes(cluster, *OWN_GPU_NODES)
        cluster.kubectl("delete", "node", CPU_NODE, "--ignore-not-found", check=False)


def manifest_objects(cluster: Cluster) -> list[dict[str, Any]]:
    manifest = cluster.helm("get", "manifest", RELEASE, "-n", NAMESPACE).stdout
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def existing(cluster: Cluster, objects: list[dict[str, Any]]) -> list[str]:
    """`kind/name` of each object that exists on the server."""
    text = "\n---\n".join(yaml.safe_dump(obj) for obj in objects)
    proc = cluster.kubectl("get", "-f", "-", "--ignore-not-found", "-o", "name", input=text)
    return proc.stdout.split()


def pods(cluster: Cluster, component: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component={component}"
    items: list[dict[str, Any]] = cluster.get_json("pods", "-n", NAMESPACE, "-l", selector)["items"]
    return [pod for pod in items if "deletionTimestamp" not in pod["metadata"]]


def running(cluster: Cluster, component: str) -> int:
    # Not readiness: KWOK fakes it, and a KWOK node that misses a heartbeat leaves its pods NotReady.
    return sum(pod["status"].get("phase") == "Running" for pod in pods(cluster, component))


def agent_nodes(cluster: Cluster) -> list[str]:
    return sorted(pod["spec"].get("nodeName", "") for pod in pods(cluster, "agent"))


def gpu_node_names(cluster: Cluster) -> list[str]:
    return sorted(node["metadata"]["name"] for node in cluster.get_json("nodes", "-l", GPU_SELECTOR)["items"])


# ---------------------------------------------------------------- install


def test_install_creates_every_object(release: Cluster) -> None:
    proc = release.helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--set",
        "agent.backend=sim",
    )
    assert "Wire the extender into your cluster's kube-scheduler" in proc.stdout, (
        "NOTES.txt tells what to do next"
    )
    assert f"urlPrefix: https://{PREFIX}-extender.{NAMESPACE}.svc:8888" in proc.stdout
    assert f"the files of Secret {PREFIX}-extender-client" in proc.stdout  # its tlsConfig

    objects = manifest_objects(release)
    assert {"Deployment", "DaemonSet", "ValidatingAdmissionPolicy", "ClusterKopfPeering"} <= {
        o["kind"] for o in objects
    }
    found = existing(release, objects)
    assert len(found) == len(objects), f"missing: {len(objects) - len(found)} of {len(objects)}"

    crds = {crd["metadata"]["name"] for crd in release.get_json("crds")["items"]}
    assert {
        "energypolicies.edpilot.io",
        "gpunodereports.edpilot.io",
        "powerbudgets.edpilot.io",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    } <= crds
    # The restricted namespace admitted them: non-root, no escalation, no capabilities, seccomp.
    wait_for(
        "the operator and extender pods",
        lambda: running(release, "operator") == running(release, "extender") == 1,
    )


def test_agents_run_on_every_gpu_node_and_nowhere_else(release: Cluster) -> None:
    gpu_nodes = gpu_node_names(release)
    assert set(OWN_GPU_NODES) <= set(gpu_nodes)
    wait_for("an agent on every GPU node", lambda: agent_nodes(release) == gpu_nodes)
    daemonset = release.get_json("daemonset", f"{PREFIX}-agent", "-n", NAMESPACE)
    assert daemonset["status"]["desiredNumberScheduled"] == len(gpu_nodes)
    assert CPU_NODE not in agent_nodes(release)

    # Positive control: the DaemonSet controller does see the CPU node; the selector keeps agents off it.
    release.kubectl("label", "node", CPU_NODE, GPU_SELECTOR)
    try:
        wait_for("an agent on the newly labelled node", lambda: CPU_NODE in agent_nodes(release))
    finally:
        release.kubectl("label", "node", CPU_NODE, "nvidia.com/gpu.present-")
    wait_for("the agent to leave the unlabelled node", lambda: CPU_NODE not in agent_nodes(release))
    assert agent_nodes(release) == gpu_nodes


def test_each_ci_variant_is_accepted_by_the_api_server(release: Cluster) -> None:
    """Server-side dry run: the API server's own schemas and validation, for every values variant."""
    scratch = ("team-a", "team-b", "monitoring")  # namespaces the ci/ variants put objects in
    for namespace in scratch:
        release.kubectl("create", "namespace", namespace)
    try:
        for index, values in enumerate(sorted((CHART / "ci").glob("*.yaml"))):
            rendered = release.helm(
                "template", f"ci{index}", str(CHART), "-n", NAMESPACE,
                "--kube-version", KUBE_VERSION, "-f", str(values),
            ).stdout  # fmt: skip
            docs = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] != "ServiceMonitor"]
            text = "\n---\n".join(yaml.safe_dump(d) for d in docs)
            proc = release.kubectl("apply", "--dry-run=server", "-f", "-", input=text, check=False)
            assert proc.returncode == 0, f"{values.name}: {proc.stderr}"
            assert proc.stdout.count("(server dry run)") == len(docs)
    finally:
        for namespace in scratch:
            release.kubectl("delete", "namespace", namespace, "--wait=false")


# ---------------------------------------------------------------- least privilege


def review(cluster: Cluster, component: str, checks: list[str]) -> dict[str, bool]:
    """Asks the API server's authorizer (SubjectAccessReview, as `kubectl auth can-i` does) whether
    the component's ServiceAccount, with the groups its tokens carry, may do each check:
    "verb resource[.group][/subresource] [namespace [name]]"."""
    user = f"system:serviceaccount:{NAMESPACE}:{SA[component]}"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}", "system:authenticated"]
    reviews = []
    for check in checks:
        verb, target, *where = check.split()
        resource, _, subresource = target.partition("/")
        resource, _, group = resource.partition(".")
        attributes = {"verb": verb, "resource": resource, "group": group, "subresource": subresource}
        if where:
            attributes["namespace"] = where[0]
        if len(where) > 1:
            attributes["name"] = where[1]
        reviews.append(
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {"user": user, "groups": groups, "resourceAttributes": attributes},
            }
        )
    text = "\n---\n".join(json.dumps(r) for r in reviews)
    out = cluster.kubectl("create", "-f", "-", "-o", 'jsonpath={.status.allowed}{"\\n"}', input=text).stdout
    answers = out.split()
    return {check: answer == "true" for check, answer in zip(checks, answers, strict=True)}


LEASE = f"{PREFIX}-operator"  # the operator's liveness Lease, in the release namespace
LEASES = "leases.coordination.k8s.io"
OPERATOR_ALLOWED = [
    f"create {LEASES} {NAMESPACE}",
    f"get {LEASES} {NAMESPACE} {LEASE}",
    f"patch {LEASES} {NAMESPACE} {LEASE}",
    f"update {LEASES} {NAMESPACE} {LEASE}",
    "watch energypolicies.edpilot.io",
    "patch energypolicies.edpilot.io team-a",
    "patch energypolicies.edpilot.io/status team-a",
    "create gpunodereports.edpilot.io",
    "patch gpunodereports.edpilot.io",
    "patch powerbudgets.edpilot.io/status",
    "patch pods team-a",
    "list nodes",
    "create events default",
    "create events.events.k8s.io default",
    "patch clusterkopfpeerings.kopf.dev",
    "list customresourcedefinitions.apiextensions.k8s.io",
    "list workloadoptimizerstates.edpilot.io",
    "watch workloadoptimizerstates.edpilot.io",
    "create workloadoptimizerstates.edpilot.io team-a",
    "patch workloadoptimizerstates.edpilot.io team-a",
    "delete workloadoptimizerstates.edpilot.io team-a",
]
OPERATOR_FORBIDDEN = [
    "update workloadoptimizerstates.edpilot.io team-a",
    "deletecollection workloadoptimizerstates.edpilot.io team-a",
    f"patch {LEASES} {NAMESPACE} another-lease",
    f"patch {LEASES} kube-node-lease chart-gpu-0",
    f"create {LEASES} default",
    f"delete {LEASES} {NAMESPACE} {LEASE}",
    "get secrets default",
    "list secrets",
    "patch nodes",
    "watch nodes",  # labels for budgets come from a list
    "update nodes/status",
    "delete pods team-a",
    "create pods team-a",
    "create pods/exec team-a",
    "create pods/eviction team-a",
    "update pods/status team-a",
    "delete energypolicies.edpilot.io team-a",
    "create energypolicies.edpilot.io team-a",
    "patch gpunodereports.edpilot.io/status",
    "delete gpunodereports.edpilot.io",
    "create powerbudgets.edpilot.io",
    "update customresourcedefinitions.apiextensions.k8s.io",
    "create clusterrolebindings.rbac.authorization.k8s.io",
    "impersonate users",
    "create serviceaccounts/token default",
    "patch validatingadmissionpolicies.admissionregistration.k8s.io",
    "patch deployments.apps default",
    "update configmaps default",
    "delete namespaces",
]
AGENT_ALLOWED = [
    f"get {LEASES} {NAMESPACE} {LEASE}",
    f"list {LEASES} {NAMESPACE} {LEASE}",  # a list or watch with fieldSelector metadata.name=<it>
    f"watch {LEASES} {NAMESPACE} {LEASE}",
    "list pods",
    "watch pods",
    "get gpunodereports.edpilot.io",
    "watch gpunodereports.edpilot.io",
    "create gpunodereports.edpilot.io",
    "patch gpunodereports.edpilot.io/status",
    "update gpunodereports.edpilot.io/status",
    "create tokenreviews.authentication.k8s.io",
    "create subjectaccessreviews.authorization.k8s.io",
]
AGENT_FORBIDDEN = [
    f"patch {LEASES} {NAMESPACE} {LEASE}",
    f"update {LEASES} {NAMESPACE} {LEASE}",
    f"delete {LEASES} {NAMESPACE} {LEASE}",
    f"create {LEASES} {NAMESPACE}",
    f"watch {LEASES} {NAMESPACE}",  # every Lease of the namespace
    f"get {LEASES} {NAMESPACE} another-lease",
    f"watch {LEASES} kube-node-lease",
    "get secrets default",
    "get pods default",
    "create events default",
    "create events.events.k8s.io default",
    "list configmaps",
    "patch pods default",
    "delete pods default",
    "create pods default",
    "create pods/exec default",
    "patch nodes",
    "patch nodes/status",
    "update gpunodereports.edpilot.io",
    "patch gpunodereports.edpilot.io",
    "delete gpunodereports.edpilot.io",
    "patch energypolicies.edpilot.io default",
    "patch energypolicies.edpilot.io/status default",
    "create powerbudgets.edpilot.io",
    "create serviceaccounts/token default",
    "impersonate serviceaccounts default",
    "update customresourcedefinitions.apiextensions.k8s.io",
]
EXTENDER_ALLOWED = [
    "list nodes",
    "watch pods",
    "list gpunodereports.edpilot.io",
    "watch powerbudgets.edpilot.io",
    "list energypolicies.edpilot.io",
]
EXTENDER_FORBIDDEN = [
    "create pods default",
    "patch pods default",
    "delete pods default",
    "create pods/binding default",
    "patch nodes",
    "get secrets default",
    "patch gpunodereports.edpilot.io",
    "update gpunodereports.edpilot.io/status",
    "patch powerbudgets.edpilot.io",
    "patch energypolicies.edpilot.io default",
    "create events default",
    "create leases.coordination.k8s.io default",
    "get configmaps default",
]


@pytest.mark.parametrize(
    ("component", "allowed", "forbidden"),
    [
        ("operator", OPERATOR_ALLOWED, OPERATOR_FORBIDDEN),
        ("agent", AGENT_ALLOWED, AGENT_FORBIDDEN),
        ("extender", EXTENDER_ALLOWED, EXTENDER_FORBIDDEN),
    ],
)
def test_rbac_grants_what_each_component_needs_and_nothing_more(
    release: Cluster, component: str, allowed: list[str], forbidden: list[str]
) -> None:
    assert len(forbidden) >= 10
    answers = review(release, component, allowed + forbidden)
    assert [c for c in allowed if not answers[c]] == [], f"{component} lacks what it needs"
    assert [c for c in forbidden if answers[c]] == [], f"{component} may do more than it needs"


def test_a_service_account_kubeconfig_acts_with_the_charts_rbac(release: Cluster, tmp_path: Path) -> None:
    kubeconfig = service_account_kubeconfig(
        release, NAMESPACE, SA["operator"], tmp_path / "operator.kubeconfig"
    )
    whoami = kubectl_with(release, kubeconfig, "auth", "whoami", "-o", "json")
    assert (
        json.loads(whoami.stdout)["status"]["userInfo"]["username"]
        == f"system:serviceaccount:{NAMESPACE}:{SA['operator']}"
    )
    assert kubectl_with(release, kubeconfig, "get", "energypolicies", "-A").returncode == 0
    denied = kubectl_with(release, kubeconfig, "get", "secrets", "-n", NAMESPACE)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr


def test_a_namespace_admin_cannot_write_optimizer_states(release: Cluster) -> None:
    """The built-in admin and edit roles, bound in a tenant's namespace, give no write access to
    WorkloadOptimizerStates: the chart aggregates nothing into them (docs/security.md)."""
    namespace = "chart-tenant"
    release.kubectl("create", "namespace", namespace)
    try:
        for role, user in (("admin", "tenant-admin"), ("edit", "tenant-editor")):
            release.kubectl(
                "create", "rolebinding", user, f"--clusterrole={role}", f"--user={user}", "-n", namespace
            )
            for verb in ("create", "patch", "update", "delete"):
                answer = release.kubectl(
                    "auth",
                    "can-i",
                    verb,
                    "workloadoptimizerstates.edpilot.io",
                    "-n",
                    namespace,
                    f"--as={user}",
                    check=False,
                )
                assert answer.stdout.strip() == "no", (role, verb, answer.stdout)
            # The binding works: the same user may create pods there.
            assert (
                release.kubectl(
                    "auth", "can-i", "create", "pods", "-n", namespace, f"--as={user}"
                ).stdout.strip()
                == "yes"
            )
    finally:
        release.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


# ---------------------------------------------------------------- admission policies


def report(name: str) -> str:
    return json.dumps(
        {"apiVersion": "edpilot.io/v1alpha1", "kind": "GPUNodeReport", "metadata": {"name": name}}
    )


def status_patch(node: str) -> str:
    status = {"nodeName": node, "agentVersion": "0.1.0", "backend": "sim", "time": "2026-01-01T00:00:00Z"}
    return json.dumps({"status": status})


def test_agents_write_only_their_own_nodes_report(release: Cluster, tmp_path: Path) -> None:
    node_a, node_b = OWN_GPU_NODES
    kubeconfigs = {
        node: service_account_kubeconfig(
            release,
            NAMESPACE,
            SA["agent"],
            tmp_path / f"{node}.kubeconfig",
            bound_pod=agent_pod_on(release, NAMESPACE, RELEASE, node),
        )
        for node in OWN_GPU_NODES
    }
    whoami = json.loads(kubectl_with(release, kubeconfigs[node_a], "auth", "whoami", "-o", "json").stdout)
    assert whoami["status"]["userInfo"]["extra"]["authentication.kubernetes.io/node-name"] == [node_a]

    def message(own: str, other: str) -> str:
        return f"edpilot agent on node {own} may only write GPUNodeReport {own}, not {other}"

    # Each agent creates its own node's report and writes its status.
    for node in OWN_GPU_NODES:
        created = kubectl_with(release, kubeconfigs[node], "create", "-f", "-", input=report(node))
        assert created.returncode == 0, created.stderr
        patched = kubectl_with(
            release, kubeconfigs[node], "patch", "gpunodereport", node,
            "--subresource=status", "--type=merge", "-p", status_patch(node),
        )  # fmt: skip
        assert patched.returncode == 0, patched.stderr
    assert release.get_json("gpunodereport", node_a)["status"]["nodeName"] == node_a

    # ...and is denied on the other's (with a status that is otherwise valid), by the policy.
    for own, other in ((node_a, node_b), (node_b, node_a)):
        patched = kubectl_with(
            release, kubeconfigs[own], "patch", "gpunodereport", other,
            "--subresource=status", "--type=merge", "-p", status_patch(other),
        )  # fmt: skip
        assert patched.returncode != 0
        assert f"{PREFIX}-agent-node-restriction" in patched.stderr
        assert message(own, other) in patched.stderr
    release.kubectl("delete", "gpunodereport", node_b)
    created = kubectl_with(release, kubeconfigs[node_a], "create", "-f", "-", input=report(node_b))
    assert created.returncode != 0
    assert message(node_a, node_b) in created.stderr
    assert release.get_json("gpunodereport", node_a)["status"]["nodeName"] == node_a

    # A token of the same ServiceAccount that is not bound to a pod names no node: denied.
    unbound = service_account_kubeconfig(release, NAMESPACE, SA["agent"], tmp_path / "unbound.kubeconfig")
    created = kubectl_with(release, unbound, "create", "-f", "-", input=report(node_b))
    assert created.returncode != 0
    assert "edpilot agent credentials carry no node name" in created.stderr


def test_operator_may_change_only_hint_annotations_of_pods(release: Cluster, tmp_path: Path) -> None:
    restricted = {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "name": "main",
        "image": "example.invalid/trainer:1",
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "chart-workload", "namespace": NAMESPACE, "labels": {"app": "trainer"}},
        "spec": {"nodeName": OWN_GPU_NODES[0], "securityContext": restricted, "containers": [container]},
    }
    release.kubectl("create", "-f", "-", input=json.dumps(pod))
    try:
        kubeconfig = service_account_kubeconfig(
            release, NAMESPACE, SA["operator"], tmp_path / "op.kubeconfig"
        )
        hint = kubectl_with(
            release, kubeconfig, "annotate", "pod", "chart-workload", "edpilot.io/batch-size=64"
        )
        assert hint.returncode == 0, hint.stderr
        label = kubectl_with(
            release, kubeconfig, "label", "pod", "chart-workload", "app=other", "--overwrite"
        )
        assert label.returncode != 0
        assert "pod chart-workload, not its labels, finalizers or owners" in label.stderr
        foreign = kubectl_with(release, kubeconfig, "annotate", "pod", "chart-workload", "owner=someone")
        assert foreign.returncode != 0
        assert "may only change annotations starting with edpilot.io/" in foreign.stderr
        annotations = release.get_json("pod", "chart-workload", "-n", NAMESPACE)["metadata"]["annotations"]
        assert annotations == {"edpilot.io/batch-size": "64"}
    finally:
        release.kubectl("delete", "pod", "chart-workload", "-n", NAMESPACE, "--wait=false")


# ---------------------------------------------------------------- the loop under the chart's identities


WORKLOADS = "edpilot-chart-workloads"


def trainer_pod(name: str, node: str) -> dict[str, Any]:
    """A simulated training pod: the sim agent on its node plays it from the sim.edpilot.io annotations."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": WORKLOADS,
            "labels": {"app": "chart-trainer"},
            "annotations": SIM_TRAINER,
        },
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": "trainer",
                    "image": "example.invalid/trainer:1",
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }
            ],
        },
    }


def converged(cluster: Cluster) -> bool:
    policy = cluster.get_json("energypolicy", "chart-power", "-n", WORKLOADS)
    rows = (policy.get("status") or {}).get("workloads") or []
    return bool(rows) and all(row.get("phase") == "Converged" for row in rows)


@pytest.mark.slow
def test_operator_and_agents_converge_with_only_the_charts_credentials(
    release: Cluster, tmp_path: Path
) -> None:
    """The real operator and simulated agents, run as processes with the chart's ServiceAccount
    tokens (the agents' bound to their DaemonSet pods, so the node restriction applies), steer a
    workload to convergence; neither is ever refused by RBAC or the admission policies."""
    from edpilot_operator.localrun import Processes, agent_argv, operator_argv

    release.kubectl("create", "namespace", WORKLOADS)
    procs = Processes(logs=tmp_path / "logs")
    try:
        release.kubectl("create", "-f", "-", input=json.dumps(trainer_pod("trainer-0", OWN_GPU_NODES[0])))
        release.kubectl("create", "-f", "-", input=json.dumps(trainer_pod("trainer-1", OWN_GPU_NODES[1])))
        policy = training_policy(WORKLOADS, "chart-power", "chart-trainer")
        release.kubectl("create", "-f", "-", input=json.dumps(policy))

        operator_kubeconfig = service_account_kubeconfig(
            release, NAMESPACE, SA["operator"], tmp_path / "op.kc"
        )
        procs.start(
            "operator",
            operator_argv(
                operator_kubeconfig,
                f"--peering={PREFIX}",
                "--all-namespaces",
                f"--lease-name={LEASE}",
                f"--lease-namespace={NAMESPACE}",
            ),
        )
        agent_kubeconfigs = []
        for seed, node in enumerate(OWN_GPU_NODES):
            kubeconfig = service_account_kubeconfig(
                release,
                NAMESPACE,
                SA["agent"],
                tmp_path / f"{node}.kc",
                bound_pod=agent_pod_on(release, NAMESPACE, RELEASE, node),
            )
            agent_kubeconfigs.append(kubeconfig)
            procs.start(f"agent-{node}", agent_argv(kubeconfig, node, seed))

        def done() -> bool:
            assert not procs.dead(), f"exited: {procs.dead()}"
            failed = [
                line
                for line in (procs.logs / "operator.log").read_text(errors="replace").splitlines()
                if "failed with an exception" in line
            ]
            assert not failed, f"an operator handler failed (see {procs.logs}): {failed[0]}"
            return converged(release)

        wait_for("the policy's workloads to converge", done, 300)
        rows = release.get_json("energypolicy", "chart-power", "-n", WORKLOADS)["status"]["workloads"]
        assert {pod for row in rows for pod in row["pods"]} == {
            f"{WORKLOADS}/trainer-0",
            f"{WORKLOADS}/trainer-1",
        }
        assert all(row["powerCapWatts"] for row in rows)
        # Each workload's state in its own object, written with the chart's operator credentials.
        uid = release.get_json("energypolicy", "chart-power", "-n", WORKLOADS)["metadata"]["uid"]
        states = release.get_json("workloadoptimizerstates", "-n", WORKLOADS)["items"]
        assert {s["spec"]["workload"]: s["metadata"]["ownerReferences"][0]["uid"] for s in states} == {
            row["name"]: uid for row in rows
        }
        assert all(s["spec"]["state"]["phase"] == "Converged" for s in states)
        # The operator's one Lease, created and renewed with its chart credentials; every report
        # names it and every agent, watching it with its own, holds it.
        lease = release.get_json("lease", LEASE, "-n", NAMESPACE)["spec"]
        assert lease["holderIdentity"] and lease["leaseDurationSeconds"] > 0 and lease["renewTime"]
        for node in OWN_GPU_NODES:
            report = release.get_json("gpunodereport", node)
            assert report["spec"]["operatorLease"] == {"namespace": NAMESPACE, "name": LEASE}
            assert "lease" not in report["spec"]
            held = {c["type"]: c["status"] for c in report["status"]["conditions"]}
            assert held["LeaseValid"] == "True", report["status"]["conditions"]
        as_agent = agent_kubeconfigs[0]
        read = kubectl_with(
            release, as_agent, "get", "leases", "-n", NAMESPACE, f"--field-selector=metadata.name={LEASE}"
        )
        assert read.returncode == 0 and LEASE in read.stdout, read.stderr
        renew = '{"spec":{"renewTime":"2099-01-01T00:00:00.000000Z"}}'
        written = kubectl_with(release, as_agent, "patch", "lease", LEASE, "-n", NAMESPACE, "-p", renew)
        assert written.returncode != 0 and "forbidden" in written.stderr

        # Clean up while the operator runs: it removes its finalizers from the policy and the reports.
        release.kubectl("delete", "energypolicy", "chart-power", "-n", WORKLOADS, "--timeout=60s")
        for node in OWN_GPU_NODES:
            procs.stop(f"agent-{node}")
        release.kubectl("delete", "gpunodereports", *OWN_GPU_NODES, "--timeout=60s")
    finally:
        procs.stop_all()
        release.kubectl("delete", "namespace", WORKLOADS, "--wait=false", check=False)
    refused = [
        f"{log.name}: {line.strip()}"
        for log in sorted(procs.logs.glob("*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if " 403" in line or "forbidden" in line.lower() or "ValidatingAdmissionPolicy" in line
    ]
    assert not refused, "refused requests:\n" + "\n".join(refused[:20])


# ---------------------------------------------------------------- upgrade and uninstall


def test_upgrade_scales_and_adds_the_second_scheduler(release: Cluster) -> None:
    release.helm(
        "upgrade", RELEASE, str(CHART), "-n", NAMESPACE, "--reuse-values",
        "--set", "operator.replicas=2", "--set", "scheduler.enabled=true",
    )  # fmt: skip
    history = json.loads(release.helm("history", RELEASE, "-n", NAMESPACE, "-o", "json").stdout)
    assert [(h["revision"], h["status"]) for h in history][-1] == (2, "deployed")
    objects = manifest_objects(release)
    assert len(existing(release, objects)) == len(objects)
    operator = release.get_json("deployment", f"{PREFIX}-operator", "-n", NAMESPACE)
    assert operator["spec"]["replicas"] == 2
    assert f"--peering={PREFIX}" in operator["spec"]["template"]["spec"]["containers"][0]["args"]
    wait_for("two running operator pods", lambda: running(release, "operator") == 2)
    wait_for("the running second scheduler", lambda: running(release, "scheduler") == 1)
    assert agent_nodes(release) == gpu_node_names(release)


def test_uninstall_with_policies_present_leaves_no_release_objects(release: Cluster) -> None:
    policy = {
        "apiVersion": "edpilot.io/v1alpha1",
        "kind": "EnergyPolicy",
        "metadata": {"name": "chart-test", "namespace": NAMESPACE},
        "spec": {"selector": {"matchLabels": {"app": "trainer"}}, "workMetric": {"name": "tokens_total"}},
    }
    release.kubectl("create", "-f", "-", input=json.dumps(policy))
    objects = manifest_objects(release)
    release.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", "120s")

    assert existing(release, objects) == []
    assert release.helm("list", "-n", NAMESPACE, "-q").stdout.strip() == ""
    wait_for(
        "the release's pods to go",
        lambda: all(not pods(release, c) for c in ("operator", "agent", "extender")),
    )
    labelled = release.kubectl(
        "get", "all,serviceaccounts,configmaps,roles,rolebindings", "-A", "-l", f"app.kubernetes.io/instance={RELEASE}",
        "-o", "name",
    ).stdout  # fmt: skip
    assert labelled.strip() == ""
    cluster_scoped = release.kubectl(
        "get", "clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings,"
        "clusterkopfpeerings", "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name",
    ).stdout  # fmt: skip
    assert cluster_scoped.strip() == ""
    # Helm keeps CRDs (and so the users' policies) on uninstall; the policy carries no finalizer of
    # an operator that is gone, so deleting it (or its namespace) does not hang.
    remaining = release.get_json("energypolicy", "chart-test", "-n", NAMESPACE)
    assert remaining["metadata"].get("finalizers", []) == []
    release.kubectl("delete", "energypolicy", "chart-test", "-n", NAMESPACE, "--timeout=30s")
