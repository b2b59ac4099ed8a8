"""`NodeAgent`: one node's measure-apply-report loop, one `tick()` at a time.

Each tick reads every GPU and every selected pod's work counter (from a `WorkSource` that never
blocks: pods' HTTP endpoints are scraped in the background, see scraper.py), decides the power limits
and locked SM clocks (`actuator.plan_limits`, `actuator.plan_clocks`) and applies them, and writes the node's GPUNodeReport status when it
is due: every `reportIntervalSeconds` of the spec (clamped to [min, default] interval), sooner
(but not more often than the min interval) when a limit changed or a condition flipped, and
with exponential backoff while the API server fails. Nothing here raises out of `tick()`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

from edpilot.contract import HOLDERS_UNKNOWN, transition
from edpilot.dra import DEFAULT_CONFIG, DraConfig, SliceDevice, device_catalog
from edpilot.models import (
    Condition,
    GPUNodeReportSpec,
    GPUNodeReportStatus,
    GPUStatus,
    Lease,
    WorkloadSample,
)
from edpilot_agent import AGENT_VERSION
from edpilot_agent.actuator import (
    Applier,
    ClockPlan,
    LeaseTracker,
    Plan,
    plan_clocks,
    plan_limits,
    restore_clocks,
    restore_defaults,
)
from edpilot_agent.backend import ENERGY_COUNTER_WRAP_JOULES, GpuBackend, GpuBackendError, GpuInfo, GpuReading
from edpilot_agent.counters import CounterTracker
from edpilot_agent.holdings import GpuAllocations, Holdings, resolve
from edpilot_agent.kube import KubeApi
from edpilot_agent.pods import PodInfo
from edpilot_agent.reporter import gpu_status, workload_sample
from edpilot_agent.scraper import WorkReading, WorkSource

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 300.0


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> datetime: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> datetime:
        return datetime.now(UTC)


class SliceSource(Protocol):
    """The GPU devices DRA drivers published for this node (its ResourceSlices)."""

    def slice_devices(self) -> Sequence[SliceDevice]: ...


class NodeAgent:
    def __init__(
        self,
        node_name: str,
        backend: GpuBackend,
        work_source: WorkSource,
        kube: KubeApi,
        clock: Clock,
        allocations: GpuAllocations | None = None,
        dry_run: bool = False,
        default_interval_seconds: float = 60.0,
        min_interval_seconds: float = 1.0,
        silent_after_seconds: float = 30.0,
        energy_period_seconds: float = 10.0,
        time_scale: float = 1.0,
        dra: DraConfig | None = DEFAULT_CONFIG,
        slices: SliceSource | None = None,
    ) -> None:
        self.node_name = node_name
        # DRA devices are GPUs only through the UUIDs `slices` publish for them (holdings.py).
        self.dra = dra
        self.slices = slices
        # Reports carry the wall-clock time the counters were read, and apart the same instant on
        # the agent's steady clock (monotonic, anchored at its start), which windows are measured
        # on: a wall clock stepped forward (NTP) must not read as one long window. A simulated
        # node running `time_scale` times faster than real time runs that clock faster too, as
        # its counters do, while API timestamps stay real (in the future they read `<invalid>`).
        self.time_scale = time_scale
        self._started_wall = clock.wall()
        self._started_monotonic = clock.monotonic()
        self.backend = backend
        self.work_source = work_source
        self.kube = kube
        self.clock = clock
        self.allocations = allocations
        self.default_interval = default_interval_seconds
        self.min_interval = min(min_interval_seconds, default_interval_seconds)
        self.silent_after = silent_after_seconds
        self.energy_period = energy_period_seconds
        self.gpus = backend.gpus()
        self.applier = Applier(backend, node_name, dry_run)
        self.lease = LeaseTracker()
        self.energy = {g.uuid: CounterTracker(wrap_at=ENERGY_COUNTER_WRAP_JOULES) for g in self.gpus}
        self.work: dict[str, CounterTracker] = {}
        self.readings: dict[str, GpuReading] = {}
        self.snapshot: GPUNodeReportStatus | None = None
        self.last_plan: Plan | None = None
        self.last_clock_plan: ClockPlan | None = None
        self.reports = 0
        self.report_errors = 0
        self._last_report_at: float | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self._dirty = True
        self._energy_read_at: float | None = None
        self._refusals: frozenset[tuple[str, str, str]] = frozenset()

    # ------------------------------------------------------------------ the loop

    def tick(self) -> None:
        now, wall = self.clock.monotonic(), self.clock.wall()
        spec, spec_problem = self.kube.report_spec()
        pods = self.kube.pods()
        held, allocation_problem = self._holdings(pods)
        if pods is None:
            # A restarted agent's first report would otherwise say that no pod holds any GPU, and
            # the operator would drop the node's caps until the next report.
            allocation_problem = "the node's pods have not been listed yet"
        read_errors = self._read_gpus(now, self.gpus, energy=False)
        samples = self._read_work(spec, pods, held.by_pod, now)

        lease, lease_note = self._operator_lease(spec)
        lease_problem = self.lease.expired_reason(lease, now, wall)
        # Until the pods are known, no cap can be tied to a live pod: hold the defaults.
        void = lease_problem or ("PodsUnknown" if pods is None else None)
        gpu_pods = None if allocation_problem else held.holders()
        current = self.applier.current_limits({u: r.enforced_limit_watts for u, r in self.readings.items()})
        live = {p.key for p in pods or ()}
        plan = plan_limits(
            spec.powerLimits if spec else (), self.gpus, current, live, gpu_pods, void, shared=held.shared
        )
        clocks = plan_clocks(
            spec.lockedClocks if spec else (),
            self.gpus,
            self.applier.current_clocks(),
            live,
            gpu_pods,
            void,
            shared=held.shared,
        )
        errors = self._apply(plan, clocks, now)

        interval = spec.reportIntervalSeconds if spec else self.default_interval
        report = self._report_due(now, min(max(interval, self.min_interval), self.default_interval))
        # Energy counters are cumulative: reading them for each report (and every energy period,
        # for /metrics) loses nothing, and they are by far the dearest NVML read.
        if report or self._energy_read_at is None or now - self._energy_read_at >= self.energy_period:
            read_errors += self._read_gpus(now, self.gpus, energy=True)
        conditions = self._conditions(
            wall,
            spec_problem,
            lease_problem,
            plan,
            clocks,
            errors,
            read_errors,
            allocation_problem,
            samples,
            lease_note,
        )
        self._publish(now, wall, held, samples, conditions)
        if report:
            self._write_report(now)

    def shutdown(self, reason: str = "Shutdown") -> None:
        """Give every GPU back its default limit and unlocked clocks, and say so in a last report
        (best effort)."""
        now, wall = self.clock.monotonic(), self.clock.wall()
        current = self.applier.current_limits({u: r.enforced_limit_watts for u, r in self.readings.items()})
        plan = restore_defaults(self.gpus, current, reason)
        clocks = restore_clocks(self.gpus, self.applier.current_clocks(), reason)
        errors = self._apply(plan, clocks, now)
        errors += self._read_gpus(now, self.gpus, energy=True)
        if self.snapshot is not None:
            previous = self.snapshot.conditions
            conditions = [c for c in previous if c.type not in ("Ready", "LeaseValid")] + [
                transition(
                    previous,
                    "Ready",
                    "False",
                    "AgentStopped",
                    "the agent stopped; default limits and unlocked clocks restored",
                    wall,
                )
            ]
            if errors:
                conditions.append(
                    transition(previous, "SpecApplied", "False", "RestoreFailed", "; ".join(errors), wall)
                )
            self._publish(now, wall, Holdings(), list(self.snapshot.workloads), conditions)
            self._dirty = True
            self._write_report(now)

    def _operator_lease(self, spec: GPUNodeReportSpec | None) -> tuple[Lease | None, str]:
        """The operator's lease as the spec names it: the watched Lease of `operatorLease`, else
        (an operator before that field) the lease embedded in the spec. Only a Lease the spec
        names is trusted: the operator writes the spec, and tenants cannot write reports."""
        if spec is None:
            return None, ""
        if spec.operatorLease is not None:
            return self.kube.operator_lease(spec.operatorLease)
        return spec.lease, ""

    # ------------------------------------------------------------------ measuring

    def _holdings(self, pods: list[PodInfo] | None) -> tuple[Holdings, str]:
        if self.allocations is None:
            return Holdings(), "no source of GPU allocations"
        try:
            given = self.allocations.allocations(pods or [])
        except Exception as exc:  # an unreachable kubelet must not stop measuring
            return Holdings(), str(exc)
        catalog = device_catalog(self.slices.slice_devices()) if self.slices is not None else {}
        return resolve(given, catalog, self.dra), ""

    def _read_gpus(self, now: float, gpus: Sequence[GpuInfo], energy: bool) -> list[str]:
        errors = []
        for info in gpus:
            try:
                reading = self.backend.read(info.uuid, energy=energy)
            except GpuBackendError as exc:
                errors.append(str(exc))
                continue
            self.readings[info.uuid] = reading
            tracker = self.energy[info.uuid]
            if reading.energy_joules is not None and not tracker.update(reading.energy_joules, now):
                errors.append(f"GPU {info.uuid}: {tracker.problem}")
        if energy and len(gpus) == len(self.gpus):
            self._energy_read_at = now
        return errors

    def _read_work(
        self,
        spec: GPUNodeReportSpec | None,
        pods: list[PodInfo] | None,
        pod_gpus: Mapping[str, tuple[str, ...]],
        now: float,
    ) -> list[WorkloadSample]:
        by_key = {p.key: p for p in pods or ()}
        samples = []
        wanted = {f"{w.namespace}/{w.pod}": w for w in (spec.workloads if spec else ())}
        for key in [k for k in self.work if k not in wanted]:
            del self.work[key]
        for key, workload in wanted.items():
            try:
                reading = self.work_source.read(workload, by_key.get(key))
            except Exception as exc:  # one broken workload must not stop the others
                reading = WorkReading(None, error=f"reading the work counter failed: {exc}")
            tracker = self.work.setdefault(key, CounterTracker())
            accepted = reading.work_units is not None and tracker.update(reading.work_units, now)
            samples.append(
                workload_sample(
                    workload, reading, accepted, tracker, pod_gpus.get(key, ()), now, self.silent_after
                )
            )
        return samples

    # ------------------------------------------------------------------ acting

    def _apply(self, plan: Plan, clocks: ClockPlan, now: float) -> list[str]:
        self.last_plan, self.last_clock_plan = plan, clocks
        refusals = frozenset((r.uuid, r.pod, r.reason) for r in [*plan.refusals, *clocks.refusals])
        for r in [*plan.refusals, *clocks.refusals]:
            if (r.uuid, r.pod, r.reason) not in self._refusals:
                log.warning("node %s refuses a spec entry (%s): %s", self.node_name, r.reason, r.message)
        if refusals != self._refusals:
            self._dirty = True
        self._refusals = refusals
        errors = self.applier.apply(plan) + self.applier.apply_clocks(clocks)
        if plan.actions or clocks.actions:
            self._dirty = True
            changed = {a.uuid for a in plan.actions} | {a.uuid for a in clocks.actions}
            errors += self._read_gpus(now, [g for g in self.gpus if g.uuid in changed], energy=False)
        return errors

    # ------------------------------------------------------------------ reporting

    def _conditions(
        self,
        wall: datetime,
        spec_problem: str,
        lease_problem: str | None,
        plan: Plan,
        clocks: ClockPlan,
        errors: list[str],
        read_errors: list[str],
        allocation_problem: str,
        samples: list[WorkloadSample],
        lease_note: str = "",
    ) -> list[Condition]:
        previous = self.snapshot.conditions if self.snapshot else []
        if read_errors:
            ready = ("False", "GPUReadFailed", "; ".join(read_errors))
        elif allocation_problem:
            ready = ("False", HOLDERS_UNKNOWN, allocation_problem)
        else:
            ready = ("True", "Measuring", f"{len(self.readings)} GPUs measured")
        if lease_problem is None:
            lease = ("True", "LeaseHeld", "the operator's lease is current")
        elif lease_problem == "NoLease":
            lease = (
                "False",
                "NoLease",
                f"{lease_note or 'the spec names no lease'}: every GPU keeps its default limit",
            )
        else:
            lease = (
                "False",
                lease_problem,
                "the operator's lease expired: every GPU is back at its default limit",
            )
        capped = sum(1 for reason in plan.reasons.values() if reason in ("Spec", "SpecClamped"))
        locked = sum(1 for mhz in clocks.targets.values() if mhz is not None)
        refusals = [*plan.refusals, *clocks.refusals]
        if spec_problem:
            applied = ("False", "SpecUnreadable", spec_problem)
        elif errors:
            applied = ("False", "ActuationFailed", "; ".join(errors))
        elif refusals:
            applied = ("False", "Refused", "; ".join(f"{r.reason}: {r.message}" for r in refusals))
        elif self.applier.dry_run:
            applied = (
                "True",
                "DryRun",
                f"dry-run: {capped} GPUs would be capped, {locked} clock-locked; no setting was changed",
            )
        else:
            applied = (
                "True",
                "Applied",
                f"{capped} GPUs capped, {locked} clock-locked, the others at their default limit and clocks",
            )
        unhealthy = [f"{s.namespace}/{s.pod}: {s.message}" for s in samples if not s.healthy]
        if unhealthy:
            work = ("False", "UnhealthyCounters", "; ".join(unhealthy))
        else:
            work = ("True", "Healthy", f"{len(samples)} work counters healthy")
        rows = {"Ready": ready, "LeaseValid": lease, "SpecApplied": applied, "WorkCountersHealthy": work}
        conditions = [transition(previous, t, s, r, m, wall) for t, (s, r, m) in rows.items()]  # type: ignore[arg-type]
        if {(c.type, c.status, c.reason) for c in conditions} != {
            (c.type, c.status, c.reason) for c in previous
        }:
            self._dirty = True
        return conditions

    def _publish(
        self,
        now: float,
        wall: datetime,
        held: Holdings,
        samples: list[WorkloadSample],
        conditions: list[Condition],
    ) -> None:
        holders = held.holders()
        counted = self._started_wall + timedelta(seconds=(now - self._started_monotonic) * self.time_scale)
        gpus: list[GPUStatus] = [
            gpu_status(
                info,
                self.readings[info.uuid],
                self.energy[info.uuid].total or 0.0,
                sorted(holders.get(info.uuid, ())),
                shared=info.uuid in held.shared,
                locked_sm_clock_mhz=self.applier.locked.get(info.uuid),
            )
            for info in self.gpus
            if info.uuid in self.readings
        ]
        self.snapshot = GPUNodeReportStatus(
            nodeName=self.node_name,
            agentVersion=AGENT_VERSION,
            backend=self.backend.name,
            time=wall,
            counterTime=counted,
            gpus=gpus,
            workloads=samples,
            conditions=conditions,
        )

    def _report_due(self, now: float, interval: float) -> bool:
        if now < self._retry_at:
            return False
        last = self._last_report_at
        return last is None or now - last >= interval or (self._dirty and now - last >= self.min_interval)

    def _write_report(self, now: float) -> None:
        if self.snapshot is None:
            return
        try:
            self.kube.write_status(self.snapshot)
        except Exception as exc:  # never crash on the API server; back off and try again
            self.report_errors += 1
            self._backoff = min(max(2 * self._backoff, self.min_interval), MAX_BACKOFF_SECONDS)
            self._retry_at = now + self._backoff * random.uniform(0.8, 1.2)
            log.warning("node %s: %s; retrying in %.1f s", self.node_name, exc, self._retry_at - now)
            return
        self.reports += 1
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_report_at = now
        self._dirty = False
