from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from edpilot_agent.actuator import Action, Applier, LeaseTracker, Plan, plan_limits, restore_defaults
from edpilot_agent.backend import GpuInfo
from edpilot_agent.sim import SimBackend

from edpilot.models import DesiredPowerLimit, Lease

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
