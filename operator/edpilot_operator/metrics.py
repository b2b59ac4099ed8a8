"""/metrics of the operator: per-workload efficiency and per-budget power, as the policies' and
budgets' status say. Handlers publish each status they write; the families are built at scrape
time from the latest ones, so a deleted policy's series vanish with `forget_policy`."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any, get_args

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError

from edpilot.models import EnergyPolicyStatus, Phase, PowerBudgetStatus

DEFAULT_PORT = 9465
WORKLOAD_LABELS = ["namespace", "policy", "workload"]
POLICY_LABELS = ["namespace", "policy"]
BUDGET_LABELS = ["budget"]
PHASES: tuple[Phase, ...] = get_args(Phase)


class OperatorCollector(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._policies: dict[tuple[str, str], EnergyPolicyStatus] = {}
        self._budgets: dict[str, tuple[float, PowerBudgetStatus]] = {}

    def publish_policy(self, namespace: str, policy: str, status: Mapping[str, Any]) -> None:
        try:
            parsed = EnergyPolicyStatus.model_validate(dict(status))
        except ValidationError:
            return  # the API server keeps what it accepted; a scrape shows the last readable status
        with self._lock:
            self._policies[(namespace, policy)] = parsed

    def forget_policy(self, namespace: str, policy: str) -> None:
        with self._lock:
            self._policies.pop((namespace, policy), None)

    def publish_budget(self, budget: str, max_watts: float, status: Mapping[str, Any]) -> None:
        try:
            parsed = PowerBudgetStatus.model_validate(dict(status))
        except ValidationError:
            return
        with self._lock:
            self._budgets[budget] = (max_watts, parsed)

    def forget_budget(self, budget: str) -> None:
        with self._lock:
            self._budgets.pop(budget, None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            policies = dict(self._policies)
            budgets = dict(self._budgets)
        yield from self._workload_families(policies)
        yield from self._policy_families(policies)
        yield from self._budget_families(budgets)

    @staticmethod
    def _workload_families(policies: dict[tuple[str, str], EnergyPolicyStatus]) -> Iterator[Metric]:
        joules = GaugeMetricFamily(
            "edpilot_workload_joules_per_unit",
            "Energy per unit of work at the baseline and at the configuration kept now.",
            labels=[*WORKLOAD_LABELS, "measurement"],
        )
        edp = GaugeMetricFamily(
            "edpilot_workload_edp_joule_seconds",
            "Energy-delay product per unit of work (J*s) at the baseline and now.",
            labels=[*WORKLOAD_LABELS, "measurement"],
        )
        reduction = GaugeMetricFamily(
            "edpilot_workload_edp_reduction_ratio",
            "Measured EDP reduction against the workload's own baseline (0.2 = 20 % lower).",
            labels=WORKLOAD_LABELS,
        )
        slowdown = GaugeMetricFamily(
            "edpilot_workload_slowdown_ratio",
            "Throughput lost against the baseline (negative: faster).",
            labels=WORKLOAD_LABELS,
        )
        saved = GaugeMetricFamily(
            "edpilot_workload_energy_saved_joules",
            "Energy saved so far against the baseline.",
            labels=WORKLOAD_LABELS,
        )
        cap = GaugeMetricFamily(
            "edpilot_workload_power_cap_watts",
            "Power cap the operator asks for on the workload's GPUs.",
            labels=WORKLOAD_LABELS,
        )
        clock = GaugeMetricFamily(
            "edpilot_workload_sm_clock_hertz",
            "Locked SM clock ceiling the operator asks for on the workload's GPUs (absent: unlocked).",
            labels=WORKLOAD_LABELS,
        )
        batch = GaugeMetricFamily(
            "edpilot_workload_batch_size", "Batch size of the configuration kept.", labels=WORKLOAD_LABELS
        )
        phase = GaugeMetricFamily(
            "edpilot_workload_phase",
            "1 for the phase the workload is in, 0 for the others.",
            labels=[*WORKLOAD_LABELS, "phase"],
        )
        for (namespace, policy), status in sorted(policies.items()):
            for w in status.workloads:
                labels = [namespace, policy, w.name]
                for measurement, m in (("baseline", w.baseline), ("current", w.current)):
                    if m is not None:
                        joules.add_metric([*labels, measurement], m.joulesPerUnit)
                        edp.add_metric([*labels, measurement], m.edp)
                if w.edpReductionPercent is not None:
                    reduction.add_metric(labels, w.edpReductionPercent / 100)
                if w.slowdownPercent is not None:
                    slowdown.add_metric(labels, w.slowdownPercent / 100)
                saved.add_metric(labels, w.energySavedJoules)
                if w.powerCapWatts is not None:
                    cap.add_metric(labels, w.powerCapWatts)
                if w.smClockMHz is not None:
                    clock.add_metric(labels, w.smClockMHz * 1e6)
                if w.batchSize is not None:
                    batch.add_metric(labels, w.batchSize)
                for p in PHASES:
                    phase.add_metric([*labels, p], 1.0 if w.phase == p else 0.0)
        yield from (joules, edp, reduction, slowdown, saved, cap, clock, batch, phase)

    @staticmethod
    def _policy_families(policies: dict[tuple[str, str], EnergyPolicyStatus]) -> Iterator[Metric]:
        saved = GaugeMetricFamily(
            "edpilot_policy_energy_saved_joules",
            "Energy the policy's workloads saved so far against their baselines.",
            labels=POLICY_LABELS,
        )
        gpus = GaugeMetricFamily(
            "edpilot_policy_gpus", "GPUs held by the workloads the policy steers.", labels=POLICY_LABELS
        )
        workloads = GaugeMetricFamily(
            "edpilot_policy_workloads", "Workloads the policy steers.", labels=POLICY_LABELS
        )
        condition = GaugeMetricFamily(
            "edpilot_policy_condition",
            "1 when the policy's condition has this status (Kubernetes conditions).",
            labels=[*POLICY_LABELS, "type", "status"],
        )
        for (namespace, policy), status in sorted(policies.items()):
            labels = [namespace, policy]
            saved.add_metric(labels, status.totals.energySavedJoules)
            gpus.add_metric(labels, status.totals.gpus)
            workloads.add_metric(labels, status.totals.workloads)
            for c in status.conditions:
                condition.add_metric([*labels, c.type, c.status], 1.0)
        yield from (saved, gpus, workloads, condition)

    @staticmethod
    def _budget_families(budgets: dict[str, tuple[float, PowerBudgetStatus]]) -> Iterator[Metric]:
        maximum = GaugeMetricFamily(
            "edpilot_budget_max_watts", "The budget's maxWatts.", labels=BUDGET_LABELS
        )
        allocated = GaugeMetricFamily(
            "edpilot_budget_allocated_watts",
            "Sum of the power limits of the budget's GPUs.",
            labels=BUDGET_LABELS,
        )
        measured = GaugeMetricFamily(
            "edpilot_budget_measured_watts", "Power the budget's GPUs draw now.", labels=BUDGET_LABELS
        )
        headroom = GaugeMetricFamily(
            "edpilot_budget_headroom_watts",
            "maxWatts minus the allocated limits (negative: over budget).",
            labels=BUDGET_LABELS,
        )
        for name, (max_watts, status) in sorted(budgets.items()):
            maximum.add_metric([name], max_watts)
            allocated.add_metric([name], status.allocatedWatts)
            measured.add_metric([name], status.measuredWatts)
            headroom.add_metric([name], status.headroomWatts)
        yield from (maximum, allocated, measured, headroom)


COLLECTOR = OperatorCollector()
REGISTRY = CollectorRegistry()
REGISTRY.register(COLLECTOR)


def publish_policy_status(namespace: str, policy: str, status: Mapping[str, Any]) -> None:
    """Expose `status` (an EnergyPolicy status as written) until the next publish or forget."""
    COLLECTOR.publish_policy(namespace, policy, status)


def forget_policy(namespace: str, policy: str) -> None:
    COLLECTOR.forget_policy(namespace, policy)


def publish_budget_status(budget: str, max_watts: float, status: Mapping[str, Any]) -> None:
    COLLECTOR.publish_budget(budget, max_watts, status)


def forget_budget(budget: str) -> None:
    COLLECTOR.forget_budget(budget)


def serve(port: int = DEFAULT_PORT, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr, registry=REGISTRY)
