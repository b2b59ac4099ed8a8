"""What the chart promises against a hostile tenant (issue 14), rendered with the real helm, no
cluster: the annotation-ownership policy names exactly the operator's annotations and identity."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from kubetest import REPO, tool_dir

from edpilot.models import HINT_ANNOTATIONS

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
