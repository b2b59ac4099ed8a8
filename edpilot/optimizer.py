"""The per-workload search over (quantization, batch size, power cap, SM clock), as one pure function.

`step(policy, workload, state, observation, now)` is called every time a new observation of a
workload arrives. It turns the observation into a window (edp.py), attributes the window to the
configuration the workload REPORTS it runs, and moves a small state machine:

    Baseline  -> Exploring (quantization -> batch size -> power cap -> SM clock -> straggler caps)
              -> Converged
    Converged -> Drifted (work rate changed beyond noise, restart, new image) -> Baseline again

Every probe is measured over enough windows to beat the noise measured at the baseline, and a
probe only replaces the best configuration so far when it is better by more than that noise and
keeps throughput within `maxSlowdownPercent` (and the latency SLO).

A policy whose work metric names a serving engine's load (`workMetric.load`) governs
load-driven workloads: demand sets their work rate, so a configuration is judged at the load it
serves. Its slowdown is the rise of the named
latency over the baseline's, its energy per unit is its power over the served load (which is
what it minimises, the latency being bounded by the SLO and the slowdown limit), and one whose
queue of waiting requests grows cannot carry the load and is never kept. A converged
serving workload that breaks its SLO falls back to its safe configuration at once; when its load
moves to another level it switches to what it found for that level before, or explores anew
(quantization only once: engines reload their weights to change it). Every decision is a function
of its inputs; the whole state is a JSON-serialisable pydantic model, so a restarted operator
resumes mid-exploration from what it stored in the policy's status.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from edpilot import edp
from edpilot.contract import CapBounds, WorkloadFigures, cap_bounds
from edpilot.edp import (
    CAP_TOLERANCE_WATTS,
    CLOCK_TOLERANCE_MHZ,
    TRANSITIONS,
    Accumulator,
    BadData,
    MemberSample,
    Metrics,
    Sample,
    Window,
    pooled_relative_std,
    significance_threshold,
    window,
    windows_to_beat_noise,
)
from edpilot.models import (
    PROFILES,
    EnergyPolicySpec,
    Measurement,
    Phase,
    PowerCapSpec,
    Profile,
    SmClockSpec,
)

Stage = Literal["quantization", "batch", "cap", "clock", "straggler"]  # in order: STAGE_ORDER
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
GOLDEN_STEP = 1.0 - GOLDEN  # a golden-section step: 38% of the interval


class Tuning(BaseModel):
    """How carefully to measure; the defaults suit reports every few seconds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    windowSeconds: float = Field(default=5.0, gt=0)
    baselineWindows: int = Field(default=5, ge=2)
    probeWindows: int = Field(default=3, ge=1)
    maxWindows: int = Field(default=12, ge=1)
    settleWindows: int = Field(default=1, ge=0)  # after a change: reloads, caches, clocks settle
    noiseK: float = Field(default=2.0, gt=0)
    noiseFloor: float = Field(default=0.02, gt=0)  # never trust a difference smaller than this
    # The slowdown limit is a promise: keep 3 standard deviations of the throughput noise from it
    # (the best-looking probe is also the one whose noise flattered its throughput most).
    slowdownNoiseK: float = Field(default=3.0, ge=0)
    # How a probe is held to that limit. "sequential": a probe whose slowdown is within the noise
    # margin of the limit, either way, is measured for more windows (up to maxWindows) before it
    # is judged (up to edgeWindows), and the margin is that of the windows it has: a probe near
    # the edge pays with time, not with the allowance. "fixed": judged after the windows sized for
    # the objective's noise, at their margin.
    slowdownTest: Literal["sequential", "fixed"] = "sequential"
    edgeWindows: int = Field(default=48, ge=1)  # the most windows a probe near the limit may take
    applyTimeoutSeconds: float = Field(default=120.0, gt=0)
    capGridWatts: float = Field(default=5.0, gt=0)
    capProbeBudget: int = Field(default=8, ge=2)
    capMarginWatts: float = Field(default=25.0, ge=0)  # above the natural draw a cap changes nothing
    # Locked SM clocks: ceilings are supported clocks (clockStepMHz apart, as on NVIDIA's GPUs),
    # searched on a coarser grid: clocks a step apart differ by less than the noise.
    clockStepMHz: float = Field(default=15.0, gt=0)
    clockGridMHz: float = Field(default=30.0, gt=0)
    clockProbeBudget: int = Field(default=8, ge=2)
    stragglerProbeBudget: int = Field(default=4, ge=1)
    waitingPowerRatio: float = Field(default=0.85, gt=0, lt=1)  # below this share of the hottest: waits
    driftWindows: int = Field(default=3, ge=1)
    driftMinPercent: float = Field(default=10.0, gt=0)
    driftHoldoffSeconds: float = Field(default=120.0, ge=0)
    degradedAfterBadWindows: int = Field(default=3, ge=1)
    # Load-driven workloads: a load level spans this relative change of the offered load, judged on
    # the mean of this many windows (a window's arrivals are Poisson: at 6 requests/s, 60 s of them
    # vary by 5%, 30 s by 7.5%, which puts a 25% step 5 and 3 standard deviations out).
    loadTolerance: float = Field(default=0.25, gt=0)
    loadWindows: int = Field(default=12, ge=1)
    # Requests waiting for a slot that a configuration may leave (or add to the queue) in a
    # window: near capacity, Poisson bursts queue a few requests for a moment under any
    # configuration; a queue past this and growing means the load is not being carried.
    queueAllowance: float = Field(default=16.0, ge=0)


DEFAULT_TUNING = Tuning()


# ---------------------------------------------------------------- inputs


class MemberInfo(BaseModel):
    """One GPU of a workload; limits are None for a GPU whose constraints are unknown, and its
    supported SM clocks None where they are unknown (its clocks are then never locked)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    member: str  # GPU UUID
    pod: str  # namespace/name
    minWatts: float | None = None
    maxWatts: float | None = None
    defaultWatts: float | None = None
    minClockMHz: float | None = None
    maxClockMHz: float | None = None


class WorkloadInfo(BaseModel):
    """What the operator knows about a workload apart from its measurements."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    members: tuple[MemberInfo, ...]
    accuracy: dict[Profile, float] = {}  # declared per profile (parse_accuracy)
    batchSize: int | None = None  # the workload's own starting hints
    quantization: Profile | None = None
    batchRange: tuple[int, int] | None = None  # edpilot.io/batch-size-range
    image: str = ""
    restarts: int = 0


class Observation(BaseModel):
    """Cumulative counters of every member at `time` (the agent's report time)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    time: float
    members: tuple[MemberSample, ...]


# ---------------------------------------------------------------- state


class Config(BaseModel):
    """A configuration the optimizer asks for. capWatts None: each member's baseline cap;
    smClockMHz None: clocks not locked; quantization or batchSize None: no hint (the workload
    runs its own)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quantization: Profile | None = None
    batchSize: int | None = None
    capWatts: float | None = None
    memberCaps: dict[str, float] = {}  # straggler-aware overrides of capWatts
    smClockMHz: float | None = None  # the locked SM clock ceiling (clamped per member)


class Probe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Stage | Literal["baseline"]
    config: Config
    metrics: Metrics | None = None
    failed: str | None = None


class LoadLevel(BaseModel):
    """A load-driven workload's choice at one level of load, kept to switch back to it cheaply.
    Levels are fixed bands of the offered load, (1 + loadTolerance) apart (`load_band`)."""

    model_config = ConfigDict(extra="forbid")

    band: int
    load: float  # offered while it was measured
    baseline: Probe
    choice: Probe


# The shape of the stored `OptimizerState`. A field added with a default that means what its
# absence meant needs no new version (old states load as they are); renaming, removing or
# reshaping a field does: bump SCHEMA_VERSION and append the step to MIGRATIONS.
SCHEMA_VERSION = 1


class OptimizerState(BaseModel):
    """Everything the optimizer remembers about one workload (stored in the policy's status).
    Read a stored one with `load_state`, which migrates it from the version it was written at."""

    model_config = ConfigDict(extra="forbid")

    schemaVersion: int = Field(default=SCHEMA_VERSION, ge=SCHEMA_VERSION, le=SCHEMA_VERSION)
    phase: Phase = "Baseline"
    stage: Stage | None = None
    exploration: int = 1
    origin: Config = Config()  # the workload's own hints, restored for every baseline
    target: Config = Config()
    targetSince: float = 0.0
    settle: int = 0
    acc: Accumulator = Accumulator()
    baseline: Probe | None = None
    incumbent: Probe | None = None  # the best configuration measured so far
    probes: list[Probe] = []
    noise: float = 0.0  # relative std of one window's objective, pooled over this exploration
    throughputNoise: float = 0.0
    windowsPerProbe: int = 3
    capBracket: tuple[float, float] | None = None
    clockBracket: tuple[float, float] | None = None
    last: Sample | None = None
    badStreak: int = 0
    lastBad: BadData | None = None
    driftStreak: int = 0
    convergedAt: float | None = None
    energySavedJoules: float = 0.0
    latencyNoise: float = 0.0
    levels: list[LoadLevel] = []  # load-driven: what each load level converged on
    heldQuantization: Profile | None = None  # load-driven: chosen once, at the first level
    requantized: bool = False  # the precision was re-checked at the batch the batch stage chose
    latencyScale: float | None = None  # load-driven: own precision's latency / the chosen one's
    band: int | None = None  # load-driven: the level being explored or held
    levelLoad: float | None = None  # load-driven: the offered load that level was measured at
    recentLoads: list[float] = []  # load-driven: the last windows' offered load while converged
    rollouts: int = 0  # delivery Rollout: changes of the owner's pod template this exploration cost


# ---------------------------------------------------------------- stored state: versions

UNVERSIONED = 0  # states stored before `schemaVersion` existed: version 1's shape, unlabelled


class StateTooNew(ValueError):
    """A stored state written by a newer optimizer (a rolling downgrade): this one cannot read it."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"stored optimizer state has schemaVersion {version}; this operator knows up to {SCHEMA_VERSION}"
        )
        self.version = version


def _label_unversioned(stored: dict[str, Any]) -> dict[str, Any]:
    """Unversioned -> 1: the shape is version 1's (a state stored before the clock stage lacks
    its fields, whose defaults mean what their absence meant); only the label is added."""
    return {**stored, "schemaVersion": 1}


# MIGRATIONS[v] turns a stored state of version v into version v + 1, as plain dicts.
MIGRATIONS: tuple[Callable[[dict[str, Any]], dict[str, Any]], ...] = (_label_unversioned,)


def stored_version(stored: Mapping[str, Any]) -> int:
    """The version a stored state was written at (UNVERSIONED without a label)."""
    if not isinstance(stored, Mapping):
        raise ValueError(f"stored optimizer state is not an object: {type(stored).__name__}")
    version = stored.get("schemaVersion", UNVERSIONED)
    if not isinstance(version, int) or isinstance(version, bool) or version < UNVERSIONED:
        raise ValueError(f"stored optimizer state has an invalid schemaVersion {version!r}")
    return version


def migrate(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored state brought to SCHEMA_VERSION, one step at a time, in order."""
    version = stored_version(stored)
    if version > SCHEMA_VERSION:
        raise StateTooNew(version)
    data = dict(stored)
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        if data.get("schemaVersion") != version + 1:
            raise RuntimeError(f"migration from schemaVersion {version} did not produce {version + 1}")
        version += 1
    return data


def load_state(stored: Mapping[str, Any]) -> OptimizerState:
    """A state read back from the policy's status. Raises StateTooNew for one written by a newer
    optimizer, ValueError (pydantic's ValidationError among them) for one that is unreadable."""
    return OptimizerState.model_validate(migrate(stored))


# ---------------------------------------------------------------- outputs


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


# Status figures: the status row model every reader shares (edpilot.contract).
Figures = WorkloadFigures


class Decision(BaseModel):
    state: OptimizerState
    phase: Phase
    capWatts: dict[str, float | None]  # per member GPU; None: leave that GPU's limit alone
    smClockMHz: dict[str, float | None] = {}  # per member GPU: the locked ceiling; None: unlocked
    batchSize: int | None  # hint to write; None: no hint
    quantization: Profile | None
    reasons: list[str]
    events: list[Event]
    figures: Figures
    objectiveReductionPercent: float | None = None
    badData: BadData | None = None


# ---------------------------------------------------------------- power-cap bounds


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _member_caps(bounds: dict[str, CapBounds | str], config: Config) -> dict[str, float | None]:
    caps: dict[str, float | None] = {}
    for member, b in bounds.items():
        if isinstance(b, str):
            caps[member] = None
            continue
        wanted = config.memberCaps.get(member, b.baseline if config.capWatts is None else config.capWatts)
        caps[member] = _clamp(wanted, b.lo, b.hi)
    return caps


def member_caps(policy: EnergyPolicySpec, workload: WorkloadInfo, config: Config) -> dict[str, float | None]:
    """The cap each member GPU gets under `config`, always inside its bounds; None: left alone."""
    return _member_caps({m.member: cap_bounds(policy.powerCap, m) for m in workload.members}, config)


def cap_for(spec: PowerCapSpec, member: MemberInfo, config: Config) -> float | None:
    """The cap one member GPU gets under `config` and the bounds of `spec`; None: left alone."""
    return _member_caps({member.member: cap_bounds(spec, member)}, config)[member.member]


ClockBounds = tuple[float, float]


def clock_bounds(
    spec: SmClockSpec, member: MemberInfo, step: float = DEFAULT_TUNING.clockStepMHz
) -> ClockBounds | None:
    """The SM clock ceilings a member GPU may be locked to under `spec`: from `minPercent` of its
    highest supported clock (rounded up to a supported step, never below its lowest) to its
    highest. None under mode Off and where its supported clocks are unknown: never locked."""
    lo, hi = member.minClockMHz, member.maxClockMHz
    if spec.mode != "Auto" or lo is None or hi is None or not 0 < lo <= hi:
        return None
    floor = math.ceil(max(lo, spec.minPercent / 100.0 * hi) / step - 1e-9) * step
    return min(floor, hi), hi


def _member_clocks(bounds: dict[str, ClockBounds | None], config: Config) -> dict[str, float | None]:
    return {
        member: None if b is None or config.smClockMHz is None else _clamp(config.smClockMHz, b[0], b[1])
        for member, b in bounds.items()
    }


def member_clocks(
    policy: EnergyPolicySpec, workload: WorkloadInfo, config: Config
) -> dict[str, float | None]:
    """The locked SM clock ceiling each member GPU gets under `config`; None: clocks unlocked."""
    return _member_clocks({m.member: clock_bounds(policy.smClock, m) for m in workload.members}, config)


def clock_for(spec: SmClockSpec, member: MemberInfo, config: Config) -> float | None:
    """The locked SM clock ceiling one member GPU gets under `config` and `spec`; None: unlocked."""
    return _member_clocks({member.member: clock_bounds(spec, member)}, config)[member.member]


@dataclass
class _Ctx:
    policy: EnergyPolicySpec
    workload: WorkloadInfo
    tuning: Tuning
    now: float
    bounds: dict[str, CapBounds | str]
    clocks: dict[str, ClockBounds | None]
    reasons: list[str]
    events: list[Event]

    @classmethod
    def of(cls, policy: EnergyPolicySpec, workload: WorkloadInfo, tuning: Tuning, now: float) -> _Ctx:
        bounds = {m.member: cap_bounds(policy.powerCap, m) for m in workload.members}
        clocks = {m.member: clock_bounds(policy.smClock, m, tuning.clockStepMHz) for m in workload.members}
        return cls(policy, workload, tuning, now, bounds, clocks, reasons=[], events=[])

    def member_caps(self, config: Config) -> dict[str, float | None]:
        return _member_caps(self.bounds, config)

    def member_clocks(self, config: Config) -> dict[str, float | None]:
        return _member_clocks(self.clocks, config)

    def known_bounds(self) -> list[CapBounds]:
        return [b for b in self.bounds.values() if not isinstance(b, str)]

    @property
    def load_driven(self) -> bool:
        return self.policy.load_driven

    @property
    def by_rollout(self) -> bool:
        """Batch size and quantization reach the pods by rolling their owner out: slow, counted."""
        return self.policy.delivery.mode == "Rollout"

    def rollout_room(self, st: OptimizerState) -> bool:
        """Can the budget pay a probe's rollout and the one back?"""
        return not self.by_rollout or st.rollouts + 2 <= self.policy.delivery.maxRollouts

    def event(self, kind: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events.append(Event(type=kind, reason=reason, message=message))
        self.reasons.append(message)


def _threshold(st: OptimizerState, t: Tuning) -> float:
    return significance_threshold(st.noise, st.windowsPerProbe, t.noiseK, t.noiseFloor)


def slowdown_percent(m: Metrics, baseline: Metrics, load_driven: bool) -> float | None:
    """How much slower `m` is than `baseline`: throughput lost, or for a load-driven workload
    (whose throughput is its demand) the rise of its latency. None when it cannot be told."""
    if not load_driven:
        return 100.0 * (1.0 - m.unitsPerSecond / baseline.unitsPerSecond)
    if m.latencySeconds is None or not baseline.latencySeconds:
        return None
    return 100.0 * (m.latencySeconds / baseline.latencySeconds - 1.0)


def _slack(m: Metrics, st: OptimizerState, ctx: _Ctx, noise_margin: bool = True) -> float:
    """Percentage points left before the slowdown limit, less the measurement noise (unless
    `noise_margin` is False: the point estimate)."""
    assert st.baseline is not None and st.baseline.metrics is not None
    margin = _slowdown_margin(m, st, ctx) if noise_margin else 0.0
    slowdown = slowdown_percent(m, st.baseline.metrics, ctx.load_driven)
    if slowdown is None:
        return -100.0  # a slowdown that cannot be checked is not within the limit
    if ctx.load_driven and st.latencyScale is not None and st.heldQuantization != st.origin.quantization:
        # This level's baseline runs the precision chosen at the first level, not the workload's
        # own: the limit is against the workload's own latency, which the first level measured.
        slowdown = 100.0 * ((1.0 + slowdown / 100.0) / st.latencyScale - 1.0)
    return ctx.policy.maxSlowdownPercent - slowdown - margin


def _slowdown_margin(m: Metrics, st: OptimizerState, ctx: _Ctx) -> float:
    """K standard deviations of the difference between `m`'s and the baseline's mean throughput
    (or latency), in percentage points, for the windows each was measured over."""
    assert st.baseline is not None and st.baseline.metrics is not None
    t = ctx.tuning
    noise = st.latencyNoise if ctx.load_driven else st.throughputNoise
    if t.slowdownTest == "fixed":
        return 100.0 * t.slowdownNoiseK * noise * math.sqrt(2.0 / max(st.windowsPerProbe, 1))
    spread = 1.0 / max(m.windows, 1) + 1.0 / max(st.baseline.metrics.windows, 1)
    return 100.0 * t.slowdownNoiseK * noise * math.sqrt(spread)


def _near_the_limit(m: Metrics, st: OptimizerState, ctx: _Ctx) -> bool:
    """Is the slowdown too close to the limit to call, with the windows measured so far?"""
    return abs(_slack(m, st, ctx, noise_margin=False)) < _slowdown_margin(m, st, ctx)


def noise_margin_percent(st: OptimizerState, ctx: _Ctx) -> float | None:
    """The smallest slowdown the search could tell from noise: the slowdown limit's noise margin
    at the most windows a probe may take. None before a baseline."""
    if st.baseline is None:
        return None
    t = ctx.tuning
    noise = st.latencyNoise if ctx.load_driven else st.throughputNoise
    return 100.0 * t.slowdownNoiseK * noise * math.sqrt(2.0 / t.maxWindows)


def _overloaded(m: Metrics, st: OptimizerState, ctx: _Ctx) -> bool:
    """Requests queue up: the configuration cannot carry the load it was offered."""
    if m.peakWaiting is None:
        return False
    normal = _normal_queue(st, ctx)
    return (m.queueGrowth or 0.0) > normal or m.peakWaiting > normal


def _violation(m: Metrics, st: OptimizerState, ctx: _Ctx) -> float:
    """How far a measurement breaks the policy's limits (0: within them). The slowdown limit is
    tightened by the measurement noise, so a kept configuration is within it with confidence."""
    policy = ctx.policy
    over = max(0.0, -_slack(m, st, ctx))
    for slo, value in ((policy.latencySLO, m.latencySeconds), (policy.firstTokenSLO, m.firstTokenSeconds)):
        if slo is None:
            continue
        if value is None:
            over += 100.0  # an SLO that cannot be checked is not met
        elif value > slo.maxSeconds:
            over += 100.0 * (value / slo.maxSeconds - 1.0)
    if (
        ctx.load_driven
        and m is not (st.baseline.metrics if st.baseline else None)
        and _overloaded(m, st, ctx)
    ):
        over += 100.0
    return over


def _key(p: Probe, st: OptimizerState, ctx: _Ctx) -> tuple[float, float]:
    if p.metrics is None:
        return (math.inf, math.inf)
    return (_violation(p.metrics, st, ctx), p.metrics.objective)


def _better(p: Probe, than: Probe, st: OptimizerState, ctx: _Ctx) -> bool:
    """Feasible, and better than `than` by more than the noise."""
    assert than.metrics is not None
    if p.metrics is None or _violation(p.metrics, st, ctx) > 0:
        return False
    return p.metrics.objective < than.metrics.objective * (1.0 - _threshold(st, ctx.tuning))


# ---------------------------------------------------------------- stages


def _stage_probes(st: OptimizerState, stage: Stage) -> list[Probe]:
    return [p for p in st.probes if p.stage == stage]


def _eligible_profiles(st: OptimizerState, ctx: _Ctx) -> list[Profile]:
    assert st.incumbent is not None
    q = ctx.policy.quantization
    accuracy = ctx.workload.accuracy
    current = st.incumbent.config.quantization
    if not accuracy:
        return []
    reference = accuracy.get(current) if current is not None else None
    if reference is None:
        reference = max(accuracy.values())
    eligible = [
        p
        for p in q.allowed
        if p != current
        and p in accuracy
        and 100.0 * (reference - accuracy[p]) / reference <= q.maxAccuracyDropPercent
    ]
    # Most accurate first: if the search is cut short, the safest profiles were tried.
    return sorted(eligible, key=lambda p: (-accuracy[p], PROFILES.index(p)))


def _quantization_probes(st: OptimizerState) -> list[Probe]:
    """The quantization probes at the incumbent's batch size (a re-check runs at a new batch)."""
    assert st.incumbent is not None
    batch = st.incumbent.config.batchSize
    return [p for p in _stage_probes(st, "quantization") if p.config.batchSize == batch]


def batch_candidates(policy: EnergyPolicySpec, workload: WorkloadInfo) -> list[int]:
    """Multiples of `multipleOf` at powers of two inside the policy's and the workload's range."""
    spec = policy.batchSize
    lo, hi = spec.min, spec.max
    if workload.batchRange is not None:
        lo, hi = max(lo, workload.batchRange[0]), min(hi, workload.batchRange[1])
    m = spec.multipleOf
    sizes = {math.ceil(2**k / m) * m for k in range(18)}
    return sorted(s for s in sizes if lo <= s <= hi)


def _stage_best(st: OptimizerState, stage: Stage, ctx: _Ctx) -> Probe:
    """The incumbent, replaced by each probe of the stage that beats the best so far beyond noise."""
    assert st.incumbent is not None
    best = st.incumbent
    for p in _stage_probes(st, stage):
        if _better(p, best, st, ctx):
            best = p
    return best


def _limit_binds(st: OptimizerState, ctx: _Ctx) -> bool:
    """Does the serving engine's sequence limit bind: do requests wait, or run close to it?"""
    assert st.incumbent is not None and st.incumbent.metrics is not None
    m, limit = st.incumbent.metrics, st.incumbent.config.batchSize
    if m.peakRunning is None or limit is None:
        return True  # no load gauges: the limit may bind, so it is searched
    return (m.peakWaiting or 0.0) > ctx.tuning.queueAllowance or m.peakRunning >= 0.9 * limit


def _next_batch(st: OptimizerState, ctx: _Ctx) -> Config | None:
    """Hill-climb over the candidates (a unimodal curve): up from the best, then down. A serving
    engine's batch knob only limits what runs: a lower limit never saves energy (the same work
    waits for fewer slots), so a load-driven workload is only probed upwards."""
    assert st.incumbent is not None and st.incumbent.config.batchSize is not None
    if not ctx.rollout_room(st):
        ctx.reasons.append("batch size: the rollout budget (delivery.maxRollouts) is spent")
        return None
    candidates = batch_candidates(ctx.policy, ctx.workload)
    if ctx.by_rollout and ctx.load_driven:
        return _batch_for_demand(st, ctx, candidates)
    probed = {st.incumbent.config.batchSize} | {p.config.batchSize for p in _stage_probes(st, "batch")}
    best = _stage_best(st, "batch", ctx).config.batchSize
    assert best is not None
    up = [c for c in candidates if c > best]
    down = [] if ctx.load_driven else [c for c in candidates if c < best]
    for neighbour in up[:1] + down[-1:]:
        if neighbour not in probed:
            return st.incumbent.config.model_copy(update={"batchSize": neighbour})
    return None


def _batch_for_demand(st: OptimizerState, ctx: _Ctx, candidates: list[int]) -> Config | None:
    """A serving engine delivered by rollout: one probe, not a climb. The running replicas already
    measured the demand for slots (requests running and waiting), so the limit that carries it is
    the smallest candidate above that (or the largest there is); every step of a climb would cost a
    rollout of its own."""
    assert st.incumbent is not None and st.incumbent.metrics is not None
    current = st.incumbent.config.batchSize or 0
    if _stage_probes(st, "batch"):
        return None
    m = st.incumbent.metrics
    demand = (m.peakRunning or 0.0) + (m.peakWaiting or 0.0)
    above = [c for c in candidates if c > current]
    enough = [c for c in above if c >= demand]
    choice = enough[0] if enough else max(above, default=None)
    return None if choice is None else st.incumbent.config.model_copy(update={"batchSize": choice})


def _cap_range(st: OptimizerState, ctx: _Ctx) -> tuple[float, float] | None:
    assert st.incumbent is not None and st.incumbent.metrics is not None
    bounds = ctx.known_bounds()
    lo, hi = min(b.lo for b in bounds), max(b.hi for b in bounds)
    natural = max(st.incumbent.metrics.wattsByMember.values(), default=hi)
    grid = ctx.tuning.capGridWatts
    hi = min(hi, math.ceil((natural + ctx.tuning.capMarginWatts) / grid) * grid)
    if hi - lo < 2 * grid:
        return None
    return lo, hi


def _clock_range(st: OptimizerState, ctx: _Ctx) -> tuple[float, float] | None:
    """From the lowest ceiling the policy allows to the clock the incumbent runs at: its lock, or
    the clock it was read at (a cap that binds holds it below the highest), else the highest."""
    assert st.incumbent is not None and st.incumbent.metrics is not None
    bounds = [b for b in ctx.clocks.values() if b is not None]
    if not bounds:
        return None
    t = ctx.tuning
    lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
    running = [c for c in (st.incumbent.metrics.smClockMHz, st.incumbent.config.smClockMHz) if c]
    if running:
        hi = min(hi, max(lo, math.floor(min(running) / t.clockStepMHz + 1e-9) * t.clockStepMHz))
    if hi - lo < 2 * t.clockGridMHz:
        return None
    return lo, hi


@dataclass(frozen=True)
class _Axis:
    """A knob the golden-section search moves along: the power cap or the SM clock ceiling. Lower
    values never speed the work up; the objective (with infeasible values worse than any feasible
    one) is unimodal along it."""

    stage: Stage
    field: Literal["capWatts", "smClockMHz"]
    bracket: Literal["capBracket", "clockBracket"]
    grid: Callable[[Tuning], float]
    budget: Callable[[Tuning], int]
    span: Callable[[OptimizerState, _Ctx], tuple[float, float] | None]

    def value(self, p: Probe) -> float | None:
        return cast(float | None, getattr(p.config, self.field))

    def of(self, p: Probe) -> float:
        return self.value(p) or 0.0

    def at(self, config: Config, x: float) -> Config:
        return config.model_copy(update={self.field: x})

    def get_bracket(self, st: OptimizerState) -> tuple[float, float] | None:
        return cast(tuple[float, float] | None, getattr(st, self.bracket))

    def set_bracket(self, st: OptimizerState, bracket: tuple[float, float] | None) -> None:
        setattr(st, self.bracket, bracket)


CAP_AXIS = _Axis(
    stage="cap",
    field="capWatts",
    bracket="capBracket",
    grid=lambda t: t.capGridWatts,
    budget=lambda t: t.capProbeBudget,
    span=_cap_range,
)
CLOCK_AXIS = _Axis(
    stage="clock",
    field="smClockMHz",
    bracket="clockBracket",
    grid=lambda t: t.clockGridMHz,
    budget=lambda t: t.clockProbeBudget,
    span=_clock_range,
)


def _snap(x: float, lo: float, hi: float, grid: float) -> float:
    return _clamp(round(x / grid) * grid, lo, hi)


def _find(probes: list[Probe], x: float, axis: _Axis, grid: float) -> Probe | None:
    """A probe at `x` or one grid step from it: snapping golden points to the grid moves them by
    a step from one bracket to the next, and values a step apart differ by less than the noise."""
    near = [p for p in probes if axis.value(p) is not None and abs(axis.of(p) - x) <= grid]
    return min(near, key=lambda p: abs(axis.of(p) - x), default=None)


def _golden(st: OptimizerState, ctx: _Ctx, axis: _Axis) -> Config | None:
    """Golden-section search along `axis`: the objective (with infeasible values worse than any
    feasible one) is unimodal along it, so each probe after the first two shrinks the bracket by
    38% — about 8 probes where a 25 W sweep of caps needs 10-20."""
    assert st.incumbent is not None
    t = ctx.tuning
    grid, budget = axis.grid(t), axis.budget(t)
    full = axis.span(st, ctx)
    if full is None:
        return None
    probes = _stage_probes(st, axis.stage)
    a, b = axis.get_bracket(st) or full
    floor = _find(probes, full[0], axis, grid)
    # One probe is kept back to pin down an optimum on an edge of the feasible range, unless the
    # lowest value, the edge that probe would most often try, was measured already.
    reserve = 1 if floor is None else 0
    while len(probes) < budget - reserve and b - a > 2 * grid:
        x1 = _snap(b - GOLDEN * (b - a), full[0], full[1], grid)
        x2 = _snap(a + GOLDEN * (b - a), full[0], full[1], grid)
        if x2 - x1 < grid / 2:
            break
        p1, p2 = _find(probes, x1, axis, grid), _find(probes, x2, axis, grid)
        if p1 is None or p2 is None:
            axis.set_bracket(st, (a, b))
            return axis.at(st.incumbent.config, x1 if p1 is None else x2)
        if _key(p1, st, ctx) <= _key(p2, st, ctx):
            if a == full[0] and floor is None and _barely_slowed(p1, st, ctx):
                # Still falling towards the lowest value with the speed barely touched: memory-bound
                # work often gains all the way down, so the floor is probed now rather than last.
                axis.set_bracket(st, (a, b))
                return axis.at(st.incumbent.config, full[0])
            if floor is not None and a == full[0] and _key(floor, st, ctx) <= _key(p1, st, ctx):
                b = x1  # the floor beats the lower golden point: the optimum lies below it
                continue
            b = x2
        else:
            a = x1
    axis.set_bracket(st, (a, b))
    return _edge_probe(st, ctx, axis, probes, full[0])


def _barely_slowed(p: Probe, st: OptimizerState, ctx: _Ctx) -> bool:
    """Within the limits, with at most a quarter of the slowdown allowance used."""
    if p.metrics is None or _violation(p.metrics, st, ctx) > 0:
        return False
    return _slack(p.metrics, st, ctx, noise_margin=False) >= 0.75 * ctx.policy.maxSlowdownPercent


def _edge(st: OptimizerState, ctx: _Ctx, axis: _Axis, probes: list[Probe], lowest: float) -> float | None:
    """Where the constrained optimum most likely sits when it is on an edge: the lowest allowed
    value (memory-bound work gains all the way down), or the value where the slowdown reaches the
    limit, interpolated between the best feasible probe and the infeasible one below it."""
    grid = axis.grid(ctx.tuning)
    measured = sorted((p for p in probes if p.metrics is not None), key=axis.of)
    best = _best_probe(st, ctx, axis, measured)
    if best is None:
        return None
    below = [p for p in measured if axis.of(p) < axis.of(best)]
    under = below[-1] if below else None
    if under is None or under.metrics is None or _violation(under.metrics, st, ctx) == 0:
        # Memory-bound work often gains all the way down, sometimes only in the last few watts.
        return lowest
    assert best.metrics is not None
    s_under, s_best = _slack(under.metrics, st, ctx), _slack(best.metrics, st, ctx)
    c_under, c_best = axis.of(under), axis.of(best)
    if s_under >= 0 or s_best <= s_under:
        return None  # the latency SLO, not the slowdown, rules the lower value out
    crossing = c_under + (0.0 - s_under) / (s_best - s_under) * (c_best - c_under)
    edge = math.ceil(crossing / grid) * grid  # round towards the feasible side
    return edge if c_under < edge <= c_best - grid else None


def _best_probe(st: OptimizerState, ctx: _Ctx, axis: _Axis, probes: list[Probe]) -> Probe | None:
    """The feasible probe with the lowest objective, judged on a least-squares parabola through
    the probes nearest the best one when there are enough: near the optimum the curve is smooth
    and its differences are as small as the noise, so the fit's average beats one noisy reading."""
    feasible = [p for p in probes if p.metrics is not None and _violation(p.metrics, st, ctx) == 0]
    if not feasible:
        return None
    best = min(feasible, key=lambda p: p.metrics.objective)  # type: ignore[union-attr]
    if len(feasible) < 4:
        return best
    near = sorted(feasible, key=lambda p: abs(axis.of(p) - axis.of(best)))[:5]
    xs = [(axis.of(p) - axis.of(best)) / 100.0 for p in near]
    ys = [p.metrics.objective / best.metrics.objective for p in near]  # type: ignore[union-attr]
    fit = _parabola(xs, ys)
    if fit is None or fit[0] <= 0:
        return best
    a, b, c = fit
    fitted = {id(p): a * x * x + b * x + c for p, x in zip(near, xs, strict=True)}
    return min(near, key=lambda p: fitted[id(p)])


def _parabola(xs: list[float], ys: list[float]) -> tuple[float, float, float] | None:
    """Least-squares y = a·x² + b·x + c (normal equations, Cramer's rule); None if degenerate."""
    s = [sum(x**k for x in xs) for k in range(5)]
    t = [sum(y * x**k for x, y in zip(xs, ys, strict=True)) for k in range(3)]
    m = [[s[4], s[3], s[2]], [s[3], s[2], s[1]], [s[2], s[1], s[0]]]

    def det(q: list[list[float]]) -> float:
        return (
            q[0][0] * (q[1][1] * q[2][2] - q[1][2] * q[2][1])
            - q[0][1] * (q[1][0] * q[2][2] - q[1][2] * q[2][0])
            + q[0][2] * (q[1][0] * q[2][1] - q[1][1] * q[2][0])
        )

    d = det(m)
    if abs(d) < 1e-12:
        return None
    solved = []
    for col in range(3):
        q = [row[:] for row in m]
        for r in range(3):
            q[r][col] = t[2 - r]
        solved.append(det(q) / d)
    return solved[0], solved[1], solved[2]


# ---------------------------------------------------------------- the power cap: a guided search

# A probe's throughput may miss the model's forecast by this much (in ln units/s, beyond its
# noise) before the model is distrusted for the next step.
MODEL_TOLERANCE = 0.05


def _throughput_fit(points: list[tuple[float, float]], draw: float) -> tuple[float, float] | None:
    """ln(throughput ratio) = -k·x^p with x = ln(draw / cap), fitted to (cap, ratio) points below
    the draw: a cap at the draw takes nothing away, and the loss grows as the cap bites deeper
    (compute-bound work loses speed almost as fast as power; memory-bound work little until the
    clock falls below what the memory needs). One point fixes k with p = 2 (the slope grows
    linearly from the draw); two or more fit both on log-log axes, p kept within [1, 4]."""
    use = [(math.log(draw / c), -math.log(r)) for c, r in points if c < 0.98 * draw and 0 < r < 0.995]
    if not use:
        return None
    if len(use) == 1:
        x, y = use[0]
        return y / x**2, 2.0
    lx, ly = [math.log(x) for x, _ in use], [math.log(y) for _, y in use]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((u - mx) ** 2 for u in lx)
    if sxx < 1e-6:
        return None
    p = _clamp(sum((u - mx) * (v - my) for u, v in zip(lx, ly, strict=True)) / sxx, 1.0, 4.0)
    return math.exp(my - p * mx), p


def _throughput_points(probes: list[Probe], base: Metrics) -> list[tuple[float, float]]:
    """(cap, throughput relative to `base`) of each measured probe: what `_throughput_fit` fits."""
    return [(CAP_AXIS.of(p), p.metrics.unitsPerSecond / base.unitsPerSecond) for p in probes if p.metrics]


def _ratio(fit: tuple[float, float], cap: float, draw: float) -> float:
    k, p = fit
    return math.exp(-k * math.log(draw / cap) ** p) if cap < draw else 1.0


def _forecast(st: OptimizerState, ctx: _Ctx, probes: list[Probe], lo: float, hi: float) -> float | None:
    """The cap the workload's own measurements predict is best, or None without a usable model.
    Under a cap that binds a GPU draws about the cap (the limit is enforced on its power), so the
    energy per unit follows from the throughput alone: the fitted throughput curve, the draw each
    member had uncapped and the policy's objective give the objective at every cap on the grid;
    caps whose forecast slowdown breaks the limit are left out."""
    assert st.incumbent is not None and st.incumbent.metrics is not None
    base = st.incumbent.metrics
    if ctx.load_driven or base.unitsPerSecond <= 0:
        return None  # demand sets a serving workload's throughput: it tells nothing about the cap
    draws = list(base.wattsByMember.values())
    draw = max(draws, default=0.0)
    fit = _throughput_fit(_throughput_points(probes, base), draw)
    if fit is None or draw <= 0:
        return None
    grid = ctx.tuning.capGridWatts
    best: tuple[float, float] | None = None
    for i in range(round((hi - lo) / grid) + 1):
        cap = lo + i * grid
        r = _ratio(fit, cap, draw)
        if 100.0 * (1.0 - r) > ctx.policy.maxSlowdownPercent:
            continue
        watts = sum(min(cap, d) for d in draws)
        value = edp.objective_value(
            ctx.policy.objective, watts / (base.unitsPerSecond * r), base.secondsPerUnit / r
        )
        if best is None or value < best[1]:
            best = (cap, value)
    return None if best is None else best[0]


def _model_trusted(st: OptimizerState, ctx: _Ctx, probes: list[Probe]) -> bool:
    """Did the model fitted before the latest probe forecast that probe's throughput? A curve
    that bends where the model does not (a memory-bound knee) makes its next forecast a guess."""
    assert st.incumbent is not None and st.incumbent.metrics is not None
    if len(probes) < 2:
        return True
    base = st.incumbent.metrics
    draw = max(base.wattsByMember.values(), default=0.0)
    *earlier, last = probes
    assert last.metrics is not None
    fit = _throughput_fit(_throughput_points(earlier, base), draw)
    if fit is None:
        return True
    noise = (
        3.0 * st.throughputNoise * math.sqrt(1.0 / max(last.metrics.windows, 1) + 1.0 / max(base.windows, 1))
    )
    forecast = math.log(_ratio(fit, CAP_AXIS.of(last), draw))
    measured = math.log(last.metrics.unitsPerSecond / base.unitsPerSecond)
    return abs(forecast - measured) <= MODEL_TOLERANCE + noise


def _next_cap(st: OptimizerState, ctx: _Ctx) -> Config | None:
    """The power cap's search: each probe goes where a model of the workload's own throughput
    against the cap puts the optimum, inside the bracket its measurements leave (the incumbent is
    the point at the top of the range: a cap above the draw changes nothing). When the model
    cannot say (no fit yet, a forecast already measured or outside the bracket, or the last probe
    missed its forecast), a golden-section step stands in, as in Brent's method: into the side of
    the bracket the model favours (else the wider), at that side's lower golden point, because
    below an optimum the objective climbs steeply (a memory-bound knee, the static power of a
    slow clock) and above it slowly. The first probe is such a step: the lower golden point of
    the whole range."""
    assert st.incumbent is not None
    axis, t = CAP_AXIS, ctx.tuning
    grid, budget = t.capGridWatts, t.capProbeBudget
    full = _cap_range(st, ctx)
    if full is None:
        return None
    lo, hi = full
    probes = _stage_probes(st, "cap")
    measured = [p for p in probes if p.metrics is not None]
    floor = _find(probes, lo, axis, grid)
    reserve = 1 if floor is None else 0  # kept back for the edge, as in `_golden`
    if len(probes) >= budget - reserve:
        return _edge_probe(st, ctx, CAP_AXIS, probes, lo)
    points = sorted([*measured, st.incumbent], key=lambda p: hi if p is st.incumbent else axis.of(p))
    i = min(range(len(points)), key=lambda k: _key(points[k], st, ctx))

    def at(k: int) -> float:
        return hi if points[k] is st.incumbent else axis.of(points[k])

    best = at(i)
    # A neighbour bounds the bracket only when it is worse beyond one sigma of the difference: on a
    # flat curve a lucky reading must not shut out the side the optimum lies on. The neighbours
    # themselves still bound the golden steps tried when the wide bracket's are measured already.
    sigma = st.noise * math.sqrt(2.0 / max(st.windowsPerProbe, 1))
    worse = [k for k in range(len(points)) if _key(points[k], st, ctx) > _worse_by(points[i], sigma, st, ctx)]
    a = max((at(k) for k in worse if k < i), default=lo)
    b = min((at(k) for k in worse if k > i), default=hi)
    st.capBracket = (a, b)
    forecast = _forecast(st, ctx, measured, lo, hi)
    if (
        forecast is not None
        and a <= forecast <= b
        and forecast < hi - grid  # at the draw a cap changes nothing
        and _find(probes, forecast, axis, grid) is None
        and _model_trusted(st, ctx, measured)
    ):
        return axis.at(st.incumbent.config, forecast)
    near_a, near_b = (at(i - 1) if i > 0 else lo), (at(i + 1) if i + 1 < len(points) else hi)
    upwards = forecast > best if forecast is not None else b - best > best - a
    for low, high in ((a, b), (near_a, near_b)):
        sides = [
            (low + GOLDEN_STEP * (best - low), best - low),
            (best + GOLDEN_STEP * (high - best), high - best),
        ]
        if upwards:
            sides.reverse()
        for x, width in sides:
            x = _snap(x, lo, hi, grid)
            if width > grid and _find(probes, x, axis, grid / 2) is None and x < hi - grid:
                return axis.at(st.incumbent.config, x)
    return _edge_probe(st, ctx, CAP_AXIS, probes, lo)


def _worse_by(p: Probe, margin: float, st: OptimizerState, ctx: _Ctx) -> tuple[float, float]:
    assert p.metrics is not None
    return (_violation(p.metrics, st, ctx), p.metrics.objective * (1.0 + margin))


def _edge_probe(
    st: OptimizerState, ctx: _Ctx, axis: _Axis, probes: list[Probe], lowest: float
) -> Config | None:
    """After the search: a probe at the optimum's likely edge (`_edge`) while the budget lasts."""
    assert st.incumbent is not None
    if len(probes) >= axis.budget(ctx.tuning):
        return None
    edge = _edge(st, ctx, axis, probes, lowest)
    if edge is None or _find(probes, edge, axis, axis.grid(ctx.tuning)) is not None:
        return None
    return axis.at(st.incumbent.config, edge)


def _waiting_members(st: OptimizerState, ctx: _Ctx) -> list[str]:
    assert st.incumbent is not None and st.incumbent.metrics is not None
    watts = st.incumbent.metrics.wattsByMember
    hottest = max(watts.values(), default=0.0)
    return sorted(
        m
        for m, w in watts.items()
        if w < ctx.tuning.waitingPowerRatio * hottest and not isinstance(ctx.bounds.get(m, ""), str)
    )


def _straggler_range(st: OptimizerState, ctx: _Ctx, waiting: list[str]) -> tuple[float, float] | None:
    assert st.incumbent is not None and st.incumbent.metrics is not None
    caps = ctx.member_caps(st.incumbent.config)
    bounds = [b for m, b in ctx.bounds.items() if m in waiting and not isinstance(b, str)]
    lo = max(b.lo for b in bounds)
    draw = max(st.incumbent.metrics.wattsByMember[m] for m in waiting)
    hi = min(
        min(c for m, c in caps.items() if m in waiting and c is not None), draw + ctx.tuning.capMarginWatts
    )
    return (lo, hi) if hi - lo >= 2 * ctx.tuning.capGridWatts else None


def _keeps_pace(p: Probe, st: OptimizerState, ctx: _Ctx) -> bool:
    """A straggler cap is judged by its own effect: it may not slow the job beyond noise against
    the configuration it changes. The incumbent already kept the slowdown limit with the noise
    margin; holding each probe to that margin again, right at the edge the cap stage left, would
    fail a probe with no effect at all about half the time. The limit itself still holds, on the
    probe's point estimate, and the latency SLOs as always."""
    assert st.incumbent is not None and st.incumbent.metrics is not None
    m = p.metrics
    if m is None or _slack(m, st, ctx, noise_margin=False) < 0:
        return False
    if _violation(m, st, ctx) > max(0.0, -_slack(m, st, ctx)):
        return False  # a latency SLO or a queue, not the slowdown margin
    floor = st.incumbent.metrics.unitsPerSecond * (1.0 - _threshold(st, ctx.tuning))
    return m.unitsPerSecond >= floor


def _next_straggler(st: OptimizerState, ctx: _Ctx) -> Config | None:
    """Bisection for the lowest common cap of the waiting members that keeps the job's pace."""
    assert st.incumbent is not None
    waiting = _waiting_members(st, ctx)
    span = _straggler_range(st, ctx, waiting) if waiting else None
    if span is None:
        return None
    t = ctx.tuning
    probes = _stage_probes(st, "straggler")
    if len(probes) >= t.stragglerProbeBudget:
        return None
    slow = [p.config.memberCaps[waiting[0]] for p in probes if not _keeps_pace(p, st, ctx)]
    fast = [p.config.memberCaps[waiting[0]] for p in probes if _keeps_pace(p, st, ctx)]
    lo, hi = span
    if not probes:
        y = math.ceil(lo / t.capGridWatts) * t.capGridWatts
    else:
        below, above = max(slow, default=None), min(fast, default=hi)
        if below is None or above - below <= 2 * t.capGridWatts:
            return None
        y = _snap((below + above) / 2, lo, hi, t.capGridWatts)
    y = _clamp(y, lo, hi)
    return st.incumbent.config.model_copy(update={"memberCaps": {m: y for m in waiting}})


def _lost_in_noise(st: OptimizerState, ctx: _Ctx, label: str, lever: str) -> str | None:
    """Why a stage that only slows work down is skipped when the slowdown limit is within the
    measurement noise: a lower cap or clock never speeds work up, so every probe would slow the
    workload and none could be shown to keep the limit. None when the limit is above the noise."""
    margin = noise_margin_percent(st, ctx)
    if margin is None or margin < ctx.policy.maxSlowdownPercent:
        return None
    return (
        f"{label}: maxSlowdownPercent {ctx.policy.maxSlowdownPercent:g}% is within the measurement "
        f"noise ({margin:.1f}% even at {ctx.tuning.maxWindows} windows a probe): no lower {lever} is probed"
    )


class _StageRules:
    """One stage of the exploration and all its transitions: why it is skipped (None: it runs),
    the next configuration it probes (None: it has none left), the probe it keeps when it ends,
    and the stages tried after it. `_advance` drives them in `STAGE_ORDER`."""

    name: Stage
    label: str  # in events

    def skipped(self, st: OptimizerState, ctx: _Ctx) -> str | None:
        raise NotImplementedError

    def next_config(self, st: OptimizerState, ctx: _Ctx) -> Config | None:
        raise NotImplementedError

    def finish(self, st: OptimizerState, ctx: _Ctx) -> Probe:
        """The configuration kept from this stage's probes (the incumbent if none beat it)."""
        return _stage_best(st, self.name, ctx)

    def then(self, st: OptimizerState, ctx: _Ctx) -> list[_StageRules]:
        """The stages tried after this one has finished, in order."""
        return _after(self)


def _after(rules: _StageRules) -> list[_StageRules]:
    return list(STAGE_ORDER[STAGE_ORDER.index(rules) + 1 :])


def _measured(st: OptimizerState, stage: Stage) -> list[Probe]:
    return [p for p in _stage_probes(st, stage) if p.metrics is not None]


class _Quantization(_StageRules):
    name, label = "quantization", "quantization"

    def skipped(self, st: OptimizerState, ctx: _Ctx) -> str | None:
        assert st.incumbent is not None
        if ctx.policy.quantization.mode != "Auto":
            return "quantization: mode Off"
        if st.incumbent.config.quantization is None:
            return "quantization: the workload does not report the profile it runs"
        if not _eligible_profiles(st, ctx):
            return "quantization: no allowed profile declares an accuracy within maxAccuracyDropPercent"
        if ctx.load_driven and st.heldQuantization is not None:
            return "quantization: chosen at the first load level (a serving engine reloads to change it)"
        return None

    def next_config(self, st: OptimizerState, ctx: _Ctx) -> Config | None:
        assert st.incumbent is not None
        if not ctx.rollout_room(st):
            ctx.reasons.append("quantization: the rollout budget (delivery.maxRollouts) is spent")
            return None
        tried = {p.config.quantization for p in _quantization_probes(st)}
        for profile in _eligible_profiles(st, ctx):
            if profile not in tried:
                return st.incumbent.config.model_copy(update={"quantization": profile})
        return None

    def finish(self, st: OptimizerState, ctx: _Ctx) -> Probe:
        assert st.incumbent is not None
        batch = st.incumbent.config.batchSize
        winners = [
            p
            for p in _measured(st, self.name)
            if p.config.batchSize == batch and _better(p, st.incumbent, st, ctx)
        ]
        if not winners:
            return st.incumbent
        best = min(winners, key=lambda p: _key(p, st, ctx))
        own, faster = st.incumbent.metrics, best.metrics
        if own is not None and faster is not None and own.latencySeconds and faster.latencySeconds:
            # How much slower the workload's own precision is, at the same cap and load.
            st.latencyScale = own.latencySeconds / faster.latencySeconds
        return best

    def then(self, st: OptimizerState, ctx: _Ctx) -> list[_StageRules]:
        # The re-check after the batch stage goes on after the batch stage, not back into it.
        return _after(BATCH) if st.requantized else _after(self)


class _Batch(_StageRules):
    name, label = "batch", "batch size"

    def skipped(self, st: OptimizerState, ctx: _Ctx) -> str | None:
        assert st.incumbent is not None
        policy = ctx.policy
        if policy.batchSize.mode != "Auto":
            return "batch size: mode Off"
        if st.incumbent.config.batchSize is None:
            return "batch size: the workload does not report the batch size it runs"
        if not batch_candidates(policy, ctx.workload):
            return "batch size: no multiple of multipleOf inside the allowed range"
        if ctx.load_driven and not _limit_binds(st, ctx):
            return "batch size: the sequence limit does not bind at this load (fewer run, none wait)"
        return None

    def next_config(self, st: OptimizerState, ctx: _Ctx) -> Config | None:
        return _next_batch(st, ctx)

    def then(self, st: OptimizerState, ctx: _Ctx) -> list[_StageRules]:
        following = super().then(st, ctx)
        return [QUANTIZATION, *following] if self._requantize(st, ctx) else following

    @staticmethod
    def _requantize(st: OptimizerState, ctx: _Ctx) -> bool:
        """Re-check the precision once when the batch search moved the batch: which precision is
        best depends on it (at small batches bytes decide, at large ones the math). Not for
        serving, where a precision change restarts the engine."""
        assert st.incumbent is not None
        if st.requantized or ctx.load_driven or st.baseline is None:
            return False
        if st.incumbent.config.batchSize == st.baseline.config.batchSize:
            return False
        st.requantized = QUANTIZATION.skipped(st, ctx) is None
        return st.requantized


def _cap_skipped(st: OptimizerState, ctx: _Ctx, stage: Stage) -> str | None:
    """Why a stage that lowers power caps (the cap, the stragglers') is skipped."""
    if ctx.policy.powerCap.mode != "Auto":
        return f"power cap: mode {ctx.policy.powerCap.mode}"
    if (lost := _lost_in_noise(st, ctx, stage, "cap")) is not None:
        return lost
    if not ctx.known_bounds() or len(ctx.known_bounds()) != len(ctx.bounds):
        return "power cap: some GPU has no usable bounds"
    return None


class _AxisStage(_StageRules):
    """A golden-section search along an axis; keeps the best probe on the fitted curve if it beats
    the incumbent beyond noise."""

    axis: _Axis

    def next_config(self, st: OptimizerState, ctx: _Ctx) -> Config | None:
        return _golden(st, ctx, self.axis)

    def finish(self, st: OptimizerState, ctx: _Ctx) -> Probe:
        assert st.incumbent is not None
        chosen = _best_probe(st, ctx, self.axis, _measured(st, self.name))
        return chosen if chosen is not None and _better(chosen, st.incumbent, st, ctx) else st.incumbent


class _Cap(_AxisStage):
    name, label, axis = "cap", "power cap", CAP_AXIS

    def next_config(self, st: OptimizerState, ctx: _Ctx) -> Config | None:
        return _next_cap(st, ctx)

    def skipped(self, st: OptimizerState, ctx: _Ctx) -> str | None:
        return _cap_skipped(st, ctx, self.name)


class _Clock(_AxisStage):
    """The SM clock ceiling, searched like the cap with the incumbent's cap kept: where the cap
    does not bind (the draw is below any cap worth trying), a locked clock still lowers power."""

    name, label, axis = "clock", "SM clock", CLOCK_AXIS

    def skipped(self, st: OptimizerState, ctx: _Ctx) -> str | None:
        if ctx.policy.smClock.mode != "Auto":
            return f"SM clock: mode {ctx.policy.smClock.mode}"
        if (lost := _lost_in_noise(st, ctx, "SM clock", "clock")) is not None:
            return lost
        if any(b is None for b in ctx.clocks.values()):
            return "SM clock: some GPU's supported clocks are unknown (or it is not held alone)"
        return None


class _Straggler(_StageRules):
    name, label = "straggler", "straggler caps"

    def skipped(self, st: OptimizerState, ctx: _Ctx) -> str | None:
        if (why := _cap_skipped(st, ctx, self.name)) is not None:
            return why
        return "straggler: a single GPU" if len(ctx.workload.members) < 2 else None

    def next_config(self, st: OptimizerState, ctx: _Ctx) -> Config | None:
        return _next_straggler(st, ctx)

    def finish(self, st: OptimizerState, ctx: _Ctx) -> Probe:
        """The lowest-objective probe that keeps the job's pace, if it beats the incumbent's
        objective beyond noise."""
        assert st.incumbent is not None and st.incumbent.metrics is not None
        pace = [p for p in _measured(st, self.name) if _keeps_pace(p, st, ctx)]
        bar = st.incumbent.metrics.objective * (1.0 - _threshold(st, ctx.tuning))
        winner = min(pace, key=lambda p: p.metrics.objective if p.metrics else math.inf, default=None)
        if winner is not None and winner.metrics is not None and winner.metrics.objective < bar:
            return winner
        return st.incumbent


QUANTIZATION, BATCH = _Quantization(), _Batch()
STAGE_ORDER: tuple[_StageRules, ...] = (QUANTIZATION, BATCH, _Cap(), _Clock(), _Straggler())
STAGE_RULES: dict[Stage, _StageRules] = {rules.name: rules for rules in STAGE_ORDER}


def _finish_stage(st: OptimizerState, rules: _StageRules, ctx: _Ctx) -> None:
    assert st.incumbent is not None
    best = rules.finish(st, ctx)
    changed = best is not st.incumbent
    st.incumbent = best
    st.capBracket = st.clockBracket = None
    ctx.event(
        "Normal",
        "ExplorationStep",
        f"{rules.label}: {_describe(best.config, ctx) if changed else 'kept ' + _describe(best.config, ctx)} "
        f"after {len(_stage_probes(st, rules.name))} probe(s)",
    )


def _describe(config: Config, ctx: _Ctx) -> str:
    caps = sorted({c for c in ctx.member_caps(config).values() if c is not None})
    clocks = sorted({c for c in ctx.member_clocks(config).values() if c is not None})
    parts = [
        f"quantization {config.quantization}" if config.quantization else "",
        f"batch {config.batchSize}" if config.batchSize else "",
        ("cap " + "/".join(f"{c:.0f}" for c in caps) + " W") if caps else "",
        ("SM clock ≤ " + "/".join(f"{c:.0f}" for c in clocks) + " MHz") if clocks else "",
    ]
    return ", ".join(p for p in parts if p) or "the workload's own configuration"


# ---------------------------------------------------------------- the state machine


def _baseline_target(st: OptimizerState, ctx: _Ctx) -> Config:
    """The workload's own hints at the baseline cap. A serving workload keeps the precision and
    any larger sequence limit its first level chose: changing the precision reloads the engine,
    and a smaller limit only takes capacity away."""
    origin = Config(quantization=st.origin.quantization, batchSize=st.origin.batchSize)
    if not ctx.load_driven:
        return origin
    batch = max((lv.choice.config.batchSize or 0 for lv in st.levels), default=0)
    if origin.batchSize is not None:
        batch = max(batch, origin.batchSize)
    return Config(quantization=st.heldQuantization or origin.quantization, batchSize=batch or None)


def _set_target(st: OptimizerState, config: Config, ctx: _Ctx) -> None:
    if config != st.target:
        st.settle = ctx.tuning.settleWindows
    if ctx.by_rollout and _template_part(config, ctx) != _template_part(st.target, ctx):
        st.rollouts += 1
    st.target = config
    st.targetSince = ctx.now
    st.acc = Accumulator()


def _template_part(config: Config, ctx: _Ctx) -> tuple[Profile | None, int | None]:
    """What of a configuration a rollout carries: the hints the policy steers."""
    q = config.quantization if ctx.policy.quantization.mode == "Auto" else None
    b = config.batchSize if ctx.policy.batchSize.mode == "Auto" else None
    return q, b


def _runs(w: Window, target: Config, ctx: _Ctx) -> bool:
    """Does the workload run the target? Only dimensions the optimizer manages are compared."""
    if ctx.policy.quantization.mode == "Auto" and target.quantization not in (None, w.config.quantization):
        return False
    if ctx.policy.batchSize.mode == "Auto" and target.batchSize not in (None, w.config.batchSize):
        return False
    reported = w.config.caps()
    for member, cap in ctx.member_caps(target).items():
        got = reported.get(member)
        if cap is not None and (got is None or abs(got - cap) > CAP_TOLERANCE_WATTS):
            return False
    if ctx.policy.smClock.mode == "Auto":
        # Both ways: a probe runs at its lock, and a baseline only once the lock is reset.
        locked = w.config.clocks()
        for member, clock in ctx.member_clocks(target).items():
            got = locked.get(member)
            if (clock is None) != (got is None):
                return False
            if clock is not None and got is not None and abs(got - clock) > CLOCK_TOLERANCE_MHZ:
                return False
    return True


def _advance(st: OptimizerState, ctx: _Ctx, abandon: bool = False) -> None:
    """Pick the next probe, finishing stages that have none left; converge after the last.
    `abandon`: the current stage ends now, whatever it has left."""
    while True:
        following: list[_StageRules] | tuple[_StageRules, ...] = STAGE_ORDER
        if st.stage is not None:
            rules = STAGE_RULES[st.stage]
            config = None if abandon else rules.next_config(st, ctx)
            abandon = False
            if config is not None:
                _set_target(st, config, ctx)
                return
            _finish_stage(st, rules, ctx)
            following = rules.then(st, ctx)
        st.stage = None
        for candidate in following:
            skipped = candidate.skipped(st, ctx)
            if skipped is None:
                st.stage = candidate.name
                break
            ctx.reasons.append(skipped)
        if st.stage is None:
            _converge(st, ctx)
            return


def _converge(st: OptimizerState, ctx: _Ctx) -> None:
    assert st.incumbent is not None
    st.phase = "Converged"
    st.stage = None
    st.convergedAt = ctx.now
    st.driftStreak = 0
    st.recentLoads = []
    if ctx.load_driven:
        _remember_level(st, ctx)
    _set_target(st, st.incumbent.config, ctx)
    ctx.event("Normal", "Converged", f"converged on {_describe(st.incumbent.config, ctx)}: {_summary(st)}")


def _summary(st: OptimizerState) -> str:
    if (
        st.baseline is None
        or st.baseline.metrics is None
        or st.incumbent is None
        or st.incumbent.metrics is None
    ):
        return "no measurement yet"
    b, c = st.baseline.metrics, st.incumbent.metrics
    if c.latencySeconds is not None and b.latencySeconds and c.arrivalRate is not None:
        change = f"latency {100 * (c.latencySeconds / b.latencySeconds - 1):+.1f}% at the load served"
    else:
        change = f"throughput {100 * (c.unitsPerSecond / b.unitsPerSecond - 1):+.1f}%"
    return f"objective {100 * (1 - c.objective / b.objective):.1f}% lower than baseline, {change}"


def _rebaseline(st: OptimizerState, ctx: _Ctx, why: str) -> None:
    if st.phase in ("Exploring", "Converged"):
        ctx.event("Normal", "DriftDetected", f"{why}: measuring a new baseline and exploring again")
        st.phase = "Drifted"
        st.exploration += 1
    st.stage = None
    st.baseline = st.incumbent = None
    st.probes = []
    st.capBracket = st.clockBracket = None
    st.driftStreak = 0
    st.convergedAt = None
    st.band = st.levelLoad = None
    st.recentLoads = []
    st.requantized = False
    st.rollouts = 0
    _set_target(st, _baseline_target(st, ctx), ctx)


def _measure(st: OptimizerState, w: Window, ctx: _Ctx) -> None:
    t = ctx.tuning
    if not _runs(w, st.target, ctx):
        waited = ctx.now - st.targetSince
        if waited <= t.applyTimeoutSeconds:
            ctx.reasons.append(
                f"waiting for the workload to run {_describe(st.target, ctx)} ({waited:.0f} s)"
            )
        elif st.phase in ("Baseline", "Drifted"):
            if st.target.quantization is not None or st.target.batchSize is not None:
                ctx.reasons.append("the workload did not apply its own hints: measuring what it runs")
                _set_target(st, Config(), ctx)
            else:
                ctx.reasons.append("waiting for the baseline power limit to be applied")
        else:
            failed = Probe(stage=st.stage or "cap", config=st.target, failed="hint not applied in time")
            st.probes = [*st.probes, failed]
            ctx.event(
                "Warning", "ProbeFailed", f"the workload did not run {_describe(st.target, ctx)} in time"
            )
            _advance(st, ctx)
        return
    if ctx.load_driven and _draining(w, st, ctx):
        # A backlog (after a reload, or a burst) is being served, and its requests keep the batch
        # large and their first tokens late a while after the queue is empty: neither is this
        # configuration's steady state.
        st.settle = max(st.settle, 1)
        ctx.reasons.append("serving a backlog of waiting requests: the window is not measured")
        return
    if st.settle > 0:
        st.settle -= 1
        return
    st.acc = st.acc.add(w, ctx.policy.objective)
    if st.phase in ("Baseline", "Drifted"):
        if st.acc.windows < t.baselineWindows:
            return
        metrics = st.acc.metrics(ctx.policy.objective, _served_load(st, ctx))
        needed = windows_to_beat_noise(metrics.noise, t.noiseK, t.noiseFloor, t.baselineWindows, t.maxWindows)
        if t.slowdownTest == "sequential":
            # Every slowdown is a difference from the baseline's mean: its noise counts in every
            # margin, and the baseline costs nothing to measure longer.
            needed = t.maxWindows
        if st.acc.windows < needed:
            return
        if ctx.load_driven and _load_stepped(st.acc.loads, t):
            # A baseline straddling a load step belongs to neither level.
            st.acc = Accumulator()
            ctx.reasons.append("the load changed while the baseline was measured: measuring it again")
            return
        config = Config(quantization=st.acc.quantization, batchSize=st.acc.batchSize)
        st.baseline = st.incumbent = Probe(stage="baseline", config=config, metrics=metrics)
        if ctx.load_driven:
            st.levelLoad = offered_load(metrics)
            st.band = load_band(st.levelLoad, t)
        _update_noise(st, t)
        st.phase = "Exploring"
        st.stage = None
        ctx.event(
            "Normal",
            "BaselineMeasured",
            f"baseline {_describe(config, ctx)}: {metrics.joulesPerUnit:.4g} J/unit, "
            f"{metrics.unitsPerSecond:.4g} units/s, noise {100 * metrics.noise:.1f}% over {metrics.windows} windows",
        )
        _advance(st, ctx)
        return
    breach = _breach(w, st, ctx) if ctx.load_driven else None
    if breach is not None:
        # A probe that cannot carry the load is stopped at once, not measured to the end.
        metrics = st.acc.metrics(ctx.policy.objective, _served_load(st, ctx))
        st.probes = [
            *st.probes,
            Probe(stage=st.stage or "cap", config=st.target, metrics=metrics, failed=breach),
        ]
        ctx.event("Warning", "ProbeFailed", f"{_describe(st.target, ctx)}: {breach}")
        _advance(st, ctx)
        return
    if st.acc.windows < st.windowsPerProbe:
        return
    metrics = st.acc.metrics(ctx.policy.objective, _served_load(st, ctx))
    if (
        t.slowdownTest == "sequential"
        and st.acc.windows < t.edgeWindows
        and _near_the_limit(metrics, st, ctx)
    ):
        ctx.reasons.append(f"{_describe(st.target, ctx)} is near the slowdown limit: measuring more windows")
        return
    # A probe's few windows carry more arrival noise than the baseline's: half a tolerance more.
    if ctx.load_driven and not _same_level(offered_load(metrics), st, ctx, slack=1.5):
        _rebaseline(
            st, ctx, f"the load moved to {_load_text(offered_load(metrics), metrics)} during the exploration"
        )
        return
    st.probes = [*st.probes, Probe(stage=st.stage or "cap", config=st.target, metrics=metrics)]
    _update_noise(st, t)
    _advance(st, ctx)


def _served_load(st: OptimizerState, ctx: _Ctx) -> float | None:
    """The load a load-driven workload's configurations are compared at: its baseline's (the
    baseline itself: its own); None for workloads whose configuration sets their work rate."""
    if not ctx.load_driven:
        return None
    if st.baseline is not None and st.baseline.metrics is not None:
        return st.baseline.metrics.unitsPerSecond
    return st.acc.units / st.acc.seconds if st.acc.seconds > 0 else None


def _load_stepped(loads: list[float], t: Tuning) -> bool:
    """Did the offered load move by more than a level between the two halves of these windows?"""
    half = len(loads) // 2
    if half == 0:
        return False
    first, second = statistics.median(loads[:half]), statistics.median(loads[half:])
    return first > 0 and second > 0 and abs(math.log(second / first)) > math.log1p(t.loadTolerance)


def offered_load(m: Metrics) -> float:
    """What a load-driven workload is offered: requests per second where the engine reports them,
    else the units per second it serves."""
    return m.arrivalRate if m.arrivalRate is not None else m.unitsPerSecond


def _window_load(w: Window) -> float:
    return w.arrivals / w.seconds if w.arrivals is not None else w.unitsPerSecond


def _load_text(load: float, m: Metrics | Window) -> str:
    unit = (
        "requests/s" if (m.arrivalRate if isinstance(m, Metrics) else m.arrivals) is not None else "units/s"
    )
    return f"{load:.4g} {unit}"


def load_band(load: float, t: Tuning) -> int:
    """The level an offered load belongs to: bands centred on powers of (1 + loadTolerance)."""
    return round(math.log(max(load, 1e-9)) / math.log1p(t.loadTolerance))


def _same_level(load: float, st: OptimizerState, ctx: _Ctx, slack: float = 1.0) -> bool:
    """Is `load` within `slack` tolerances of the load the current level was measured at?"""
    if st.levelLoad is None or st.levelLoad <= 0:
        return True
    return abs(math.log(max(load, 1e-9) / st.levelLoad)) <= slack * math.log1p(ctx.tuning.loadTolerance)


def _normal_queue(st: OptimizerState, ctx: _Ctx) -> float:
    """Requests that may wait at this load: the allowance, or twice the queue the baseline held
    steady at (a baseline whose queue grew could not carry the load: its queue is no norm)."""
    allowance = ctx.tuning.queueAllowance
    base = st.baseline.metrics if st.baseline is not None else None
    if base is None or (base.queueGrowth or 0.0) > allowance:
        return allowance
    return max(allowance, 2.0 * (base.peakWaiting or 0.0))


def _draining(w: Window, st: OptimizerState, ctx: _Ctx) -> bool:
    """The window started with a backlog and ended with a shorter one."""
    return w.waiting is not None and w.waiting[0] > _normal_queue(st, ctx) and w.waiting[1] < w.waiting[0]


def _breach(w: Window, st: OptimizerState, ctx: _Ctx) -> str | None:
    """Why one window of a serving workload shows it cannot carry its load, or None."""
    policy = ctx.policy
    for what, slo, value in (
        ("latency", policy.latencySLO, w.latencySeconds),
        ("time to first token", policy.firstTokenSLO, w.firstTokenSeconds),
    ):
        if slo is not None and value is not None and value > slo.maxSeconds:
            return f"{what} {value:.3g} s over the SLO's {slo.maxSeconds:g} s"
    if w.waiting is not None:
        start, end = w.waiting
        if end > _normal_queue(st, ctx) and end > start:
            return f"{end:.0f} requests waiting for a slot and the queue growing: it cannot carry the load"
    return None


def _update_noise(st: OptimizerState, t: Tuning) -> None:
    """Pool the noise over every measurement of this exploration (one baseline is a poor estimate),
    and size the next probes to beat it."""
    measured = [p.metrics for p in [st.baseline, *st.probes] if p is not None and p.metrics is not None]
    st.noise = pooled_relative_std([(m.noise, m.windows) for m in measured])
    st.throughputNoise = pooled_relative_std([(m.throughputNoise, m.windows) for m in measured])
    st.latencyNoise = pooled_relative_std([(m.latencyNoise, m.windows) for m in measured])
    st.windowsPerProbe = windows_to_beat_noise(st.noise, t.noiseK, t.noiseFloor, t.probeWindows, t.maxWindows)


def _watch_drift(st: OptimizerState, w: Window, ctx: _Ctx) -> None:
    assert st.incumbent is not None and st.incumbent.metrics is not None
    t = ctx.tuning
    if not _runs(w, st.target, ctx):
        if ctx.now - st.targetSince > t.applyTimeoutSeconds:
            ctx.reasons.append(f"the workload does not run the hinted {_describe(st.target, ctx)}")
        return
    if st.settle > 0:
        st.settle -= 1
        return
    if ctx.load_driven:
        _follow_load(st, w, ctx)
        return
    reference = st.incumbent.metrics.unitsPerSecond
    change = w.unitsPerSecond / reference - 1.0
    limit = max(t.driftMinPercent / 100.0, t.noiseK * st.noise)
    settled = st.convergedAt is not None and ctx.now - st.convergedAt >= t.driftHoldoffSeconds
    st.driftStreak = st.driftStreak + 1 if abs(change) > limit and settled else 0
    if st.driftStreak >= t.driftWindows:
        _rebaseline(st, ctx, f"work rate changed by {100 * change:+.0f}% at the same configuration")


def _follow_load(st: OptimizerState, w: Window, ctx: _Ctx) -> None:
    """A converged serving workload: fall back at once when its configuration stops carrying the
    load, and move with the load between levels, reusing what each level found."""
    assert st.incumbent is not None and st.incumbent.metrics is not None
    t = ctx.tuning
    safe = _baseline_target(st, ctx)
    breach = _breach(w, st, ctx)
    if breach is not None and st.target != safe:
        ctx.event("Warning", "SLOBreach", f"{_describe(st.target, ctx)}: {breach}; falling back")
        if _same_level(_window_load(w), st, ctx):
            # It fails at the very load it was chosen for: forget it. (After a load step it may
            # still be right for its own level.)
            st.levels = [lv for lv in st.levels if lv.band != st.band]
        _rebaseline(st, ctx, "the chosen configuration stopped carrying the load")
        return
    st.recentLoads = [*st.recentLoads, _window_load(w)][-t.loadWindows :]
    settled = st.convergedAt is not None and ctx.now - st.convergedAt >= t.driftHoldoffSeconds
    if len(st.recentLoads) < t.loadWindows or not settled:
        return
    # The median: a window that straddles a step must not decide which level follows it.
    load = statistics.median(st.recentLoads)
    if _same_level(load, st, ctx):
        return
    if _load_stepped(st.recentLoads, t):
        # The windows straddle a step: wait until they all show the new load.
        st.recentLoads = st.recentLoads[len(st.recentLoads) // 2 :]
        return
    st.recentLoads = []
    # The level measured nearest this load, within a tolerance (its band may be the next one over:
    # a load near a band's edge is measured on either side).
    step = math.log1p(t.loadTolerance)
    near = [lv for lv in st.levels if abs(math.log(max(load, 1e-9) / lv.load)) <= step]
    level = min(near, key=lambda lv: abs(math.log(max(load, 1e-9) / lv.load)), default=None)
    if level is None:
        _rebaseline(st, ctx, f"the load moved to {_load_text(load, w)}, a level not explored yet")
        return
    st.baseline, st.incumbent, st.band, st.levelLoad = level.baseline, level.choice, level.band, load
    st.convergedAt = ctx.now
    _set_target(st, level.choice.config, ctx)
    ctx.event(
        "Normal",
        "LoadLevelChanged",
        f"the load moved to {_load_text(load, w)}: back to {_describe(level.choice.config, ctx)}, "
        "found for this level before",
    )


def _remember_level(st: OptimizerState, ctx: _Ctx) -> None:
    """Keep what this level converged on (replacing an older record of the same level), and the
    precision a serving engine keeps from now on."""
    if st.baseline is None or st.incumbent is None or st.band is None or st.levelLoad is None:
        return
    kept = [lv for lv in st.levels if lv.band != st.band]
    level = LoadLevel(band=st.band, load=st.levelLoad, baseline=st.baseline, choice=st.incumbent)
    st.levels = [*kept, level][-16:]
    if st.heldQuantization is None:
        st.heldQuantization = st.incumbent.config.quantization or st.origin.quantization


def _initial(policy: EnergyPolicySpec, workload: WorkloadInfo, ctx: _Ctx) -> OptimizerState:
    st = OptimizerState(
        origin=Config(quantization=workload.quantization, batchSize=workload.batchSize),
        windowsPerProbe=ctx.tuning.probeWindows,
    )
    _set_target(st, _baseline_target(st, ctx), ctx)
    st.settle = 0
    st.rollouts = 0  # the workload's own configuration is already in its template
    return st


def _sample(observation: Observation, workload: WorkloadInfo) -> Sample:
    return Sample(
        time=observation.time,
        members=tuple(sorted(observation.members, key=lambda m: m.member)),
        restarts=workload.restarts,
        image=workload.image,
    )


def step(
    policy: EnergyPolicySpec,
    workload: WorkloadInfo,
    state: OptimizerState | None,
    observation: Observation,
    now: float,
    tuning: Tuning = DEFAULT_TUNING,
) -> Decision:
    """The next configuration for `workload`, given what was observed up to `observation`."""
    ctx = _Ctx.of(policy, workload, tuning, now)
    # A shallow copy is enough: the state's parts are replaced, never changed in place.
    st = _initial(policy, workload, ctx) if state is None else state.model_copy()
    ctx.reasons.extend(b for b in ctx.bounds.values() if isinstance(b, str))
    sample = _sample(observation, workload)
    bad: BadData | None = None
    if st.last is None:
        st.last = sample
    else:
        w = window(st.last, sample, tuning.windowSeconds)
        if w in (BadData.RESTARTED, BadData.MEMBERS_CHANGED):
            st.last = sample
            _rebaseline(
                st, ctx, "the workload restarted or changed" if w == BadData.RESTARTED else "members changed"
            )
        elif isinstance(w, BadData):
            if w != BadData.ZERO_LENGTH:
                st.last = sample
            # A workload reloading after a hint does no work; its agent soon calls the counter silent.
            reloading = (
                w in (BadData.SILENT_WORK_COUNTER, BadData.UNHEALTHY_SAMPLE)
                and now - st.targetSince <= tuning.applyTimeoutSeconds
            )
            if reloading:
                ctx.reasons.append(
                    "no work since the new configuration was hinted: the workload may be reloading"
                )
            elif w not in TRANSITIONS and w != BadData.ZERO_LENGTH:
                bad = w
                st.badStreak += 1
                st.lastBad = w
                if st.badStreak == 1:
                    ctx.event(
                        "Warning", "BadMeasurement", f"window discarded: {w.value}; no decision taken from it"
                    )
                else:
                    ctx.reasons.append(f"window discarded: {w.value} ({st.badStreak} in a row)")
        elif w is None:
            ctx.reasons.append("collecting a window")
        else:
            st.last = sample
            st.badStreak = 0
            st.lastBad = None
            if st.baseline is not None and st.baseline.metrics is not None:
                st.energySavedJoules += st.baseline.metrics.joulesPerUnit * w.units - w.joules
            if st.phase == "Converged":
                _watch_drift(st, w, ctx)
            else:
                _measure(st, w, ctx)
    return _decision(st, ctx, bad)


def fail_target(
    policy: EnergyPolicySpec,
    workload: WorkloadInfo,
    state: OptimizerState,
    now: float,
    reason: str,
    tuning: Tuning = DEFAULT_TUNING,
) -> Decision:
    """The target could not be run at all (delivered by rollout, its pods never became Ready): a
    failed probe, and the end of its stage, since its neighbours are no better bet. The next target
    keeps the best configuration so far, which rolls the owner back to it. A target that was not a
    probe (the baseline's, the converged one) has nothing to fall back to: it is reported."""
    ctx = _Ctx.of(policy, workload, tuning, now)
    st = state.model_copy()
    st.last = None  # the pods that ran before are not the ones that run next
    probing = st.phase == "Exploring" and st.stage in ("quantization", "batch") and st.incumbent is not None
    if probing:
        failed = Probe(stage=st.stage or "batch", config=st.target, failed=reason)
        st.probes = [*st.probes, failed]
        ctx.event("Warning", "ProbeFailed", f"{_describe(st.target, ctx)}: {reason}; rolled back")
        _advance(st, ctx, abandon=True)
    else:
        ctx.event("Warning", "RolloutFailed", f"{_describe(st.target, ctx)}: {reason}")
    return _decision(st, ctx, None)


def _measurement(m: Metrics) -> Measurement:
    return Measurement(
        joulesPerUnit=m.joulesPerUnit,
        secondsPerUnit=m.secondsPerUnit,
        edp=m.edp,
        unitsPerSecond=m.unitsPerSecond,
    )


def _decision(st: OptimizerState, ctx: _Ctx, bad: BadData | None) -> Decision:
    policy = ctx.policy
    caps = ctx.member_caps(st.target)
    clocks = ctx.member_clocks(st.target)
    phase: Phase = "Degraded" if st.badStreak >= ctx.tuning.degradedAfterBadWindows else st.phase
    baseline = st.baseline.metrics if st.baseline else None
    current = st.incumbent.metrics if st.incumbent else None
    figures = Figures(
        phase=phase,
        powerCapWatts=max((c for c in caps.values() if c is not None), default=None),
        smClockMHz=max((c for c in clocks.values() if c is not None), default=None),
        batchSize=st.incumbent.config.batchSize if st.incumbent else None,
        quantization=st.incumbent.config.quantization if st.incumbent else None,
        baseline=_measurement(baseline) if baseline else None,
        current=_measurement(current) if current else None,
        edpReductionPercent=100.0 * (1.0 - current.edp / baseline.edp) if baseline and current else None,
        slowdownPercent=slowdown_percent(current, baseline, ctx.load_driven)
        if baseline and current
        else None,
        energySavedJoules=max(0.0, st.energySavedJoules),
        probes=len(st.probes),
        message=ctx.reasons[-1] if ctx.reasons else "",
        noiseMarginPercent=noise_margin_percent(st, ctx),
    )
    return Decision(
        state=st,
        phase=phase,
        capWatts=caps,
        smClockMHz=clocks,
        batchSize=st.target.batchSize if policy.batchSize.mode == "Auto" else None,
        quantization=st.target.quantization if policy.quantization.mode == "Auto" else None,
        reasons=ctx.reasons,
        events=ctx.events,
        figures=figures,
        objectiveReductionPercent=100.0 * (1.0 - current.objective / baseline.objective)
        if baseline and current
        else None,
        badData=bad,
    )
