"""Delivery by rollout for one workload (a Deployment's or StatefulSet's pods). Pure: the policy
reconcile (`services`) calls it with what the watches hold and writes back the JSON patches it
returns (`edpilot.rollout` builds them).

Each reconcile is one of:
- *in flight*: the owner's controller is replacing its pods with those of the template edpilot
  changed. Nothing is measured (old and new pods run different configurations); once every pod
  it wants runs the new template and is Ready, the rollout is done and the next window starts
  with the new pods only. A rollout not done within `delivery.readyTimeoutSeconds` is rolled back
  and its configuration marked failed (`optimizer.fail_target`).
- *steady*: the pods of the current template are measured (pods of an older template are left
  out), the optimizer steps, and if its target differs from what the template carries a rollout
  starts: only on an owner its controller has fully rolled out (so its maxUnavailable bounds
  what edpilot's rollout takes away), one at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from edpilot.contract import ANNOTATION_ROLLOUT_CONFIG
from edpilot.models import EnergyPolicySpec, RolloutStatus
from edpilot.optimizer import Decision, OptimizerState, WorkloadInfo, fail_target
from edpilot.rollout import (
    JsonPatch,
    OwnerView,
    RolloutConfig,
    original_fields,
    parse_config,
    restore_patch,
    rollout_patch,
    template_config,
    why_not,
)

from .selection import PodInfo, Workload


@dataclass
class RolloutPlan:
    """What one reconcile of a workload delivered by rollout found and wants."""

    owner: OwnerView | None
    problem: str = ""  # why hints cannot be delivered by rollout: caps only
    template: RolloutConfig = field(default_factory=RolloutConfig)
    record: RolloutStatus | None = None
    measured: tuple[PodInfo, ...] = ()  # the pods of the current template
    in_flight: bool = False
    completed: bool = False  # the rollout in flight finished in this reconcile
    timed_out: bool = False
    message: str = ""


def owner_for(workload: Workload, owners: Mapping[str, OwnerView]) -> OwnerView | None:
    return owners.get(workload.name)


def pod_config(pod: PodInfo, owner: OwnerView, template: RolloutConfig) -> RolloutConfig | None:
    """The configuration a pod was created with: the template's stamp it carries, or, on an owner
    edpilot never changed, the template's own. None: an older template's pod, not measured."""
    stamp = pod.annotations.get(ANNOTATION_ROLLOUT_CONFIG)
    if stamp is not None:
        return parse_config(stamp)
    return template if original_fields(owner) is None else None


def plan(
    spec: EnergyPolicySpec,
    workload: Workload,
    owners: Mapping[str, OwnerView],
    previous: RolloutStatus | None,
    now: datetime,
) -> RolloutPlan:
    owner = owner_for(workload, owners)
    if owner is None:
        return RolloutPlan(
            None,
            problem=(
                "delivery Rollout needs pods created by a Deployment or StatefulSet that the operator "
                "watches (chart value operator.rolloutDelivery.enabled): only power caps are steered"
            ),
        )
    problem = why_not(owner)
    if problem:
        return RolloutPlan(owner, problem=f"{problem}: only power caps are steered")
    template = template_config(owner, spec)
    record = previous if previous is not None and previous.owner == owner.key else None
    record = record or RolloutStatus(owner=owner.key, config=template.text())
    current = [p for p in workload.pods if pod_config(p, owner, template) == template]
    ready = [p for p in current if p.ready]
    record = record.model_copy(
        update={"config": template.text(), "readyReplicas": len(ready), "replicas": owner.replicas}
    )
    result = RolloutPlan(owner, template=template, record=record, measured=tuple(ready))
    if record.startedAt is None:
        return result
    done = owner.settled and len(ready) >= owner.replicas and len(current) == len(workload.pods)
    if done:
        result.record = record.model_copy(update={"startedAt": None})
        result.completed = True
        return result
    waited = (now - record.startedAt).total_seconds()
    if waited > spec.delivery.readyTimeoutSeconds:
        result.timed_out = True
        result.message = (
            f"the pods of {owner.key}'s new template ({template.text() or 'its own configuration'}) were not "
            f"Ready within {spec.delivery.readyTimeoutSeconds} s ({len(ready)} of {owner.replicas})"
        )
        return result
    result.in_flight = True
    result.message = (
        f"rolling out {owner.key} with {template.text() or 'its own configuration'}: "
        f"{len(ready)} of {owner.replicas} pods of the new template Ready ({waited:.0f} s)"
    )
    return result


def wanted(decision: Decision, template: RolloutConfig) -> RolloutConfig:
    """The configuration the template must carry for the decision: the hints it gives, the
    template's own where it gives none."""
    return RolloutConfig(
        decision.batchSize if decision.batchSize is not None else template.batchSize,
        decision.quantization if decision.quantization is not None else template.quantization,
    )


def start(
    spec: EnergyPolicySpec, result: RolloutPlan, config: RolloutConfig, now: datetime, force: bool = False
) -> tuple[JsonPatch | None, str]:
    """The patch that rolls the owner out with `config`, or None and why not yet. `force`: roll
    an owner that is mid-rollout (back from a rollout that failed)."""
    owner, record = result.owner, result.record
    assert owner is not None and record is not None
    if config == result.template:
        return None, ""
    if not owner.settled and not force:
        return None, f"{owner.key} is rolling out on its own: edpilot waits before changing its template"
    patch = rollout_patch(owner, spec, config)
    if patch is None:
        return None, ""
    result.record = record.model_copy(
        update={"startedAt": now, "config": config.text(), "previous": result.template.text()}
    )
    return patch, f"rolling out {owner.key} with {config.text()}"


def rolled_back(
    spec: EnergyPolicySpec,
    info: WorkloadInfo,
    state: OptimizerState,
    result: RolloutPlan,
    now: datetime,
) -> tuple[Decision, JsonPatch | None]:
    """A rollout that timed out: its configuration fails, and the template goes back to what the
    optimizer keeps (the best configuration so far)."""
    decision = fail_target(spec, info, state, now.timestamp(), result.message)
    back = wanted(decision, result.template)
    patch, _ = start(spec, result, back, now, force=True)
    if patch is None:
        # Nothing to go back to (the stuck template is what the optimizer keeps): report, wait.
        assert result.record is not None
        result.record = result.record.model_copy(update={"startedAt": None})
    return decision, patch


def restores(
    previous: Mapping[str, RolloutStatus],
    kept: set[str],
    owners: Mapping[str, OwnerView],
    spec: EnergyPolicySpec | None,
) -> dict[str, JsonPatch]:
    """Patches that put back the templates of owners this policy rolled out and no longer does
    (`kept`: the owners it still rolls out): deleted, no longer selected, or delivered live now."""
    patches: dict[str, JsonPatch] = {}
    for key in sorted(set(previous) - kept):
        owner = owners.get(key)
        patch = restore_patch(owner, spec) if owner is not None else None
        if patch is not None:
            patches[key] = patch
    return patches


def caps_only(spec: EnergyPolicySpec) -> EnergyPolicySpec:
    """The policy without the hints a rollout would have to carry."""
    return spec.model_copy(
        update={
            "batchSize": spec.batchSize.model_copy(update={"mode": "Off"}),
            "quantization": spec.quantization.model_copy(update={"mode": "Off"}),
        }
    )
