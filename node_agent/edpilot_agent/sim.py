"""The simulated backend for KWOK nodes, built on `edpilot.gpusim`.

`SimBackend` is a `GpuBackend` over `SimulatedGpu`s that advance with the agent's clock times
`speed`. `SimWorkloads` plays the node's pods and its kubelet: it hands each pod that requests
nvidia.com/gpu a stable set of GPUs (like the device plugin), gives a pod the DRA devices of the
ResourceClaims reserved for it (as the kubelet prepares them; their GPUs are those the node's
ResourceSlices name), runs the workload its `sim.edpilot.io/*`
annotations describe, follows the operator's batch-size / quantization hints after a reload
delay (as a real workload does through its downward-API file), and reports work through the
`WorkSource` interface the HTTP scraper implements. Pods without sim annotations idle.

An `llm-serving` pod is a serving engine (`edpilot.serving`) offered the requests per second of
its `sim.edpilot.io/requests-per-second` annotation: it reports what a vLLM engine exposes, as
Prometheus text that goes through the agent's own parser, and reloads (serving nothing while
requests queue) to change its precision or sequence limit, as an engine restarted with new
arguments does.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from edpilot import gpusim, serving
from edpilot.contract import ANNOTATION_BATCH_SIZE, ANNOTATION_QUANTIZATION
from edpilot.dra import DEFAULT_CONFIG, ClaimView, DraConfig, SliceDevice, device_catalog
from edpilot.models import MeasuredWorkload
from edpilot.rollout import flag_value
from edpilot.textnum import ascii_float, positive_int
from edpilot_agent.backend import GpuBackendError, GpuInfo, GpuReading
from edpilot_agent.holdings import DynamicDevice, GpuAllocations, PodDevices, resolve
from edpilot_agent.pods import PodInfo
from edpilot_agent.scraper import MetricsParser, WorkReading

log = logging.getLogger(__name__)

SIM_WORKLOAD = "sim.edpilot.io/workload"
SIM_PRECISION = "sim.edpilot.io/precision"
SIM_BATCH_SIZE = "sim.edpilot.io/batch-size"
SIM_WORK_SHARE = "sim.edpilot.io/work-share"
SIM_REQUESTS_PER_SECOND = "sim.edpilot.io/requests-per-second"
# A GPU whose cooling holds its SM clock at this many MHz (hardware thermal slowdown, which the
# agent reports as NVML does and placement avoids).
SIM_THERMAL_CLOCK = "sim.edpilot.io/thermal-clock-limit-mhz"

# Start-up arguments a simulated engine reads, as real ones do (vLLM, SGLang, edpilot's examples).
BATCH_FLAGS = ("--max-num-seqs", "--max-running-requests", "--batch-size")
QUANTIZATION_FLAG = "--quantization"

SERVING = "llm-serving"
PROFILES: dict[str, Callable[[], gpusim.WorkloadProfile]] = {
    # A saturated (offline) decode of the Llama-3-8B shape at a fixed batch; `llm-serving` is
    # the same model served under offered load.
    "llm-decode": gpusim.llama_decode,
    SERVING: gpusim.llama_decode,
    "training": gpusim.training,
    "gemm": gpusim.gemm,
}
DEFAULT_BATCH = {"llm-decode": 8, SERVING: 256, "training": 8, "gemm": 4}
DEFAULT_PRECISION = "bf16"
DEFAULT_REQUESTS_PER_SECOND = 8.0


@dataclass
class SimJob:
    """The workload one pod runs on its GPUs, and the configuration it actually applies."""

    pod: str
    gpu_indices: tuple[int, ...]
    kind: str | None  # None: the pod idles
    batch_size: int
    precision: str
    work_share: float = 1.0
    work_units: float = 0.0
    step_seconds: float | None = None
    pending: tuple[int, str] | None = None  # a hinted (batch, precision) waiting for the reload
    pending_since: float = 0.0
    engine: serving.ServingEngine | None = None  # an llm-serving pod's engine
    requests_per_second: float = 0.0
    dra_indices: tuple[int, ...] = ()  # the GPUs it holds through DRA (the rest: device plugin)
    thermal_clock_mhz: float | None = None
    # Set by a start-up argument, as an engine's are: a live hint no longer changes it.
    fixed_batch: bool = False
    fixed_precision: bool = False

    @property
    def profile(self) -> gpusim.WorkloadProfile | None:
        if not self.kind:
            return None
        profile = PROFILES[self.kind]()
        return (
            profile if self.thermal_clock_mhz is None else gpusim.throttled(profile, self.thermal_clock_mhz)
        )


class SimBackend:
    """Simulated GPUs of one node, advancing with `clock()` x `speed` simulated seconds."""

    def __init__(
        self,
        node_name: str,
        gpus: int = 8,
        spec: gpusim.GpuSpec = gpusim.H100_SXM,
        seed: int = 0,
        speed: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        reload_delay_seconds: float = 5.0,
    ) -> None:
        self.devices = [gpusim.SimulatedGpu(spec, i, seed_name=node_name) for i in range(gpus)]
        self.speed = speed
        self.reload_delay_seconds = reload_delay_seconds
        self.jobs: dict[str, SimJob] = {}
        self.sim_time = 0.0
        self._clock = clock
        self._rng = random.Random(seed)
        self._last = clock()
        self._points: dict[tuple[object, ...], gpusim.JobPoint] = {}
        self._window: dict[int, gpusim.WindowResult] = {
            d.index: d.advance(1e-3, self._rng) for d in self.devices
        }

    @property
    def name(self) -> Literal["sim"]:
        return "sim"

    def gpus(self) -> list[GpuInfo]:
        return [
            GpuInfo(
                index=d.index,
                uuid=d.uuid,
                model=d.spec.name,
                min_limit_watts=d.spec.min_power_limit_watts,
                max_limit_watts=d.spec.max_power_limit_watts,
                default_limit_watts=d.spec.default_power_limit_watts,
                min_sm_clock_mhz=d.spec.min_sm_clock_mhz,
                max_sm_clock_mhz=d.spec.max_sm_clock_mhz,
            )
            for d in self.devices
        ]

    def device(self, uuid: str) -> gpusim.SimulatedGpu:
        for d in self.devices:
            if d.uuid == uuid:
                return d
        raise GpuBackendError(f"GPU {uuid} is not on this node")

    def read(self, uuid: str, energy: bool = True) -> GpuReading:
        self.advance()
        d = self.device(uuid)
        w = self._window[d.index]
        return GpuReading(
            uuid=uuid,
            energy_joules=d.energy_counter_mj / 1000 if energy else None,
            power_watts=w.power_watts,
            enforced_limit_watts=d.power_limit_watts,
            utilization_percent=float(w.utilization_percent),
            sm_clock_mhz=float(w.sm_clock_mhz),
            mem_clock_mhz=float(w.mem_clock_mhz),
            temperature_c=w.temperature_c,
            throttle_reasons=w.throttle_reasons,
        )

    def set_power_limit(self, uuid: str, watts: float) -> None:
        try:
            self.device(uuid).set_power_limit(watts)
        except ValueError as exc:
            raise GpuBackendError(str(exc)) from exc

    def set_locked_sm_clock(self, uuid: str, max_mhz: float | None) -> None:
        device = self.device(uuid)
        if max_mhz is None:
            device.reset_locked_clock()
            return
        try:
            device.lock_sm_clock(max_mhz)
        except ValueError as exc:
            raise GpuBackendError(str(exc)) from exc

    def close(self) -> None:
        pass

    def advance(self) -> None:
        """Run every GPU from the last call to now (in simulated seconds)."""
        now = self._clock()
        seconds = (now - self._last) * self.speed
        if seconds <= 1e-6:
            return
        self._last = now
        self.sim_time += seconds
        busy: set[int] = set()
        for job in self.jobs.values():
            if job.engine is not None and job.gpu_indices:
                self._serve(job, seconds)
                busy.add(job.gpu_indices[0])
                continue
            self._apply_reload(job)
            if job.kind is None or not job.gpu_indices:
                continue
            point = self._job_point(job)
            job.step_seconds = point.step_seconds
            for rank, index in enumerate(job.gpu_indices):
                window = self.devices[index].advance_at(point.ranks[rank], seconds, self._rng)
                self._window[index] = window
                job.work_units += window.work_units
                busy.add(index)
        for d in self.devices:
            if d.index not in busy:
                d.clear()
                self._window[d.index] = d.advance(seconds, self._rng)

    def _serve(self, job: SimJob, seconds: float) -> None:
        """Run a serving pod's engine under its offered load; its GPU draws what the engine spent."""
        engine = job.engine
        assert engine is not None
        device = self.devices[job.gpu_indices[0]]
        settings = (device.power_limit_watts, device.locked_clock_mhz)
        if (engine.config.cap_watts, engine.config.locked_clock_mhz) != settings:
            engine.configure(replace(engine.config, cap_watts=settings[0], locked_clock_mhz=settings[1]))
        joules, tokens = engine.counters.energy_joules, engine.counters.generation_tokens
        start = self.sim_time - seconds
        if job.pending is not None:
            # The restart with the hinted arguments happens inside this interval or later.
            due = min(max(job.pending_since + self.reload_delay_seconds, start), self.sim_time)
            engine.run(due - start, job.requests_per_second)
            self._apply_reload(job)
            engine.run(self.sim_time - due, job.requests_per_second)
        else:
            engine.run(seconds, job.requests_per_second)
        watts = (engine.counters.energy_joules - joules) / seconds
        rate = (engine.counters.generation_tokens - tokens) / seconds
        point = gpusim.OperatingPoint(
            units_per_second=rate,
            power_watts=watts,
            sm_clock_mhz=device.locked_clock_mhz or device.spec.max_sm_clock_mhz,
            mem_clock_mhz=device.spec.mem_clock_mhz,
            step_seconds=seconds,
            joules_per_unit=watts / rate if rate > 0 else math.inf,
            utilization=1.0 if engine.running else 0.0,
            cap_watts=device.power_limit_watts,
            throttle_reasons=(),
        )
        self._window[device.index] = device.advance_at(point, seconds, self._rng)

    def _apply_reload(self, job: SimJob) -> None:
        if job.pending is not None and self.sim_time - job.pending_since >= self.reload_delay_seconds:
            job.batch_size, job.precision = job.pending
            job.pending = None
            log.info("simulated pod %s now runs batch %d at %s", job.pod, job.batch_size, job.precision)
            if job.engine is not None:
                # The engine restarts with its new arguments: nothing is served while it loads.
                config = replace(job.engine.config, max_num_seqs=job.batch_size, precision=job.precision)
                job.engine.configure(config, reload_seconds=self.reload_delay_seconds)

    def _job_point(self, job: SimJob) -> gpusim.JobPoint:
        """A synchronous step over the pod's GPUs. A pod with work-share < 1 waits each step for a
        peer elsewhere (at the default limit) that does a full share: a straggler's partner."""
        caps = [self.devices[i].power_limit_watts for i in job.gpu_indices]
        locks: list[float | None] = [self.devices[i].locked_clock_mhz for i in job.gpu_indices]
        key = (job.kind, job.thermal_clock_mhz, job.batch_size, job.precision, job.work_share, *caps, *locks)
        point = self._points.get(key)
        if point is None:
            profile = job.profile
            assert profile is not None
            spec = self.devices[job.gpu_indices[0]].spec
            work = [job.work_share * job.batch_size] * len(caps)
            if job.work_share < 1:
                work.append(float(job.batch_size))
                caps.append(spec.default_power_limit_watts)
                locks.append(None)
            point = gpusim.job_step(
                spec, profile, job.precision, work, caps, batch_size=job.batch_size, locked_clocks=locks
            )
            if len(self._points) > 4096:
                self._points.clear()
            self._points[key] = point
        return point


class SimWorkloads:
    """Pods of a KWOK node as simulated workloads: GPU allocation and work counters. `claims` and
    `slices` (the API server's ResourceClaims and this node's ResourceSlices) give DRA pods their
    devices; without them only device-plugin pods get GPUs. On a node with a real kubelet (its
    device plugin advertising these simulated GPUs' UUIDs), `kubelet` is its pod-resources API:
    each pod then plays on the GPUs the kubelet gave it, and a pod it lists none for waits."""

    def __init__(
        self,
        backend: SimBackend,
        claims: Callable[[], Sequence[ClaimView]] | None = None,
        slices: Callable[[], Sequence[SliceDevice]] | None = None,
        dra: DraConfig | None = DEFAULT_CONFIG,
        kubelet: GpuAllocations | None = None,
    ) -> None:
        self.backend = backend
        self.claims = claims
        self.slices = slices
        self.dra = dra
        self.kubelet = kubelet
        self._parser = MetricsParser()

    def dynamic(self, pods: Sequence[PodInfo]) -> dict[str, tuple[DynamicDevice, ...]]:
        """What the kubelet would list for each pod: the allocated devices of the claims reserved
        for it (by UID, in its namespace)."""
        claims = self.claims() if self.claims is not None else ()
        given: dict[str, tuple[DynamicDevice, ...]] = {}
        for pod in pods:
            devices = tuple(
                DynamicDevice(*d.key, d.share_id or "")
                for c in claims
                if c.namespace == pod.namespace and pod.uid and pod.uid in c.consumers
                for d in c.devices
            )
            if devices:
                given[pod.key] = devices
        return given

    def allocations(self, pods: Sequence[PodInfo]) -> Mapping[str, PodDevices]:
        """Keep each pod's GPUs stable, free those of pods that are gone, give DRA pods the GPUs of
        their devices and hand free ones to device-plugin pods (lowest index first, those no DRA
        driver publishes before those it does: a node split between the two)."""
        jobs = self.backend.jobs
        devices = self.backend.devices
        index_of = {d.uuid: d.index for d in devices}
        dynamic = self.dynamic(pods)
        catalog = device_catalog(self.slices()) if self.slices is not None else {}
        by_dra = resolve({k: PodDevices((), v) for k, v in dynamic.items()}, catalog, self.dra).by_pod
        published = {index_of[d.uuid] for d in catalog.values() if d.uuid in index_of}
        present = {
            p.key: p
            for p in pods
            if (p.gpu_request > 0 or p.key in by_dra) and p.phase in ("Pending", "Running")
        }
        for key in [k for k in jobs if k not in present]:
            del jobs[key]
        used = {i for job in jobs.values() for i in job.gpu_indices}
        given = self.kubelet.allocations(pods) if self.kubelet is not None else None
        for key, pod in sorted(present.items()):
            job = jobs.get(key)
            if job is None:
                allocated: tuple[int, ...] = ()
                if given is not None:
                    gpus = tuple(index_of[u] for u in given.get(key, PodDevices()).plugin if u in index_of)
                    if len(gpus) < pod.gpu_request:
                        continue  # not admitted by the kubelet yet
                else:
                    allocated = tuple(index_of[u] for u in by_dra.get(key, ()) if u in index_of)
                    free = sorted(
                        (d.index for d in devices if d.index not in used and d.index not in allocated),
                        key=lambda i: (i in published, i),
                    )
                    if len(free) < pod.gpu_request:
                        log.warning(
                            "pod %s wants %d GPUs, only %d free on this node", key, pod.gpu_request, len(free)
                        )
                        continue
                    gpus = allocated + tuple(free[: pod.gpu_request])
                job = self._new_job(pod, gpus)
                job.dra_indices = allocated
                if job.kind == SERVING:
                    self._start_engine(job, pod)
                jobs[key] = job
                used.update(job.gpu_indices)
            self._follow_hints(job, pod)
        return {
            key: PodDevices(
                tuple(devices[i].uuid for i in job.gpu_indices if i not in job.dra_indices),
                dynamic.get(key, ()),
            )
            for key, job in jobs.items()
        }

    @staticmethod
    def _new_job(pod: PodInfo, gpu_indices: tuple[int, ...]) -> SimJob:
        kind = pod.annotations.get(SIM_WORKLOAD)
        if kind is not None and kind not in PROFILES:
            log.warning("pod %s: unknown %s %r; it idles", pod.key, SIM_WORKLOAD, kind)
            kind = None
        batch = positive_int(pod.annotations.get(SIM_BATCH_SIZE)) or DEFAULT_BATCH.get(kind or "", 1)
        precision = pod.annotations.get(SIM_PRECISION, DEFAULT_PRECISION)
        # Its start-up arguments win, as an engine's command line does.
        flagged = [b for flag in BATCH_FLAGS if (b := positive_int(flag_value(pod.argv, flag)))]
        batch = flagged[-1] if flagged else batch
        quantization = flag_value(pod.argv, QUANTIZATION_FLAG)
        precision = quantization or precision
        if precision not in gpusim.PRECISIONS:
            precision = DEFAULT_PRECISION
        try:
            share = float(pod.annotations.get(SIM_WORK_SHARE, "1"))
        except ValueError:
            share = 1.0
        share = min(max(share, 0.05), 1.0)
        thermal = positive_int(pod.annotations.get(SIM_THERMAL_CLOCK))
        return SimJob(
            pod.key,
            gpu_indices,
            kind,
            batch,
            precision,
            work_share=share,
            thermal_clock_mhz=float(thermal) if thermal is not None else None,
            fixed_batch=bool(flagged),
            fixed_precision=quantization is not None,
        )

    def _start_engine(self, job: SimJob, pod: PodInfo) -> None:
        """An llm-serving pod serves on its first GPU (one replica, one GPU)."""
        device = self.backend.devices[job.gpu_indices[0]]
        if not device.spec.supports(job.precision):
            job.precision = DEFAULT_PRECISION
        rate = ascii_float(pod.annotations.get(SIM_REQUESTS_PER_SECOND, ""))
        job.requests_per_second = (
            rate if rate is not None and 0 <= rate <= 1e4 else DEFAULT_REQUESTS_PER_SECOND
        )
        job.gpu_indices = job.gpu_indices[:1]
        job.engine = serving.ServingEngine(
            serving.ServedModel(gpu=device.spec),
            serving.EngineConfig(
                job.batch_size, job.precision, device.power_limit_watts, device.locked_clock_mhz
            ),
            random.Random(f"{job.pod}/arrivals"),
        )

    def _follow_hints(self, job: SimJob, pod: PodInfo) -> None:
        batch = positive_int(pod.annotations.get(ANNOTATION_BATCH_SIZE)) or job.batch_size
        precision = pod.annotations.get(ANNOTATION_QUANTIZATION, job.precision)
        if job.fixed_batch:
            batch = job.batch_size
        if job.fixed_precision:
            precision = job.precision
        spec = self.backend.devices[job.gpu_indices[0]].spec if job.gpu_indices else None
        if spec is None or not spec.supports(precision):
            precision = job.precision
        wanted = (batch, precision)
        if wanted == (job.batch_size, job.precision):
            job.pending = None
        elif wanted != job.pending:
            job.pending, job.pending_since = wanted, self.backend.sim_time

    def read(self, workload: MeasuredWorkload, pod: PodInfo | None) -> WorkReading:
        job = self.backend.jobs.get(f"{workload.namespace}/{workload.pod}")
        if pod is None or job is None:
            return WorkReading(
                None, error=f"pod {workload.namespace}/{workload.pod} runs no workload on this node"
            )
        self.backend.advance()
        if job.kind is None:
            return WorkReading(0.0)
        if job.engine is not None:
            # What a vLLM engine exposes, and the config info line of edpilot's workload helper,
            # read by the agent's own parser.
            config = job.engine.config
            info = f'{workload.configMetric}{{batch_size="{config.max_num_seqs}",quantization="{config.precision}"}} 1\n'
            return self._parser.parse(workload, serving.exposition(job.engine) + info)
        latency = job.step_seconds if workload.latencyMetric is not None else None
        return WorkReading(job.work_units, job.batch_size, job.precision, latency)
