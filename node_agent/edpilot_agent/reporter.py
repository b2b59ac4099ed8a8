"""Builds `GPUNodeReportStatus` from what the agent measured (pure)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from edpilot.contract import decode_quantization
from edpilot.models import GPUStatus, MeasuredWorkload, Profile, WorkloadSample
from edpilot_agent.backend import GpuInfo, GpuReading
from edpilot_agent.counters import CounterTracker
from edpilot_agent.scraper import WorkReading


def gpu_status(
    info: GpuInfo,
    reading: GpuReading,
    energy_joules: float,
    pods: Sequence[str],
    shared: bool = False,
    locked_sm_clock_mhz: float | None = None,
) -> GPUStatus:
    """One GPU's status; `locked_sm_clock_mhz` is the ceiling the agent locked (None: none)."""
    return GPUStatus(
        index=info.index,
        uuid=info.uuid,
        model=info.model,
        migEnabled=info.mig_enabled,
        minLimitWatts=info.min_limit_watts,
        maxLimitWatts=info.max_limit_watts,
        defaultLimitWatts=info.default_limit_watts,
        enforcedLimitWatts=_gauge(reading.enforced_limit_watts),
        powerWatts=_gauge(reading.power_watts),
        energyJoules=energy_joules,
        energySource=info.energy_source,
        utilizationPercent=min(100.0, _gauge(reading.utilization_percent)),
        smClockMHz=_gauge(reading.sm_clock_mhz),
        memClockMHz=_gauge(reading.mem_clock_mhz),
        minSmClockMHz=_gauge(info.min_sm_clock_mhz),
        maxSmClockMHz=_gauge(info.max_sm_clock_mhz),
        lockedSmClockMHz=locked_sm_clock_mhz,
        temperatureC=reading.temperature_c if math.isfinite(reading.temperature_c) else 0.0,
        throttleReasons=list(reading.throttle_reasons),
        pods=sorted(pods),
        shared=shared,
    )


def _gauge(value: float) -> float:
    return value if math.isfinite(value) and value >= 0 else 0.0


def _reading(value: float | None) -> float | None:
    """A value read from a pod, if it is a finite, non-negative number."""
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def workload_sample(
    workload: MeasuredWorkload,
    reading: WorkReading,
    accepted: bool,
    tracker: CounterTracker,
    gpu_uuids: Sequence[str],
    now: float,
    silent_after_seconds: float,
) -> WorkloadSample:
    """One pod's sample. It is unhealthy (and the operator must not decide on it) when the
    scrape failed, the value was rejected, or the counter has not moved for too long."""
    problems = []
    if reading.error:
        problems.append(reading.error)
    elif not accepted:
        problems.append(tracker.problem)
    silent = tracker.silent_for(now)
    if tracker.total is not None and silent > silent_after_seconds:
        problems.append(f"work counter {workload.metricName} has not increased for {silent:.0f} s")
    quantization: Profile | None = None
    if reading.quantization is not None:
        quantization = decode_quantization(reading.quantization)
        if quantization is None:
            problems.append("the pod reports a quantization profile edpilot does not know")
    return WorkloadSample(
        namespace=workload.namespace,
        pod=workload.pod,
        gpuUUIDs=list(gpu_uuids),
        workUnits=tracker.total or 0.0,
        unit=workload.unit,
        batchSize=reading.batch_size,
        quantization=quantization,
        latencySeconds=_reading(reading.latency_seconds),
        firstTokenSeconds=_reading(reading.first_token_seconds),
        requestsRunning=_reading(reading.requests_running),
        requestsWaiting=_reading(reading.requests_waiting),
        requestsFinished=_reading(reading.requests_finished),
        counterResets=tracker.resets,
        healthy=not problems,
        message="; ".join(problems)[:1000],
    )
