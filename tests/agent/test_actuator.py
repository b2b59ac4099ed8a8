from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from edpilot_agent.actuator import (
    Action,
    Applier,
    ClockAction,
    ClockPlan,
    LeaseTracker,
    Plan,
    plan_clocks,
    plan_limits,
    restore_clocks,
    restore_defaults,
)
from edpilot_agent.backend import GpuInfo
from edpilot_agent.sim import SimBackend

from edpilot.models import DesiredLockedClock, DesiredPowerLimit, Lease

A, B, MIG = "GPU-a", "GPU-b", "GPU-mig"
GPUS = [
    GpuInfo(0, A, "H100", 200.0, 700.0, 700.0),
    GpuInfo(1, B, "H100", 200.0, 700.0, 700.0),
    GpuInfo(2, MIG, "H100", 200.0, 700.0, 700.0, mig_enabled=True),
]
AT_DEFAULT = {A: 700.0, B: 700.0, MIG: 700.0}
PODS = {"ns/a", "ns/b"}
HOLDERS = {A: {"ns/a"}, B: {"ns/b"}}


def cap(uuid: str, watts: float, pod: str) -> DesiredPowerLimit:
    return DesiredPowerLimit(gpuUUID=uuid, watts=watts, pod=pod)


def test_a_cap_for_a_live_pod_on_its_gpu_is_applied() -> None:
    plan = plan_limits([cap(A, 450, "ns/a")], GPUS, AT_DEFAULT, PODS, HOLDERS, None)
    assert [(a.uuid, a.watts, a.reason, a.pod) for a in plan.actions] == [(A, 450, "Spec", "ns/a")]
    assert plan.targets[B] == 700 and plan.reasons[B] == "NotInSpec"
    assert not plan.refusals


@pytest.mark.parametrize(("watts", "clamped"), [(50.0, 200.0), (900.0, 700.0), (200.0, 200.0)])
def test_limits_are_clamped_to_the_gpu_constraints(watts: float, clamped: float) -> None:
    plan = plan_limits([cap(A, watts, "ns/a")], GPUS, AT_DEFAULT, PODS, HOLDERS, None)
    assert plan.targets[A] == clamped
    assert plan.reasons[A] == ("Spec" if watts == clamped else "SpecClamped")


def test_unknown_gpu_foreign_pod_and_mig_are_refused_and_change_nothing() -> None:
    desired = [
        cap("GPU-of-another-node", 300, "ns/a"),
        cap(B, 300, "other-ns/not-here"),
        cap(MIG, 300, "ns/a"),
    ]
    plan = plan_limits(desired, GPUS, AT_DEFAULT, PODS, HOLDERS, None)
    assert plan.actions == []
    assert [r.reason for r in plan.refusals] == ["UnknownGPU", "PodNotOnNode", "MIGEnabled"]


def test_a_cap_for_a_pod_that_does_not_hold_the_gpu_is_refused() -> None:
    plan = plan_limits([cap(A, 300, "ns/b")], GPUS, AT_DEFAULT, PODS, HOLDERS, None)
    assert plan.targets[A] == 700
    assert [r.reason for r in plan.refusals] == ["GPUNotHeldByPod"]
    # When the node cannot tell who holds what, a live pod is enough.
    assert plan_limits([cap(A, 300, "ns/b")], GPUS, AT_DEFAULT, PODS, None, None).targets[A] == 300


def test_pod_removal_restores_the_default() -> None:
    capped = {**AT_DEFAULT, A: 450.0}
    plan = plan_limits([cap(A, 450, "ns/a")], GPUS, capped, {"ns/b"}, {B: {"ns/b"}}, None)
    assert [(a.uuid, a.watts, a.reason) for a in plan.actions] == [(A, 700, "PodGone")]


def test_a_void_lease_restores_every_default_but_leaves_mig_alone() -> None:
    capped = {A: 300.0, B: 400.0, MIG: 250.0}
    plan = plan_limits([cap(A, 300, "ns/a")], GPUS, capped, PODS, HOLDERS, "LeaseExpired")
    assert sorted((a.uuid, a.watts, a.reason) for a in plan.actions) == [
        (A, 700, "LeaseExpired"),
        (B, 700, "LeaseExpired"),
    ]
    assert restore_defaults(GPUS, capped, "Shutdown").targets == {A: 700, B: 700, MIG: 700}


def test_no_action_when_the_limit_is_already_there() -> None:
    plan = plan_limits([cap(A, 450, "ns/a")], GPUS, {**AT_DEFAULT, A: 450.2}, PODS, HOLDERS, None)
    assert plan.actions == []


def test_a_duplicate_entry_is_refused_and_the_first_wins() -> None:
    plan = plan_limits([cap(A, 450, "ns/a"), cap(A, 300, "ns/a")], GPUS, AT_DEFAULT, PODS, HOLDERS, None)
    assert plan.targets[A] == 450
    assert [r.reason for r in plan.refusals] == ["Duplicate"]


T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def test_lease_expires_on_the_monotonic_clock_since_renew_time_last_changed() -> None:
    tracker = LeaseTracker()
    lease = Lease(renewTime=T0, leaseSeconds=30)
    assert tracker.expired_reason(lease, 100.0, T0) is None
    assert tracker.expired_reason(lease, 129.0, T0 + timedelta(seconds=29)) is None
    assert tracker.expired_reason(lease, 131.0, T0 + timedelta(seconds=31)) == "LeaseExpired"
    renewed = Lease(renewTime=T0 + timedelta(seconds=31), leaseSeconds=30)
    assert tracker.expired_reason(renewed, 131.5, T0 + timedelta(seconds=31)) is None
    assert tracker.expired_reason(None, 132.0, T0) == "NoLease"


def test_an_agent_clock_behind_the_operator_cannot_keep_a_lease_alive() -> None:
    tracker = LeaseTracker()
    lease = Lease(renewTime=T0, leaseSeconds=30)
    behind = T0 - timedelta(hours=1)  # the node's wall clock is an hour late
    assert tracker.expired_reason(lease, 0.0, behind) is None
    assert tracker.expired_reason(lease, 31.0, behind + timedelta(seconds=31)) == "LeaseExpired"


def test_a_lease_already_stale_at_start_is_expired_at_once() -> None:
    lease = Lease(renewTime=T0, leaseSeconds=30)
    assert LeaseTracker().expired_reason(lease, 0.0, T0 + timedelta(minutes=10)) == "LeaseExpired"
    # ...but a few seconds of skew are tolerated.
    assert LeaseTracker().expired_reason(lease, 0.0, T0 + timedelta(seconds=35)) is None


def test_dry_run_counts_each_change_once_and_calls_no_setter() -> None:
    backend = SimBackend("n", gpus=1, clock=lambda: 0.0)
    uuid = backend.devices[0].uuid
    gpus = backend.gpus()
    applier = Applier(backend, "n", dry_run=True)
    for _ in range(3):
        current = applier.current_limits({uuid: backend.devices[0].power_limit_watts})
        applier.apply(plan_limits([cap(uuid, 400, "ns/a")], gpus, current, {"ns/a"}, None, None))
    assert backend.devices[0].power_limit_watts == 700
    assert applier.counts == {(uuid, "Spec", "dry_run"): 1}


def test_a_failing_setter_is_counted_and_reported_not_raised() -> None:
    backend = SimBackend("n", gpus=1, clock=lambda: 0.0)
    uuid = backend.devices[0].uuid
    applier = Applier(backend, "n")

    errors = applier.apply(Plan({uuid: 100.0}, {uuid: "Spec"}, [Action(uuid, 100.0, "Spec")]))
    assert errors and "outside the constraints" in errors[0]
    assert applier.counts[(uuid, "Spec", "failed")] == 1
    assert backend.devices[0].power_limit_watts == 700


# ---------------------------------------------------------------- locked SM clocks


CLOCK_GPUS = [dataclasses.replace(g, min_sm_clock_mhz=345.0, max_sm_clock_mhz=1980.0) for g in GPUS] + [
    GpuInfo(3, "GPU-old", "P100", 125.0, 250.0, 250.0)
]  # an old driver: clock range unknown
UNLOCKED: dict[str, float | None] = {A: None, B: None, MIG: None, "GPU-old": None}


def lock(uuid: str, mhz: float, pod: str) -> DesiredLockedClock:
    return DesiredLockedClock(gpuUUID=uuid, maxMHz=mhz, pod=pod)


def test_a_lock_for_a_live_pod_on_its_gpu_is_applied() -> None:
    plan = plan_clocks([lock(A, 1200, "ns/a")], CLOCK_GPUS, UNLOCKED, PODS, HOLDERS, None)
    assert [(a.uuid, a.max_mhz, a.reason, a.pod) for a in plan.actions] == [(A, 1200, "Spec", "ns/a")]
    assert plan.targets[B] is None and plan.reasons[B] == "NotInSpec"
    assert not plan.refusals


@pytest.mark.parametrize(
    ("mhz", "target", "reason"),
    [
        (100.0, 345.0, "SpecClamped"),  # below the lowest supported clock
        (345.0, 345.0, "Spec"),
        (1500.7, 1500.0, "SpecClamped"),  # NVML takes whole MHz; a ceiling never rounds up
        (1980.0, None, "Spec"),  # at the highest supported clock a lock changes nothing: none
        (9000.0, None, "SpecClamped"),
    ],
)
def test_lock_ceilings_are_clamped_to_the_supported_clocks(
    mhz: float, target: float | None, reason: str
) -> None:
    plan = plan_clocks([lock(A, mhz, "ns/a")], CLOCK_GPUS, UNLOCKED, PODS, HOLDERS, None)
    assert (plan.targets[A], plan.reasons[A]) == (target, reason)
    assert [a.max_mhz for a in plan.actions] == ([] if target is None else [target])


def test_a_gpu_whose_clock_range_is_unknown_is_never_locked_nor_reset() -> None:
    plan = plan_clocks([lock("GPU-old", 1000, "ns/a")], CLOCK_GPUS, {}, PODS, {"GPU-old": {"ns/a"}}, None)
    assert [r.reason for r in plan.refusals] == ["ClockRangeUnknown"]
    assert "GPU-old" not in plan.targets
    assert all(a.uuid != "GPU-old" for a in plan.actions)


def test_unknown_gpu_foreign_pod_mig_and_shared_gpus_get_no_lock() -> None:
    desired = [
        lock("GPU-of-another-node", 1000, "ns/a"),
        lock(B, 1000, "other-ns/not-here"),
        lock(MIG, 1000, "ns/a"),
        lock(A, 1000, "ns/b"),  # ns/b does not hold A
    ]
    plan = plan_clocks(desired, CLOCK_GPUS, UNLOCKED, PODS, HOLDERS, None)
    assert plan.actions == []
    assert [r.reason for r in plan.refusals] == [
        "UnknownGPU",
        "PodNotOnNode",
        "MIGEnabled",
        "GPUNotHeldByPod",
    ]
    shared = plan_clocks([lock(A, 1000, "ns/a")], CLOCK_GPUS, UNLOCKED, PODS, HOLDERS, None, shared={A})
    both = plan_clocks([lock(A, 1000, "ns/a")], CLOCK_GPUS, UNLOCKED, PODS, {A: {"ns/a", "ns/b"}}, None)
    for plan in (shared, both):
        assert plan.actions == [] and [r.reason for r in plan.refusals] == ["GPUShared"]
    assert MIG not in plan.targets


def test_a_duplicate_lock_is_refused_and_the_first_wins() -> None:
    plan = plan_clocks(
        [lock(A, 1200, "ns/a"), lock(A, 900, "ns/a")], CLOCK_GPUS, UNLOCKED, PODS, HOLDERS, None
    )
    assert plan.targets[A] == 1200 and [r.reason for r in plan.refusals] == ["Duplicate"]


@pytest.mark.parametrize(
    ("pods", "holders", "lease_problem", "reason"),
    [
        ({"ns/b"}, {B: {"ns/b"}}, None, "PodGone"),
        (PODS, {A: {"ns/b"}, B: {"ns/b"}}, None, "PodGone"),  # the pod no longer holds the GPU
        (PODS, HOLDERS, "LeaseExpired", "LeaseExpired"),
        (PODS, HOLDERS, "NoLease", "NoLease"),
    ],
)
def test_a_lock_is_reset_when_its_pod_or_the_lease_is_gone(
    pods: set[str], holders: dict[str, set[str]], lease_problem: str | None, reason: str
) -> None:
    locked = {**UNLOCKED, A: 1200.0}
    plan = plan_clocks([lock(A, 1200, "ns/a")], CLOCK_GPUS, locked, pods, holders, lease_problem)
    assert [(a.uuid, a.max_mhz, a.reason) for a in plan.actions] == [(A, None, reason)]


def test_a_lock_no_longer_in_the_spec_is_reset_and_nothing_is_repeated() -> None:
    locked = {**UNLOCKED, A: 1200.0}
    assert [
        (a.uuid, a.max_mhz, a.reason)
        for a in plan_clocks((), CLOCK_GPUS, locked, PODS, HOLDERS, None).actions
    ] == [(A, None, "NotInSpec")]
    assert plan_clocks([lock(A, 1200, "ns/a")], CLOCK_GPUS, locked, PODS, HOLDERS, None).actions == []


def test_at_start_every_eligible_gpu_is_reset_once() -> None:
    # The agent cannot read a lock back from NVML: a crashed run may have left one behind.
    plan = plan_clocks((), CLOCK_GPUS, {}, PODS, HOLDERS, None)
    assert sorted((a.uuid, a.max_mhz) for a in plan.actions) == [(A, None), (B, None)]
    restored = restore_clocks(CLOCK_GPUS, {A: 1200.0, B: None}, "Shutdown")
    assert restored.actions == [ClockAction(A, None, "Shutdown")]
    assert {a.uuid for a in restore_clocks(CLOCK_GPUS, {}, "Shutdown").actions} == {A, B}


def test_dry_run_remembers_locks_counts_each_once_and_calls_no_setter() -> None:
    backend = SimBackend("n", gpus=1, clock=lambda: 0.0)
    uuid = backend.devices[0].uuid
    gpus = backend.gpus()
    applier = Applier(backend, "n", dry_run=True)
    for _ in range(3):
        plan = plan_clocks([lock(uuid, 1200, "ns/a")], gpus, applier.current_clocks(), {"ns/a"}, None, None)
        applier.apply_clocks(plan)
    assert backend.devices[0].locked_clock_mhz is None
    assert applier.locked == {}  # nothing is locked
    assert applier.clock_counts == {(uuid, "Spec", "dry_run"): 1}


def test_a_lock_is_applied_remembered_and_a_failure_is_counted_not_raised() -> None:
    backend = SimBackend("n", gpus=1, clock=lambda: 0.0)
    uuid = backend.devices[0].uuid
    applier = Applier(backend, "n")
    applier.apply_clocks(plan_clocks([lock(uuid, 1200, "ns/a")], backend.gpus(), {}, {"ns/a"}, None, None))
    assert backend.devices[0].locked_clock_mhz == 1200 and applier.locked == {uuid: 1200}
    errors = applier.apply_clocks(ClockPlan({uuid: 50.0}, {uuid: "Spec"}, [ClockAction(uuid, 50.0, "Spec")]))
    assert errors and "outside the supported clocks" in errors[0]
    assert applier.clock_counts[(uuid, "Spec", "failed")] == 1
    # A failed call may still have reached the GPU (a setter that timed out): its state is
    # unknown again, so the next plan resets it even once the spec no longer asks for a lock.
    assert backend.devices[0].locked_clock_mhz == 1200 and uuid not in applier.locked
    plan = plan_clocks((), backend.gpus(), applier.current_clocks(), {"ns/a"}, None, None)
    assert plan.actions == [ClockAction(uuid, None, "NotInSpec")]
    applier.apply_clocks(plan)
    assert backend.devices[0].locked_clock_mhz is None and applier.locked == {uuid: None}
