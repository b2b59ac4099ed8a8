"""kopf handlers, one module per resource, each a few lines: build a `ClusterSnapshot` from the
watches' indexes, call a pure planner (`plans`), apply the plan (`apply`).

    indexes.py    what the watches keep (kopf indexes)      snapshot.py  one read of them
    policy.py     EnergyPolicy timer and delete handler     plans.py     the decisions, pure
    report.py     the report sweep (and the Lease), which   apply.py     the writes
                  the policy and budget timers run
    budget.py     PowerBudget timer and delete handler      runtime.py   settings, memo.runtime
    operator.py   login, startup, probe

`register` is the one place that binds them to a registry, with the intervals of the settings."""

from __future__ import annotations

from functools import partial

import kopf

from edpilot.contract import STATE_PLURAL
from edpilot.models import GROUP, VERSION

from . import budget, indexes, operator, policy
from .runtime import OperatorConfig, Runtime

__all__ = ["OperatorConfig", "Runtime", "register"]

POLICIES = (GROUP, VERSION, "energypolicies")
REPORTS = (GROUP, VERSION, "gpunodereports")
BUDGETS = (GROUP, VERSION, "powerbudgets")
STATES = (GROUP, VERSION, STATE_PLURAL)
PODS = ("pods",)
CLAIMS = ("resource.k8s.io", "v1", "resourceclaims")
SLICES = ("resource.k8s.io", "v1", "resourceslices")
DEPLOYMENTS = ("apps", "v1", "deployments")
STATEFULSETS = ("apps", "v1", "statefulsets")

INDEXES = (
    (PODS, indexes.pods_by_namespace),
    (PODS, indexes.pods_by_node),
    (POLICIES, indexes.policies_by_namespace),
    (POLICIES, indexes.decisions_by_policy),
    (STATES, indexes.states_by_policy),
    (STATES, indexes.targets_by_workload),
    (STATES, indexes.probe_points_by_policy_gpu),
    (REPORTS, indexes.reports_by_node),
    (REPORTS, indexes.report_specs),
    (BUDGETS, indexes.budget_caps_by_node),
)
DRA_INDEXES = ((CLAIMS, indexes.claims_by_pod), (SLICES, indexes.slices_by_pool))
ROLLOUT_INDEXES = (
    (DEPLOYMENTS, indexes.deployments_by_namespace),
    (STATEFULSETS, indexes.statefulsets_by_namespace),
)


def register(registry: kopf.OperatorRegistry, cfg: OperatorConfig) -> None:
    """Register every handler on `registry` with the intervals of `cfg`."""
    kopf.on.login(registry=registry)(partial(operator.login, cfg=cfg))
    kopf.on.startup(registry=registry)(partial(operator.configure, cfg=cfg))
    kopf.on.probe(id="policies", registry=registry)(operator.probe_policies)
    chosen = (
        INDEXES + (DRA_INDEXES if cfg.dra is not None else ()) + (ROLLOUT_INDEXES if cfg.rollouts else ())
    )
    for resource, fn in chosen:
        when = indexes.is_gpu_pod if resource == PODS else None
        kopf.index(*resource, id=fn.__name__, when=when, registry=registry)(fn)
    # Not sharp: sharp timers started together stay in step, and 50 policies then sent their
    # status patches in the same millisecond, each on a connection of kopf's own, which the API
    # server dropped ("TCP closed"; `bench.operator_scale`).
    timers = (
        (POLICIES, policy.reconcile_policy, cfg.reconcile_interval),
        (BUDGETS, budget.reconcile_budget, cfg.report_interval),
    )
    for resource, timer, interval in timers:
        kopf.timer(*resource, id=timer.__name__, interval=interval, initial_delay=1, registry=registry)(timer)
    kopf.on.delete(*BUDGETS, id="forget_budget", optional=True, registry=registry)(budget.forget_budget)
    kopf.on.delete(*POLICIES, id="release_policy", registry=registry)(policy.release_policy)
