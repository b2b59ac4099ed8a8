"""Delivery by rollout, the pure part: reading owners and templates, the patches that change a
template and put it back. tests/e2e/test_rollout_e2e.py runs them against the real Deployment
controller."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from edpilot.contract import ANNOTATION_ORIGINAL_TEMPLATE, ANNOTATION_ROLLOUT_CONFIG
from edpilot.models import EnergyPolicySpec
from edpilot.rollout import (
    OwnerView,
    RolloutConfig,
    owner_of,
    owner_view,
    parse_config,
    restore_patch,
    rollout_patch,
    template_config,
    why_not,
)

SPEC = EnergyPolicySpec.model_validate(
    {
        "selector": {},
        "latencySLO": {"maxSeconds": 0.05},
        "batchSize": {"mode": "Auto", "min": 64, "max": 1024, "multipleOf": 64},
        "quantization": {"mode": "Auto", "allowed": ["bf16", "fp8"]},
        "workMetric": {"engine": "vllm", "port": 8000},
        "delivery": {
            "mode": "Rollout",
            "container": "engine",
            "quantization": [
                {"profile": "bf16", "args": []},
                {
                    "profile": "fp8",
                    "args": ["--quantization", "fp8"],
                    "env": [{"name": "VLLM_FP8", "value": "1"}],
                    "image": "vllm/vllm-openai:v0.11-fp8",
                },
            ],
        },
    }
)


def deployment(**status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chat", "namespace": "team-a", "resourceVersion": "41", "generation": 3},
        "spec": {
            "replicas": 2,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"app": "chat"}},
                "spec": {
                    "containers": [
                        {"name": "sidecar", "image": "proxy:1"},
                        {
                            "name": "engine",
                            "image": "vllm/vllm-openai:v0.11",
                            "command": ["vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct"],
                            "args": ["--max-num-seqs", "256", "--port", "8000"],
                            "env": [{"name": "HF_HOME", "value": "/cache"}],
                        },
                    ]
                },
            },
        },
        "status": {
            "observedGeneration": 3,
            "replicas": 2,
            "updatedReplicas": 2,
            "readyReplicas": 2,
            **status,
        },
    }


class PatchTestFailed(Exception):
    pass


def apply_patch(body: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902's add, remove and test, as the API server applies them (all or nothing)."""
    doc = copy.deepcopy(body)
    for op in patch:
        *parents, leaf = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        at: Any = int(leaf) if isinstance(node, list) else leaf
        if op["op"] == "test":
            if node[at] != op["value"]:
                raise PatchTestFailed(op["path"])
        elif op["op"] == "add":
            node[at] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[at]
        else:
            raise AssertionError(op)
    return doc


def applied(body: dict[str, Any], patch: list[dict[str, Any]] | None) -> dict[str, Any]:
    assert patch is not None
    result = apply_patch(body, patch)
    result["metadata"]["resourceVersion"] = str(int(result["metadata"]["resourceVersion"]) + 1)
    return result


def view(body: dict[str, Any]) -> OwnerView:
    return owner_view("Deployment", body)


def test_a_settled_owner_and_one_mid_rollout() -> None:
    assert view(deployment()).settled
    assert not view(deployment(updatedReplicas=1)).settled
    assert not view(deployment(replicas=3)).settled  # an old pod is still there
    assert not view(deployment(readyReplicas=1)).settled
    assert not view(deployment(observedGeneration=2)).settled


def test_pods_are_traced_to_their_owner() -> None:
    labels = {"pod-template-hash": "5d8f9c"}
    assert owner_of("ReplicaSet", "chat-5d8f9c", labels) == ("Deployment", "chat")
    assert owner_of("ReplicaSet", "chat-5d8f9c", {}) is None
    assert owner_of("StatefulSet", "db", {}) == ("StatefulSet", "db")
    assert owner_of("Job", "train", labels) is None


def test_recreate_and_on_delete_owners_are_not_rolled_out() -> None:
    body = deployment()
    body["spec"]["strategy"] = {"type": "Recreate"}
    assert "every replica at once" in why_not(view(body))
    assert why_not(view(deployment())) == ""


def test_the_template_says_which_configuration_it_carries() -> None:
    assert template_config(view(deployment()), SPEC) == RolloutConfig(256, "bf16")


def test_a_rollout_changes_only_what_the_policy_names_and_records_the_original() -> None:
    body = deployment()
    patch = rollout_patch(view(body), SPEC, RolloutConfig(512, "fp8"))
    after = applied(body, patch)
    engine = after["spec"]["template"]["spec"]["containers"][1]
    assert engine["args"] == ["--max-num-seqs", "512", "--port", "8000", "--quantization", "fp8"]
    assert engine["env"] == [{"name": "HF_HOME", "value": "/cache"}, {"name": "VLLM_FP8", "value": "1"}]
    assert engine["image"] == "vllm/vllm-openai:v0.11-fp8"
    assert engine["command"] == body["spec"]["template"]["spec"]["containers"][1]["command"]
    assert after["spec"]["template"]["spec"]["containers"][0] == {"name": "sidecar", "image": "proxy:1"}
    assert after["spec"]["template"]["metadata"]["annotations"][ANNOTATION_ROLLOUT_CONFIG] == (
        "batch=512,quantization=fp8"
    )
    assert json.loads(after["metadata"]["annotations"][ANNOTATION_ORIGINAL_TEMPLATE])["args"] == [
        "--max-num-seqs",
        "256",
        "--port",
        "8000",
    ]
    assert template_config(view(after), SPEC) == RolloutConfig(512, "fp8")
    # Back to bf16: fp8's arguments, env and image go; the recorded original is kept as it was.
    again = applied(after, rollout_patch(view(after), SPEC, RolloutConfig(512, "bf16")))
    engine = again["spec"]["template"]["spec"]["containers"][1]
    assert engine["args"] == ["--max-num-seqs", "512", "--port", "8000"]
    assert engine["env"] == [{"name": "HF_HOME", "value": "/cache"}]
    assert engine["image"] == "vllm/vllm-openai:v0.11"
    assert again["metadata"]["annotations"] == after["metadata"]["annotations"]
    assert rollout_patch(view(again), SPEC, RolloutConfig(512, "bf16")) is None


def test_a_flag_missing_from_the_template_is_appended_and_an_env_variable_set() -> None:
    body = deployment()
    del body["spec"]["template"]["spec"]["containers"][1]["args"]
    after = applied(body, rollout_patch(view(body), SPEC, RolloutConfig(128, None)))
    assert after["spec"]["template"]["spec"]["containers"][1]["args"] == ["--max-num-seqs=128"]
    raw = SPEC.model_dump(exclude_none=True)
    raw["delivery"]["batchSize"] = {"env": "MAX_NUM_SEQS"}
    by_env = EnergyPolicySpec.model_validate(raw)
    after = applied(body, rollout_patch(view(body), by_env, RolloutConfig(128, None)))
    assert {"name": "MAX_NUM_SEQS", "value": "128"} in after["spec"]["template"]["spec"]["containers"][1][
        "env"
    ]


def test_every_patch_is_refused_on_a_template_changed_since_it_was_read() -> None:
    body = deployment()
    patch = rollout_patch(view(body), SPEC, RolloutConfig(512, None))
    assert patch is not None and patch[0] == {
        "op": "test",
        "path": "/metadata/resourceVersion",
        "value": "41",
    }
    changed = copy.deepcopy(body)
    changed["metadata"]["resourceVersion"] = "42"
    with pytest.raises(PatchTestFailed):
        apply_patch(changed, patch)


def test_a_restore_puts_back_the_template_as_it_was() -> None:
    body = deployment()
    after = applied(body, rollout_patch(view(body), SPEC, RolloutConfig(512, "fp8")))
    after = applied(after, rollout_patch(view(after), SPEC, RolloutConfig(1024, "fp8")))
    restored = applied(after, restore_patch(view(after), SPEC))
    assert restored["spec"] == body["spec"]
    assert "annotations" not in restored["metadata"] or not restored["metadata"]["annotations"]
    assert restore_patch(view(restored), SPEC) is None


def test_a_restore_keeps_what_the_tenant_changed_since() -> None:
    body = deployment()
    after = applied(body, rollout_patch(view(body), SPEC, RolloutConfig(512, "fp8")))
    after["spec"]["template"]["spec"]["containers"][1]["image"] = "vllm/vllm-openai:v0.12"
    restored = applied(after, restore_patch(view(after), SPEC))
    engine = restored["spec"]["template"]["spec"]["containers"][1]
    assert engine["image"] == "vllm/vllm-openai:v0.12"  # the tenant's
    assert engine["args"] == ["--max-num-seqs", "256", "--port", "8000"]  # edpilot's, undone


def test_a_pods_configuration_annotation_is_read_strictly() -> None:
    assert parse_config("batch=64,quantization=fp8") == RolloutConfig(64, "fp8")
    assert parse_config("batch=64") == RolloutConfig(64, None)
    for bad in ("batch=²", "batch=0", "quantization=fp4", "cap=300", "batch=64,quantization=fp8,x=1"):
        assert parse_config(bad) is None, bad


def test_back_to_the_original_configuration_the_template_is_restored_whole() -> None:
    """No stamp on a template that carries what it carried before: the owner's controller scales
    its old pods back up instead of replacing them."""
    body = deployment()
    after = applied(body, rollout_patch(view(body), SPEC, RolloutConfig(512, None)))
    back = applied(after, rollout_patch(view(after), SPEC, RolloutConfig(256, "bf16")))
    assert back["spec"] == body["spec"]
    assert not back["metadata"].get("annotations")
