"""What the agent, the operator, the scheduler extender and workloads must agree on, defined once.

Every process imports its side of an agreement from here, so that a rule cannot drift between two
copies (issue 15: placement matched snake_case throttle reasons that no agent ever sent). Pure: no
I/O, no clock; the CRD models it speaks in are `edpilot.models`.

- throttle reasons: NVML's clocks-event reasons by their nvml.h names, and the bits of its mask;
- pod annotations: their names and how each value is written and read;
- GPU requests: how many GPUs a pod asks for through the device plugin;
- cap bounds: the power limits a policy allows on one GPU;
- committed watts: what GPUs hold against a power budget;
- condition transitions: when a condition's lastTransitionTime moves;
- stored optimizer states: the `WorkloadOptimizerState` object that holds one workload's state,
  its name, labels and owner (written by the operator, read by budgets and `edpilot report`);
- the status row model: `WorkloadFigures`, what the optimizer decides about a workload and every
  reader shows (the policy's status rows extend it, as do `edpilot report`'s). It is a CRD shape,
  so it is defined with the CRD models and named here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final, Protocol

from edpilot.models import (
    GROUP,
    PROFILES,
    Condition,
    ConditionStatus,
    GPUStatus,
    PowerCapSpec,
    Profile,
)
from edpilot.models import WorkloadFigures as WorkloadFigures  # the status row model (re-exported)
from edpilot.textnum import ascii_float, ascii_int, positive_int

# ---------------------------------------------------------------- throttle reasons


class ThrottleReason(StrEnum):
    """NVML's clocks-event reasons, named as in nvml.h without `nvmlClocksEventReason`: what both
    agent backends report in `GPUStatus.throttleReasons` and what gpusim produces."""

    GPU_IDLE = "GpuIdle"
    APPLICATIONS_CLOCKS_SETTING = "ApplicationsClocksSetting"
    SW_POWER_CAP = "SwPowerCap"
    HW_SLOWDOWN = "HwSlowdown"
    SYNC_BOOST = "SyncBoost"
    SW_THERMAL_SLOWDOWN = "SwThermalSlowdown"
    HW_THERMAL_SLOWDOWN = "HwThermalSlowdown"
    HW_POWER_BRAKE_SLOWDOWN = "HwPowerBrakeSlowdown"
    DISPLAY_CLOCK_SETTING = "DisplayClockSetting"


# The bits of nvmlDeviceGetCurrentClocksEventReasons' mask (nvml.h).
NVML_REASON_BITS: Final[Mapping[ThrottleReason, int]] = {
    ThrottleReason.GPU_IDLE: 0x001,
    ThrottleReason.APPLICATIONS_CLOCKS_SETTING: 0x002,
    ThrottleReason.SW_POWER_CAP: 0x004,
    ThrottleReason.HW_SLOWDOWN: 0x008,
    ThrottleReason.SYNC_BOOST: 0x010,
    ThrottleReason.SW_THERMAL_SLOWDOWN: 0x020,
    ThrottleReason.HW_THERMAL_SLOWDOWN: 0x040,
    ThrottleReason.HW_POWER_BRAKE_SLOWDOWN: 0x080,
    ThrottleReason.DISPLAY_CLOCK_SETTING: 0x100,
}

# Reasons that mean a GPU already loses work to heat or to the power brake: a new pod there runs
# slower and spends more energy per unit, so placement avoids the node. SwPowerCap is not one:
# it is the cap edpilot itself sets.
BLOCKING_THROTTLE_REASONS: Final[Mapping[ThrottleReason, str]] = {
    ThrottleReason.HW_THERMAL_SLOWDOWN: "hardware thermal slowdown",
    ThrottleReason.SW_THERMAL_SLOWDOWN: "software thermal slowdown",
    ThrottleReason.HW_POWER_BRAKE_SLOWDOWN: "power-brake slowdown",
}


def throttle_reasons(mask: int) -> tuple[ThrottleReason, ...]:
    """The reasons set in an NVML clocks-event mask, in nvml.h's order."""
    return tuple(reason for reason, bit in NVML_REASON_BITS.items() if mask & bit)


def blocking_reasons(reported: Sequence[str]) -> list[str]:
    """What each blocking reason among `reported` (as a GPU status carries them) means, in words."""
    return [BLOCKING_THROTTLE_REASONS[ThrottleReason(r)] for r in reported if r in _BLOCKING_NAMES]


_BLOCKING_NAMES: Final = frozenset(r.value for r in BLOCKING_THROTTLE_REASONS)


# ---------------------------------------------------------------- pod annotations

# Written by the operator (only the operator may: an admission policy enforces it).
ANNOTATION_POLICY: Final = f"{GROUP}/policy"
ANNOTATION_POWER_CAP: Final = f"{GROUP}/power-cap-watts"
ANNOTATION_BATCH_SIZE: Final = f"{GROUP}/batch-size"
ANNOTATION_QUANTIZATION: Final = f"{GROUP}/quantization"
HINT_ANNOTATIONS: Final = (
    ANNOTATION_POLICY,
    ANNOTATION_POWER_CAP,
    ANNOTATION_BATCH_SIZE,
    ANNOTATION_QUANTIZATION,
)
# Rollout delivery, written by the operator: on a pod template (so on its pods), the configuration
# edpilot rolled out; on the owner (Deployment, StatefulSet), the template fields as they were
# before edpilot's first change.
ANNOTATION_ROLLOUT_CONFIG: Final = f"{GROUP}/rollout-config"
ANNOTATION_ORIGINAL_TEMPLATE: Final = f"{GROUP}/original-template"
# Written by the workload's owner.
ANNOTATION_EXCLUDE: Final = f"{GROUP}/exclude"
ANNOTATION_QUANTIZATION_ACCURACY: Final = f"{GROUP}/quantization-accuracy"
ANNOTATION_BATCH_SIZE_RANGE: Final = f"{GROUP}/batch-size-range"


def encode_power_cap(watts: float | None) -> str | None:
    """The power-cap hint: whole watts (None removes the annotation)."""
    return None if watts is None else f"{watts:.0f}"


def decode_power_cap(text: str | None) -> float | None:
    value = ascii_float(text.strip()) if text is not None else None
    return value if value is not None and math.isfinite(value) and value > 0 else None


def encode_batch_size(batch: int | None) -> str | None:
    return None if batch is None else str(batch)


def decode_batch_size(text: str | None) -> int | None:
    return positive_int(text.strip()) if text is not None else None


def decode_quantization(text: str | None) -> Profile | None:
    value = (text or "").strip()
    return next((p for p in PROFILES if p == value), None)


def is_excluded(annotations: Mapping[str, str]) -> bool:
    """Whether the pod's owner opted it out of every policy."""
    return annotations.get(ANNOTATION_EXCLUDE, "").strip().lower() == "true"


def parse_batch_range(text: str) -> tuple[int, int] | None:
    """`edpilot.io/batch-size-range`: "8-512" (or "8..512"), ASCII digits, 1 <= low <= high; else None."""
    low_text, sep, high_text = text.strip().replace("..", "-").partition("-")
    low, high = positive_int(low_text), positive_int(high_text)
    if not sep or low is None or high is None:
        return None
    return (low, high) if low <= high else None


def parse_accuracy(text: str) -> dict[Profile, float]:
    """`edpilot.io/quantization-accuracy`: a JSON object of profile -> relative accuracy. Raises
    ValueError with a message for the pod's owner."""
    where = f"annotation {ANNOTATION_QUANTIZATION_ACCURACY}"
    try:
        raw: Any = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err.msg} at position {err.pos}") from None
    except RecursionError:
        # A tenant writes this annotation: nesting deep enough to exhaust the parser is just bad input.
        raise ValueError(f"{where} is nested too deeply to be a table of profiles") from None
    if not isinstance(raw, dict):
        raise ValueError(f'{where} must be a JSON object like {{"bf16": 1.0, "fp8": 0.995}}')
    parsed: dict[Profile, float] = {}
    for key, value in raw.items():
        profile = next((p for p in PROFILES if p == key), None)
        if profile is None:
            raise ValueError(f"{where}: unknown profile {key!r}; expected one of {', '.join(PROFILES)}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"{where}: accuracy of {key} must be a positive number, got {value!r}")
        parsed[profile] = float(value)
    return parsed


# ---------------------------------------------------------------- GPU requests

GPU_RESOURCE: Final = "nvidia.com/gpu"


def gpu_request(pod_spec: Mapping[str, Any]) -> int:
    """GPUs a pod asks for through the device plugin: the sum over its containers (init containers
    run before them, not beside). A container's limit wins over its request, as the kubelet's
    extended resources require them equal; a quantity that is not ASCII digits counts as none
    (a tenant writes it, and `int()` would take full-width digits)."""
    total = 0
    for container in pod_spec.get("containers") or []:
        resources = container.get("resources") or {} if isinstance(container, Mapping) else {}
        amount = (resources.get("limits") or {}).get(GPU_RESOURCE) or (resources.get("requests") or {}).get(
            GPU_RESOURCE
        )
        if amount is not None:
            total += ascii_int(str(amount)) or 0
    return total


# ---------------------------------------------------------------- cap bounds


class GpuLimits(Protocol):
    """A GPU's power-limit constraints as a reader knows them (None: unknown)."""

    @property
    def member(self) -> str: ...

    @property
    def minWatts(self) -> float | None: ...

    @property
    def maxWatts(self) -> float | None: ...

    @property
    def defaultWatts(self) -> float | None: ...


@dataclass(frozen=True)
class Limits:
    """`GpuLimits` for callers that hold plain numbers (the extender's node view)."""

    member: str
    minWatts: float | None
    maxWatts: float | None
    defaultWatts: float | None


@dataclass(frozen=True)
class CapBounds:
    lo: float
    hi: float
    baseline: float  # the cap a baseline is measured at


def cap_bounds(spec: PowerCapSpec, gpu: GpuLimits) -> CapBounds | str:
    """The power limits a policy's `powerCap` allows on one GPU, or why its limit is left alone:
    inside the GPU's constraints and the policy's percent and watt bounds; Fixed is one point
    clamped to the constraints. The optimizer proposes only these, the operator re-clamps to them,
    budgets steer within them and the extender assumes their lowest."""
    lo_c, hi_c, default = gpu.minWatts, gpu.maxWatts, gpu.defaultWatts
    if lo_c is None or hi_c is None or default is None or not lo_c <= default <= hi_c:
        return (
            f"GPU {gpu.member} has unknown or inconsistent power-limit constraints: its limit is left alone"
        )
    if spec.mode == "Off":
        return f"power cap mode Off: the limit of GPU {gpu.member} is left alone"
    if spec.mode == "Fixed":
        assert spec.watts is not None  # the model's validator guarantees it
        fixed = min(max(spec.watts, lo_c), hi_c)
        return CapBounds(fixed, fixed, fixed)
    lo = max(lo_c, spec.minPercent / 100.0 * default, spec.minWatts or 0.0)
    hi = min(hi_c, spec.maxPercent / 100.0 * default, spec.maxWatts or math.inf)
    if lo > hi:
        return (
            f"the policy's power-cap bounds do not meet GPU {gpu.member}'s constraints "
            f"[{lo_c:g}, {hi_c:g}] W: its limit is left alone"
        )
    return CapBounds(lo, hi, min(default, hi))


# ---------------------------------------------------------------- committed watts


def committed_watts(
    gpus: Sequence[GPUStatus], unreported_gpus: int = 0, default_limit_watts: float = 0.0
) -> float:
    """Watts GPUs hold against a power budget now: a GPU holding pods its enforced limit (what it
    may draw), an idle one its present draw (edpilot caps per pod and cannot lower an idle GPU's
    limit). GPUs of pods bound to the node but not reported by its agent yet count at the default
    limit (where they start), taking the place of the idle GPUs that draw least."""
    busy = [g for g in gpus if g.pods]
    idle_draws = sorted(g.powerWatts for g in gpus if not g.pods)
    total = sum(g.enforcedLimitWatts for g in busy) + sum(idle_draws)
    for draw in idle_draws[:unreported_gpus]:
        total += default_limit_watts - draw
    total += max(0, unreported_gpus - len(idle_draws)) * default_limit_watts
    return total


# ---------------------------------------------------------------- conditions

MAX_CONDITION_MESSAGE: Final = 32768  # the CRDs' bound


def transition(
    previous: Sequence[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> Condition:
    """A condition whose lastTransitionTime moves only when its status changes (Kubernetes API
    conventions); a reason or message change alone keeps it."""
    before = next((c for c in previous if c.type == type_), None)
    since = before.lastTransitionTime if before is not None and before.status == status else now
    return Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message[:MAX_CONDITION_MESSAGE],
        lastTransitionTime=since,
        observedGeneration=generation,
    )


# The agent's Ready reason while it cannot tell which pod holds which GPU (the kubelet's
# pod-resources socket unreadable, or the node's pods not listed yet, as right after a restart):
# its GPUs' `pods` are then unknown, not empty.
HOLDERS_UNKNOWN: Final = "GPUAllocationsUnknown"


def holders_known(conditions: Iterable[Condition]) -> bool:
    """Whether a report's GPUs name their pods (`HOLDERS_UNKNOWN`)."""
    return not any(c.type == "Ready" and c.reason == HOLDERS_UNKNOWN for c in conditions)


# ---------------------------------------------------------------- stored optimizer states

STATE_KIND: Final = "WorkloadOptimizerState"
STATE_PLURAL: Final = "workloadoptimizerstates"
# The policy a state object belongs to, for `kubectl get wos -l edpilot.io/policy=NAME`. Label
# values hold 63 characters: a longer policy name is cut and suffixed with a hash of it.
LABEL_STATE_POLICY: Final = f"{GROUP}/policy"
_NAME_BUDGET: Final = 100  # characters of an object name, hash suffix included (253 allowed)
_UNSAFE: Final = re.compile(r"[^a-z0-9-]+")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:10]


def _readable(text: str, limit: int) -> str:
    return _UNSAFE.sub("-", text.lower())[:limit].strip("-")


def state_name(policy: str, workload: str) -> str:
    """The object name of one workload's stored state in its policy's namespace: readable where the
    names allow, always unique (a hash of both names ends it, so "a-b"/"c" and "a"/"b-c" differ)."""
    head = _readable(f"{policy}.{workload}".replace(".", "-"), _NAME_BUDGET - 11)
    return f"{head}-{_digest(policy, workload)}" if head else _digest(policy, workload)


def policy_label(policy: str) -> str:
    """The `edpilot.io/policy` label value naming `policy` (63 characters at most)."""
    if len(policy) <= 63:
        return policy
    return f"{_readable(policy, 52)}-{_digest(policy)}"


def state_object(
    namespace: str, policy: str, policy_uid: str, workload: str, state: Mapping[str, Any]
) -> dict[str, Any]:
    """The whole object holding `state` (an `OptimizerState` as JSON), owned by its EnergyPolicy so
    that the garbage collector deletes it with the policy."""
    return {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": STATE_KIND,
        "metadata": {
            "name": state_name(policy, workload),
            "namespace": namespace,
            "labels": {LABEL_STATE_POLICY: policy_label(policy)},
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/v1alpha1",
                    "kind": "EnergyPolicy",
                    "name": policy,
                    "uid": policy_uid,
                    "controller": True,
                }
            ],
        },
        "spec": {"policy": policy, "workload": workload, "state": dict(state)},
    }


@dataclass(frozen=True)
class StoredState:
    """One state object as read back: which policy and workload it claims, and its state body."""

    name: str
    policy: str
    workload: str
    state: Mapping[str, Any]
    owner: str = ""  # the UID its ownerReference names


def stored_state(name: str, spec: Mapping[str, Any], owner: str = "") -> StoredState | None:
    """A state object's content, or None for one that does not even name a policy and a workload
    (its state body is checked by `optimizer.load_state` where it is used)."""
    policy, workload, state = spec.get("policy"), spec.get("workload"), spec.get("state")
    if not isinstance(policy, str) or not isinstance(workload, str):
        return None
    return StoredState(name, policy, workload, dict(state) if isinstance(state, Mapping) else {}, owner)


def states_of(stored: Iterable[StoredState], policy: str) -> dict[str, Mapping[str, Any]]:
    """Workload name -> state body, of the objects that belong to `policy`: an object counts only
    under the name `state_name` gives its policy and workload (a copy under another name is not
    read, and is deleted as an orphan by the operator)."""
    return {
        s.workload: s.state for s in stored if s.policy == policy and s.name == state_name(policy, s.workload)
    }
