"""The Helm chart without a cluster: lint, every values variant under ci/ rendered and checked,
bad values rejected by values.schema.json with messages, CRDs identical to crds/, Dockerfiles pinned."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubetest import tool_dir

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "edpilot"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
KUBE_VERSION = "1.36.3"  # hack/versions.env: render for the version the local control plane runs
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}

Manifests = list[dict[str, Any]]
Render = Callable[..., Manifests]


@pytest.fixture(scope="module")
def helm() -> Path:
    return tool_dir() / "helm"


def run_helm(helm: Path, *args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args, str(chart)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def render(helm: Path) -> Render:
    def _render(*args: str, chart: Path = CHART) -> Manifests:
        proc = run_helm(
            helm,
            "template",
            "rel",
            "--namespace",
            "gpu-energy",
            "--kube-version",
            KUBE_VERSION,
            *args,
            chart=chart,
        )
        assert proc.returncode == 0, proc.stderr
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]

    return _render


def one(manifests: Manifests, kind: str, name: str) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def kinds(manifests: Manifests) -> set[str]:
    return {m["kind"] for m in manifests}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def named_containers(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def assert_restricted(workload: dict[str, Any]) -> None:
    """The restricted Pod Security Standard, as far as the chart decides it."""
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(workload)["securityContext"]
    assert sc.items() >= RESTRICTED_CONTAINER.items()
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert not any("hostPath" in volume for volume in pod.get("volumes", []))


# ---------------------------------------------------------------- lint and schema


def test_the_ci_folder_covers_the_variants_the_issue_names() -> None:
    names = {path.stem for path in CI_VALUES}
    assert {
        "default-values",
        "operator-ha-values",
        "existing-serviceaccounts-values",
        "sim-backend-values",
        "monitoring-values",
        "second-scheduler-values",
    } <= names


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_helm_lint_strict_passes(helm: Path, values: Path) -> None:
    proc = run_helm(helm, "lint", "--strict", "--kube-version", KUBE_VERSION, "-f", str(values))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def helm_client_go_minor() -> int:
    """The Kubernetes minor version of the client-go that the pinned helm is built with."""
    go_mod = (REPO / "hack" / "tools" / "helm" / "go.mod").read_text()
    found = re.search(r"^\s*k8s\.io/client-go v0\.(\d+)\.\d+", go_mod, re.MULTILINE)
    assert found, "hack/tools/helm/go.mod pins no k8s.io/client-go"
    return int(found.group(1))


def test_helm_template_works_without_kube_version(helm: Path, tmp_path: Path) -> None:
    # Offline, helm assumes the Kubernetes version its build was stamped with; unstamped it
    # assumes v1.20, older than the chart allows, and a user's first `helm template` fails.
    proc = run_helm(helm, "template", "rel", "--namespace", "gpu-energy")
    assert proc.returncode == 0, proc.stderr
    assert any(doc and doc["kind"] == "DaemonSet" for doc in yaml.safe_load_all(proc.stdout))
    # Stamped as helm's own Makefile does: one minor above client-go's v0.N, i.e. v1.N.0.
    probe = tmp_path / "probe"
    (probe / "templates").mkdir(parents=True)
    (probe / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (probe / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n"
        "data: {kube: '{{ .Capabilities.KubeVersion.Version }}'}\n"
    )
    proc = run_helm(helm, "template", "rel", chart=probe)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["data"]["kube"] == f"v1.{helm_client_go_minor()}.0"


def test_helm_reports_a_clean_release_build(helm: Path) -> None:
    proc = subprocess.run([str(helm), "version"], capture_output=True, text=True, timeout=60, check=True)
    assert 'GitTreeState:"clean"' in proc.stdout, proc.stdout
    assert "+unreleased" not in proc.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_each_ci_variant_passes_the_schema_and_renders(render: Render, values: Path) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(deep_merge(defaults, yaml.safe_load(values.read_text()) or {}), schema)

    manifests = render("-f", str(values))
    assert {"Deployment", "DaemonSet", "Service", "ValidatingAdmissionPolicy"} <= kinds(manifests)
    for manifest in manifests:
        labels = manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "rel"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "edpilot-0.1.0"


BAD_VALUES: list[tuple[list[str], str]] = [
    (["operator.replicas=0"], "at '/operator/replicas': minimum: got 0, want 1"),
    (
        ["operator.replicas=2", "operator.peering.enabled=false"],
        "at '/operator/peering/enabled': value must be true",
    ),
    (["agent.backend=cuda"], "at '/agent/backend': value must be one of 'nvml', 'sim'"),
    (["operator.replica=2"], "at '/operator': additional properties 'replica' not allowed"),
    (
        ["operator.securityContext.privileged=true"],
        "at '/operator/securityContext/privileged': value must be false",
    ),
    (
        ["agent.securityContext.allowPrivilegeEscalation=true"],
        "at '/agent/securityContext/allowPrivilegeEscalation'",
    ),
    (
        ["agent.securityContext.capabilities.add={NET_ADMIN}"],
        "additional properties 'capabilities' not allowed",
    ),
    (
        ["operator.serviceAccount.create=false"],
        "at '/operator/serviceAccount/name': minLength: got 0, want 1",
    ),
    (["scheduler.enabled=true", "extender.enabled=false"], "at '/extender/enabled': value must be true"),
    (
        ["operator.watchNamespaces={Team_A}"],
        "at '/operator/watchNamespaces/0': 'Team_A' does not match pattern",
    ),
    (["operator.metricsPort=70000"], "at '/operator/metricsPort': maximum: got 70,000, want 65,535"),
    (["operator.image.pullPolicy=Sometimes"], "at '/operator/image/pullPolicy': value must be one of"),
    (["agent.nodeSelector=null"], "at '/agent': missing property 'nodeSelector'"),
    (["extender.service.type=ExternalName"], "at '/extender/service/type': value must be one of"),
    (["serviceMonitor.interval=often"], "at '/serviceMonitor/interval': 'often' does not match pattern"),
    (
        ["scheduler.replicas=2", "scheduler.leaderElect=false"],
        "at '/scheduler/leaderElect': value must be true",
    ),
]


@pytest.mark.parametrize(("sets", "message"), BAD_VALUES, ids=[",".join(s) for s, _ in BAD_VALUES])
def test_bad_values_are_rejected_with_a_message(helm: Path, sets: list[str], message: str) -> None:
    args = [arg for s in sets for arg in ("--set", s)]
    proc = run_helm(helm, "template", "rel", "--kube-version", KUBE_VERSION, *args)
    assert proc.returncode != 0, f"{sets} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr, proc.stderr


def test_an_empty_agent_node_selector_is_rejected(helm: Path, tmp_path: Path) -> None:
    # An empty selector would put an agent (root, with CAP_SYS_ADMIN) on every node. Helm merges
    # maps, so removing the default label (null) is how a user empties it.
    values = tmp_path / "values.yaml"
    values.write_text("agent:\n  nodeSelector:\n    nvidia.com/gpu.present: null\n")
    proc = run_helm(helm, "template", "rel", "--kube-version", KUBE_VERSION, "-f", str(values))
    assert proc.returncode != 0
    assert "at '/agent/nodeSelector': minProperties: got 0, want 1" in proc.stderr, proc.stderr


def test_every_value_is_commented() -> None:
    """Each leaf value in values.yaml has a comment right above it or above one of its parents."""
    stack: list[tuple[int, bool]] = []  # (indent, commented) of the enclosing keys
    previous = ""
    undocumented = []
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        match = re.match(r"^( *)([A-Za-z0-9_.-]+):(.*)$", line)
        if match:
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            commented = previous.lstrip().startswith("#")
            is_leaf = bool(match.group(3).strip())
            if is_leaf and not commented and not any(c for _, c in stack):
                undocumented.append(f"{number}: {line.strip()}")
            stack.append((indent, commented))
        if line.strip():
            previous = line
    assert not undocumented, "values without a comment:\n" + "\n".join(undocumented)


# ---------------------------------------------------------------- what each variant renders


def test_defaults_install_every_component_with_least_privilege(render: Render) -> None:
    manifests = render()
    operator = one(manifests, "Deployment", "rel-edpilot-operator")
    args = container(operator)["args"]
    assert args[0] == "operator"
    assert "--all-namespaces" in args
    assert "--peering=rel-edpilot" in args
    assert "--liveness=http://0.0.0.0:8080/healthz" in args
    assert "--lease-name=rel-edpilot-operator" in args  # in $POD_NAMESPACE
    env = {e["name"]: e for e in container(operator)["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert one(manifests, "ClusterKopfPeering", "rel-edpilot")
    for probe in ("livenessProbe", "readinessProbe"):
        assert container(operator)[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert_restricted(operator)

    extender = one(manifests, "Deployment", "rel-edpilot-extender")
    assert container(extender)["args"] == [
        "extender",
        "--port=8888",
        "--metrics-port=9466",
        "--tls-cert-file=/etc/edpilot/tls/tls.crt",
        "--tls-private-key-file=/etc/edpilot/tls/tls.key",
        "--client-ca-file=/etc/edpilot/tls/ca.crt",
        *DRA_ARGS,
    ]
    assert container(extender)["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    volume = next(v for v in extender["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "rel-edpilot-extender-tls"
    assert one(manifests, "Secret", "rel-edpilot-extender-tls")["type"] == "kubernetes.io/tls"
    ports = {p["name"]: p["port"] for p in one(manifests, "Service", "rel-edpilot-extender")["spec"]["ports"]}
    assert ports == {"scheduler": 8888, "metrics": 9466}
    assert_restricted(extender)

    agent = one(manifests, "DaemonSet", "rel-edpilot-agent")
    pod = agent["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "runtimeClassName" not in pod
    c, setter = named_containers(agent)["agent"], named_containers(agent)["setter"]
    assert c["args"] == [
        "agent",
        "--node-name=$(NODE_NAME)",
        "--backend=nvml",
        "--metrics-port=9464",
        "--metrics-auth=kube",
        "--setter-socket=/run/edpilot/setter.sock",
        *DRA_ARGS,
    ]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"
    for each in (c, setter):
        assert "nvidia.com/gpu" not in json.dumps(each["resources"]), "the agent must not take a GPU"
        assert each["securityContext"].items() >= RESTRICTED_CONTAINER.items()
        assert "privileged" not in each["securityContext"]
    # Only the setter reads the kubelet's socket and holds the capability NVML needs to set limits.
    mount = next(m for m in setter["volumeMounts"] if m["name"] == "pod-resources")
    assert mount == {"name": "pod-resources", "mountPath": "/var/lib/kubelet/pod-resources", "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "pod-resources")
    assert volume["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    assert setter["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 65532

    assert not {"ServiceMonitor", "ConfigMap"} & kinds(manifests)
    # The only namespaced RBAC: the operator's liveness Lease (test_the_operator_lease_rbac...).
    roles = {m["metadata"]["name"] for m in manifests if m["kind"] in ("Role", "RoleBinding")}
    assert roles == {"rel-edpilot-operator-lease", "rel-edpilot-operator-lease-reader"}


DRA_ARGS = (
    "--dra-driver=gpu.nvidia.com",
    "--dra-device-class=gpu.nvidia.com",
    "--dra-device-class=mig.nvidia.com",
    "--dra-uuid-attribute=uuid",
)


def grants(role: dict[str, Any], group: str = "resource.k8s.io") -> dict[str, set[str]]:
    """resource -> verbs a role grants in `group`."""
    result: dict[str, set[str]] = {}
    for rule in role["rules"]:
        if group in rule.get("apiGroups", ()):
            for resource in rule["resources"]:
                result.setdefault(resource, set()).update(rule["verbs"])
    return result


def test_dra_objects_are_read_only_and_only_with_dra_enabled(render: Render) -> None:
    """The operator reads claims (which devices, for which pods) and slices (their UUIDs); the
    extender claims and templates (what a pod asks for); an agent its node's slices, and a simulated
    one the claims it plays the kubelet for. Nobody writes any, nor reads DeviceClasses."""
    read = {"get", "list", "watch"}
    manifests = render()
    assert grants(one(manifests, "ClusterRole", "rel-edpilot-operator")) == {
        "resourceclaims": read,
        "resourceslices": read,
    }
    assert grants(one(manifests, "ClusterRole", "rel-edpilot-extender")) == {
        "resourceclaims": read,
        "resourceclaimtemplates": read,
    }
    assert grants(one(manifests, "ClusterRole", "rel-edpilot-agent")) == {"resourceslices": {"list", "watch"}}
    sim = render("--set", "agent.backend=sim")
    assert grants(one(sim, "ClusterRole", "rel-edpilot-agent")) == {
        "resourceslices": {"list", "watch"},
        "resourceclaims": {"list", "watch"},
    }
    assert container(one(manifests, "Deployment", "rel-edpilot-operator"))["args"][-4:] == list(DRA_ARGS)
    # A namespaced operator reads claims in its namespaces only; slices are cluster-scoped.
    namespaced = render("--set", "operator.watchNamespaces={team-a}")
    roles = [m for m in namespaced if m["kind"] == "Role" and m["metadata"]["namespace"] == "team-a"]
    assert grants(roles[0]) == {"resourceclaims": read}
    assert grants(one(namespaced, "ClusterRole", "rel-edpilot-operator")) == {"resourceslices": read}

    off = render("--set", "dra.enabled=false")
    for component in ("operator", "extender", "agent"):
        assert grants(one(off, "ClusterRole", f"rel-edpilot-{component}")) == {}
    assert "--no-dra" in container(one(off, "Deployment", "rel-edpilot-operator"))["args"]


def test_node_restriction_policy_names_the_agents_service_account(render: Render) -> None:
    manifests = render("--set", "agent.serviceAccount.name=gpu-agent")
    policy = one(manifests, "ValidatingAdmissionPolicy", "rel-edpilot-agent-node-restriction")
    match = policy["spec"]["matchConditions"][0]["expression"]
    assert match == 'request.userInfo.username == "system:serviceaccount:gpu-energy:gpu-agent"'
    rules = policy["spec"]["matchConstraints"]["resourceRules"][0]
    assert set(rules["resources"]) == {"gpunodereports", "gpunodereports/status"}
    assert {"CREATE", "UPDATE"} <= set(rules["operations"])
    binding = one(manifests, "ValidatingAdmissionPolicyBinding", "rel-edpilot-agent-node-restriction")
    assert binding["spec"] == {
        "policyName": "rel-edpilot-agent-node-restriction",
        "validationActions": ["Deny"],
    }
    assert "ValidatingAdmissionPolicy" not in kinds(
        render(
            "--set",
            "agent.nodeRestriction.enabled=false",
            "--set",
            "operator.podPatchRestriction.enabled=false",
            "--set",
            "operator.annotationOwnership.enabled=false",
        )
    )


def test_sim_backend_agent_needs_no_root_no_socket_and_no_capability(render: Render) -> None:
    agent = one(render("-f", str(CHART / "ci" / "sim-backend-values.yaml")), "DaemonSet", "rel-edpilot-agent")
    assert_restricted(agent)
    env = {e["name"] for e in container(agent)["env"]}
    assert "NVIDIA_VISIBLE_DEVICES" not in env
    assert "--backend=sim" in container(agent)["args"]


def test_nvml_dry_run_agent_gets_no_capability(render: Render) -> None:
    agent = one(
        render("-f", str(CHART / "ci" / "nvml-dry-run-values.yaml")), "DaemonSet", "rel-edpilot-agent"
    )
    for c in named_containers(agent).values():
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "--dry-run" in named_containers(agent)["agent"]["args"]
    assert "--read-only" in named_containers(agent)["setter"]["args"]
    assert agent["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"


def test_operator_ha_variant_peers_per_namespace(render: Render) -> None:
    manifests = render("-f", str(CHART / "ci" / "operator-ha-values.yaml"))
    operator = one(manifests, "Deployment", "rel-edpilot-operator")
    assert operator["spec"]["replicas"] == 2
    assert operator["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    args = container(operator)["args"]
    assert {"--namespace=team-a", "--namespace=team-b", "--peering=edpilot-ha"} <= set(args)
    assert "--all-namespaces" not in args
    peerings = [m for m in manifests if m["kind"] == "KopfPeering"]
    assert {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings} == {
        ("team-a", "edpilot-ha"),
        ("team-b", "edpilot-ha"),
    }
    assert "ClusterKopfPeering" not in kinds(manifests)
    role = one(manifests, "ClusterRole", "rel-edpilot-operator")
    assert any("namespaces" in rule["resources"] for rule in role["rules"])


def test_existing_service_accounts_variant_creates_no_rbac(render: Render) -> None:
    manifests = render("-f", str(CHART / "ci" / "existing-serviceaccounts-values.yaml"))
    assert not {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & kinds(
        manifests
    )
    accounts = {
        m["metadata"]["name"]: m["spec"]["template"]["spec"]["serviceAccountName"]
        for m in manifests
        if m["kind"] in ("Deployment", "DaemonSet")
    }
    assert accounts == {
        "rel-edpilot-operator": "gpu-energy-operator",
        "rel-edpilot-agent": "gpu-energy-agent",
        "rel-edpilot-extender": "gpu-energy-extender",
    }
    policy = one(manifests, "ValidatingAdmissionPolicy", "rel-edpilot-agent-node-restriction")
    assert (
        "system:serviceaccount:gpu-energy:gpu-energy-agent"
        in policy["spec"]["matchConditions"][0]["expression"]
    )


def test_second_scheduler_variant_wires_the_extender(render: Render) -> None:
    manifests = render("-f", str(CHART / "ci" / "second-scheduler-values.yaml"))
    config = yaml.safe_load(one(manifests, "ConfigMap", "rel-edpilot-scheduler")["data"]["config.yaml"])
    assert config["kind"] == "KubeSchedulerConfiguration"
    assert config["profiles"] == [{"schedulerName": "edpilot-scheduler"}]
    (extender,) = config["extenders"]
    assert extender["urlPrefix"] == "https://rel-edpilot-extender.gpu-energy.svc:8888"
    client = "/etc/edpilot-extender-client"
    assert extender["tlsConfig"] == {
        "certFile": f"{client}/tls.crt",
        "keyFile": f"{client}/tls.key",
        "caFile": f"{client}/ca.crt",
    }
    assert (extender["filterVerb"], extender["prioritizeVerb"], extender["weight"]) == (
        "filter",
        "prioritize",
        10,
    )
    assert extender["ignorable"] is False
    assert extender["managedResources"] == [{"name": "nvidia.com/gpu", "ignoredByScheduler": False}]
    assert config["leaderElection"]["resourceName"] == "edpilot-scheduler"

    scheduler = one(manifests, "Deployment", "rel-edpilot-scheduler")
    assert container(scheduler)["image"] == "registry.k8s.io/kube-scheduler:v1.36.3"
    mounted = {v["name"]: v for v in scheduler["spec"]["template"]["spec"]["volumes"]}
    assert mounted["extender-client"]["secret"]["secretName"] == "rel-edpilot-extender-client"
    assert_restricted(scheduler)
    bound = {m["roleRef"]["name"] for m in manifests if m["kind"] in ("ClusterRoleBinding", "RoleBinding")}
    assert {
        "system:kube-scheduler",
        "system:volume-scheduler",
        "extension-apiserver-authentication-reader",
    } <= bound
    lease_role = one(manifests, "Role", "rel-edpilot-scheduler-leader-election")
    assert {"resourceNames": ["edpilot-scheduler"]}.items() <= lease_role["rules"][1].items()


def test_monitoring_variant_and_dashboards_from_the_chart_files(render: Render, tmp_path: Path) -> None:
    values = str(CHART / "ci" / "monitoring-values.yaml")
    monitors = [m for m in render("-f", values) if m["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {"rel-edpilot-operator", "rel-edpilot-agent"}
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"

    chart = tmp_path / "edpilot"
    shutil.copytree(CHART, chart)
    dashboard = {"title": "edpilot", "panels": [], "schemaVersion": 39}
    (chart / "dashboards").mkdir(exist_ok=True)
    (chart / "dashboards" / "edpilot-test.json").write_text(json.dumps(dashboard))
    configmap = one(render("-f", values, chart=chart), "ConfigMap", "rel-edpilot-dashboards")
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["edpilot-test.json"]) == dashboard


def test_the_operator_lease_rbac_lets_the_operator_renew_it_and_the_agents_only_read_it(
    render: Render,
) -> None:
    """One Lease in the release namespace: the operator may create Leases there (RBAC cannot narrow
    `create` to a name) and read and renew only its own; the agents may read only it."""
    manifests = render()
    lease = "rel-edpilot-operator"
    operator = one(manifests, "Role", f"{lease}-lease")
    assert operator["metadata"]["namespace"] == "gpu-energy"
    assert sorted((r.get("resourceNames", []), sorted(r["verbs"])) for r in operator["rules"]) == [
        ([], ["create"]),
        ([lease], ["get", "patch", "update"]),
    ]
    assert all(
        r["apiGroups"] == ["coordination.k8s.io"] and r["resources"] == ["leases"] for r in operator["rules"]
    )
    reader = one(manifests, "Role", f"{lease}-lease-reader")
    assert reader["metadata"]["namespace"] == "gpu-energy"
    assert reader["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [lease],
            "verbs": ["get", "list", "watch"],
        }
    ]
    for name, account in (
        (f"{lease}-lease", "rel-edpilot-operator"),
        (f"{lease}-lease-reader", "rel-edpilot-agent"),
    ):
        binding = one(manifests, "RoleBinding", name)
        assert binding["roleRef"]["name"] == name
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "gpu-energy"}]
    for role in manifests:
        if role["kind"] == "ClusterRole":
            assert "leases" not in {
                r for rule in role.get("rules", []) for r in rule.get("resources", [])
            } or (role["metadata"]["name"].startswith("rel-edpilot-scheduler")), role["metadata"]["name"]


def test_operator_rbac_matches_what_it_touches(render: Render) -> None:
    role = one(render(), "ClusterRole", "rel-edpilot-operator")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert ("", "secrets", "get") not in granted
    assert not {verb for group, resource, verb in granted if resource == "pods"} - {
        "get",
        "list",
        "watch",
        "patch",
    }
    assert {verb for group, resource, verb in granted if resource == "nodes"} == {"list"}
    assert ("edpilot.io", "gpunodereports/status", "patch") not in granted, "the status is the agent's"
    assert ("kopf.dev", "clusterkopfpeerings", "patch") in granted
    # The one delete: state objects of workloads that left their policy (no orphans).
    deletes = {(group, resource) for group, resource, verb in granted if verb == "delete"}
    assert deletes == {("edpilot.io", "workloadoptimizerstates")}
    assert not any(
        verb in ("*", "deletecollection", "escalate", "bind", "impersonate") for *_, verb in granted
    )


def test_operator_may_keep_optimizer_states_and_no_tenant_role_gets_them(render: Render) -> None:
    """The operator lists, watches, applies (create, patch) and deletes WorkloadOptimizerStates,
    nothing more, cluster-wide or only in its watched namespaces; no ClusterRole of the chart is
    aggregated into admin/edit/view, so a namespace's owners get no write access to them."""
    states = {"list", "watch", "create", "patch", "delete"}
    manifests = render()
    assert (
        grants(one(manifests, "ClusterRole", "rel-edpilot-operator"), "edpilot.io")["workloadoptimizerstates"]
        == states
    )
    namespaced = render("--set", "operator.watchNamespaces={team-a}")
    assert "workloadoptimizerstates" not in grants(
        one(namespaced, "ClusterRole", "rel-edpilot-operator"), "edpilot.io"
    )
    (role,) = [m for m in namespaced if m["kind"] == "Role" and m["metadata"]["namespace"] == "team-a"]
    assert grants(role, "edpilot.io")["workloadoptimizerstates"] == states
    for variant in (manifests, namespaced):
        for doc in variant:
            if doc["kind"] != "ClusterRole":
                continue
            labels = doc["metadata"].get("labels") or {}
            assert not [k for k in labels if k.startswith("rbac.authorization.k8s.io/aggregate-to-")], doc
            assert "aggregationRule" not in doc
            if doc["metadata"]["name"] != "rel-edpilot-operator":
                assert "workloadoptimizerstates" not in grants(doc, "edpilot.io")


def test_rollout_delivery_grants_template_patches_only_when_enabled(render: Render) -> None:
    """Delivery Rollout patches Deployments' and StatefulSets' pod templates: off by default, the
    operator can neither read nor patch them; on, it watches and patches them (never creates or
    deletes), in its watched namespaces only."""
    rw = {"get", "list", "watch", "patch"}
    manifests = render()
    assert grants(one(manifests, "ClusterRole", "rel-edpilot-operator"), "apps") == {}
    assert "--rollout-delivery" not in container(one(manifests, "Deployment", "rel-edpilot-operator"))["args"]
    on = render("--set", "operator.rolloutDelivery.enabled=true")
    assert grants(one(on, "ClusterRole", "rel-edpilot-operator"), "apps") == {
        "deployments": rw,
        "statefulsets": rw,
    }
    assert "--rollout-delivery" in container(one(on, "Deployment", "rel-edpilot-operator"))["args"]
    namespaced = render(
        "--set", "operator.rolloutDelivery.enabled=true", "--set", "operator.watchNamespaces={team-a}"
    )
    assert grants(one(namespaced, "ClusterRole", "rel-edpilot-operator"), "apps") == {}
    (role,) = [m for m in namespaced if m["kind"] == "Role" and m["metadata"]["namespace"] == "team-a"]
    assert grants(role, "apps") == {"deployments": rw, "statefulsets": rw}


# ---------------------------------------------------------------- CRDs and Dockerfiles


def test_chart_crds_are_byte_identical_to_the_source() -> None:
    sources = sorted((REPO / "crds").glob("*.yaml"))
    assert sources, "crds/*.yaml missing"
    for source in sources:
        copy = CHART / "crds" / source.name
        assert copy.exists(), f"{copy} missing: run hack/sync-chart-crds.sh"
        assert copy.read_bytes() == source.read_bytes(), (
            f"{copy} differs from {source}: run hack/sync-chart-crds.sh"
        )
    extra = {p.name for p in (CHART / "crds").iterdir()} - {p.name for p in sources}
    assert extra == {"kopf-peerings.yaml"}, f"unexpected files in the chart's crds/: {extra}"


def test_kopf_peering_crds_preserve_the_status_kopf_writes() -> None:
    crds = list(yaml.safe_load_all((CHART / "crds" / "kopf-peerings.yaml").read_text()))
    scopes = {crd["spec"]["names"]["kind"]: crd["spec"]["scope"] for crd in crds}
    assert scopes == {"ClusterKopfPeering": "Cluster", "KopfPeering": "Namespaced"}
    for crd in crds:
        assert crd["spec"]["group"] == "kopf.dev"
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1"
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["x-kubernetes-preserve-unknown-fields"] is True


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    ]


@pytest.mark.parametrize("name", ["operator.Dockerfile", "agent.Dockerfile"])
def test_dockerfiles_are_pinned_non_root_and_build_the_repo(name: str) -> None:
    instructions = dockerfile_instructions(REPO / "docker" / name)
    # Base images are build arguments (hack/build-images.sh passes a local Debian one) whose
    # defaults must be pinned public images; a FROM may also name an earlier stage.
    defaults = dict(args.split("=", 1) for op, args in instructions if op == "ARG" and "=" in args)
    stages: set[str] = set()
    bases = []
    for op, args in instructions:
        if op != "FROM":
            continue
        words = args.split()
        base = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), words[0])
        assert "$" not in base, f"{name}: FROM {words[0]} has no default"
        if base not in stages:
            bases.append(base)
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])
    assert bases
    for base in bases:
        pinned = re.search(r"@sha256:[0-9a-f]{64}$", base) or re.search(r":\d+(\.\d+)+[-\w.]*$", base)
        assert pinned and not base.endswith(":latest"), f"{name}: base image {base} is not pinned"
    users = [args for op, args in instructions if op == "USER"]
    assert users, f"{name} sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name} runs as {users[-1]}"
    copies = " ".join(args for op, args in instructions if op == "COPY")
    for source in ("pyproject.toml", "edpilot/", "operator/", "node_agent/"):
        assert source in copies, f"{name} does not build from {source}"
    assert ("ENTRYPOINT", '["edpilot"]') in instructions
    if name == "agent.Dockerfile":
        assert bases[-1].startswith("nvidia/cuda:"), "the agent needs a CUDA base for the NVIDIA runtime"
    else:
        assert re.match(r"python:3\.\d+\.\d+-slim", bases[-1])


def test_dockerignore_keeps_local_state_out_of_images() -> None:
    rules = [
        line
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules[0] == "**", "ignore everything, then allow only what the images build from"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "README.md",
        "edpilot",
        "operator",
        "node_agent",
        "docker/requirements.lock",
        "docker/build-requirements.lock",
    }
