"""Pydantic models of edpilot's custom resources (group edpilot.io, version v1alpha1).

`crds/*.yaml` is the source of truth; these models mirror it field by field and
`tests/unit/test_models_vs_crds.py` proves that the two agree (samples, defaults,
enums and bounds). Field names are the API's camelCase names.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

GROUP = "edpilot.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

Objective = Literal["Energy", "EDP", "ED2P"]
Profile = Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8", "int4-awq"]
PROFILES: tuple[Profile, ...] = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "int4-awq")
CapMode = Literal["Auto", "Fixed", "Off"]
HintMode = Literal["Auto", "Off"]
Phase = Literal["Pending", "Baseline", "Exploring", "Converged", "Drifted", "Degraded", "Conflict"]
ConditionStatus = Literal["True", "False", "Unknown"]

Percent = Annotated[float, Field(ge=0, le=100)]
Port = Annotated[int, Field(ge=1, le=65535)]

# Pod annotations and the other agreements between processes: edpilot.contract.


class ApiModel(BaseModel):
    """Base of every API model: unknown fields are errors, like the structural schema."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


# ---------------------------------------------------------------- shared pieces


class LabelSelectorRequirement(ApiModel):
    key: str = Field(min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _values_match_operator(self) -> LabelSelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError("matchExpressions values must list at least one value for operator In or NotIn")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError("matchExpressions values must be empty for operator Exists or DoesNotExist")
        return self


class LabelSelector(ApiModel):
    # Bounded like matchExpressions: every selector is evaluated against every pod of its namespace.
    matchLabels: dict[str, str] = Field(default_factory=dict, max_length=64)
    # Bounded so the API server can afford the CEL rules evaluated per requirement.
    matchExpressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=32)

    def matches(self, labels: dict[str, str]) -> bool:
        """Kubernetes label-selector semantics; an empty selector matches everything."""
        if any(labels.get(k) != v for k, v in self.matchLabels.items()):
            return False
        for req in self.matchExpressions:
            present = req.key in labels
            if req.operator == "In" and not (present and labels[req.key] in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True


def _unique_condition_types(conditions: list[Condition]) -> list[Condition]:
    """Conditions are a map keyed by type in the CRDs (x-kubernetes-list-type: map)."""
    types = [c.type for c in conditions]
    duplicates = sorted({t for t in types if types.count(t) > 1})
    if duplicates:
        raise ValueError(f"conditions list type {', '.join(duplicates)} more than once")
    return conditions


class Condition(ApiModel):
    type: str = Field(max_length=316)
    status: ConditionStatus
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field(default="", max_length=32768)
    lastTransitionTime: datetime
    observedGeneration: int | None = Field(default=None, ge=0)


Conditions = Annotated[list[Condition], AfterValidator(_unique_condition_types)]


# ---------------------------------------------------------------- EnergyPolicy


class LatencySLO(ApiModel):
    # None: the engine preset's histogram (inter-token latency for latencySLO, time to first token
    # for firstTokenSLO); required with engine custom.
    metricName: str | None = Field(default=None, min_length=1)
    quantile: float | None = Field(default=None, gt=0, lt=1)
    maxSeconds: float = Field(gt=0)


class Target(ApiModel):
    edpReductionPercent: Percent | None = None
    joulesPerUnit: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_goal(self) -> Target:
        if self.edpReductionPercent is None and self.joulesPerUnit is None:
            raise ValueError("target needs edpReductionPercent or joulesPerUnit")
        return self


class PowerCapSpec(ApiModel):
    mode: CapMode = "Auto"
    minPercent: float = Field(default=50, ge=10, le=100)
    maxPercent: float = Field(default=100, ge=10, le=100)
    minWatts: float | None = Field(default=None, gt=0)
    maxWatts: float | None = Field(default=None, gt=0)
    watts: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> PowerCapSpec:
        if self.minPercent > self.maxPercent:
            raise ValueError("powerCap.minPercent must be <= powerCap.maxPercent")
        if self.minWatts is not None and self.maxWatts is not None and self.minWatts > self.maxWatts:
            raise ValueError("powerCap.minWatts must be <= powerCap.maxWatts")
        if self.mode == "Fixed" and self.watts is None:
            raise ValueError("powerCap.mode Fixed needs powerCap.watts")
        return self


class SmClockSpec(ApiModel):
    """Locked SM clocks: a third actuator, opt-in, for work that draws below any cap worth trying
    (small decode batches, eager engines, H200s), where a cap never binds. The optimizer locks a
    ceiling on the SM clock (NVML's locked clocks, lowest supported clock to the ceiling) and
    searches it between `minPercent` of the GPU's highest supported SM clock and the clock the
    workload runs at; the agent resets the lock whenever it would restore a default cap."""

    mode: Literal["Auto", "Off"] = "Off"
    minPercent: float = Field(default=40, ge=10, le=100)


class BatchSizeSpec(ApiModel):
    mode: HintMode = "Off"
    min: int = Field(default=8, ge=1, le=65536)
    max: int = Field(default=1024, ge=1, le=65536)
    multipleOf: int = Field(default=8, ge=1, le=1024)

    @model_validator(mode="after")
    def _bounds(self) -> BatchSizeSpec:
        if self.min > self.max:
            raise ValueError("batchSize.min must be <= batchSize.max")
        return self


class QuantizationSpec(ApiModel):
    mode: HintMode = "Off"
    allowed: list[Profile] = Field(default_factory=list, max_length=7)
    maxAccuracyDropPercent: Percent = 1.0

    @model_validator(mode="after")
    def _allowed(self) -> QuantizationSpec:
        if self.mode == "Auto" and not self.allowed:
            raise ValueError("quantization.mode Auto needs at least one allowed profile")
        if len(set(self.allowed)) != len(self.allowed):
            raise ValueError("quantization.allowed lists a profile twice")
        return self


MetricName = Annotated[str, Field(pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")]
Engine = Literal["vllm", "sglang", "custom"]


class EnginePreset(BaseModel):
    """The metric names a serving engine really exports (checked against its documentation and
    source, and tested against expositions in its format: tests/agent/fixtures)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefix: str
    work: str  # generated tokens
    latency: str  # inter-token latency histogram
    firstToken: str  # time-to-first-token histogram
    running: str  # gauge: requests in the running batch
    waiting: str  # gauge: requests queued for a slot
    finished: str  # counter: requests finished
    batchArg: str  # the start-up argument that limits the sequences in flight


ENGINE_PRESETS: dict[str, EnginePreset] = {
    # vLLM v1 engine (prometheus_client appends _total to its counters).
    "vllm": EnginePreset(
        prefix="vllm:",
        work="vllm:generation_tokens_total",
        latency="vllm:inter_token_latency_seconds",
        firstToken="vllm:time_to_first_token_seconds",
        running="vllm:num_requests_running",
        waiting="vllm:num_requests_waiting",
        finished="vllm:request_success_total",
        batchArg="--max-num-seqs",
    ),
    # SGLang with --enable-metrics; num_requests_total counts requests as they finish.
    "sglang": EnginePreset(
        prefix="sglang:",
        work="sglang:generation_tokens_total",
        latency="sglang:inter_token_latency_seconds",
        firstToken="sglang:time_to_first_token_seconds",
        running="sglang:num_running_reqs",
        waiting="sglang:num_queue_reqs",
        finished="sglang:num_requests_total",
        batchArg="--max-running-requests",
    ),
}
# `workMetric.load` of a custom engine falls back to vLLM's names (as before presets existed).
CUSTOM_LOAD_FALLBACK = ENGINE_PRESETS["vllm"]


class LoadMetrics(ApiModel):
    """A serving engine's load: requests in flight, waiting for a slot, finished. A name left
    out comes from the engine preset (vLLM's names for engine custom)."""

    running: MetricName | None = None
    waiting: MetricName | None = None
    finished: MetricName | None = None


class WorkMetric(ApiModel):
    port: Port = 9400
    path: str = Field(default="/metrics", pattern=r"^/")
    # vllm or sglang fill every metric name below (and the SLOs') with the engine's own; a name
    # given explicitly wins. custom: the names are the policy's, and `name` is required.
    engine: Engine = "custom"
    name: str | None = Field(default=None, min_length=1, pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
    # None: tokens for an engine preset, units otherwise.
    unit: str | None = Field(default=None, min_length=1, max_length=32)
    configMetric: str = Field(default="edpilot_workload_config_info", pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
    load: LoadMetrics | None = None

    @property
    def preset(self) -> EnginePreset | None:
        return ENGINE_PRESETS.get(self.engine)

    @model_validator(mode="after")
    def _names(self) -> WorkMetric:
        if self.engine == "custom" and self.name is None:
            raise ValueError(
                "workMetric.name is required unless workMetric.engine names a preset (vllm, sglang)"
            )
        load = self.load or LoadMetrics()
        for field_name, value in (
            ("name", self.name),
            ("load.running", load.running),
            ("load.waiting", load.waiting),
            ("load.finished", load.finished),
        ):
            _check_engine_prefix(self.engine, f"workMetric.{field_name}", value)
        return self


def _check_engine_prefix(engine: str, where: str, name: str | None) -> None:
    """An explicit name with another preset engine's prefix is a mistake nobody means."""
    for other, preset in ENGINE_PRESETS.items():
        if (
            engine in ENGINE_PRESETS
            and other != engine
            and name is not None
            and name.startswith(preset.prefix)
        ):
            raise ValueError(
                f"{where} names {other}'s metric {name} but workMetric.engine is {engine}: leave it out to "
                f"take {engine}'s, or set engine custom"
            )


@dataclass(frozen=True)
class ResolvedMetrics:
    """Every metric name a policy's workloads are read by, after the engine preset is applied."""

    work: str
    unit: str
    latency: str | None
    firstToken: str | None
    running: str | None
    waiting: str | None
    finished: str | None


DeliveryMode = Literal["Live", "Rollout"]
EnvName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")]
ArgFlag = Annotated[str, Field(min_length=2, max_length=128, pattern=r"^--?[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class EnvVar(ApiModel):
    name: EnvName
    value: str = Field(default="", max_length=4096)


class BatchDelivery(ApiModel):
    """Where the batch limit goes in the pod template: an argument flag, or an env variable."""

    arg: ArgFlag | None = None
    env: EnvName | None = None

    @model_validator(mode="after")
    def _one_place(self) -> BatchDelivery:
        if (self.arg is None) == (self.env is None):
            raise ValueError("delivery.batchSize needs exactly one of arg and env")
        return self


class ProfileDelivery(ApiModel):
    """What a quantization profile changes in the pod template: arguments, env, an image."""

    profile: Profile
    args: list[Annotated[str, Field(max_length=1024)]] = Field(default_factory=list, max_length=32)
    env: list[EnvVar] = Field(default_factory=list, max_length=32)
    image: str | None = Field(default=None, min_length=1, max_length=1024)


class DeliverySpec(ApiModel):
    """How batch-size and quantization hints reach the pods: Live (the pod annotations, re-read by
    the workload) or Rollout (the owning Deployment's or StatefulSet's pod template)."""

    mode: DeliveryMode = "Live"
    container: str | None = Field(default=None, min_length=1, max_length=63)
    batchSize: BatchDelivery | None = None
    quantization: list[ProfileDelivery] = Field(default_factory=list, max_length=7)
    readyTimeoutSeconds: int = Field(default=600, ge=10, le=86400)
    maxRollouts: int = Field(default=4, ge=1, le=64)

    @model_validator(mode="after")
    def _profiles_once(self) -> DeliverySpec:
        profiles = [p.profile for p in self.quantization]
        if len(set(profiles)) != len(profiles):
            raise ValueError("delivery.quantization lists a profile twice")
        return self


class EnergyPolicySpec(ApiModel):
    selector: LabelSelector
    priority: int = Field(default=0, ge=-1000, le=1000)
    objective: Objective = "EDP"
    maxSlowdownPercent: float = Field(default=10, ge=0, le=90)
    latencySLO: LatencySLO | None = None
    firstTokenSLO: LatencySLO | None = None
    target: Target | None = None
    powerCap: PowerCapSpec = Field(default_factory=PowerCapSpec)
    smClock: SmClockSpec = Field(default_factory=SmClockSpec)
    batchSize: BatchSizeSpec = Field(default_factory=BatchSizeSpec)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    workMetric: WorkMetric
    groupByLabel: str | None = Field(default=None, min_length=1, max_length=316)
    delivery: DeliverySpec = Field(default_factory=DeliverySpec)

    @model_validator(mode="after")
    def _load_driven_needs_a_latency(self) -> EnergyPolicySpec:
        if self.load_driven and self.latencySLO is None:
            raise ValueError(
                "workMetric.load or an engine preset makes the workloads load-driven (serving), whose "
                "slowdown is measured on their latency: set latencySLO too"
            )
        engine = self.workMetric.engine
        for where, slo in (("latencySLO", self.latencySLO), ("firstTokenSLO", self.firstTokenSLO)):
            if slo is None:
                continue
            if engine == "custom" and slo.metricName is None:
                raise ValueError(
                    f"{where}.metricName is required unless workMetric.engine names a preset (vllm, sglang)"
                )
            _check_engine_prefix(engine, f"{where}.metricName", slo.metricName)
        if self.delivery.mode == "Rollout":
            if self.batchSize.mode == "Auto" and self.rollout_batch is None:
                raise ValueError(
                    "delivery.mode Rollout with batchSize.mode Auto needs delivery.batchSize (the argument or "
                    "env variable of the batch limit) unless workMetric.engine names a preset"
                )
            delivered = {p.profile for p in self.delivery.quantization}
            missing = [p for p in self.quantization.allowed if p not in delivered]
            if self.quantization.mode == "Auto" and missing:
                raise ValueError(
                    "delivery.mode Rollout with quantization.mode Auto needs a delivery.quantization entry "
                    f"for every allowed profile; missing: {', '.join(missing)}"
                )
        return self

    @property
    def rollout_batch(self) -> BatchDelivery | None:
        """Where a rollout puts the batch limit: the policy's choice, else the engine's argument."""
        preset = self.workMetric.preset
        if self.delivery.batchSize is not None:
            return self.delivery.batchSize
        return BatchDelivery(arg=preset.batchArg) if preset is not None else None

    @property
    def load_driven(self) -> bool:
        """Serving engines under offered load: demand, not the configuration, sets the work rate."""
        return self.workMetric.load is not None or self.workMetric.preset is not None

    def metrics(self) -> ResolvedMetrics:
        """The names the agent reads: explicit ones, else the engine preset's."""
        wm, preset = self.workMetric, self.workMetric.preset
        load_names = preset or CUSTOM_LOAD_FALLBACK
        load = wm.load or LoadMetrics()
        driven = self.load_driven
        work = wm.name or (preset.work if preset else None)
        assert work is not None  # the validator requires a name for engine custom
        return ResolvedMetrics(
            work=work,
            unit=wm.unit or ("tokens" if preset else "units"),
            latency=_slo_name(self.latencySLO, preset.latency if preset else None),
            firstToken=_slo_name(self.firstTokenSLO, preset.firstToken if preset else None),
            running=(load.running or load_names.running) if driven else None,
            waiting=(load.waiting or load_names.waiting) if driven else None,
            finished=(load.finished or load_names.finished) if driven else None,
        )


def _slo_name(slo: LatencySLO | None, preset: str | None) -> str | None:
    return None if slo is None else slo.metricName or preset


class Measurement(ApiModel):
    """Efficiency of one configuration, per unit of work."""

    joulesPerUnit: float = Field(ge=0)
    secondsPerUnit: float = Field(ge=0)
    edp: float = Field(ge=0)
    unitsPerSecond: float = Field(ge=0)


class RolloutStatus(ApiModel):
    """Delivery by rollout: the owner whose pod template carries the workload's configuration."""

    owner: str = Field(min_length=1, max_length=320)  # "Deployment/name" or "StatefulSet/name"
    config: str = Field(default="", max_length=256)  # what the template carries now
    previous: str = Field(default="", max_length=256)  # what it carried before the last change
    startedAt: datetime | None = None  # the last change; None when none is in flight
    readyReplicas: int = Field(default=0, ge=0)
    replicas: int = Field(default=0, ge=0)


class WorkloadFigures(ApiModel):
    """The status row model: what the optimizer decides about one workload and every reader shows
    (the policy's status row, `edpilot report`'s rows). Defined once; `edpilot.contract` names it."""

    phase: Phase = "Pending"
    powerCapWatts: float | None = None
    smClockMHz: float | None = None  # the locked SM clock ceiling; None: not locked
    batchSize: int | None = None
    quantization: Profile | None = None
    baseline: Measurement | None = None
    current: Measurement | None = None
    edpReductionPercent: float | None = None
    slowdownPercent: float | None = None
    energySavedJoules: float = Field(default=0, ge=0)
    probes: int = Field(default=0, ge=0)
    # The slowdown limit's noise margin at the most windows (None before a baseline): a limit at
    # or below it cannot be told from noise, so no cap is probed.
    noiseMarginPercent: float | None = Field(default=None, ge=0)
    message: str = ""


class WorkloadStatus(WorkloadFigures):
    """One workload's row in `EnergyPolicy.status.workloads`: its figures and where it runs."""

    name: str
    pods: list[str] = Field(default_factory=list)
    nodes: list[str] = Field(default_factory=list)
    gpus: int = Field(default=0, ge=0)
    # Delivery by rollout (the operator's, not the optimizer's figures).
    rollouts: int = Field(default=0, ge=0)
    rollout: RolloutStatus | None = None
    # Where operators before per-workload WorkloadOptimizerState objects kept the whole state: read
    # once to migrate it to its object, never written.
    optimizer: dict[str, object] | None = None


class PolicyTotals(ApiModel):
    workloads: int = Field(default=0, ge=0)
    gpus: int = Field(default=0, ge=0)
    energySavedJoules: float = Field(default=0, ge=0)
    energySavedKWh: float = Field(default=0, ge=0)
    averageEdpReductionPercent: float | None = None


class EnergyPolicyStatus(ApiModel):
    observedGeneration: int | None = None
    conditions: Conditions = Field(default_factory=list)
    workloads: list[WorkloadStatus] = Field(default_factory=list)
    totals: PolicyTotals = Field(default_factory=PolicyTotals)
    # When the running figures (measurements, reductions, energy saved) were computed: they are
    # written at most once a minute while nothing else in the status changes.
    figuresTime: datetime | None = None


class ObjectMeta(BaseModel):
    """The parts of metadata edpilot reads; everything else is kept as is."""

    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class EnergyPolicy(ApiModel):
    apiVersion: Literal["edpilot.io/v1alpha1"] = API_VERSION  # type: ignore[assignment]
    kind: Literal["EnergyPolicy"] = "EnergyPolicy"
    metadata: ObjectMeta
    spec: EnergyPolicySpec
    status: EnergyPolicyStatus | None = None


# ---------------------------------------------------------------- GPUNodeReport


class DesiredPowerLimit(ApiModel):
    gpuUUID: str = Field(min_length=1)
    watts: float = Field(gt=0)
    pod: str = Field(min_length=1, description="namespace/name of the pod the cap is for")


class DesiredLockedClock(ApiModel):
    """A ceiling on one GPU's SM clock: the agent locks its clocks to [lowest supported, maxMHz]."""

    gpuUUID: str = Field(min_length=1)
    maxMHz: float = Field(gt=0, le=10000)
    pod: str = Field(min_length=1, description="namespace/name of the pod the lock is for")


class MeasuredWorkload(ApiModel):
    """A pod whose work counter the agent must scrape, and where it is."""

    namespace: str = Field(min_length=1)
    pod: str = Field(min_length=1)
    port: Port = 9400
    path: str = Field(default="/metrics", pattern=r"^/")
    metricName: str = Field(min_length=1)
    unit: str = "units"
    configMetric: str = "edpilot_workload_config_info"
    latencyMetric: str | None = None
    latencyQuantile: float | None = Field(default=None, gt=0, lt=1)
    firstTokenMetric: str | None = None
    firstTokenQuantile: float | None = Field(default=None, gt=0, lt=1)
    runningMetric: str | None = None
    waitingMetric: str | None = None
    finishedMetric: str | None = None

    @classmethod
    def of_policy(cls, namespace: str, pod: str, spec: EnergyPolicySpec) -> MeasuredWorkload:
        """What the agent must scrape from a pod the policy governs: its work counter, the
        latencies its SLOs name and, for serving engines, their load."""
        metric, slo, first, names = spec.workMetric, spec.latencySLO, spec.firstTokenSLO, spec.metrics()
        return cls(
            namespace=namespace,
            pod=pod,
            port=metric.port,
            path=metric.path,
            metricName=names.work,
            unit=names.unit,
            configMetric=metric.configMetric,
            latencyMetric=names.latency,
            latencyQuantile=slo.quantile if slo else None,
            firstTokenMetric=names.firstToken,
            firstTokenQuantile=first.quantile if first else None,
            runningMetric=names.running,
            waitingMetric=names.waiting,
            finishedMetric=names.finished,
        )


class Lease(ApiModel):
    """The operator's liveness as the agent judges it: its coordination.k8s.io Lease (named by
    `GPUNodeReportSpec.operatorLease`) mapped to these fields, or a spec's embedded lease."""

    holderIdentity: str = ""
    renewTime: datetime
    leaseSeconds: int = Field(default=60, ge=5, le=3600)


class LeaseRef(ApiModel):
    """Where the operator's one coordination.k8s.io/v1 Lease is (in the operator's namespace)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    namespace: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=253)


class GPUNodeReportSpec(ApiModel):
    powerLimits: list[DesiredPowerLimit] = Field(default_factory=list)
    lockedClocks: list[DesiredLockedClock] = Field(default_factory=list)
    workloads: list[MeasuredWorkload] = Field(default_factory=list)
    # The operator's liveness: the one Lease it renews for every node. An operator before it
    # renewed `lease` in each spec instead; an agent still honours that where no ref is set.
    operatorLease: LeaseRef | None = None
    lease: Lease | None = None
    reportIntervalSeconds: int = Field(default=60, ge=1, le=3600)


class GPUStatus(ApiModel):
    index: int = Field(ge=0)
    uuid: str
    model: str
    migEnabled: bool = False
    minLimitWatts: float = Field(ge=0)
    maxLimitWatts: float = Field(ge=0)
    defaultLimitWatts: float = Field(ge=0)
    enforcedLimitWatts: float = Field(ge=0)
    powerWatts: float = Field(ge=0)
    energyJoules: float = Field(ge=0)
    energySource: Literal["counter", "sampled"] = "counter"
    utilizationPercent: float = Field(default=0, ge=0, le=100)
    smClockMHz: float = Field(default=0, ge=0)
    memClockMHz: float = Field(default=0, ge=0)
    # The GPU's supported SM clocks (0: unknown, and the GPU's clocks are never locked) and the
    # ceiling the agent has locked them to (None: not locked by edpilot).
    minSmClockMHz: float = Field(default=0, ge=0)
    maxSmClockMHz: float = Field(default=0, ge=0)
    lockedSmClockMHz: float | None = Field(default=None, gt=0)
    temperatureC: float = 0
    throttleReasons: list[str] = Field(default_factory=list)
    pods: list[str] = Field(default_factory=list)
    # Handed out as a shareable device (time-slicing or MPS replicas, a DRA share or partition):
    # never capped, whoever holds it now (edpilot.sharing).
    shared: bool = False


class WorkloadSample(ApiModel):
    namespace: str
    pod: str
    gpuUUIDs: list[str] = Field(default_factory=list)
    workUnits: float = Field(ge=0, description="cumulative, resets folded in by the agent")
    unit: str = "units"
    batchSize: int | None = Field(default=None, ge=1)
    quantization: Profile | None = None
    latencySeconds: float | None = Field(default=None, ge=0)
    firstTokenSeconds: float | None = Field(default=None, ge=0)
    requestsRunning: float | None = Field(default=None, ge=0)
    requestsWaiting: float | None = Field(default=None, ge=0)
    requestsFinished: float | None = Field(default=None, ge=0)
    counterResets: int = Field(default=0, ge=0)
    healthy: bool = True
    message: str = ""


class GPUNodeReportStatus(ApiModel):
    nodeName: str = Field(max_length=253)
    agentVersion: str
    backend: Literal["nvml", "sim"]
    time: datetime
    counterTime: datetime | None = None
    gpus: list[GPUStatus] = Field(default_factory=list)
    workloads: list[WorkloadSample] = Field(default_factory=list)
    conditions: Conditions = Field(default_factory=list)


class GPUNodeReport(ApiModel):
    apiVersion: Literal["edpilot.io/v1alpha1"] = API_VERSION  # type: ignore[assignment]
    kind: Literal["GPUNodeReport"] = "GPUNodeReport"
    metadata: ObjectMeta
    spec: GPUNodeReportSpec = Field(default_factory=GPUNodeReportSpec)
    status: GPUNodeReportStatus | None = None

    @model_validator(mode="after")
    def _named_after_its_node(self) -> GPUNodeReport:
        if self.status is not None and self.status.nodeName != self.metadata.name:
            raise ValueError("status.nodeName must equal metadata.name (a report is named after its node)")
        return self


# ---------------------------------------------------------------- PowerBudget


BudgetScope = Literal["Governed", "AllGPUs"]


class PowerBudgetSpec(ApiModel):
    nodeSelector: LabelSelector
    maxWatts: float = Field(gt=0, le=100_000_000)
    # Governed: steer only GPUs an Auto policy governs; AllGPUs: every busy GPU of the nodes.
    scope: BudgetScope = "Governed"


class BudgetAllocation(ApiModel):
    """The power limit a PowerBudget allows one governed GPU (the operator caps it at most here)."""

    node: str = Field(min_length=1, max_length=253)
    gpuUUID: str = Field(min_length=1, max_length=128)
    watts: float = Field(gt=0, le=100_000)


class PowerBudgetStatus(ApiModel):
    observedGeneration: int | None = None
    allocatedWatts: float = Field(default=0, ge=0)
    measuredWatts: float = Field(default=0, ge=0)
    headroomWatts: float = 0
    gpus: int = Field(default=0, ge=0)
    nodes: list[str] = Field(default_factory=list)
    conditions: Conditions = Field(default_factory=list)
    # Persisted so a restarted operator keeps the caps from its first report on.
    allocations: list[BudgetAllocation] = Field(default_factory=list, max_length=4096)


class PowerBudget(ApiModel):
    apiVersion: Literal["edpilot.io/v1alpha1"] = API_VERSION  # type: ignore[assignment]
    kind: Literal["PowerBudget"] = "PowerBudget"
    metadata: ObjectMeta
    spec: PowerBudgetSpec
    status: PowerBudgetStatus | None = None


# ---------------------------------------------------------------- WorkloadOptimizerState


class WorkloadOptimizerStateSpec(ApiModel):
    """One workload's optimizer state, kept by the operator so that a restarted operator resumes
    where it was (`edpilot.optimizer.OptimizerState`, read through `load_state`)."""

    policy: str = Field(min_length=1)
    workload: str = Field(min_length=1)
    state: dict[str, object]


class WorkloadOptimizerState(ApiModel):
    apiVersion: Literal["edpilot.io/v1alpha1"] = API_VERSION  # type: ignore[assignment]
    kind: Literal["WorkloadOptimizerState"] = "WorkloadOptimizerState"
    metadata: ObjectMeta
    spec: WorkloadOptimizerStateSpec
