"""What the chart promises against a hostile tenant (issue 14), rendered with the real helm, no
cluster: the annotation-ownership policy names exactly the operator's annotations and identity."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from kubetest import REPO, tool_dir

from edpilot.contract import HINT_ANNOTATIONS

CHART = REPO / "charts" / "edpilot"
Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="module")
def render() -> Render:
    helm = tool_dir() / "helm"

    def _render(*args: str) -> list[dict[str, Any]]:
        proc = subprocess.run(
            [
                str(helm),
                "template",
                "rel",
                str(CHART),
                "--namespace",
                "gpu-energy",
                "--kube-version",
                "1.36.3",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return [d for d in yaml.safe_load_all(proc.stdout) if d]

    return _render


def named(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def test_annotation_ownership_covers_the_operators_annotations_on_create_and_update(render: Render) -> None:
    manifests = render("--set", "operator.serviceAccount.name=gpu-op")
    policy = named(manifests, "ValidatingAdmissionPolicy", "rel-edpilot-annotation-ownership")
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["pods"] and set(rule["operations"]) == {"CREATE", "UPDATE"}
    (match,) = policy["spec"]["matchConditions"]
    assert match["expression"] == 'request.userInfo.username != "system:serviceaccount:gpu-energy:gpu-op"'
    owned = next(v["expression"] for v in policy["spec"]["variables"] if v["name"] == "owned")
    assert yaml.safe_load(owned) == list(HINT_ANNOTATIONS)
    assert policy["spec"]["failurePolicy"] == "Fail"
    binding = named(manifests, "ValidatingAdmissionPolicyBinding", "rel-edpilot-annotation-ownership")
    assert binding["spec"] == {
        "policyName": "rel-edpilot-annotation-ownership",
        "validationActions": ["Deny"],
    }
    assert "matchResources" not in binding["spec"], "every namespace is protected"


def granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_with_watch_namespaces_the_operator_patches_pods_only_there(render: Render) -> None:
    """Finding 8 (operator part): a namespaced operator holds no cluster-wide pod patch."""
    manifests = render("--set", "operator.watchNamespaces={team-a,team-b}")
    cluster_wide = granted(named(manifests, "ClusterRole", "rel-edpilot-operator"))
    assert not {
        r for r in cluster_wide if r[1] in ("pods", "energypolicies", "energypolicies/status", "events")
    }
    for namespace in ("team-a", "team-b"):
        role = [m for m in manifests if m["kind"] == "Role" and m["metadata"].get("namespace") == namespace]
        assert len(role) == 1, namespace
        assert {("", "pods", "patch"), ("edpilot.io", "energypolicies/status", "patch")} <= granted(role[0])
        binding = [
            m for m in manifests if m["kind"] == "RoleBinding" and m["metadata"].get("namespace") == namespace
        ]
        assert binding[0]["subjects"] == [
            {"kind": "ServiceAccount", "name": "rel-edpilot-operator", "namespace": "gpu-energy"}
        ]
    # kopf posts the events of cluster-scoped objects into the operator's own namespace (where its
    # Lease has a Role of its own, `<fullname>-operator-lease`).
    own = [
        m
        for m in manifests
        if m["kind"] == "Role"
        and m["metadata"].get("namespace") == "gpu-energy"
        and m["metadata"]["name"] == "rel-edpilot-operator"
    ]
    assert granted(own[0]) == {
        ("", "events", "create"),
        ("", "events", "patch"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
    }
    # Without watchNamespaces the operator serves every namespace: cluster-wide, as before.
    assert ("", "pods", "patch") in granted(named(render(), "ClusterRole", "rel-edpilot-operator"))


def ingress_rules(policy: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {
        port["port"]: rule.get("from", [])
        for rule in policy["spec"]["ingress"] or []
        for port in rule["ports"]
    }


def test_metrics_and_the_extender_are_reachable_only_from_named_peers(render: Render) -> None:
    """Finding 7 (operator and extender part) and finding 4: NetworkPolicies in the chart."""
    manifests = render("--set", "scheduler.enabled=true")
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    operator = named(manifests, "NetworkPolicy", "rel-edpilot-operator")
    assert operator["spec"]["policyTypes"] == ["Ingress"]
    assert operator["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert ingress_rules(operator) == {"metrics": monitoring}
    extender = named(manifests, "NetworkPolicy", "rel-edpilot-extender")
    rules = ingress_rules(extender)
    assert rules["metrics"] == monitoring
    (scheduler,) = rules["scheduler"]
    assert scheduler["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "scheduler"
    assert set(rules) == {"scheduler", "metrics"}
    # The named ports are the containers': metrics and probes never share the scheduler's port.
    deployment = named(manifests, "Deployment", "rel-edpilot-extender")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"scheduler": 8888, "metrics": 9466}
    assert c["livenessProbe"]["httpGet"]["port"] == "metrics"


def test_the_scheduler_reaches_the_extender_over_tls_with_a_client_certificate(
    render: Render, tmp_path: Any
) -> None:
    manifests = render("--set", "scheduler.enabled=true")
    (c,) = named(manifests, "Deployment", "rel-edpilot-extender")["spec"]["template"]["spec"]["containers"]
    assert "--client-ca-file=/etc/edpilot/tls/ca.crt" in c["args"] and "--insecure-http" not in c["args"]
    config = yaml.safe_load(named(manifests, "ConfigMap", "rel-edpilot-scheduler")["data"]["config.yaml"])
    (extender,) = config["extenders"]
    assert extender["urlPrefix"].startswith("https://") and set(extender["tlsConfig"]) == {
        "certFile",
        "keyFile",
        "caFile",
    }
    # The generated certificates: one CA signs the server's (for the Service's name) and the client's.
    import base64

    server = named(manifests, "Secret", "rel-edpilot-extender-tls")["data"]
    client = named(manifests, "Secret", "rel-edpilot-extender-client")["data"]
    assert server["ca.crt"] == client["ca.crt"]
    for name, data in (("server", server), ("client", client), ("ca", {"tls.crt": server["ca.crt"]})):
        (tmp_path / f"{name}.crt").write_bytes(base64.b64decode(data["tls.crt"]))
    for name in ("server", "client"):
        proc = subprocess.run(
            ["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / f"{name}.crt")],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(tmp_path / "server.crt")],
        capture_output=True,
        text=True,
    ).stdout
    assert "DNS:rel-edpilot-extender.gpu-energy.svc" in text


def test_a_certificate_of_your_own_needs_the_schedulers_client_secret_too(render: Render) -> None:
    helm = tool_dir() / "helm"
    proc = subprocess.run(
        [str(helm), "template", "rel", str(CHART), "--kube-version", "1.36.3", "--set", "scheduler.enabled=true",
         "--set", "extender.tls.existingSecret=mine"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "scheduler.extender.clientSecret is required" in proc.stderr
    manifests = render(
        "--set", "scheduler.enabled=true", "--set", "extender.tls.existingSecret=mine",
        "--set", "scheduler.extender.clientSecret=theirs",
    )  # fmt: skip
    assert not [m for m in manifests if m["kind"] == "Secret"]
    volumes = named(manifests, "Deployment", "rel-edpilot-scheduler")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "extender-client", "secret": {"secretName": "theirs"}} in volumes


def locked(path: Any) -> dict[str, list[str]]:
    """name -> hashes of a --require-hashes requirements file."""
    text = path.read_text().replace("\\\n", " ")
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            requirement, *options = line.split()
            name, _, version = requirement.partition("==")
            assert version, f"{requirement} is not pinned to one version"
            found[name] = [
                o.removeprefix("--hash=sha256:") for o in options if o.startswith("--hash=sha256:")
            ]
    return found


def test_images_install_python_dependencies_only_from_a_hash_pinned_lock() -> None:
    """Finding 8: the images' Python dependencies are pinned by hash, the Dockerfiles refuse anything else."""
    import re
    import tomllib

    runtime = locked(REPO / "docker" / "requirements.lock")
    build = locked(REPO / "docker" / "build-requirements.lock")
    for name, hashes in {**runtime, **build}.items():
        assert hashes and all(re.fullmatch("[0-9a-f]{64}", h) for h in hashes), name
    wanted = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in wanted:
        name = re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in runtime, f"{name} ({requirement}) is missing from docker/requirements.lock"
    assert {"setuptools", "wheel"} <= set(build)
    for dockerfile in ("operator.Dockerfile", "agent.Dockerfile"):
        text = (REPO / "docker" / dockerfile).read_text().replace("\\\n", " ")
        installs = [line for line in text.splitlines() if re.search(r"\bpip (install|wheel)\b", line)]
        assert installs, dockerfile
        for line in installs:
            for command in re.findall(r"pip (?:install|wheel)[^&]*", line):
                # Either from the lock with hashes, or edpilot's own wheel with no dependencies.
                assert "--require-hashes" in command or "--no-deps" in command, (dockerfile, command)
