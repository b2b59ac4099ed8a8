"""Which GPUs a pod's policy may cap: whole GPUs that one pod holds alone. Pure.

A GPU that several pods use (device-plugin time-slicing or MPS replicas, a DRA claim reserved for
several pods, a DRA device allocated as a share or for admin access) runs other owners' work too,
and a MIG partition shares its board's power limit with the other partitions: one pod's policy
capping it would slow workloads whose owners chose nothing of the sort. Such a GPU gets no cap from
any policy or budget; it is still measured and reported (report-only), and the workloads on it say
why in their policy's status. docs/gpu-allocation.md says what each allocation style gets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edpilot.dra import DraHoldings

NO_DRA = DraHoldings()


@dataclass(frozen=True)
class Exclusivity:
    """`holder` is the one pod that holds the GPU alone, else None and `reason` says why (empty for
    a GPU nobody holds)."""

    holder: str | None
    reason: str = ""

    @property
    def shared(self) -> bool:
        return self.holder is None and bool(self.reason)


def exclusivity(
    uuid: str,
    reported_pods: Iterable[str],
    *,
    mig_enabled: bool = False,
    reported_shared: bool = False,
    dra: DraHoldings = NO_DRA,
) -> Exclusivity:
    """Who holds GPU `uuid` alone, from what its node's agent reported (the kubelet's view: the
    pods, whether it handed the GPU out as a shareable replica, whether MIG is on) and from the DRA
    allocations the scheduler made (`dra`). Every source can only make a GPU less exclusive: a pod
    one source names and another does not is one more holder."""
    holders = sorted(set(reported_pods) | dra.holders.get(uuid, frozenset()))
    if mig_enabled:
        return Exclusivity(None, "MIG is enabled: its partitions share the board's power limit")
    if uuid in dra.shared:
        return Exclusivity(None, f"shared through DRA: {dra.shared[uuid]}")
    if reported_shared:
        return Exclusivity(None, "handed out as a shared device (time-slicing, MPS or a DRA share)")
    if len(holders) > 1:
        shown = ", ".join(holders[:3]) + (", ..." if len(holders) > 3 else "")
        return Exclusivity(None, f"used by {len(holders)} pods ({shown})")
    return Exclusivity(holders[0] if holders else None)
