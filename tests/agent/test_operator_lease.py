"""The agent judges the operator's liveness from the one coordination.k8s.io Lease its report's spec
names (`spec.operatorLease`): applied while it holds, every GPU back at its default limit (and
unlocked clocks) once it runs out, is missing, or is one the spec does not name."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from agent_helpers import FakeClock, cap_spec, lock_spec, sim_node
from edpilot_agent.kube import lease_of

from edpilot.models import GPUNodeReportStatus, Lease, LeaseRef

REF = LeaseRef(namespace="edpilot-system", name="edpilot-operator")


def condition(status: GPUNodeReportStatus, kind: str) -> tuple[str, str, str]:
    c = next(c for c in status.conditions if c.type == kind)
    return c.status, c.reason, c.message


def lease_object(renew: str | None, seconds: Any = 15, name: str = REF.name) -> dict[str, Any]:
    spec: dict[str, Any] = {"holderIdentity": "operator-0", "leaseDurationSeconds": seconds}
    if renew is not None:
        spec["renewTime"] = renew
    return {"metadata": {"namespace": REF.namespace, "name": name}, "spec": spec}


def test_a_lease_object_maps_to_the_agents_lease() -> None:
    lease, problem = lease_of(lease_object("2026-12-06T20:22:12.123456Z", 60))
    assert problem == ""
    assert lease == Lease(
        holderIdentity="operator-0",
        renewTime=datetime(2026, 12, 6, 20, 22, 12, 123456, tzinfo=UTC),
        leaseSeconds=60,
    )


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        (lease_object(None), "has no renewTime"),
        (lease_object("2026-12-06T20:22:12Z", 1), "not a lease the agent can judge"),  # shorter than 5 s
        (lease_object("2026-12-06T20:22:12Z", None), "not a lease the agent can judge"),
        (lease_object("yesterday"), "not a lease the agent can judge"),
    ],
)
def test_a_lease_object_the_agent_cannot_judge_is_no_lease(obj: dict[str, Any], why: str) -> None:
    lease, problem = lease_of(obj)
    assert lease is None and why in problem


def named(clock: FakeClock, uuid: str, watts: float = 450, lock: bool = False) -> Any:
    """A spec as this operator writes it: no embedded lease, the operator's Lease named."""
    spec = lock_spec(clock, uuid, 1200) if lock else cap_spec(clock, uuid, watts)
    return spec.model_copy(update={"lease": None, "operatorLease": REF})


def renewed(clock: FakeClock, seconds: int = 10) -> Lease:
    return Lease(holderIdentity="operator-0", renewTime=clock.wall(), leaseSeconds=seconds)


def test_a_cap_holds_while_the_named_lease_is_renewed_and_goes_once_it_runs_out() -> None:
    node = sim_node()
    node.kube.spec = named(node.clock, node.uuid(0))
    node.kube.leases[REF] = renewed(node.clock)
    node.agent.tick()
    assert node.limit(0) == 450
    assert condition(node.kube.statuses[-1], "LeaseValid")[:2] == ("True", "LeaseHeld")
    for _ in range(3):  # renewed every third of the lease: the cap stays
        node.clock.advance(4)
        node.kube.leases[REF] = renewed(node.clock)
        node.agent.tick()
        assert node.limit(0) == 450
    node.clock.advance(10)  # the operator stopped renewing: still within the lease
    node.agent.tick()
    assert node.limit(0) == 450
    node.clock.advance(1)
    node.agent.tick()
    assert node.limit(0) == 700
    assert condition(node.kube.statuses[-1], "LeaseValid")[:2] == ("False", "LeaseExpired")
    assert node.agent.applier.counts[(node.uuid(0), "LeaseExpired", "applied")] == 1
    node.kube.leases[REF] = renewed(node.clock)  # the operator is back
    node.clock.advance(1)
    node.agent.tick()
    assert node.limit(0) == 450


def test_a_lock_is_reset_when_the_named_lease_runs_out() -> None:
    node = sim_node()
    node.kube.spec = named(node.clock, node.uuid(0), lock=True)
    node.kube.leases[REF] = renewed(node.clock)
    node.agent.tick()
    assert node.agent.applier.locked.get(node.uuid(0)) == 1200
    node.clock.advance(11)
    node.agent.tick()
    assert node.agent.applier.locked.get(node.uuid(0)) is None
    assert node.agent.applier.clock_counts[(node.uuid(0), "LeaseExpired", "applied")] == 1


def test_a_missing_lease_voids_the_spec_and_says_why() -> None:
    node = sim_node()
    node.backend.set_power_limit(node.uuid(0), 300)  # left by an earlier run
    node.kube.spec = named(node.clock, node.uuid(0))
    node.agent.tick()
    assert node.limit(0) == 700
    status, reason, message = condition(node.kube.statuses[-1], "LeaseValid")
    assert (status, reason) == ("False", "NoLease")
    assert "edpilot-system/edpilot-operator does not exist" in message


def test_only_the_lease_the_spec_names_counts() -> None:
    """A fresh Lease elsewhere (another namespace, another name) keeps nothing alive, and a stale
    embedded lease does not either: the named one rules."""
    node = sim_node()
    node.kube.spec = named(node.clock, node.uuid(0))
    node.kube.leases[LeaseRef(namespace="tenant", name=REF.name)] = renewed(node.clock, 3600)
    node.kube.leases[LeaseRef(namespace=REF.namespace, name="other")] = renewed(node.clock, 3600)
    node.agent.tick()
    assert node.limit(0) == 700
    assert condition(node.kube.statuses[-1], "LeaseValid")[1] == "NoLease"
    # Both set: the named Lease decides, whatever the embedded one says.
    node.kube.spec = node.kube.spec.model_copy(update={"lease": renewed(node.clock, 3600)})
    node.clock.advance(1)
    node.agent.tick()
    assert node.limit(0) == 700


def test_an_older_operators_embedded_lease_still_works() -> None:
    node = sim_node()
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 450, lease_seconds=10)
    assert node.kube.spec.operatorLease is None
    node.agent.tick()
    assert node.limit(0) == 450
    node.clock.advance(11)
    node.agent.tick()
    assert node.limit(0) == 700
