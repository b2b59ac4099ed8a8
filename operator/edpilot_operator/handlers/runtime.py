"""What every handler shares: the operator's settings and the objects the one startup handler
puts in kopf's memo (`Runtime`). No handler reads a module global."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
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
    # Report spec writes a second, with bursts of twice that (client-go's QPS and burst): an
    # operator started on 2,000 running reports finds every spec to write at once.
    report_writes_per_second: float = 20.0
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


# How long a spec write is taken as on its way while the watch shows an older generation: past
# it, the write is taken as lost (kopf failed to apply it) and the spec compared as seen.
WRITE_IN_FLIGHT_SECONDS = 30.0


@dataclass(frozen=True)
class WrittenSpec:
    """The last spec written to a report, the report's generation it was composed from, and when:
    while the watch has not delivered that write yet, the report sweep compares with what it
    wrote, not with the older spec it still sees, and does not write the same spec again
    (`plans.plan_report_spec`)."""

    generation: int
    spec: GPUNodeReportSpec
    at: datetime

    def in_flight(self, generation: int, now: datetime) -> bool:
        """Whether a report seen at `generation` predates this write, which may still arrive."""
        recent = (now - self.at).total_seconds() < WRITE_IN_FLIGHT_SECONDS
        return generation <= self.generation and recent


WrittenSpecs = dict[str, WrittenSpec]


@dataclass
class NodeLabels:
    """Every node's labels, for the PowerBudgets' node selectors: listed (metadata only) when a
    budget asks and the last list is older than `max_age` seconds, shared by every budget.

    Not a kopf index: watching Nodes hands kopf every status heartbeat of every node, for labels
    that rarely change. At 2,000 KWOK nodes that watch alone took the operator's peak memory from
    505 MB to 1.7 GB (`bench.operator_scale`)."""

    max_age: float
    monotonic: Callable[[], float] = time.monotonic
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    listed_at: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def get(
        self, fetch: Callable[[], Awaitable[dict[str, dict[str, str]]]]
    ) -> dict[str, dict[str, str]]:
        async with self.lock:  # budgets due together make one list, not one each
            now = self.monotonic()
            if self.listed_at is None or now - self.listed_at >= self.max_age:
                self.labels = await fetch()
                self.listed_at = now
            return self.labels


@dataclass
class WriteBudget:
    """A token bucket for report spec writes: `per_second` on average, `burst` at once."""

    per_second: float
    burst: float
    monotonic: Callable[[], float] = time.monotonic
    tokens: float | None = None  # None: full, at the first take
    at: float = 0.0

    @classmethod
    def of(cls, cfg: OperatorConfig, monotonic: Callable[[], float] = time.monotonic) -> WriteBudget:
        rate = cfg.report_writes_per_second
        return cls(per_second=rate, burst=2 * rate, monotonic=monotonic)

    def reserve(self) -> float:
        """Counts one write; returns how many seconds it must wait to keep to the budget."""
        now = self.monotonic()
        tokens = self.burst if self.tokens is None else self.tokens + (now - self.at) * self.per_second
        self.tokens, self.at = min(self.burst, tokens) - 1.0, now
        return max(0.0, -self.tokens / self.per_second)

    def per_interval(self, seconds: float) -> int:
        """How many writes `seconds` allow."""
        return max(1, int(self.per_second * seconds))


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
    swept_at: datetime | None = None  # when every report's spec was last composed
    sweeping: asyncio.Task[None] | None = None  # the report sweep under way
    # Optimizer states computed but not written yet (`services.worth_writing`), resumed from.
    held: HeldStates = field(default_factory=HeldStates)
    nodes: NodeLabels = field(default_factory=lambda: NodeLabels(max_age=OperatorConfig.report_interval))
    spec_writes: WriteBudget = field(default_factory=lambda: WriteBudget.of(OperatorConfig()))

    @classmethod
    def of(cls, cfg: OperatorConfig, kube: Kube | None = None, keeper: LeaseKeeper | None = None) -> Runtime:
        cache = GovernanceCache(max_age=cfg.reconcile_interval, clock=time.monotonic)
        nodes = NodeLabels(max_age=cfg.report_interval)  # budgets see a relabelled node within one interval
        return cls(
            cfg=cfg,
            kube=kube,
            lease_keeper=keeper,
            governance=cache,
            nodes=nodes,
            spec_writes=WriteBudget.of(cfg),
        )

    def snapshot(self, indexes: Mapping[str, Any]) -> ClusterSnapshot:
        """The cluster as the watches hold it now (`indexes`: the kopf kwargs naming them)."""
        return ClusterSnapshot.of(indexes, self.governance.get)

    async def node_labels(self) -> dict[str, dict[str, str]]:
        assert self.kube is not None  # set by the startup handler
        return await self.nodes.get(self.kube.node_labels)

    def sweep_due(self, now: datetime) -> bool:
        """Whether the report sweep is due (once per report interval); marks it begun."""
        if self.swept_at is not None and (now - self.swept_at).total_seconds() < self.cfg.report_interval:
            return False
        self.swept_at = now
        return True
