"""The pure parts of the fleet benchmarks' harness: statistics, API server metrics, decision-lag
matching, the soak's churn plan and its end-state check."""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

import pytest

from bench.fleet import (
    Api,
    DecisionLag,
    ReportWrites,
    Watcher,
    cap_policy,
    gpu_pod,
    last_observation,
    linear_slope,
    metric_sum,
    observation_times,
    parse_request_totals,
    percentile,
    policy_status_problems,
    request_rates,
    server_write_time,
    single_pod_rows,
    terminated_watchers,
)
from bench.soak import CYCLE_SECONDS, schedule

METRICS = """\
# HELP apiserver_request_total [STABLE] Counter of apiserver requests.
# TYPE apiserver_request_total counter
apiserver_request_total{code="200",component="apiserver",dry_run="",group="edpilot.io",resource="gpunodereports",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 120
apiserver_request_total{code="409",component="apiserver",dry_run="",group="edpilot.io",resource="gpunodereports",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 5
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="PATCH",version="v1"} 7
apiserver_request_total{code="0",component="apiserver",dry_run="",group="",resource="pods",scope="cluster",subresource="",verb="WATCH",version="v1"} 2
apiserver_terminated_watchers_total{resource="pods"} 3
apiserver_terminated_watchers_total{resource="nodes"} 1
"""


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    assert percentile([1.0, 2.0], 100) == 2.0


def test_linear_slope_is_least_squares() -> None:
    assert linear_slope([0, 1, 2, 3], [10, 12, 14, 16]) == pytest.approx(2.0)
    # Noise around a flat line gives a slope near zero, not the last-minus-first difference.
    assert linear_slope([0, 1, 2, 3, 4], [100, 101, 99, 102, 100]) == pytest.approx(0.1)
    assert linear_slope([1], [1]) is None
    assert linear_slope([2, 2], [1, 5]) is None


def test_request_totals_sum_codes_by_verb_resource_and_subresource() -> None:
    totals = parse_request_totals(METRICS)
    assert totals[("PATCH", "gpunodereports.edpilot.io", "status")] == 125
    assert totals[("PATCH", "pods", "")] == 7
    assert totals[("WATCH", "pods", "")] == 2
    assert metric_sum(METRICS, "apiserver_terminated_watchers_total") == 4


def test_terminated_watchers_are_counted_by_resource_between_scrapes() -> None:
    later = METRICS.replace('{resource="pods"} 3', '{resource="pods"} 5')
    assert terminated_watchers(METRICS, later) == {"pods": 2}
    assert terminated_watchers(METRICS, METRICS) == {}


class ListsOnce:
    """Stands in for the API server's list and watch in the harness's own bookkeeping test."""

    def __init__(self, *lists: list[dict[str, Any]]) -> None:
        self.lists = list(lists)

    def ok(self, method: str, path: str) -> dict[str, Any]:
        return {"items": self.lists.pop(0), "metadata": {"resourceVersion": "1"}}

    def watch(self, path: str, version: str, timeout_seconds: int) -> list[dict[str, Any]]:
        return []  # ends at once: as if the API server cut the watch off


def test_a_relist_reports_objects_deleted_while_the_watch_was_down() -> None:
    a, b = {"metadata": {"name": "a"}}, {"metadata": {"name": "b"}}
    events: list[tuple[str, str]] = []
    api = cast(Api, ListsOnce([a, b], [b]))
    watcher = Watcher(
        api,
        "/x",
        lambda o: str(o["metadata"]["name"]),
        lambda k, o, _: events.append((k, o["metadata"]["name"])),
    )
    watcher._list_and_watch()
    watcher._list_and_watch()
    assert events == [("LISTED", "a"), ("LISTED", "b"), ("DELETED", "a"), ("LISTED", "b")]
    assert list(watcher.items) == ["b"]
    assert watcher.cut_off == 2


def test_request_rates_divide_the_growth_and_drop_idle_kinds() -> None:
    before = parse_request_totals(METRICS)
    after = dict(before)
    after[("PATCH", "pods", "")] += 30
    after[("GET", "nodes", "")] = 10
    rates = request_rates(before, after, 10.0)
    assert rates == {("PATCH", "pods", ""): 3.0, ("GET", "nodes", ""): 1.0}
    assert next(iter(rates)) == ("PATCH", "pods", "")  # busiest first


def test_observation_times_read_the_optimizers_last_report_per_single_pod_row() -> None:
    policy: dict[str, Any] = {
        "status": {
            "workloads": [
                {"name": "w0", "pods": ["ns/w0"], "nodes": ["n1"], "optimizer": {"last": {"time": 17.5}}},
                {"name": "w1", "pods": ["ns/w1"], "nodes": ["n2"], "optimizer": None},
                {"name": "w2", "pods": ["ns/w2"], "nodes": ["n3"], "phase": "Conflict"},
                {
                    "name": "job",
                    "pods": ["ns/a", "ns/b"],
                    "nodes": ["n1", "n2"],
                    "optimizer": {"last": {"time": 3}},
                },
            ]
        }
    }
    assert observation_times(policy) == [("ns/w0", "n1", 17.5)]
    assert observation_times({"metadata": {}}) == []


def test_the_churn_plan_creates_updates_and_deletes_every_slot_each_minute() -> None:
    plan = schedule(slots=100, cycles=3, start=0.0)
    ops = Counter(op for _, op, _, _ in plan)
    assert ops["create"] == 300 and ops["update"] == 300
    assert ops["delete"] == 300 - 50  # the even slots keep their last policy
    first_minute = Counter(op for t, op, _, _ in plan if t < CYCLE_SECONDS)
    assert first_minute["create"] == 100
    kept = {slot for _, _, slot, cycle in plan if cycle == 2} - {
        slot for _, op, slot, cycle in plan if cycle == 2 and op == "delete"
    }
    assert kept == set(range(0, 100, 2))
    for slot, cycle in [(7, 1), (8, 2)]:
        times = {op: t for t, op, s, c in plan if (s, c) == (slot, cycle)}
        assert times["create"] < times["update"] < times.get("delete", float("inf"))


def _pod(name: str, labels: dict[str, str], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    pod = gpu_pod("ns", name, "gpu-node-0", labels)
    pod["metadata"]["annotations"].update(annotations or {})
    pod["status"] = {"phase": "Running"}
    return pod


def _policy(name: str, app: str, rows: list[dict[str, Any]], priority: int = 0) -> dict[str, Any]:
    policy = cap_policy("ns", name, {"app": app})
    policy["spec"]["priority"] = priority
    policy["metadata"]["generation"] = 2
    policy["status"] = {
        "observedGeneration": 2,
        "conditions": [{"type": "Ready", "status": "True"}],
        "workloads": rows,
    }
    return policy


def test_a_correct_end_state_has_no_problems() -> None:
    pods = [
        _pod("a", {"app": "x"}, {"edpilot.io/policy": "px", "edpilot.io/power-cap-watts": "500"}),
        _pod("b", {"app": "y"}),  # no policy, no hints
    ]
    policies = [_policy("px", "x", [{"name": "a", "pods": ["ns/a"], "phase": "Exploring"}])]
    assert policy_status_problems(policies, pods) == []


def test_the_end_state_check_finds_missing_rows_stale_generations_and_leftover_hints() -> None:
    pods = [
        _pod("a", {"app": "x"}, {"edpilot.io/policy": "px"}),
        _pod("a2", {"app": "x"}),  # governed, but the status has no row and no annotation yet
        _pod("b", {"app": "gone"}, {"edpilot.io/policy": "deleted", "edpilot.io/power-cap-watts": "400"}),
    ]
    stale = _policy("px", "x", [{"name": "a", "pods": ["ns/a"]}])
    stale["status"]["observedGeneration"] = 1
    problems = policy_status_problems([stale], pods)
    assert any("observedGeneration 1 != 2" in p for p in problems)
    assert any("rows ['a'] but it governs ['a', 'a2']" in p for p in problems)
    assert any(p.startswith("ns/a2: edpilot.io/policy=None") for p in problems)
    assert any(p.startswith("ns/b: governed by no policy") for p in problems)
    assert len(problems) == 4


def test_the_end_state_check_expects_conflict_rows_for_pods_a_stronger_policy_wins() -> None:
    pods = [_pod("a", {"app": "x"}, {"edpilot.io/policy": "strong"})]
    strong = _policy("strong", "x", [{"name": "a", "pods": ["ns/a"]}], priority=10)
    weak_right = _policy("weak", "x", [{"name": "a", "pods": ["ns/a"], "phase": "Conflict"}])
    assert policy_status_problems([strong, weak_right], pods) == []
    weak_wrong = _policy("weak", "x", [{"name": "a", "pods": ["ns/a"], "phase": "Exploring"}])
    problems = policy_status_problems([strong, weak_wrong], pods)
    assert any(p.startswith("ns/weak: rows ['a'] but it governs []") for p in problems)
    deleting = _policy("strong", "x", [])
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert "ns/strong: still being deleted" in policy_status_problems([deleting], [])


def test_decision_times_come_from_state_objects_placed_by_the_status_rows() -> None:
    policy = {
        "metadata": {"namespace": "ns", "name": "p"},
        "status": {"workloads": [{"name": "w0", "pods": ["ns/w0"], "nodes": ["n1"], "phase": "Converged"}]},
    }
    assert single_pod_rows(policy) == {"w0": ("ns/w0", "n1")}
    assert observation_times(policy) == []  # no state in the row any more
    assert last_observation({"last": {"time": 4}}) == 4.0 and last_observation({}) is None


def test_a_decision_is_timed_by_the_api_server_not_by_when_the_bench_read_it() -> None:
    """The bench's own watch fell 80 s behind at 2,000 nodes; the lag is the operator's."""
    writes = ReportWrites()
    writes.record("n1", 4.0, wall=1_000_000.0)
    lag = DecisionLag(writes)
    policy = {
        "metadata": {"namespace": "ns", "name": "p"},
        "status": {"workloads": [{"name": "w0", "pods": ["ns/w0"], "nodes": ["n1"], "phase": "Exploring"}]},
    }
    lag.on_event("MODIFIED", policy, received=999_990.0)
    fields = [
        {"manager": "kubectl", "time": "1970-01-12T13:46:30Z"},
        {"manager": "edpilot-operator", "operation": "Apply", "time": "1970-01-12T13:46:43Z"},
    ]
    state = {
        "kind": "WorkloadOptimizerState",
        "metadata": {"namespace": "ns", "name": "p-w0", "managedFields": fields},
        "spec": {"policy": "p", "workload": "w0", "state": {"last": {"time": 4.0}}},
    }
    assert server_write_time(state) == 1_000_003.0
    lag.on_event("MODIFIED", state, received=1_000_080.0)  # read 80 s late
    assert lag.between(1_000_000.0, 1_000_100.0) == [3.0]
    assert server_write_time({"metadata": {}}) is None
