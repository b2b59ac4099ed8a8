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
# Locked SM clocks are set on the GPU's supported clocks (15 MHz apart on an H100): a ceiling the
# agent snapped to a neighbouring supported clock is the same lock.
CLOCK_TOLERANCE_MHZ = 15.0


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
    # A serving engine's load gauges: requests running and waiting for a slot, and its counter of
    # finished requests (None: not exposed).
    requestsRunning: float | None = None
    requestsWaiting: float | None = None
    requestsFinished: float | None = None
    firstTokenSeconds: float | None = None  # a serving engine's time to first token (the policy's quantile)
    # The GPU's SM clock (an instantaneous reading; None: not reported) and the ceiling the agent
    # has locked it to (None: not locked).
    smClockMHz: float | None = None
    lockedClockMHz: float | None = None


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
    lockedClocks: tuple[tuple[str, float | None], ...] = ()  # per member; None: not locked

    def caps(self) -> dict[str, float | None]:
        return dict(self.capWatts)

    def clocks(self) -> dict[str, float | None]:
        return dict(self.lockedClocks)


@dataclass(frozen=True)
class Window:
    seconds: float
    joules: float
    units: float  # the slowest member's work: a job is as fast as its slowest member
    latencySeconds: float | None
    config: ReportedConfig
    joulesByMember: tuple[tuple[str, float], ...]
    waiting: tuple[float, float] | None = None  # requests waiting at the window's start and end
    running: float | None = None  # requests running at the window's end
    arrivals: float | None = None  # requests that arrived in the window: finished + the rise in flight
    firstTokenSeconds: float | None = None
    smClockMHz: float | None = None  # the members' highest SM clock at the window's end

    @property
    def watts(self) -> float:
        return self.joules / self.seconds

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
        lockedClocks=tuple(sorted((m.member, m.lockedClockMHz) for m in sample.members)),
    )


def _same_settings(
    a: tuple[tuple[str, float | None], ...], b: tuple[tuple[str, float | None], ...], tolerance: float
) -> bool:
    for (ma, ca), (mb, cb) in zip(a, b, strict=True):
        if ma != mb or (ca is None) != (cb is None):
            return False
        if ca is not None and cb is not None and abs(ca - cb) > tolerance:
            return False
    return True


def _same_caps(a: ReportedConfig, b: ReportedConfig) -> bool:
    return _same_settings(a.capWatts, b.capWatts, CAP_TOLERANCE_WATTS) and _same_settings(
        a.lockedClocks, b.lockedClocks, CLOCK_TOLERANCE_MHZ
    )


def _numbers(sample: Sample) -> list[float]:
    values = [sample.time]
    for m in sample.members:
        values += [m.energyJoules, m.workUnits, m.powerWatts]
        values += [
            v
            for v in (
                m.capWatts,
                m.latencySeconds,
                m.requestsRunning,
                m.requestsWaiting,
                m.requestsFinished,
                m.firstTokenSeconds,
                m.smClockMHz,
                m.lockedClockMHz,
            )
            if v is not None
        ]
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
    clocks = [m.smClockMHz for m in end.members if m.smClockMHz]
    return Window(
        seconds=seconds,
        joules=sum(j for _, j in joules_by_member),
        units=units,
        latencySeconds=max(latencies) if latencies else None,
        config=config_end,
        joulesByMember=joules_by_member,
        waiting=_waiting(start, end),
        running=_pod_gauge(end, "requestsRunning"),
        arrivals=_arrivals(start, end),
        firstTokenSeconds=_pod_gauge(end, "firstTokenSeconds"),
        smClockMHz=max(clocks) if len(clocks) == len(end.members) else None,
    )


def _pod_gauge(sample: Sample, name: str) -> float | None:
    """A serving gauge of the workload: the pod's value (its GPUs report the same), None if absent."""
    values = [getattr(m, name) for m in sample.members]
    return None if any(v is None for v in values) or not values else max(values)


def _arrivals(start: Sample, end: Sample) -> float | None:
    """Requests offered in the window, whatever the engine made of them: those that finished plus
    the rise of those in flight. Unlike tokens served, it does not swell while a backlog drains."""

    def finished_and_in_flight(sample: Sample) -> tuple[float, float] | None:
        done, running, waiting = (
            _pod_gauge(sample, n) for n in ("requestsFinished", "requestsRunning", "requestsWaiting")
        )
        return None if done is None or running is None or waiting is None else (done, running + waiting)

    a, b = finished_and_in_flight(start), finished_and_in_flight(end)
    if a is None or b is None or b[0] < a[0]:
        return None
    arrived = b[0] - a[0] + b[1] - a[1]
    return arrived if arrived >= 0 else None


def _waiting(start: Sample, end: Sample) -> tuple[float, float] | None:
    first, last = _pod_gauge(start, "requestsWaiting"), _pod_gauge(end, "requestsWaiting")
    return None if first is None or last is None else (first, last)


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
    # Load-driven (serving) workloads: the latency noise, and the queue of requests waiting for a
    # slot (its largest value at a window's end, and how much it grew from first to last window).
    latencyNoise: float = 0.0
    arrivalRate: float | None = None  # requests offered per second
    firstTokenSeconds: float | None = None
    peakWaiting: float | None = None
    queueGrowth: float | None = None
    peakRunning: float | None = None
    smClockMHz: float | None = None  # the mean SM clock read over its windows (None: not reported)

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
    watts: list[float] = []  # per window: what a load-driven workload's energy is judged on
    arrivals: float | None = None  # requests offered over the windows (None: not reported)
    firstTokens: list[float] = []
    loads: list[float] = []  # per window: requests offered per second, else units per second
    waiting: list[tuple[float, float]] = []
    running: list[float] = []
    smClocks: list[float] = []  # per window: the SM clock read at its end (where reported)

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
            watts=[*base.watts, w.watts],
            arrivals=None
            if w.arrivals is None or (base.windows and base.arrivals is None)
            else (base.arrivals or 0.0) + w.arrivals,
            waiting=[*base.waiting, w.waiting] if w.waiting is not None else base.waiting,
            running=[*base.running, w.running] if w.running is not None else base.running,
            firstTokens=[*base.firstTokens, w.firstTokenSeconds]
            if w.firstTokenSeconds is not None
            else base.firstTokens,
            loads=[*base.loads, w.arrivals / w.seconds if w.arrivals is not None else w.unitsPerSecond],
            smClocks=[*base.smClocks, w.smClockMHz] if w.smClockMHz is not None else base.smClocks,
        )

    def metrics(self, objective: Objective, served_load: float | None = None) -> Metrics:
        """The configuration's figures. With `served_load` (units/s) the workload is load-driven:
        demand, not the configuration, sets its work rate, so energy per unit is its power over
        that load (the random load of each window would otherwise dominate the comparison), the
        delay a unit sees is its measured latency, and the objective is the energy per unit: the
        latency is bounded by the policy's SLO and slowdown limit instead of traded against
        energy, because a window's latency quantile is far noisier than its power."""
        ups = self.units / self.seconds
        latency = sum(self.latencies) / len(self.latencies) if self.latencies else None
        queue: dict[str, float | None] = {"peakWaiting": None, "queueGrowth": None, "peakRunning": None}
        if self.waiting:
            queue["peakWaiting"] = max(end for _, end in self.waiting)
            queue["queueGrowth"] = self.waiting[-1][1] - self.waiting[0][0]
        if self.running:
            queue["peakRunning"] = max(self.running)
        if served_load is not None and served_load > 0 and latency is not None:
            jpu = self.joules / self.seconds / served_load
            spu = latency
            value = jpu
            noise = relative_std(self.watts)
        else:
            jpu = self.joules / self.units
            spu = seconds_per_unit(ups, self.batchSize)
            value = objective_value(objective, jpu, spu)
            noise = relative_std(self.objectives)
        return Metrics(
            joulesPerUnit=jpu,
            secondsPerUnit=spu,
            unitsPerSecond=ups,
            edp=jpu * spu,
            objective=value,
            latencySeconds=latency,
            noise=noise,
            throughputNoise=relative_std(self.throughputs),
            windows=self.windows,
            seconds=self.seconds,
            wattsByMember={m: j / self.seconds for m, j in self.joulesByMember.items()},
            latencyNoise=relative_std(self.latencies),
            arrivalRate=None if self.arrivals is None else self.arrivals / self.seconds,
            firstTokenSeconds=sum(self.firstTokens) / len(self.firstTokens) if self.firstTokens else None,
            smClockMHz=sum(self.smClocks) / len(self.smClocks) if self.smClocks else None,
            **queue,
        )
