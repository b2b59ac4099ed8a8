"""The CRDs against the real API server: they install, the samples apply, defaults and printer
columns work, `kubectl explain` teaches the API, and nonsense is rejected with a message that
names the field and the rule, by the API server and by the pydantic models alike."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from edpilot_operator.services import policy_totals
from pydantic import BaseModel, ValidationError

from edpilot import models

if TYPE_CHECKING:
    from kubetest import Cluster

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
SAMPLES = CRDS / "samples"
NAMESPACE = "edpilot-crds-test"
MODELS: dict[str, type[BaseModel]] = {
    "EnergyPolicy": models.EnergyPolicy,
    "GPUNodeReport": models.GPUNodeReport,
    "PowerBudget": models.PowerBudget,
}


def sample(file: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((SAMPLES / file).read_text())
    return doc


def private_copy(doc: dict[str, Any]) -> dict[str, Any]:
    """The sample in this test's namespace, or under a prefixed name when cluster-scoped, so tests
    that run in the same session (and the node called gpu-node-0) never see it."""
    doc = copy.deepcopy(doc)
    if "namespace" in doc["metadata"]:
        doc["metadata"]["namespace"] = NAMESPACE
    else:
        doc["metadata"]["name"] = f"crds-test-{doc['metadata']['name']}"
    return doc


def pruned(value: Any) -> Any:
    """Drops absent values; the API server leaves out empty lists and maps."""
    if isinstance(value, dict):
        kept = {k: pruned(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not None} or None
    if isinstance(value, list):
        return [pruned(v) for v in value] or None
    return value


@pytest.fixture(scope="module")
def api(crds_installed: Cluster) -> Cluster:
    crds_installed.kubectl("create", "namespace", NAMESPACE)
    return crds_installed


@pytest.fixture(scope="module")
def applied(api: Cluster) -> Iterator[dict[str, dict[str, Any]]]:
    """Every sample created for real (private copies), by kind and name, as the server stored it;
    deleted afterwards: a PowerBudget left behind gives the next modules' operators work (the
    report sweep runs only while a policy or budget exists)."""
    docs = [
        private_copy(doc)
        for path in sorted(SAMPLES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]
    api.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    stored: dict[str, dict[str, Any]] = {}
    for doc in docs:
        namespace = ["-n", doc["metadata"]["namespace"]] if "namespace" in doc["metadata"] else []
        obj = api.get_json(f"{doc['kind'].lower()}.{models.GROUP}", doc["metadata"]["name"], *namespace)
        stored[f"{doc['kind']}/{doc['metadata']['name']}"] = obj
    yield stored
    api.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=yaml.safe_dump_all(docs))


def test_crds_are_established_with_their_names(api: Cluster) -> None:
    # The chart also installs kopf's peering kinds with this label; edpilot's own API is edpilot.io.
    labelled = api.get_json("crd", "-l", "app.kubernetes.io/part-of=edpilot")["items"]
    crds = [c for c in labelled if c["spec"]["group"] == "edpilot.io"]
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "energypolicies.edpilot.io",
        "gpunodereports.edpilot.io",
        "powerbudgets.edpilot.io",
        "workloadoptimizerstates.edpilot.io",
    ]
    for crd in crds:
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True", crd["status"]


def test_crds_and_sample_files_apply_with_kubectl_apply(api: Cluster) -> None:
    """The files as shipped: client-side apply of the CRDs, and the samples, which the server checks."""
    crds = api.kubectl("apply", "--dry-run=server", "-f", str(CRDS))
    assert crds.stdout.count("customresourcedefinition.apiextensions.k8s.io/") == 4, crds.stdout
    samples = api.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", str(SAMPLES))
    for name in (
        "energypolicy.edpilot.io/llm-serving",
        "energypolicy.edpilot.io/training",
        "powerbudget.edpilot.io/rack-a3",
    ):
        assert name in samples.stdout, samples.stdout


def test_the_server_stores_samples_with_the_models_defaults(applied: dict[str, dict[str, Any]]) -> None:
    """What the API server fills in for a sample is what the pydantic model fills in."""
    assert len(applied) >= 3
    for key, stored in applied.items():
        model = MODELS[stored["kind"]].model_validate(stored)
        assert pruned(model.model_dump(mode="json", exclude_none=True)["spec"]) == pruned(stored["spec"]), key


def test_a_minimal_policy_gets_the_models_defaults(api: Cluster) -> None:
    minimal = {
        "apiVersion": models.API_VERSION,
        "kind": "EnergyPolicy",
        "metadata": {"name": "minimal", "namespace": NAMESPACE},
        "spec": {"selector": {}, "workMetric": {"name": "requests_total"}},
    }
    stored = json.loads(api.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(minimal)).stdout)
    expected = models.EnergyPolicySpec.model_validate(minimal["spec"]).model_dump(
        mode="json", exclude_none=True
    )
    assert pruned(stored["spec"]) == pruned(expected)
    assert stored["spec"]["powerCap"] == {"mode": "Auto", "minPercent": 50, "maxPercent": 100}
    assert stored["spec"]["objective"] == "EDP" and stored["spec"]["maxSlowdownPercent"] == 10


def status_patch(
    api: Cluster, resource: str, name: str, status: dict[str, Any], namespaced: bool = True
) -> None:
    namespace = ["-n", NAMESPACE] if namespaced else []
    patch = json.dumps({"status": status})
    api.kubectl("patch", resource, name, *namespace, "--subresource=status", "--type=merge", "-p", patch)


def table(api: Cluster, *args: str) -> list[dict[str, str]]:
    """`kubectl get` rows by column header; cells are cut at the headers' offsets since empty
    cells (a column whose value is absent) print as blanks."""
    lines = api.kubectl("get", *args).stdout.rstrip().splitlines()
    starts = [i for i, ch in enumerate(lines[0]) if ch != " " and (i == 0 or lines[0][i - 1] == " ")]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [{lines[0][a:b].strip(): line[a:b].strip() for a, b in bounds} for line in lines[1:]]


def test_get_energypolicies_shows_the_headline_numbers_rounded(
    api: Cluster, applied: dict[str, dict[str, Any]]
) -> None:
    # Totals as the operator writes them, from figures as unrounded as measurements come.
    rows = [
        models.WorkloadStatus(
            name="llm",
            gpus=24,
            edpReductionPercent=98.21224683513371,
            energySavedJoules=2.6572953214769993e07,
        )
    ]
    status = {
        "observedGeneration": 1,
        "totals": policy_totals(rows).model_dump(mode="json", exclude_none=True),
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Converged",
                "message": "3 workloads converged",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ],
    }
    status_patch(api, "energypolicies", "llm-serving", status)
    rows_shown = {row["NAME"]: row for row in table(api, "energypolicies", "-n", NAMESPACE)}
    headers = [
        "NAME",
        "OBJECTIVE",
        "WORKLOADS",
        "GPUS",
        "EDP-REDUCTION-%",
        "ENERGY-SAVED-KWH",
        "READY",
        "AGE",
    ]
    assert list(rows_shown["llm-serving"]) == headers
    assert {k: rows_shown["llm-serving"][k] for k in headers[1:7]} == {
        "OBJECTIVE": "EDP",
        "WORKLOADS": "1",
        "GPUS": "24",
        "EDP-REDUCTION-%": "98.2",
        "ENERGY-SAVED-KWH": "7.38",
        "READY": "True",
    }


def test_get_powerbudgets_and_gpunodereports_show_their_columns(
    api: Cluster, applied: dict[str, dict[str, Any]]
) -> None:
    budget = {
        "allocatedWatts": 22400,
        "measuredWatts": 15012.5,
        "headroomWatts": 1600,
        "gpus": 32,
        "nodes": ["n1"],
    }
    status_patch(api, "powerbudgets", "crds-test-rack-a3", budget, namespaced=False)
    row = {r["NAME"]: r for r in table(api, "powerbudgets")}["crds-test-rack-a3"]
    assert [row[k] for k in ("MAX-W", "ALLOCATED-W", "MEASURED-W", "HEADROOM-W", "GPUS")] == [
        "24000",
        "22400",
        "15012.5",
        "1600",
        "32",
    ]
    name = "crds-test-gpu-node-0"
    report = {
        "nodeName": name,
        "agentVersion": "0.1.0",
        "backend": "sim",
        "time": "2026-01-01T00:00:00Z",
        "gpus": [gpu(0)],
        "conditions": [
            {
                "type": "LeaseValid",
                "status": "False",
                "reason": "LeaseExpired",
                "message": "m",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ],
    }
    status_patch(api, "gpunodereports", name, report, namespaced=False)
    (row,) = table(api, "gpunodereports", name)
    assert list(row) == ["NAME", "BACKEND", "MODEL", "INTERVAL-S", "LEASE-VALID", "UPDATED"]
    assert [row[k] for k in ("BACKEND", "MODEL", "INTERVAL-S", "LEASE-VALID")] == [
        "sim",
        "NVIDIA H100 80GB HBM3",
        "10",
        "False",
    ]


def gpu(index: int) -> dict[str, Any]:
    return {
        "index": index,
        "uuid": f"GPU-{index:08d}-0000-0000-0000-000000000000",
        "model": "NVIDIA H100 80GB HBM3",
        "minLimitWatts": 200,
        "maxLimitWatts": 700,
        "defaultLimitWatts": 700,
        "enforcedLimitWatts": 450,
        "powerWatts": 431.5,
        "energyJoules": 1.5e6,
    }


def test_gpunodereport_status_defaults_and_the_node_name_rule(
    api: Cluster, applied: dict[str, dict[str, Any]]
) -> None:
    name = "crds-test-gpu-node-0"
    report = {
        "nodeName": name,
        "agentVersion": "0.1.0",
        "backend": "sim",
        "time": "2026-01-01T00:00:00Z",
        "gpus": [gpu(0)],
    }
    status_patch(api, "gpunodereports", name, report, namespaced=False)
    stored = api.get_json("gpunodereports", name)
    model = models.GPUNodeReport.model_validate(stored)
    assert model.status is not None
    assert pruned(stored["status"]) == pruned(model.status.model_dump(mode="json", exclude_none=True)) | {
        "time": "2026-01-01T00:00:00Z"
    }
    assert (
        stored["status"]["gpus"][0]["energySource"] == "counter"
        and stored["status"]["gpus"][0]["migEnabled"] is False
    )
    wrong = api.kubectl(
        "patch",
        "gpunodereports",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"nodeName": "gpu-node-1"}}),
        check=False,
    )
    assert wrong.returncode != 0
    assert "status.nodeName" in wrong.stderr and "must equal metadata.name" in wrong.stderr, wrong.stderr


def test_status_is_a_subresource(api: Cluster, applied: dict[str, dict[str, Any]]) -> None:
    """A write to the object ignores status; a write to status ignores spec."""
    api.kubectl(
        "patch",
        "energypolicies",
        "training",
        "-n",
        NAMESPACE,
        "--type=merge",
        "-p",
        '{"status":{"observedGeneration":7}}',
    )
    status_patch(api, "energypolicies", "training", {"observedGeneration": 1})
    api.kubectl(
        "patch",
        "energypolicies",
        "training",
        "-n",
        NAMESPACE,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"spec":{"priority":99}}',
    )
    stored = api.get_json("energypolicies", "training", "-n", NAMESPACE)
    assert stored["status"]["observedGeneration"] == 1
    assert stored["spec"]["priority"] == 0
    assert stored["status"]["totals"] == {
        "workloads": 0,
        "gpus": 0,
        "energySavedJoules": 0,
        "energySavedKWh": 0,
    }


def test_short_names_and_the_edpilot_category(api: Cluster, applied: dict[str, dict[str, Any]]) -> None:
    names = api.kubectl("get", "epol,gnr,pb", "-A", "-o", "name").stdout.split()
    assert "energypolicy.edpilot.io/llm-serving" in names
    assert "gpunodereport.edpilot.io/crds-test-gpu-node-0" in names
    assert "powerbudget.edpilot.io/crds-test-rack-a3" in names
    category = api.kubectl("get", "edpilot", "-A", "-o", "name").stdout.split()
    assert set(names) <= set(category)


def test_kubectl_explain_teaches_the_api(api: Cluster) -> None:
    deadline = time.monotonic() + 30
    while True:  # the API server publishes a new CRD's OpenAPI document a moment after it is established
        explained = api.kubectl("explain", "energypolicy.spec.objective", check=False)
        if explained.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert explained.returncode == 0, explained.stderr
    assert "What to minimise per unit of work" in explained.stdout
    for value in ("Energy", "EDP", "ED2P"):
        assert value in explained.stdout
    nested = api.kubectl("explain", "gpunodereport.status.gpus.energyJoules").stdout
    assert "Cumulative energy consumed, in joules" in nested


# ---------------------------------------------------------------- what the API rejects

DELETE = object()


def changed(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of doc with each dotted path set to its value (or removed, for DELETE)."""
    doc = copy.deepcopy(doc)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return doc


@dataclass(frozen=True)
class Invalid:
    """An object the API must reject: the server's message names `field` and says `server_says`;
    the model's error names the field's last part and says `model_says` (the server's words by default)."""

    id: str
    base: Callable[[], dict[str, Any]]
    changes: dict[str, Any]
    field: str
    server_says: str
    model_says: str = ""


def policy() -> dict[str, Any]:
    return sample("llm-serving-policy.yaml")


def budget() -> dict[str, Any]:
    return sample("rack-power-budget.yaml")


def report() -> dict[str, Any]:
    return sample("gpu-node-report.yaml")


ENUM = "Unsupported value"
IN_MODEL_ENUM = "Input should be"
CASES = [
    Invalid(
        "objective-not-an-enum",
        policy,
        {"spec.objective": "Fastest"},
        "spec.objective",
        ENUM,
        "'Energy', 'EDP' or 'ED2P'",
    ),
    Invalid(
        "slowdown-above-90",
        policy,
        {"spec.maxSlowdownPercent": 120},
        "spec.maxSlowdownPercent",
        "less than or equal to 90",
    ),
    Invalid(
        "slowdown-negative",
        policy,
        {"spec.maxSlowdownPercent": -1},
        "spec.maxSlowdownPercent",
        "greater than or equal to 0",
    ),
    Invalid(
        "priority-out-of-range",
        policy,
        {"spec.priority": 5000},
        "spec.priority",
        "less than or equal to 1000",
    ),
    Invalid(
        "serving-load-without-a-latency",
        policy,
        {
            "spec.latencySLO": DELETE,
            "spec.workMetric.engine": "custom",
            "spec.workMetric.name": "t_total",
            "spec.workMetric.load": {},
        },
        "spec.latencySLO",
        "workMetric.load or an engine preset makes the workloads load-driven (serving)",
    ),
    Invalid(
        "engine-preset-without-a-latency",
        policy,
        {"spec.latencySLO": DELETE},
        "spec.latencySLO",
        "workMetric.load or an engine preset makes the workloads load-driven (serving)",
    ),
    Invalid(
        "custom-engine-without-a-work-metric",
        policy,
        {"spec.workMetric.engine": "custom"},
        "spec.workMetric.name",
        "workMetric.name is required unless workMetric.engine names a preset",
    ),
    Invalid(
        "engine-not-an-enum",
        policy,
        {"spec.workMetric.engine": "tgi"},
        "spec.workMetric.engine",
        ENUM,
        IN_MODEL_ENUM,
    ),
    Invalid(
        "vllm-engine-with-an-sglang-counter",
        policy,
        {"spec.workMetric.name": "sglang:generation_tokens_total"},
        "spec.workMetric.name",
        "names another engine's metric",
        "names sglang's metric",
    ),
    Invalid(
        "vllm-engine-with-sglang-load",
        policy,
        {"spec.workMetric.load": {"waiting": "sglang:num_queue_reqs"}},
        "spec.workMetric.load",
        "names another engine's metric",
        "names sglang's metric",
    ),
    Invalid(
        "vllm-engine-with-an-sglang-latency",
        policy,
        {"spec.latencySLO.metricName": "sglang:inter_token_latency_seconds"},
        "spec.latencySLO.metricName",
        "names another engine's metric",
        "names sglang's metric",
    ),
    Invalid(
        "power-min-above-max",
        policy,
        {"spec.powerCap.minPercent": 90, "spec.powerCap.maxPercent": 60},
        "spec.powerCap.minPercent",
        "powerCap.minPercent must be <= powerCap.maxPercent",
    ),
    Invalid(
        "power-percent-below-10",
        policy,
        {"spec.powerCap.minPercent": 5},
        "spec.powerCap.minPercent",
        "greater than or equal to 10",
    ),
    Invalid(
        "power-percent-above-100",
        policy,
        {"spec.powerCap.maxPercent": 150},
        "spec.powerCap.maxPercent",
        "less than or equal to 100",
    ),
    Invalid(
        "power-mode-not-an-enum",
        policy,
        {"spec.powerCap.mode": "Manual"},
        "spec.powerCap.mode",
        ENUM,
        IN_MODEL_ENUM,
    ),
    Invalid(
        "fixed-without-watts",
        policy,
        {"spec.powerCap.mode": "Fixed"},
        "spec.powerCap.watts",
        "powerCap.mode Fixed needs powerCap.watts",
    ),
    Invalid(
        "negative-watts",
        policy,
        {"spec.powerCap.mode": "Fixed", "spec.powerCap.watts": -50},
        "spec.powerCap.watts",
        "greater than 0",
    ),
    Invalid(
        "min-watts-above-max-watts",
        policy,
        {"spec.powerCap.minWatts": 500, "spec.powerCap.maxWatts": 300},
        "spec.powerCap.minWatts",
        "powerCap.minWatts must be <= powerCap.maxWatts",
    ),
    Invalid(
        "batch-min-above-max",
        policy,
        {"spec.batchSize.min": 512, "spec.batchSize.max": 64},
        "spec.batchSize.min",
        "batchSize.min must be <= batchSize.max",
    ),
    Invalid(
        "batch-multiple-of-zero",
        policy,
        {"spec.batchSize.multipleOf": 0},
        "spec.batchSize.multipleOf",
        "greater than or equal to 1",
    ),
    Invalid(
        "batch-mode-not-an-enum",
        policy,
        {"spec.batchSize.mode": "On"},
        "spec.batchSize.mode",
        ENUM,
        IN_MODEL_ENUM,
    ),
    Invalid(
        "auto-quantization-without-profiles",
        policy,
        {"spec.quantization.allowed": DELETE},
        "spec.quantization.allowed",
        "quantization.mode Auto needs at least one allowed profile",
    ),
    Invalid(
        "auto-quantization-with-empty-profiles",
        policy,
        {"spec.quantization.allowed": []},
        "spec.quantization.allowed",
        "quantization.mode Auto needs at least one allowed profile",
    ),
    Invalid(
        "unknown-profile",
        policy,
        {"spec.quantization.allowed": ["fp64"]},
        "spec.quantization.allowed[0]",
        ENUM,
        IN_MODEL_ENUM,
    ),
    Invalid(
        "profile-listed-twice",
        policy,
        {"spec.quantization.allowed": ["fp8", "fp8"]},
        "spec.quantization.allowed[1]",
        'Duplicate value: "fp8"',
        "quantization.allowed lists a profile twice",
    ),
    Invalid(
        "accuracy-drop-above-100",
        policy,
        {"spec.quantization.maxAccuracyDropPercent": 101},
        "spec.quantization.maxAccuracyDropPercent",
        "less than or equal to 100",
    ),
    Invalid(
        "port-above-65535",
        policy,
        {"spec.workMetric.port": 70000},
        "spec.workMetric.port",
        "less than or equal to 65535",
    ),
    Invalid(
        "port-zero", policy, {"spec.workMetric.port": 0}, "spec.workMetric.port", "greater than or equal to 1"
    ),
    Invalid(
        "path-without-slash",
        policy,
        {"spec.workMetric.path": "metrics"},
        "spec.workMetric.path",
        "should match '^/'",
        "should match pattern '^/'",
    ),
    Invalid(
        "metric-name-not-prometheus",
        policy,
        {"spec.workMetric.name": "tokens-total"},
        "spec.workMetric.name",
        "should match '^[a-zA-Z_:][a-zA-Z0-9_:]*$'",
        "should match pattern '^[a-zA-Z_:][a-zA-Z0-9_:]*$'",
    ),
    Invalid(
        "work-metric-missing",
        policy,
        {"spec.workMetric": DELETE},
        "spec.workMetric",
        "Required value",
        "Field required",
    ),
    Invalid(
        "latency-quantile-above-1",
        policy,
        {"spec.latencySLO.quantile": 1.5},
        "spec.latencySLO.quantile",
        "less than 1",
    ),
    Invalid(
        "latency-quantile-zero",
        policy,
        {"spec.latencySLO.quantile": 0},
        "spec.latencySLO.quantile",
        "greater than 0",
    ),
    Invalid(
        "latency-bound-zero",
        policy,
        {"spec.latencySLO.maxSeconds": 0},
        "spec.latencySLO.maxSeconds",
        "greater than 0",
    ),
    Invalid(
        "latency-without-metric",
        policy,
        {"spec.workMetric.engine": "custom", "spec.workMetric.name": "t_total"},
        "spec.latencySLO.metricName",
        "latencySLO.metricName is required unless workMetric.engine names a preset",
    ),
    Invalid(
        "target-without-a-goal",
        policy,
        {"spec.target": {}},
        "spec.target",
        "target needs edpReductionPercent or joulesPerUnit",
    ),
    Invalid(
        "target-percent-above-100",
        policy,
        {"spec.target.edpReductionPercent": 150},
        "spec.target.edpReductionPercent",
        "less than or equal to 100",
    ),
    Invalid(
        "selector-in-without-values",
        policy,
        {"spec.selector.matchExpressions": [{"key": "app", "operator": "In"}]},
        "spec.selector.matchExpressions[0].values",
        "matchExpressions values must list at least one value for operator In or NotIn",
    ),
    Invalid(
        "selector-exists-with-values",
        policy,
        {"spec.selector.matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]},
        "spec.selector.matchExpressions[0].values",
        "matchExpressions values must be empty for operator Exists or DoesNotExist",
    ),
    Invalid(
        "selector-operator-not-an-enum",
        policy,
        {"spec.selector.matchExpressions": [{"key": "app", "operator": "Like", "values": ["x"]}]},
        "spec.selector.matchExpressions[0].operator",
        ENUM,
        IN_MODEL_ENUM,
    ),
    Invalid(
        "selector-too-many-labels",
        policy,
        {"spec.selector.matchLabels": {f"label-{i}": "x" for i in range(65)}},
        "spec.selector.matchLabels",
        "must have at most 64 items",
        "at most 64 items",
    ),
    Invalid(
        "budget-scope-not-an-enum",
        budget,
        {"spec.scope": "Everything"},
        "spec.scope",
        ENUM,
        IN_MODEL_ENUM,
    ),
    Invalid(
        "group-by-empty-label",
        policy,
        {"spec.groupByLabel": ""},
        "spec.groupByLabel",
        "at least 1 chars long",
        "at least 1 character",
    ),
    Invalid(
        "unknown-spec-field",
        policy,
        {"spec.turbo": True},
        "spec.turbo",
        "unknown field",
        "Extra inputs are not permitted",
    ),
    Invalid(
        "unknown-nested-field",
        policy,
        {"spec.powerCap.boostWatts": 900},
        "spec.powerCap.boostWatts",
        "unknown field",
        "Extra inputs are not permitted",
    ),
    Invalid("budget-negative", budget, {"spec.maxWatts": -100}, "spec.maxWatts", "greater than 0"),
    Invalid("budget-zero", budget, {"spec.maxWatts": 0}, "spec.maxWatts", "greater than 0"),
    Invalid(
        "budget-without-node-selector",
        budget,
        {"spec.nodeSelector": DELETE},
        "spec.nodeSelector",
        "Required value",
        "Field required",
    ),
    Invalid(
        "budget-unknown-field",
        budget,
        {"spec.maxAmps": 40},
        "spec.maxAmps",
        "unknown field",
        "Extra inputs are not permitted",
    ),
    Invalid(
        "report-zero-watt-limit",
        report,
        {"spec.powerLimits": [{"gpuUUID": "GPU-1", "watts": 0, "pod": "default/p"}]},
        "spec.powerLimits[0].watts",
        "greater than 0",
    ),
    Invalid(
        "report-lease-too-short",
        report,
        {"spec.lease.leaseSeconds": 1},
        "spec.lease.leaseSeconds",
        "greater than or equal to 5",
    ),
    Invalid(
        "report-operator-lease-without-name",
        report,
        {"spec.operatorLease": {"namespace": "edpilot-system"}},
        "spec.operatorLease.name",
        "Required value",
        "Field required",
    ),
    Invalid(
        "report-interval-zero",
        report,
        {"spec.reportIntervalSeconds": 0},
        "spec.reportIntervalSeconds",
        "greater than or equal to 1",
    ),
    Invalid(
        "report-bad-scrape-port",
        report,
        {"spec.workloads": [{"namespace": "default", "pod": "p", "metricName": "m", "port": 99999}]},
        "spec.workloads[0].port",
        "less than or equal to 65535",
    ),
]


def invalid_object(case: Invalid) -> dict[str, Any]:
    return private_copy(changed(case.base(), case.changes))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_model_rejects_invalid_objects(case: Invalid) -> None:
    obj = invalid_object(case)
    with pytest.raises(ValidationError) as rejected:
        MODELS[obj["kind"]].model_validate(obj)
    message = str(rejected.value)
    leaf = case.field.rsplit(".", 1)[-1].split("[")[0]
    assert leaf in message, message
    assert (case.model_says or case.server_says) in message, message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_api_server_rejects_invalid_objects(api: Cluster, case: Invalid) -> None:
    obj = invalid_object(case)
    verdict = api.kubectl(
        "create",
        "--dry-run=server",
        "--validate=strict",
        "-o",
        "name",
        "-f",
        "-",
        input=json.dumps(obj),
        check=False,
    )
    assert verdict.returncode != 0, f"the API server accepted {case.id}: {verdict.stdout}"
    assert case.field in verdict.stderr, verdict.stderr
    assert case.server_says in verdict.stderr, verdict.stderr


def test_the_invalid_table_is_broad() -> None:
    assert len(CASES) >= 20
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.base().get("kind") for c in CASES} == set(MODELS)


def test_each_invalid_case_differs_from_a_valid_sample_only_by_its_changes() -> None:
    """So a rejection is about the change, not about a broken base."""
    for base in (policy(), budget(), report()):
        MODELS[base["kind"]].model_validate(private_copy(base))
