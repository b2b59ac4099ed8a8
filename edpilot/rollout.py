"""Delivery by rollout: a workload's configuration carried by its owner's pod template. Pure.

Serving engines (vLLM, SGLang) read their batch limit and quantization once, at start. A policy
with `delivery.mode: Rollout` therefore changes the pod template of the pods' Deployment or
StatefulSet, and the owner's own controller replaces the pods (honouring its maxUnavailable and
maxSurge). This module reads owners, says which configuration a template carries, and writes the
JSON patches that change a template and that put it back:

- a change edits only what the policy names (the batch flag or env variable, the quantization
  profiles' arguments, env and image) in one container, in place, so the tenant's other edits
  stay; it stamps the configuration on the template (`edpilot.io/rollout-config`, copied onto every
  pod, which attributes each pod's measurements to the template it was created from), and on the
  first change records the fields as they were (`edpilot.io/original-template` on the owner);
- every patch starts with a `test` of the owner's resourceVersion: a template the tenant changed
  since it was read is never overwritten, the patch is refused and retried on fresh data;
- a restore writes the recorded fields back, except one the tenant changed since edpilot's last
  change (it is the tenant's now), and removes both annotations.

The owner's annotations are the tenant's to write: a forged original only makes the operator
write into the tenant's own template what the tenant could write itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from edpilot.contract import ANNOTATION_ORIGINAL_TEMPLATE, ANNOTATION_ROLLOUT_CONFIG
from edpilot.models import (
    PROFILES,
    BatchDelivery,
    EnergyPolicySpec,
    Profile,
    ProfileDelivery,
)
from edpilot.textnum import positive_int

OwnerKind = Literal["Deployment", "StatefulSet"]
OWNER_KINDS: tuple[OwnerKind, ...] = ("Deployment", "StatefulSet")
TOUCHED = ("command", "args", "env", "image")  # the container fields a rollout may change
JsonPatch = list[dict[str, Any]]


@dataclass(frozen=True, eq=False)
class OwnerView:
    """What the operator keeps of a Deployment or StatefulSet (in a watch index)."""

    kind: OwnerKind
    namespace: str
    name: str
    resource_version: str
    generation: int
    observed_generation: int
    replicas: int  # wanted
    status_replicas: int  # pods it has, old and new
    updated_replicas: int  # pods of the current template
    ready_replicas: int
    strategy: str  # RollingUpdate, Recreate, OnDelete
    revisions_match: bool  # StatefulSet: currentRevision == updateRevision; Deployment: True
    containers: tuple[Mapping[str, Any], ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    template_annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def settled(self) -> bool:
        """Its controller has rolled its current template out: every pod it wants runs it, Ready,
        and no pod of an older template is left."""
        return (
            self.observed_generation >= self.generation
            and self.revisions_match
            and self.updated_replicas == self.replicas
            and self.status_replicas == self.replicas
            and self.ready_replicas >= self.replicas
        )


def owner_view(kind: OwnerKind, body: Mapping[str, Any]) -> OwnerView:
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    template = spec.get("template") or {}
    strategy_field = "strategy" if kind == "Deployment" else "updateStrategy"
    strategy = str((spec.get(strategy_field) or {}).get("type") or "RollingUpdate")
    revisions = kind == "Deployment" or status.get("currentRevision") == status.get("updateRevision")
    replicas = spec.get("replicas")
    return OwnerView(
        kind=kind,
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        resource_version=str(meta.get("resourceVersion") or ""),
        generation=int(meta.get("generation") or 0),
        observed_generation=int(status.get("observedGeneration") or 0),
        replicas=1 if replicas is None else int(replicas),
        status_replicas=int(status.get("replicas") or 0),
        updated_replicas=int(status.get("updatedReplicas") or 0),
        ready_replicas=int(status.get("readyReplicas") or 0),
        strategy=strategy,
        revisions_match=bool(revisions),
        containers=tuple(dict(c) for c in (template.get("spec") or {}).get("containers") or []),
        annotations=dict(meta.get("annotations") or {}),
        template_annotations=dict((template.get("metadata") or {}).get("annotations") or {}),
    )


def owner_of(kind: str, name: str, pod_labels: Mapping[str, str]) -> tuple[OwnerKind, str] | None:
    """The Deployment or StatefulSet behind a pod's controller reference: a ReplicaSet named
    <deployment>-<pod-template-hash> belongs to that Deployment."""
    if kind == "StatefulSet":
        return "StatefulSet", name
    if kind == "ReplicaSet":
        suffix = f"-{pod_labels.get('pod-template-hash', '')}"
        if len(suffix) > 1 and name.endswith(suffix):
            return "Deployment", name.removesuffix(suffix)
    return None


def why_not(owner: OwnerView) -> str:
    """Why edpilot must not roll this owner out ("" when it may)."""
    if owner.strategy in ("Recreate", "OnDelete"):
        return (
            f"{owner.key} updates its pods by {owner.strategy}: a rollout would stop every replica at once"
            if owner.strategy == "Recreate"
            else f"{owner.key} updates its pods OnDelete: edpilot deletes no pods, so no template change would apply"
        )
    if not owner.containers:
        return f"{owner.key} has no containers in its pod template"
    return ""


# ---------------------------------------------------------------- configurations


@dataclass(frozen=True)
class RolloutConfig:
    batchSize: int | None = None
    quantization: Profile | None = None

    def text(self) -> str:
        parts = [
            f"batch={self.batchSize}" if self.batchSize else "",
            f"quantization={self.quantization or ''}",
        ]
        return ",".join(p for p in parts if p and not p.endswith("="))


def parse_config(text: str) -> RolloutConfig | None:
    """The inverse of `RolloutConfig.text`; None for anything else (a pod's annotation is tenant-writable)."""
    batch: int | None = None
    quantization: Profile | None = None
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key == "batch" and (batch := positive_int(value)) is None:
            return None
        if key == "quantization":
            quantization = next((p for p in PROFILES if p == value), None)
            if quantization is None:
                return None
        if key not in ("batch", "quantization", ""):
            return None
    return RolloutConfig(batch, quantization)


def container_index(owner: OwnerView, wanted: str | None) -> int | None:
    for i, c in enumerate(owner.containers):
        if wanted is None or c.get("name") == wanted:
            return i
    return None


def _strings(value: Any) -> list[str] | None:
    return [str(v) for v in value] if isinstance(value, list) else None


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of `--flag=value` or `--flag value` in a command line."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _env_value(env: Sequence[Mapping[str, Any]], name: str) -> str | None:
    for entry in env:
        if entry.get("name") == name and "valueFrom" not in entry:
            return str(entry.get("value") or "")
    return None


def _contains(argv: Sequence[str], part: Sequence[str]) -> bool:
    n = len(part)
    return any(list(argv[i : i + n]) == list(part) for i in range(len(argv) - n + 1))


def _matches(container: Mapping[str, Any], profile: ProfileDelivery, original_image: str) -> bool:
    argv = (_strings(container.get("command")) or []) + (_strings(container.get("args")) or [])
    env = container.get("env") or []
    image_ok = container.get("image") == (profile.image or original_image)
    return (
        _contains(argv, profile.args)
        and all(_env_value(env, e.name) == e.value for e in profile.env)
        and image_ok
    )


def template_config(owner: OwnerView, spec: EnergyPolicySpec) -> RolloutConfig:
    """The configuration the owner's template carries, read from what the policy names: the batch
    flag's (or env variable's) value, and the profile whose arguments, env and image it has (the
    most specific one when several match). None where it says nothing."""
    index = container_index(owner, spec.delivery.container)
    if index is None:
        return RolloutConfig()
    container = owner.containers[index]
    batch: int | None = None
    where = spec.rollout_batch
    if where is not None:
        argv = (_strings(container.get("command")) or []) + (_strings(container.get("args")) or [])
        text = (
            flag_value(argv, where.arg)
            if where.arg
            else _env_value(container.get("env") or [], where.env or "")
        )
        batch = positive_int(text)
    original = original_fields(owner)
    image = str((original or {}).get("image") or container.get("image") or "")
    matching = [p for p in spec.delivery.quantization if _matches(container, p, image)]
    best = max(matching, key=lambda p: len(p.args) + len(p.env) + (p.image is not None), default=None)
    return RolloutConfig(batch, best.profile if best else None)


# ---------------------------------------------------------------- changing and restoring a template


def original_fields(owner: OwnerView) -> dict[str, Any] | None:
    """The recorded fields of the container before edpilot's first change, or None."""
    text = owner.annotations.get(ANNOTATION_ORIGINAL_TEMPLATE)
    if not text:
        return None
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("container"), str) else None


def _set_flag(argv: list[str], flag: str, value: str) -> bool:
    for i, arg in enumerate(argv):
        if arg.startswith(f"{flag}="):
            argv[i] = f"{flag}={value}"
            return True
        if arg == flag and i + 1 < len(argv):
            argv[i + 1] = value
            return True
    return False


def _remove(argv: list[str], part: Sequence[str]) -> list[str]:
    n = len(part)
    for i in range(len(argv) - n + 1):
        if n and argv[i : i + n] == list(part):
            return argv[:i] + argv[i + n :]
    return argv


def _set_env(env: list[dict[str, Any]], name: str, value: str | None) -> list[dict[str, Any]]:
    kept = [e for e in env if e.get("name") != name]
    if value is None:
        return kept
    at = next((i for i, e in enumerate(env) if e.get("name") == name), len(kept))
    return [*kept[:at], {"name": name, "value": value}, *kept[at:]]


def configured_container(
    container: Mapping[str, Any], spec: EnergyPolicySpec, config: RolloutConfig, original_image: str
) -> dict[str, Any]:
    """The container running `config`: the batch flag or variable set, the other profiles'
    arguments and env taken out and the chosen one's put in, its image or the original one."""
    command = _strings(container.get("command"))
    args = _strings(container.get("args"))
    env = [dict(e) for e in container.get("env") or []]
    image = str(container.get("image") or "")
    where: BatchDelivery | None = spec.rollout_batch
    if where is not None and config.batchSize is not None:
        value = str(config.batchSize)
        if where.arg:
            found = command is not None and _set_flag(command, where.arg, value)
            if not found:
                args = args or []
                if not _set_flag(args, where.arg, value):
                    args.append(f"{where.arg}={value}")
        elif where.env:
            env = _set_env(env, where.env, value)
    profiles = spec.delivery.quantization
    chosen = next((p for p in profiles if p.profile == config.quantization), None)
    if config.quantization is not None and chosen is not None:
        for other in profiles:
            if other is chosen:
                continue
            if args is not None:
                args = _remove(args, other.args)
            for e in other.env:
                if _env_value(env, e.name) == e.value and e.name not in {c.name for c in chosen.env}:
                    env = _set_env(env, e.name, None)
        if chosen.args and not _contains((command or []) + (args or []), chosen.args):
            args = [*(args or []), *chosen.args]
        for e in chosen.env:
            env = _set_env(env, e.name, e.value)
        image = chosen.image or original_image
    result = dict(container)
    fields: tuple[tuple[str, object], ...] = (("command", command), ("args", args), ("env", env or None))
    for name, new in (*fields, ("image", image)):
        if new is None:
            result.pop(name, None)
        else:
            result[name] = new
    return result


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _field_ops(path: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> JsonPatch:
    ops: JsonPatch = []
    for name in TOUCHED:
        if before.get(name) == after.get(name):
            continue
        if name in after:
            ops.append({"op": "add", "path": f"{path}/{name}", "value": after[name]})
        else:
            ops.append({"op": "remove", "path": f"{path}/{name}"})
    return ops


def _annotation_op(path: str, present: Mapping[str, str], key: str, value: str | None) -> JsonPatch:
    if value is None:
        if key not in present:
            return []
        # The last one takes the map with it: the API server stores no empty map either.
        return [{"op": "remove", "path": path if len(present) == 1 else f"{path}/{_escape(key)}"}]
    if not present:
        return [{"op": "add", "path": path, "value": {key: value}}]
    return [{"op": "add", "path": f"{path}/{_escape(key)}", "value": value}]


def original_config(owner: OwnerView, spec: EnergyPolicySpec) -> RolloutConfig | None:
    """The configuration the template carried before edpilot's first change, or None."""
    original = original_fields(owner)
    index = container_index(owner, original["container"]) if original is not None else None
    if original is None or index is None:
        return None
    container = {"name": original["container"], **{k: original[k] for k in TOUCHED if k in original}}
    before = list(owner.containers)
    before[index] = container
    pristine = OwnerView(**{**owner.__dict__, "containers": tuple(before), "annotations": {}})
    return template_config(pristine, spec)


def rollout_patch(owner: OwnerView, spec: EnergyPolicySpec, config: RolloutConfig) -> JsonPatch | None:
    """The JSON patch that makes the owner's template run `config`; None when there is nothing
    to change (or no container to change). Back to the configuration it had before edpilot
    changed it, the template is restored as it was: the owner's controller then scales its old
    pods back up rather than replacing them with pods of a template that differs only by the stamp."""
    index = container_index(owner, spec.delivery.container)
    if index is None:
        return None
    if original_config(owner, spec) == config:
        return restore_patch(owner, spec)
    container = owner.containers[index]
    original = original_fields(owner)
    image = str((original or {}).get("image") or container.get("image") or "")
    changed = configured_container(container, spec, config, image)
    path = f"/spec/template/spec/containers/{index}"
    ops = _field_ops(path, container, changed)
    if not ops and owner.template_annotations.get(ANNOTATION_ROLLOUT_CONFIG) == config.text():
        return None
    patch: JsonPatch = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": owner.resource_version},
        {"op": "test", "path": f"{path}/name", "value": container.get("name")},
        *ops,
        *_annotation_op(
            "/spec/template/metadata/annotations",
            owner.template_annotations,
            ANNOTATION_ROLLOUT_CONFIG,
            config.text(),
        ),
    ]
    if original is None:
        record = {"container": container.get("name"), **{k: container[k] for k in TOUCHED if k in container}}
        patch += _annotation_op(
            "/metadata/annotations", owner.annotations, ANNOTATION_ORIGINAL_TEMPLATE, json.dumps(record)
        )
    return patch


def restore_patch(owner: OwnerView, spec: EnergyPolicySpec | None) -> JsonPatch | None:
    """The JSON patch that puts the template back as it was before edpilot's first change; None
    when edpilot never changed it. A field the tenant changed since edpilot's last change (it no
    longer holds what edpilot wrote) is the tenant's and stays."""
    original = original_fields(owner)
    if original is None:
        return None
    ops: JsonPatch = [{"op": "test", "path": "/metadata/resourceVersion", "value": owner.resource_version}]
    index = next((i for i, c in enumerate(owner.containers) if c.get("name") == original["container"]), None)
    if index is not None:
        container = owner.containers[index]
        applied = parse_config(owner.template_annotations.get(ANNOTATION_ROLLOUT_CONFIG, ""))
        restored = {k: original[k] for k in TOUCHED if k in original}
        if spec is not None and applied is not None:
            image = str(original.get("image") or "")
            rebuilt = configured_container({"name": container.get("name"), **restored}, spec, applied, image)
            # What the tenant changed since: kept as it is now.
            for name in TOUCHED:
                if container.get(name) != rebuilt.get(name):
                    if name in container:
                        restored[name] = container[name]
                    else:
                        restored.pop(name, None)
        path = f"/spec/template/spec/containers/{index}"
        target = {k: v for k, v in container.items() if k not in TOUCHED} | restored
        ops.append({"op": "test", "path": f"{path}/name", "value": container.get("name")})
        ops += _field_ops(path, container, target)
    template = owner.template_annotations
    ops += _annotation_op("/spec/template/metadata/annotations", template, ANNOTATION_ROLLOUT_CONFIG, None)
    ops += _annotation_op("/metadata/annotations", owner.annotations, ANNOTATION_ORIGINAL_TEMPLATE, None)
    return ops
