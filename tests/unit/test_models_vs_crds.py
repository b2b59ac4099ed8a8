"""The CRDs in crds/ (the source of truth) and the pydantic models in edpilot/models.py agree:
same fields, same required fields, same enums and bounds, same defaults, and every sample is
valid in both. No cluster needed; tests/e2e/test_crds.py asks the real API server."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from edpilot import models

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
SAMPLES = CRDS / "samples"
MODELS: dict[str, type[BaseModel]] = {
    "EnergyPolicy": models.EnergyPolicy,
    "GPUNodeReport": models.GPUNodeReport,
    "PowerBudget": models.PowerBudget,
    "WorkloadOptimizerState": models.WorkloadOptimizerState,
}
SCOPES = {
    "EnergyPolicy": "Namespaced",
    "GPUNodeReport": "Cluster",
    "PowerBudget": "Cluster",
    "WorkloadOptimizerState": "Namespaced",
}
SHORT_NAMES = {
    "EnergyPolicy": ["epol"],
    "GPUNodeReport": ["gnr"],
    "PowerBudget": ["pb"],
    "WorkloadOptimizerState": ["wos"],
}
# The operator's own state has no status: it is all spec, written by the operator only.
SUBRESOURCES = {"WorkloadOptimizerState": None}
# Keywords that constrain a value; both sides must say the same for each field.
BOUND_KEYS = (
    "type",
    "format",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
)
# The envelope the API server owns; the models only mirror what edpilot reads of it.
ENVELOPE = {"apiVersion", "kind", "metadata"}


def load_crds() -> dict[str, dict[str, Any]]:
    crds = [yaml.safe_load(path.read_text()) for path in sorted(CRDS.glob("*.yaml"))]
    return {crd["spec"]["names"]["kind"]: crd for crd in crds}


def load_samples() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}#{i}", doc)
        for path in sorted(SAMPLES.glob("*.yaml"))
        for i, doc in enumerate(yaml.safe_load_all(path.read_text()))
        if doc
    ]


def schema_of(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


CRD_BY_KIND = load_crds()
SAMPLE_DOCS = load_samples()


def test_there_is_one_crd_per_model() -> None:
    assert set(CRD_BY_KIND) == set(MODELS)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_crd_names_scope_version_and_subresources(kind: str) -> None:
    crd = CRD_BY_KIND[kind]
    names = crd["spec"]["names"]
    assert crd["spec"]["group"] == models.GROUP
    assert crd["metadata"]["name"] == f"{names['plural']}.{models.GROUP}"
    assert crd["spec"]["scope"] == SCOPES[kind]
    assert names["shortNames"] == SHORT_NAMES[kind]
    assert names["categories"] == ["edpilot"]
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == (models.VERSION, True, True)
    assert version.get("subresources") == SUBRESOURCES.get(kind, {"status": {}})
    for column in version["additionalPrinterColumns"]:
        assert column["jsonPath"].startswith("."), column


def walk(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, prop in schema.get("properties", {}).items():
        yield from walk(prop, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_field_has_a_description(kind: str) -> None:
    undocumented = [
        path for path, prop in walk(schema_of(CRD_BY_KIND[kind]), kind) if not prop.get("description")
    ]
    assert undocumented == []


def crd_facts(prop: dict[str, Any]) -> dict[str, Any]:
    facts = {k: prop[k] for k in BOUND_KEYS if k in prop}
    # OpenAPI v3.0 spells an exclusive bound as a flag next to the bound; JSON Schema as the bound.
    if facts.pop("exclusiveMinimum", False):
        facts["exclusiveMinimum"] = facts.pop("minimum")
    if facts.pop("exclusiveMaximum", False):
        facts["exclusiveMaximum"] = facts.pop("maximum")
    if prop.get("x-kubernetes-preserve-unknown-fields"):
        facts["additionalProperties"] = True
    elif isinstance(prop.get("additionalProperties"), dict):
        facts["additionalProperties"] = crd_facts(prop["additionalProperties"])
    if isinstance(prop.get("items"), dict) and prop["items"].get("type") != "object":
        facts["items"] = crd_facts(prop["items"])
    return facts


def model_facts(prop: dict[str, Any]) -> dict[str, Any]:
    if "anyOf" in prop:  # `X | None`: the API spells an absent value by leaving the field out
        (present,) = [s for s in prop["anyOf"] if s.get("type") != "null"]
        prop = {**present, **{k: v for k, v in prop.items() if k != "anyOf"}}
    if "$ref" in prop:
        return {"type": "object"}
    facts = {k: prop[k] for k in BOUND_KEYS if k in prop}
    extra = prop.get("additionalProperties")
    if extra is True:
        facts["additionalProperties"] = True
    elif isinstance(extra, dict):
        facts["additionalProperties"] = model_facts(extra)
    if isinstance(prop.get("items"), dict) and "$ref" not in prop["items"]:
        facts["items"] = model_facts(prop["items"])
    return facts


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, directly, in a list, or as an optional value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = nested_model(arg)
            if found is not None:
                return found
    return None


def pruned(value: Any) -> Any:
    """Drops absent values; the API leaves out empty lists and maps, so they count as absent."""
    if isinstance(value, dict):
        kept = {k: pruned(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not None} or None
    if isinstance(value, list):
        return [pruned(v) for v in value] or None
    return value


def model_default(cls: type[BaseModel], name: str) -> Any:
    field = cls.model_fields[name]
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return None
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    return pruned(value)


def with_crd_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server stores for `value`: nested defaults filled in, as structural defaulting does."""
    if isinstance(value, dict) and "properties" in schema:
        filled = dict(value)
        for name, prop in schema["properties"].items():
            if name not in filled and "default" in prop:
                filled[name] = prop["default"]
            if name in filled:
                filled[name] = with_crd_defaults(prop, filled[name])
        return filled
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [with_crd_defaults(schema["items"], v) for v in value]
    return value


def crd_default(prop: dict[str, Any]) -> Any:
    if "default" not in prop:
        return None
    value = with_crd_defaults(prop, prop["default"])
    return pruned(value)


def disagreements(cls: type[BaseModel], schema: dict[str, Any], path: str) -> Iterator[str]:
    """Every way the model `cls` and the CRD schema of the same object differ."""
    properties: dict[str, Any] = schema.get("properties", {})
    fields = {name: f.alias or name for name, f in cls.model_fields.items()}
    root = path.count(".") == 0
    api_names = set(fields.values()) - (ENVELOPE if root else set())
    crd_names = set(properties) - (ENVELOPE if root else set())
    for missing in sorted(crd_names - api_names):
        yield f"{path}.{missing}: in the CRD, not in {cls.__name__}"
    for missing in sorted(api_names - crd_names):
        yield f"{path}.{missing}: in {cls.__name__}, not in the CRD"
    required_in_model = {fields[n] for n, f in cls.model_fields.items() if f.is_required()} - ENVELOPE
    if required_in_model != set(schema.get("required", [])):
        required_in_crd = sorted(schema.get("required", []))
        yield f"{path}: required {sorted(required_in_model)} in {cls.__name__}, {required_in_crd} in the CRD"
    json_schema = cls.model_json_schema()["properties"]
    for name, api_name in fields.items():
        if api_name not in properties or api_name in ENVELOPE:
            continue
        prop, where = properties[api_name], f"{path}.{api_name}"
        in_model, in_crd = model_facts(json_schema[api_name]), crd_facts(prop)
        if in_model != in_crd:
            yield f"{where}: {cls.__name__} says {in_model}, the CRD says {in_crd}"
        default_in_model, default_in_crd = model_default(cls, name), crd_default(prop)
        if default_in_model != default_in_crd:
            yield f"{where}: default {default_in_model!r} in {cls.__name__}, {default_in_crd!r} in the CRD"
        inner = nested_model(cls.model_fields[name].annotation)
        if inner is not None and inner is not models.ObjectMeta:
            inner_schema = prop["items"] if prop.get("type") == "array" else prop
            if prop.get("x-kubernetes-preserve-unknown-fields"):
                continue
            yield from disagreements(inner, inner_schema, where)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_models_mirror_the_crd_schema(kind: str) -> None:
    """Field names, required fields, types, enums, bounds and defaults, both ways, at every depth."""
    assert list(disagreements(MODELS[kind], schema_of(CRD_BY_KIND[kind]), kind)) == []


def test_the_comparison_notices_a_difference() -> None:
    """Guards the guard: a changed bound, default or field in the CRD shows up as a disagreement."""
    schema = yaml.safe_load(yaml.safe_dump(schema_of(CRD_BY_KIND["EnergyPolicy"])))
    power_cap = schema["properties"]["spec"]["properties"]["powerCap"]
    power_cap["properties"]["minPercent"]["minimum"] = 5
    power_cap["default"]["minPercent"] = 40
    power_cap["properties"]["turbo"] = {"type": "boolean", "description": "not in the model"}
    found = list(disagreements(models.EnergyPolicy, schema, "EnergyPolicy"))
    assert any("powerCap.minPercent" in d and "'minimum': 5" in d for d in found), found
    assert any("powerCap: default" in d for d in found), found
    assert any("powerCap.turbo: in the CRD" in d for d in found), found


def test_there_are_samples_of_each_policy_kind() -> None:
    names = {doc["metadata"]["name"] for _, doc in SAMPLE_DOCS}
    kinds = {doc["kind"] for _, doc in SAMPLE_DOCS}
    assert {"llm-serving", "training", "rack-a3"} <= names
    assert {"EnergyPolicy", "PowerBudget"} <= kinds


@pytest.mark.parametrize(("name", "doc"), SAMPLE_DOCS, ids=[name for name, _ in SAMPLE_DOCS])
def test_sample_is_valid_in_the_model_and_the_crd_schema(name: str, doc: dict[str, Any]) -> None:
    MODELS[doc["kind"]].model_validate(doc)
    # The OpenAPI bounds (draft-4 style exclusive flags) checked offline; CEL rules need the API server.
    jsonschema.Draft4Validator(schema_of(CRD_BY_KIND[doc["kind"]])).validate(doc)


def test_llm_serving_sample_steers_all_three_knobs_of_a_vllm_engine_under_load() -> None:
    policy = models.EnergyPolicy.model_validate(
        yaml.safe_load((SAMPLES / "llm-serving-policy.yaml").read_text())
    )
    spec = policy.spec
    assert spec.quantization.mode == "Auto" and spec.quantization.allowed == ["bf16", "fp8"]
    assert (spec.batchSize.mode, spec.batchSize.min, spec.batchSize.max) == ("Auto", 64, 1024)
    # The vllm preset: vLLM's own metric names (v1 engine), and its load gauges: a load-driven policy.
    assert spec.workMetric.engine == "vllm" and spec.load_driven
    names = spec.metrics()
    assert (names.work, names.unit) == ("vllm:generation_tokens_total", "tokens")
    assert (names.latency, names.firstToken) == (
        "vllm:inter_token_latency_seconds",
        "vllm:time_to_first_token_seconds",
    )
    assert (names.running, names.waiting, names.finished) == (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:request_success_total",
    )


def test_a_load_driven_policy_without_a_latency_is_refused() -> None:
    doc = yaml.safe_load((SAMPLES / "llm-serving-policy.yaml").read_text())
    del doc["spec"]["latencySLO"]
    with pytest.raises(ValueError, match="set latencySLO too"):
        models.EnergyPolicy.model_validate(doc)


def test_training_sample_caps_power_of_a_job_as_one_workload() -> None:
    policy = models.EnergyPolicy.model_validate(
        yaml.safe_load((SAMPLES / "training-policy.yaml").read_text())
    )
    spec = policy.spec
    assert (spec.objective, spec.powerCap.mode, spec.powerCap.minPercent, spec.powerCap.maxPercent) == (
        "EDP",
        "Auto",
        50,
        100,
    )
    assert spec.batchSize.mode == "Off" and spec.groupByLabel


def test_model_defaults_match_what_the_crd_fills_in_for_a_minimal_policy() -> None:
    """A minimal spec, defaulted by the CRD's rules, is what the model makes of it."""
    minimal = {"selector": {}, "workMetric": {"name": "tokens_total"}}
    spec_schema = schema_of(CRD_BY_KIND["EnergyPolicy"])["properties"]["spec"]
    by_crd = pruned(with_crd_defaults(spec_schema, minimal))
    by_model = pruned(
        models.EnergyPolicySpec.model_validate(minimal).model_dump(mode="json", exclude_none=True)
    )
    assert by_model == by_crd
    assert by_crd["powerCap"] == {"mode": "Auto", "minPercent": 50, "maxPercent": 100}


def test_conditions_are_a_map_keyed_by_type_in_both() -> None:
    condition = {
        "type": "Ready",
        "status": "True",
        "reason": "Converged",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    with pytest.raises(ValueError, match="conditions list type Ready more than once"):
        models.EnergyPolicyStatus.model_validate({"conditions": [condition, condition]})
    for kind in set(MODELS) - set(SUBRESOURCES):  # the kinds with a status
        conditions = schema_of(CRD_BY_KIND[kind])["properties"]["status"]["properties"]["conditions"]
        assert (conditions["x-kubernetes-list-type"], conditions["x-kubernetes-list-map-keys"]) == (
            "map",
            ["type"],
        )
