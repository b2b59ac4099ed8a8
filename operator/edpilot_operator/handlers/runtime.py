"""What every handler shares: the operator's settings and the objects the one startup handler
puts in kopf's memo (`Runtime`). No handler reads a module global."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from edpilot.dra import DEFAULT_CONFIG, DraConfig
from edpilot.models import GPUNodeReportSpec, LeaseRef
from edpilot.optimizer import DEFAULT_TUNING, Tuning

from ..kube import Kube
from ..liveness import LeaseKeeper
from ..reports import ReportTiming
from ..selection import GovernanceCache
from ..services import HeldStates
from .snapshot import ClusterSnapshot


@dataclass(frozen=True)
class OperatorConfig:
    kubeconfig: str | None = None
    identity: str = "edpilot-operator"
    reconcile_interval: float = 5.0
    report_interval: float = 5.0
    lease_seconds: int = 60
    # The one coordination.k8s.io Lease the operator renews and every report spec names.
    lease_namespace: str = "default"
    lease_name: str = "edpilot-operator"
    fast_report_interval: int = 5
    slow_report_interval: int = 60
    tuning: Tuning = DEFAULT_TUNING
    dra: DraConfig | None = DEFAULT_CONFIG  # None: a cluster without DRA; no claim or slice is read
    # Delivery Rollout: watch Deployments and StatefulSets and patch their pod templates (the
    # chart grants that only with operator.rolloutDelivery.enabled).
    rollouts: bool = False

    @property
    def lease(self) -> LeaseRef:
        return LeaseRef(namespace=self.lease_namespace, name=self.lease_name)

    @property
    def timing(self) -> ReportTiming:
        return ReportTiming(self.lease_seconds, self.fast_report_interval, self.slow_report_interval)


def utc_now() -> datetime:
    return datetime.now(UTC)


# The last spec written per report, with the resourceVersion it was composed from: while the
# watch has not delivered that write yet, the report timer compares with what it wrote, not with
# the older spec it still sees, and does not write the same spec again.
WrittenSpecs = dict[str, tuple[str, GPUNodeReportSpec]]


@dataclass
class Runtime:
    """Set once by the startup handler (`memo.runtime`); tests build their own, with their clock."""

    cfg: OperatorConfig
    kube: Kube | None = None
    lease_keeper: LeaseKeeper | None = None
    # Each namespace's governance, shared by the policy timers, the report composer and budgets.
    governance: GovernanceCache = field(default_factory=GovernanceCache)
    clock: Callable[[], datetime] = utc_now
    written_specs: WrittenSpecs = field(default_factory=dict)
    pruned_at: datetime | None = None  # when `written_specs` was last pruned of deleted reports
    # Optimizer states computed but not written yet (`services.worth_writing`), resumed from.
    held: HeldStates = field(default_factory=HeldStates)

    @classmethod
    def of(cls, cfg: OperatorConfig, kube: Kube | None = None, keeper: LeaseKeeper | None = None) -> Runtime:
        cache = GovernanceCache(max_age=cfg.reconcile_interval, clock=time.monotonic)
        return cls(cfg=cfg, kube=kube, lease_keeper=keeper, governance=cache)

    def snapshot(self, indexes: Mapping[str, Any]) -> ClusterSnapshot:
        """The cluster as the watches hold it now (`indexes`: the kopf kwargs naming them)."""
        return ClusterSnapshot.of(indexes, self.governance.get)

    def prune_due(self, now: datetime) -> bool:
        """Whether `written_specs` is due a prune (once per report interval); marks it done."""
        if self.pruned_at is not None and (now - self.pruned_at).total_seconds() < self.cfg.report_interval:
            return False
        self.pruned_at = now
        return True
