"""Windows over cumulative counters: joules, seconds and units of work between two samples.

A workload (one pod, a pod with several GPUs, or several pods grouped as one job) is sampled
as cumulative counters per member GPU. A window between two samples gives its efficiency:
J/unit, units/s, and the delay a unit of work sees (`secondsPerUnit`): for a batched workload
that reports batch size b it is the step latency b / (units/s), since a token waits a whole
decode step; otherwise 1 / (units/s). EDP = J/unit × s/unit, ED2P = J/unit × (s/unit)².

Bad samples never become a measurement: `window` returns a typed `BadData` reason instead,
which the operator turns into a condition or an event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from edpilot.models import Objective, Profile

# An average draw above this over a window is a unit error or a broken counter, not a GPU.
MAX_PLAUSIBLE_WATTS_PER_GPU = 5000.0
# Enforced limits are reported in whole watts (NVML: mW); smaller differences are rounding.
CAP_TOLERANCE_WATTS = 1.0


class BadData(StrEnum):
    """Why a window was not turned into a measurement (CamelCase: usable as a condition reason)."""

    NOT_FINITE = "NotFinite"
    NEGATIVE_VALUE = "NegativeValue"
    ZERO_LENGTH = "ZeroLengthWindow"
    CLOCK_WENT_BACKWARDS = "ClockWentBackwards"
    COUNTER_RESET = "CounterReset"  # energy or work decreased: a reset or a wrap
    SILENT_WORK_COUNTER = "SilentWorkCounter"
    SILENT_ENERGY_COUNTER = "SilentEnergyCounter"
    IMPLAUSIBLE_POWER = "ImplausiblePower"
    CONFIG_CHANGED = "ConfigChangedInWindow"
    INCONSISTENT_CONFIG = "InconsistentConfig"  # members of one workload report different configs
    MEMBERS_CHANGED = "MembersChanged"
    RESTARTED = "RestartedInWindow"
    UNHEALTHY_SAMPLE = "UnhealthySample"  # the agent flagged the pod's counter at an end of the window


# A configuration change inside a window is the normal way a new hint arrives, not a fault.
TRANSITIONS = frozenset({BadData.CONFIG_CHANGED})


class MemberSample(BaseModel):
    """Cumulative counters of one GPU of a workload, with what its pod reports it runs.

    No bounds here on purpose: a NaN or a negative value must become a `BadData` reason, not a
    validation error the caller has to catch.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    member: str  # GPU UUID
    energyJoules: float
    workUnits: float  # the pod's cumulative work counter (shared by the GPUs of one pod)
    powerWatts: float = 0.0
    capWatts: float | None = None  # the enforced limit the agent reports
    batchSize: int | None = None
    quantization: Profile | None = None
    latencySeconds: float | None = None
    counterResets: int = 0
    healthy: bool = True  # the agent's verdict on the pod's work counter (scrape, value, progress)


class Sample(BaseModel):
    """One observation of a whole workload at `time` (seconds, any epoch)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    time: float
    members: tuple[MemberSample, ...]
    restarts: int = 0
    image: str = ""


@dataclass(frozen=True)
class ReportedConfig:
    """What the workload says it runs; caps are the enforced limits per member."""

    quantization: Profile | None
    batchSize: int | None
    capWatts: tuple[tuple[str, float | None], ...]

    def caps(self) -> dict[str, float | None]:
        return dict(self.capWatts)


@dataclass(frozen=True)
class Window:
    seconds: float
    joules: float
    units: float  # the slowest member's work: a job is as fast as its slowest member
    latencySeconds: float | None
    config: ReportedConfig
    joulesByMember: tuple[tuple[str, float], ...]

    @property
    def unitsPerSecond(self) -> float:
        return self.units / self.seconds

    @property
    def joulesPerUnit(self) -> float:
        return self.joules / self.units

    @property
    def secondsPerUnit(self) -> float:
        return seconds_per_unit(self.unitsPerSecond, self.config.batchSize)


def seconds_per_unit(units_per_second: float, batch_size: int | None) -> float:
    if units_per_second <= 0:
        return math.inf
    return (batch_size or 1) / units_per_second


def objective_value(objective: Objective, joules_per_unit: float, seconds_per_unit: float) -> float:
    if objective == "Energy":
        return joules_per_unit
    if objective == "EDP":
        return joules_per_unit * seconds_per_unit
    return joules_per_unit * seconds_per_unit**2


def reported_config(sample: Sample) -> ReportedConfig | BadData:
    """The config a workload reports; its members must agree on batch size and quantization."""
    batches = {m.batchSize for m in sample.members}
    profiles = {m.quantization for m in sample.members}
    if len(batches) > 1 or len(profiles) > 1:
        return BadData.INCONSISTENT_CONFIG
    return ReportedConfig(
        quantization=profiles.pop() if profiles else None,
        batchSize=batches.pop() if batches else None,
        capWatts=tuple(sorted((m.member, m.capWatts) for m in sample.members)),
    )


def _same_caps(a: ReportedConfig, b: ReportedConfig) -> bool:
    for (ma, ca), (mb, cb) in zip(a.capWatts, b.capWatts, strict=True):
        if ma != mb or (ca is None) != (cb is None):
            return False
        if ca is not None and cb is not None and abs(ca - cb) > CAP_TOLERANCE_WATTS:
            return False
    return True


def _numbers(sample: Sample) -> list[float]:
    values = [sample.time]
    for m in sample.members:
        values += [m.energyJoules, m.workUnits, m.powerWatts]
        values += [v for v in (m.capWatts, m.latencySeconds) if v is not None]
    return values


def window(start: Sample, end: Sample, min_seconds: float = 0.0) -> Window | BadData | None:
    """The window from `start` to `end`; a `BadData` reason when it must not be used, and None
    when it is sound but shorter than `min_seconds` (wait for a later sample)."""
    for sample in (start, end):
        values = _numbers(sample)
        if not all(math.isfinite(v) for v in values):
            return BadData.NOT_FINITE
        if any(v < 0 for v in values[1:]) or any(m.counterResets < 0 for m in sample.members):
            return BadData.NEGATIVE_VALUE
    seconds = end.time - start.time
    if seconds == 0:
        return BadData.ZERO_LENGTH
    if seconds < 0:
        return BadData.CLOCK_WENT_BACKWARDS
    if not end.members or [m.member for m in start.members] != [m.member for m in end.members]:
        return BadData.MEMBERS_CHANGED
    if start.restarts != end.restarts or start.image != end.image:
        return BadData.RESTARTED
    for a, b in zip(start.members, end.members, strict=True):
        if b.energyJoules < a.energyJoules or b.workUnits < a.workUnits or b.counterResets != a.counterResets:
            return BadData.COUNTER_RESET
    config_start, config_end = reported_config(start), reported_config(end)
    if isinstance(config_start, BadData):
        return config_start
    if isinstance(config_end, BadData):
        return config_end
    if (
        config_start.quantization != config_end.quantization
        or config_start.batchSize != config_end.batchSize
        or not _same_caps(config_start, config_end)
    ):
        return BadData.CONFIG_CHANGED
    if seconds < min_seconds:
        return None
    joules_by_member = tuple(
        (b.member, b.energyJoules - a.energyJoules) for a, b in zip(start.members, end.members, strict=True)
    )
    units = min(b.workUnits - a.workUnits for a, b in zip(start.members, end.members, strict=True))
    if units <= 0:
        return BadData.SILENT_WORK_COUNTER
    if any(j <= 0 for _, j in joules_by_member):
        return BadData.SILENT_ENERGY_COUNTER
    if any(j / seconds > MAX_PLAUSIBLE_WATTS_PER_GPU for _, j in joules_by_member):
        return BadData.IMPLAUSIBLE_POWER
    if not all(m.healthy for m in (*start.members, *end.members)):
        return BadData.UNHEALTHY_SAMPLE
    latencies = [m.latencySeconds for m in end.members if m.latencySeconds is not None]
    return Window(
        seconds=seconds,
        joules=sum(j for _, j in joules_by_member),
        units=units,
        latencySeconds=max(latencies) if latencies else None,
        config=config_end,
        joulesByMember=joules_by_member,
    )


def relative_std(values: list[float]) -> float:
    """Sample standard deviation over the mean; 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    if mean <= 0:
        return 0.0
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(variance) / mean


def pooled_relative_std(groups: list[tuple[float, int]]) -> float:
    """One noise estimate from several (relative std, windows) measurements of different configs."""
    dof = sum(n - 1 for _, n in groups if n > 1)
    if dof == 0:
        return 0.0
    return math.sqrt(sum((n - 1) * s * s for s, n in groups if n > 1) / dof)


def significance_threshold(noise: float, windows: int, k: float, floor: float) -> float:
    """The smallest relative difference between two measurements of `windows` windows each that is
    not noise: k standard deviations of the difference of two means, never below `floor`."""
    return max(floor, k * noise * math.sqrt(2.0 / max(windows, 1)))


def windows_to_beat_noise(noise: float, k: float, floor: float, least: int, most: int) -> int:
    """How many windows a measurement needs so that `floor` is beyond k·noise of the difference."""
    if noise <= 0:
        return least
    needed = math.ceil(2.0 * (k * noise / floor) ** 2)
    return max(least, min(most, needed))


class Metrics(BaseModel):
    """The efficiency of one configuration, aggregated over several windows (ratio of sums)."""

    model_config = ConfigDict(extra="forbid")

    joulesPerUnit: float
    secondsPerUnit: float
    unitsPerSecond: float
    edp: float
    objective: float
    latencySeconds: float | None = None
    noise: float = 0.0  # relative std of the per-window objective
    throughputNoise: float = 0.0  # relative std of the per-window units/s
    windows: int = 0
    seconds: float = 0.0
    wattsByMember: dict[str, float] = {}

    @property
    def watts(self) -> float:
        return sum(self.wattsByMember.values())


class Accumulator(BaseModel):
    """Windows of one reported configuration, summed; stored in the optimizer's state."""

    model_config = ConfigDict(extra="forbid")

    batchSize: int | None = None
    quantization: Profile | None = None
    windows: int = 0
    seconds: float = 0.0
    joules: float = 0.0
    units: float = 0.0
    objectives: list[float] = []
    throughputs: list[float] = []
    latencies: list[float] = []
    joulesByMember: dict[str, float] = {}

    def accepts(self, w: Window) -> bool:
        return self.windows == 0 or (
            self.batchSize == w.config.batchSize and self.quantization == w.config.quantization
        )

    def add(self, w: Window, objective: Objective) -> Accumulator:
        """This accumulator with `w` added; a window of another configuration starts afresh."""
        base = self if self.accepts(w) else Accumulator()
        by_member = dict(base.joulesByMember)
        for member, joules in w.joulesByMember:
            by_member[member] = by_member.get(member, 0.0) + joules
        return Accumulator(
            batchSize=w.config.batchSize,
            quantization=w.config.quantization,
            windows=base.windows + 1,
            seconds=base.seconds + w.seconds,
            joules=base.joules + w.joules,
            units=base.units + w.units,
            objectives=[*base.objectives, objective_value(objective, w.joulesPerUnit, w.secondsPerUnit)],
            throughputs=[*base.throughputs, w.unitsPerSecond],
            latencies=[*base.latencies, w.latencySeconds] if w.latencySeconds is not None else base.latencies,
            joulesByMember=by_member,
        )

    def metrics(self, objective: Objective) -> Metrics:
        ups = self.units / self.seconds
        jpu = self.joules / self.units
        spu = seconds_per_unit(ups, self.batchSize)
        return Metrics(
            joulesPerUnit=jpu,
            secondsPerUnit=spu,
            unitsPerSecond=ups,
            edp=jpu * spu,
            objective=objective_value(objective, jpu, spu),
            latencySeconds=sum(self.latencies) / len(self.latencies) if self.latencies else None,
            noise=relative_std(self.objectives),
            throughputNoise=relative_std(self.throughputs),
            windows=self.windows,
            seconds=self.seconds,
            wattsByMember={m: j / self.seconds for m, j in self.joulesByMember.items()},
        )
