"""Property tests on the core and the operator's pure reconcile, over random observation streams.

tests/unit/test_optimizer.py already checks single short streams (2-7 ticks) for cap bounds and
bad windows. These cover what it does not: long streams that reach exploration and convergence
with bad data injected anywhere, jobs of several GPUs over several pods, the optimizer state
restored from its JSON form mid-stream (what a restarted operator reads back), and the same
streams driven through `services.reconcile_policy` as GPUNodeReports, end to end.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from edpilot_operator.selection import PodInfo, PolicyRef, governance
from edpilot_operator.services import reconcile_policy
from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from pydantic import ValidationError

from edpilot.contract import ANNOTATION_POWER_CAP
from edpilot.edp import MemberSample
from edpilot.models import (
    BatchSizeSpec,
    EnergyPolicySpec,
    EnergyPolicyStatus,
    GPUNodeReportStatus,
    LabelSelector,
    PowerCapSpec,
    Profile,
    QuantizationSpec,
    WorkMetric,
)
from edpilot.optimizer import (
    Decision,
    MemberInfo,
    Observation,
    OptimizerState,
    Tuning,
    WorkloadInfo,
    batch_candidates,
    step,
)

# Short windows and probes, so a stream of a few dozen reports reaches every phase.
TUNING = Tuning(
    windowSeconds=1.0,
    baselineWindows=2,
    probeWindows=1,
    maxWindows=2,
    settleWindows=0,
    capProbeBudget=4,
    stragglerProbeBudget=2,
    applyTimeoutSeconds=4.0,
    driftWindows=2,
    driftHoldoffSeconds=5.0,
)
ACCURACY: dict[Profile, float] = {"bf16": 1.0, "fp16": 0.999, "fp8": 0.995, "int8": 0.97}
# Events of a stream. Each bad one is something an agent or a workload really produces.
GOOD = "good"
BAD = ("nan", "inf", "negative", "energy-reset", "work-backwards", "huge-energy", "inconsistent-config")
QUIET = ("same-time", "silent-work", "clock-stepped-back")  # no window, or no work: never a decision
EVENT = st.one_of(
    st.just(GOOD),
    st.just(GOOD),
    st.just(GOOD),
    st.sampled_from(BAD),
    st.sampled_from(QUIET),
    st.just("ignore-hints"),
)

# ---------------------------------------------------------------- strategies


@st.composite
def constraints(draw: st.DrawFn) -> tuple[float, float, float] | None:
    """A GPU's (min, max, default) limits; sometimes unknown or inconsistent, as a broken driver says."""
    kind = draw(st.sampled_from(["h100", "h100", "random", "random", "unknown", "inconsistent"]))
    if kind == "h100":
        return (200.0, 700.0, 700.0)
    if kind == "unknown":
        return None
    lo = draw(st.floats(50, 400))
    hi = lo + draw(st.floats(0, 600))
    if kind == "inconsistent":
        return (lo, hi, hi + draw(st.floats(1, 100)))
    return (lo, hi, lo + draw(st.floats(0, 1)) * (hi - lo))


@st.composite
def policies(draw: st.DrawFn) -> EnergyPolicySpec:
    mode = draw(st.sampled_from(["Auto", "Auto", "Auto", "Fixed", "Off"]))
    p_lo, p_hi = sorted((draw(st.floats(10, 100)), draw(st.floats(10, 100))))
    w_lo, w_hi = sorted((draw(st.floats(1, 1000)), draw(st.floats(1, 1000))))
    watts = draw(st.booleans())
    b_lo, b_hi = sorted((draw(st.integers(1, 512)), draw(st.integers(1, 512))))
    quantize = draw(st.booleans())
    return EnergyPolicySpec(
        selector=LabelSelector(),
        workMetric=WorkMetric(name="work_total"),
        objective=draw(st.sampled_from(["Energy", "EDP", "ED2P"])),
        maxSlowdownPercent=draw(st.floats(0, 50)),
        powerCap=PowerCapSpec(
            mode=mode,
            minPercent=p_lo,
            maxPercent=p_hi,
            minWatts=w_lo if watts else None,
            maxWatts=w_hi if watts else None,
            watts=draw(st.floats(1, 1000)) if mode == "Fixed" else None,
        ),
        batchSize=BatchSizeSpec(
            mode=draw(st.sampled_from(["Auto", "Off"])),
            min=b_lo,
            max=b_hi,
            multipleOf=draw(st.sampled_from([1, 8, 64])),
        ),
        quantization=QuantizationSpec(
            mode="Auto" if quantize else "Off",
            allowed=draw(st.lists(st.sampled_from(list(ACCURACY)), min_size=1, max_size=4, unique=True)),
            maxAccuracyDropPercent=draw(st.floats(0, 5)),
        ),
    )


@st.composite
def jobs(draw: st.DrawFn) -> WorkloadInfo:
    """One to four GPUs over one or two pods (a job grouped by label)."""
    n = draw(st.integers(1, 4))
    pods = draw(st.integers(1, min(n, 2)))
    members = []
    for i in range(n):
        c = draw(constraints())
        pod = f"ns/p{i % pods}"
        if c is None:
            members.append(MemberInfo(member=f"GPU-{i}", pod=pod))
        else:
            members.append(
                MemberInfo(member=f"GPU-{i}", pod=pod, minWatts=c[0], maxWatts=c[1], defaultWatts=c[2])
            )
    return WorkloadInfo(
        name="job",
        members=tuple(members),
        accuracy=ACCURACY,
        batchSize=draw(st.sampled_from([8, 16, 32])),
        quantization="bf16",
    )


# ---------------------------------------------------------------- a job that follows its hints


@dataclass
class Job:
    """Counters of a job whose speed and draw follow its caps and batch size (a memory-bound
    curve: throughput saturates with the cap, so the optimizer has something to find)."""

    info: WorkloadInfo
    rng: random.Random
    time: float = 1_000.0
    clock_offset: float = 0.0
    batch: int = 8
    quantization: Profile = "bf16"

    def __post_init__(self) -> None:
        self.batch = self.info.batchSize or 8
        self.energy = {m.member: 10.0 * (i + 1) for i, m in enumerate(self.info.members)}
        self.work = {m.pod: 100.0 for m in self.info.members}
        self.caps: dict[str, float | None] = {m.member: m.defaultWatts for m in self.info.members}

    def apply(self, d: Decision) -> None:
        for m in self.info.members:
            wanted = d.capWatts.get(m.member)
            if wanted is not None and m.minWatts is not None and m.maxWatts is not None:
                self.caps[m.member] = min(max(wanted, m.minWatts), m.maxWatts)
            elif wanted is None:
                self.caps[m.member] = m.defaultWatts
        self.batch = d.batchSize or self.batch
        self.quantization = d.quantization or self.quantization

    def advance(self, silent: bool = False) -> None:
        dt = self.rng.uniform(1.0, 3.0)
        self.time += dt
        slowest = min((c or 700.0) for c in self.caps.values())
        speed = 100.0 * math.sqrt(self.batch / 8) * min(1.0, (slowest / 450.0) ** 0.5)
        speed *= {"fp8": 1.3, "int8": 1.25}.get(self.quantization, 1.0) * self.rng.uniform(0.97, 1.03)
        for member, cap in self.caps.items():
            self.energy[member] += min(cap or 700.0, 380.0) * dt * self.rng.uniform(0.97, 1.03)
        if not silent:
            for pod in self.work:
                self.work[pod] += speed * dt

    def observation(self, event: str) -> Observation:
        members = []
        for i, m in enumerate(self.info.members):
            energy, work = self.energy[m.member], self.work[m.pod]
            batch: int | None = self.batch
            if event == "nan" and i == 0:
                energy = math.nan
            elif event == "inf" and i == 0:
                work = math.inf
            elif event == "negative" and i == 0:
                energy = -energy
            elif event == "inconsistent-config" and i == 0 and len(self.info.members) > 1:
                batch = self.batch * 2
            members.append(
                MemberSample(
                    member=m.member,
                    energyJoules=energy,
                    workUnits=work,
                    powerWatts=300.0,
                    capWatts=self.caps[m.member],
                    batchSize=batch,
                    quantization=self.quantization,
                )
            )
        return Observation(time=self.time + self.clock_offset, members=tuple(members))


def tick(job: Job, event: str) -> Observation:
    """Move the job on by one report and return what the agent reports for `event`."""
    if event == "same-time":
        return job.observation(event)
    work = dict(job.work)
    job.advance(silent=event == "silent-work")
    if event == "energy-reset":
        job.energy = dict.fromkeys(job.energy, 1.0)  # a driver reload zeroes the counters
    elif event == "work-backwards":
        job.work = {k: v * 0.5 for k, v in work.items()}  # a new process counting from scratch
    elif event == "huge-energy":
        first = job.info.members[0].member
        job.energy[first] += 1e9  # a glitch the counter keeps: a gigajoule in seconds
    elif event == "clock-stepped-back":
        job.clock_offset -= 3600.0  # an NTP step: the node's clock is an hour behind from now on
    return job.observation(event)


def roundtrip(state: OptimizerState) -> OptimizerState:
    """What a restarted operator reads back from the policy's status: strict JSON (the API server
    takes no NaN) without nulls (a merge patch reads null as "delete"). A state holding a
    non-finite sample cannot be stored; the operator never builds one, since its reports are
    validated, so such a state is kept in memory here."""
    try:
        stored = json.loads(json.dumps(state.model_dump(mode="json", exclude_none=True), allow_nan=False))
    except ValueError:
        return state
    return OptimizerState.model_validate(stored)


# ---------------------------------------------------------------- invariants


def cap_range(spec: PowerCapSpec, m: MemberInfo) -> tuple[float, float] | None:
    """Where a member's cap may be (DESIGN.md §5, invariant 1); None: its limit is left alone."""
    if m.minWatts is None or m.maxWatts is None or m.defaultWatts is None:
        return None
    if not m.minWatts <= m.defaultWatts <= m.maxWatts:
        return None
    if spec.mode == "Off":
        return (m.defaultWatts, m.defaultWatts)
    if spec.mode == "Fixed":
        assert spec.watts is not None
        fixed = min(max(spec.watts, m.minWatts), m.maxWatts)
        return (fixed, fixed)
    lo = max(m.minWatts, spec.minPercent * m.defaultWatts / 100, spec.minWatts or 0)
    hi = min(m.maxWatts, spec.maxPercent * m.defaultWatts / 100, spec.maxWatts or math.inf)
    return (lo, hi) if lo <= hi + 1e-9 else None


def assert_within_bounds(policy: EnergyPolicySpec, info: WorkloadInfo, d: Decision) -> None:
    assert set(d.capWatts) == {m.member for m in info.members}
    for m in info.members:
        cap, allowed = d.capWatts[m.member], cap_range(policy.powerCap, m)
        if allowed is None:
            # An empty intersection may round to one value either way; anything else is left alone.
            assert cap is None or (m.minWatts is not None and m.maxWatts is not None), (m, cap)
            if cap is not None:
                assert m.minWatts is not None and m.maxWatts is not None
                assert m.minWatts - 1e-9 <= cap <= m.maxWatts + 1e-9
            continue
        if cap is None:
            # Bounds that meet in one point may round to an empty range: leaving it alone is right.
            assert allowed[1] - allowed[0] < 1e-6, (m, policy.powerCap)
            continue
        assert allowed[0] - 1e-6 <= cap <= allowed[1] + 1e-6, (m, policy.powerCap, cap)
    if d.batchSize is not None:
        assert d.batchSize == info.batchSize or d.batchSize in batch_candidates(policy, info), d.batchSize
    if d.quantization is not None:
        assert d.quantization == info.quantization or d.quantization in policy.quantization.allowed


def decided(state: OptimizerState) -> dict[str, Any]:
    """The part of the state a decision changes: what to run and what was measured."""
    return state.model_dump(
        include={
            "phase",
            "stage",
            "exploration",
            "target",
            "acc",
            "baseline",
            "incumbent",
            "probes",
            "capBracket",
        }
    )


# ---------------------------------------------------------------- the properties


@settings(max_examples=6_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    policy=policies(),
    info=jobs(),
    events=st.lists(EVENT, min_size=8, max_size=32),
    seed=st.integers(0, 2**16),
)
def test_streams_stay_in_bounds_ignore_bad_data_and_survive_a_restore(
    policy: EnergyPolicySpec, info: WorkloadInfo, events: list[str], seed: int
) -> None:
    """Through a whole stream: every cap within its bounds, no bad or quiet report moves what the
    optimizer decided or measured, and an optimizer restored from its stored JSON at any report
    decides exactly as the one that never stopped."""
    job = Job(info, random.Random(seed))
    restart = random.Random(~seed)  # which reports the second operator restarts at
    kept: OptimizerState | None = None  # the operator that never restarts
    restored: OptimizerState | None = None  # the one that reads its state back at random reports
    for event in events:
        obs = tick(job, event)
        now = job.time
        d = step(policy, info, kept, obs, now, TUNING)
        again = step(
            policy,
            info,
            roundtrip(restored) if restored and restart.random() < 0.3 else restored,
            obs,
            now,
            TUNING,
        )
        assert again.model_dump_json(exclude={"reasons", "events"}) == d.model_dump_json(
            exclude={"reasons", "events"}
        )
        assert_within_bounds(policy, info, d)
        harmless = event == "inconsistent-config" and len(info.members) == 1  # nobody to disagree with
        if kept is not None and (event in BAD or event in QUIET) and not harmless:
            assert decided(d.state) == decided(kept), f"{event} changed a decision"
        if d.badData is not None and kept is not None:
            assert decided(d.state) == decided(kept)
            # The first bad window of a streak is an event; a streak makes the workload Degraded.
            first = d.state.badStreak == 1
            assert first == any(e.reason == "BadMeasurement" for e in d.events), d.events
            assert (d.phase == "Degraded") == (d.state.badStreak >= TUNING.degradedAfterBadWindows)
        kept, restored = d.state, again.state
        hypothesis_event(f"reached {d.state.phase}")
        if event != "ignore-hints":
            job.apply(d)


NODE_OF = {"ns/p0": "node-a", "ns/p1": "node-b"}


def report(node: str, job: Job, obs: Observation, t0: datetime) -> GPUNodeReportStatus | None:
    """The GPUNodeReport status an agent writes for the job's GPUs on `node`, as the operator's
    index reads it; None when the API server would refuse the write (not JSON: NaN, infinity;
    below a schema minimum), so the operator keeps seeing the report before it."""
    by_member = {m.member: m for m in job.info.members}
    mine = [s for s in obs.members if NODE_OF[by_member[s.member].pod] == node]
    gpus = [
        {
            "index": i,
            "uuid": s.member,
            "model": "H100",
            "minLimitWatts": by_member[s.member].minWatts or 0.0,
            "maxLimitWatts": by_member[s.member].maxWatts or 0.0,
            "defaultLimitWatts": by_member[s.member].defaultWatts or 0.0,
            "enforcedLimitWatts": s.capWatts or 0.0,
            "powerWatts": 300.0,
            "energyJoules": s.energyJoules,
            "pods": [by_member[s.member].pod],
        }
        for i, s in enumerate(mine)
    ]
    workloads = []
    for pod in sorted({by_member[s.member].pod for s in mine}):
        first = next(s for s in mine if by_member[s.member].pod == pod)
        workloads.append(
            {
                "namespace": "ns",
                "pod": pod.split("/", 1)[1],
                "gpuUUIDs": [s.member for s in mine if by_member[s.member].pod == pod],
                "workUnits": first.workUnits,
                "batchSize": first.batchSize,
                "quantization": first.quantization,
            }
        )
    body = {
        "nodeName": node,
        "agentVersion": "test",
        "backend": "sim",
        "time": (t0 + timedelta(seconds=obs.time)).isoformat(),
        "gpus": gpus,
        "workloads": workloads,
    }
    try:
        return GPUNodeReportStatus.model_validate(json.loads(json.dumps(body, allow_nan=False)))
    except (ValueError, ValidationError):
        return None


def applied_cap(m: MemberInfo, annotation: str | None) -> float | None:
    """What the agent enforces on a member given its pod's cap annotation (clamped, like the agent)."""
    if annotation is None or m.minWatts is None or m.maxWatts is None or m.maxWatts <= 0:
        return m.defaultWatts
    return min(max(float(annotation), m.minWatts), m.maxWatts)


@settings(max_examples=4_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    policy=policies(),
    info=jobs(),
    events=st.lists(EVENT, min_size=8, max_size=24),
    seed=st.integers(0, 2**16),
    lost=st.integers(0, 24),
)
def test_reconcile_through_reports_never_raises_and_writes_only_bounded_caps(
    policy: EnergyPolicySpec, info: WorkloadInfo, events: list[str], seed: int, lost: int
) -> None:
    """The operator's pure reconcile over the same streams as GPUNodeReports, its status fed back
    as the next call's (through JSON, as the API server stores it), one node's report missing for
    one reconcile: it never raises, its status is valid, its cap annotations are in bounds."""
    job = Job(info, random.Random(seed))
    pods = sorted({m.pod for m in info.members})
    ref = PolicyRef("ns", "policy", policy.model_copy(update={"groupByLabel": "job"}))
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    status: dict[str, Any] = {}
    reports: dict[str, GPUNodeReportStatus] = {}
    annotations: dict[str, dict[str, str]] = {pod: {} for pod in pods}
    for n, event in enumerate(events):
        obs = tick(job, event)
        for node in {NODE_OF[pod] for pod in pods}:
            written = report(node, job, obs, t0)
            reports.update({node: written} if written is not None else {})
        seen = {node: r for node, r in reports.items() if not (n == lost and node == "node-b")}
        pod_infos = [
            PodInfo(
                namespace="ns",
                name=pod.split("/", 1)[1],
                uid=pod,
                node=NODE_OF[pod],
                phase="Running",
                gpus=sum(1 for m in info.members if m.pod == pod),
                labels={"job": "j"},
                annotations=dict(annotations[pod]),
                image="img",
            )
            for pod in pods
        ]
        outcome = reconcile_policy(
            policy=ref,
            status=status,
            generation=1,
            pods=pod_infos,
            governance=governance(pod_infos, [ref]),
            reports=seen,
            now=t0 + timedelta(seconds=job.time + 1),
            tuning=TUNING,
        )
        # The API server stores strict JSON; a merge patch replaces lists and drops nulls.
        status = json.loads(json.dumps({**status, **outcome.status}, allow_nan=False))
        status["totals"] = {k: v for k, v in status["totals"].items() if v is not None}
        parsed = EnergyPolicyStatus.model_validate(status)
        assert [r.name for r in parsed.workloads] == ["job:j"]
        assert not any(e.reason == "StateDiscarded" for e in outcome.events), outcome.events
        for pod, patch in outcome.pod_annotations.items():
            for key, value in patch.items():
                if value is None:
                    annotations[pod].pop(key, None)
                else:
                    annotations[pod][key] = value
        for pod in pods:
            if ANNOTATION_POWER_CAP not in annotations[pod]:
                continue
            watts = float(annotations[pod][ANNOTATION_POWER_CAP])
            ranges = [cap_range(policy.powerCap, m) for m in info.members if m.pod == pod]
            # The annotation is the highest cap of the pod's GPUs, in whole watts.
            assert any(r is not None and r[0] - 0.5 <= watts <= r[1] + 0.5 for r in ranges), (
                pod,
                watts,
                ranges,
            )
        if event != "ignore-hints":
            job.caps = {
                m.member: applied_cap(m, annotations[m.pod].get(ANNOTATION_POWER_CAP)) for m in info.members
            }
