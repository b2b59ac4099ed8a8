"""The extender's view (fed events by hand) and its HTTP wire format, without a cluster."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from edpilot_operator.extender import Extender, HostPriority, host_priority_list
from edpilot_operator.extender_view import BUDGETS, KINDS, NODES, PODS, POLICIES, REPORTS, ClusterView
from pydantic import TypeAdapter

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"


def node(name: str, product: str = "NVIDIA-H100-80GB-HBM3", **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product, **labels}}}


def report(
    name: str,
    model: str = H100,
    gpus: int = 2,
    *,
    enforced: float = 700,
    power: float = 80,
    pods: int = 0,
    throttle: tuple[str, ...] = (),
) -> dict[str, Any]:
    default = 700 if model == H100 else 400
    return {
        "metadata": {"name": name},
        "status": {
            "nodeName": name,
            "agentVersion": "test",
            "backend": "sim",
            "time": "2026-11-27T00:00:00Z",
            "gpus": [
                {
                    "index": i,
                    "uuid": f"GPU-{name}-{i}",
                    "model": model,
                    "minLimitWatts": default / 3.5,
                    "maxLimitWatts": default,
                    "defaultLimitWatts": default,
                    "enforcedLimitWatts": enforced if i < pods else default,
                    "powerWatts": power,
                    "energyJoules": 1.0,
                    "throttleReasons": list(throttle),
                    "pods": ["ns/p"] if i < pods else [],
                }
                for i in range(gpus)
            ],
        },
    }


def budget(name: str, max_watts: float, **match: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"nodeSelector": {"matchLabels": match}, "maxWatts": max_watts},
    }


def pod(
    name: str,
    gpus: int = 1,
    node_name: str = "",
    image: str = "llm:1",
    ns: str = "ml",
    labels: dict[str, str] | None = None,
    phase: str = "Pending",
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": labels or {"app": "llm"}},
        "spec": {
            "nodeName": node_name,
            "containers": [
                {"name": "side", "image": "proxy:1"},
                {"name": "main", "image": image, "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}},
            ],
        },
        "status": {"phase": phase},
    }


def policy(
    name: str, ns: str = "ml", min_percent: float = 50, rows: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": "llm"}},
            "powerCap": {"minPercent": min_percent},
            "workMetric": {"name": "tokens_total"},
        },
        "status": {"workloads": rows or []},
    }


def synced_view() -> ClusterView:
    view = ClusterView()
    for kind in KINDS:
        view.replace_all(kind, [])
    return view


# ---------------------------------------------------------------- the view


def test_view_is_ready_only_when_every_kind_was_listed() -> None:
    view = ClusterView()
    for kind in KINDS[:-1]:
        view.replace_all(kind, [])
        assert not view.ready
    view.replace_all(KINDS[-1], [])
    assert view.ready


def test_budget_sums_follow_reports_pods_and_label_changes() -> None:
    view = synced_view()
    view.replace_all(BUDGETS, [budget("rack-a", 3000, rack="a")])
    view.apply(NODES, "ADDED", node("n1", rack="a"))
    view.apply(NODES, "ADDED", node("n2", rack="b"))
    # No report yet: nothing committed, limits from the H100 prior.
    assert view.node_views["n1"].budgets == ("rack-a",)
    assert view.node_views["n1"].default_limit_watts == 700
    assert view.budget_views["rack-a"].committed_watts == 0

    view.apply(REPORTS, "ADDED", report("n1", pods=1, enforced=400, power=90))
    assert view.budget_views["rack-a"].committed_watts == pytest.approx(400 + 90)
    view.apply(REPORTS, "ADDED", report("n2"))  # rack b: not this budget
    assert view.budget_views["rack-a"].committed_watts == pytest.approx(490)

    # A pod bound to n1 that the agent has not reported yet takes the idle GPU at 700 W.
    view.apply(PODS, "ADDED", pod("p2", gpus=1, node_name="n1"))
    assert view.budget_views["rack-a"].committed_watts == pytest.approx(400 + 700)
    view.apply(PODS, "MODIFIED", pod("p2", gpus=1, node_name="n1", phase="Succeeded"))
    assert view.budget_views["rack-a"].committed_watts == pytest.approx(490)

    # n2 moves into rack a; n1 leaves.
    view.apply(NODES, "MODIFIED", node("n2", rack="a"))
    view.apply(NODES, "MODIFIED", node("n1", rack="c"))
    assert view.budget_views["rack-a"].committed_watts == pytest.approx(160)
    view.apply(NODES, "DELETED", node("n2", rack="a"))
    assert view.budget_views["rack-a"].committed_watts == pytest.approx(0)


def test_budget_changes_rematch_every_node() -> None:
    view = synced_view()
    view.replace_all(NODES, [node("n1", rack="a"), node("n2", rack="b")])
    view.replace_all(REPORTS, [report("n1"), report("n2")])
    view.apply(BUDGETS, "ADDED", budget("b", 1000, rack="b"))
    assert view.node_views["n2"].budgets == ("b",) and view.node_views["n1"].budgets == ()
    assert view.budget_views["b"].committed_watts == pytest.approx(160)
    view.apply(BUDGETS, "MODIFIED", budget("b", 1000))  # empty selector: every node
    assert view.budget_views["b"].committed_watts == pytest.approx(320)
    view.apply(BUDGETS, "DELETED", budget("b", 1000))
    assert view.budget_views == {} and view.node_views["n1"].budgets == ()


def test_invalid_objects_are_ignored_not_fatal() -> None:
    view = synced_view()
    view.apply(BUDGETS, "ADDED", {"metadata": {"name": "bad"}, "spec": {"maxWatts": -5}})
    view.apply(REPORTS, "ADDED", {"metadata": {"name": "n1"}, "status": {"gpus": "nonsense"}})
    view.apply(POLICIES, "ADDED", {"metadata": {"name": "p", "namespace": "ml"}, "spec": {}})
    assert view.budget_views == {} and view.counts()[REPORTS] == 0 and view.counts()[POLICIES] == 0


def test_throttled_report_marks_the_node() -> None:
    view = synced_view()
    view.apply(NODES, "ADDED", node("n1"))
    view.apply(REPORTS, "ADDED", report("n1", throttle=("HwThermalSlowdown",)))
    assert "GPU 0 hardware thermal slowdown" in view.node_views["n1"].blocking_throttle


def test_demand_uses_the_governing_policy_and_the_gpu_container_image() -> None:
    view = synced_view()
    view.apply(POLICIES, "ADDED", policy("llm", min_percent=30))
    demand = view.demand(pod("p", gpus=2))
    assert (demand.key, demand.gpus, demand.image, demand.policy) == ("ml/p", 2, "llm:1", "ml/llm")
    assert demand.power_cap is not None and demand.power_cap.minPercent == 30
    other = view.demand(pod("q", ns="other"))
    assert other.policy is None and other.power_cap is None


def test_history_comes_from_policy_rows_with_the_model_of_their_node_and_the_image_of_their_pods() -> None:
    view = synced_view()
    view.replace_all(NODES, [node("h1"), node("a1", product="NVIDIA-A100-SXM4-80GB")])
    view.replace_all(REPORTS, [report("h1"), report("a1", model=A100)])
    view.apply(PODS, "ADDED", pod("w1", node_name="a1", image="llm:7", phase="Running"))
    row = {
        "name": "w1",
        "pods": ["w1"],
        "nodes": ["a1"],
        "gpus": 1,
        "current": {"joulesPerUnit": 0.02, "secondsPerUnit": 0.001, "edp": 2e-5, "unitsPerSecond": 1000},
    }
    view.apply(POLICIES, "ADDED", policy("llm", rows=[row]))
    history = view.history()
    assert history.by_image[("ml/llm", "llm:7")] == {"NVIDIA A100 SXM4 80GB": 0.02}


# ---------------------------------------------------------------- HTTP


def with_client(
    view: ClusterView, body: Callable[[TestClient[Any, Any], Extender], Awaitable[None]], ops: bool = False
) -> None:
    """`body` against the scheduler's app, or with `ops` the metrics and probes app."""

    async def run() -> None:
        extender = Extender(view)
        async with TestClient(TestServer(extender.ops_app() if ops else extender.app())) as client:
            await body(client, extender)

    asyncio.run(run())


def fleet() -> ClusterView:
    view = synced_view()
    view.replace_all(POLICIES, [policy("llm")])  # governs the test pods, at 50-100% of the default
    view.replace_all(BUDGETS, [budget("rack-a", 1500, rack="a")])
    view.replace_all(
        NODES,
        [
            node("h1", rack="a"),
            node("h2", rack="b"),
            node("a1", product="NVIDIA-A100-SXM4-80GB", rack="b"),
            node("hot", rack="b"),
        ],
    )
    view.replace_all(
        REPORTS,
        [
            report("h1", pods=2, enforced=600),
            report("h2"),
            report("a1", model=A100),
            report("hot", throttle=("HwPowerBrakeSlowdown",)),
        ],
    )
    return view


def test_filter_with_node_names() -> None:
    async def body(client: TestClient[Any, Any], extender: Extender) -> None:
        args = {"Pod": pod("p", gpus=2), "NodeNames": ["h1", "h2", "a1", "hot", "unknown"]}
        resp = await client.post("/filter", data=json.dumps(args))
        assert resp.status == 200
        result = await resp.json()
        # rack-a: 1500 - 1200 committed = 300 W left; 2 GPUs need 700 W at 350 W.
        assert result["NodeNames"] == ["h2", "a1", "unknown"]
        assert result["FailedNodes"] == {
            "h1": "edpilot: PowerBudget rack-a cannot take 2 GPU(s): 700 W needed at the lowest allowed cap "
            "of 350 W, 300 W left of 1500 W"
        }
        assert result["FailedAndUnresolvableNodes"]["hot"].startswith("edpilot: node GPUs are throttled")
        assert result["Error"] == ""
        assert "Nodes" not in result

    with_client(fleet(), body)


def test_filter_with_whole_nodes_returns_the_passing_node_objects() -> None:
    async def body(client: TestClient[Any, Any], extender: Extender) -> None:
        nodes = [node("h1", rack="a"), node("h2", rack="b")]
        args = {"Pod": pod("p", gpus=2), "Nodes": {"items": nodes}}
        result = await (await client.post("/filter", data=json.dumps(args))).json()
        assert result["Nodes"]["items"] == [nodes[1]]
        assert list(result["FailedNodes"]) == ["h1"]
        assert "NodeNames" not in result

    with_client(fleet(), body)


def test_prioritize_prefers_the_efficient_node_with_headroom() -> None:
    async def body(client: TestClient[Any, Any], extender: Extender) -> None:
        args = {"Pod": pod("p", gpus=1), "NodeNames": ["h1", "h2", "a1"]}
        resp = await client.post("/prioritize", data=json.dumps(args))
        assert resp.status == 200
        rows = TypeAdapter(list[HostPriority]).validate_json(await resp.read())
        scores = {row.Host: row.Score for row in rows}
        assert set(scores) == {"h1", "h2", "a1"}
        assert scores["h2"] == 10
        assert scores["h2"] > scores["h1"]  # same GPU, less budget headroom
        assert scores["h2"] > scores["a1"]  # less efficient GPU
        assert all(0 <= s <= 10 for s in scores.values())

    with_client(fleet(), body)


def test_not_ready_answers_error_and_bad_bodies_are_refused() -> None:
    async def body(client: TestClient[Any, Any], extender: Extender) -> None:
        args = {"Pod": pod("p"), "NodeNames": ["h1"]}
        result = await (await client.post("/filter", data=json.dumps(args))).json()
        assert "still listing" in result["Error"]
        assert (await client.post("/prioritize", data=json.dumps(args))).status == 503

    with_client(ClusterView(), body)

    async def probes(client: TestClient[Any, Any], extender: Extender) -> None:
        assert (await client.get("/readyz")).status == 503
        assert (await client.get("/healthz")).status == 200

    with_client(ClusterView(), probes, ops=True)

    async def bad(client: TestClient[Any, Any], extender: Extender) -> None:
        resp = await client.post("/filter", data=b"{not json")
        assert resp.status == 400 and "bad ExtenderArgs" in await resp.text()
        assert (await client.post("/prioritize", data=b'{"NodeNames": []}')).status == 400

    with_client(synced_view(), bad)


def test_metrics_count_requests_and_filtered_nodes() -> None:
    async def body(client: TestClient[Any, Any], extender: Extender) -> None:
        args = {"Pod": pod("p", gpus=2), "NodeNames": ["h1", "hot"]}
        async with TestClient(TestServer(extender.app())) as scheduler:
            await scheduler.post("/filter", data=json.dumps(args))
        text = await (await client.get("/metrics")).text()
        assert 'edpilot_extender_requests_total{outcome="ok",verb="filter"} 1.0' in text
        assert 'edpilot_extender_filtered_nodes_total{reason="power_budget"} 1.0' in text
        assert 'edpilot_extender_filtered_nodes_total{reason="throttled"} 1.0' in text
        assert 'edpilot_extender_view_objects{kind="nodes"} 4.0' in text
        assert "edpilot_extender_request_duration_seconds_bucket" in text

    with_client(fleet(), body, ops=True)


def test_every_request_and_filter_series_exists_at_zero_before_the_first_request() -> None:
    """rate() and increase() see a counter's first request only if the series was there before."""

    async def body(client: TestClient[Any, Any], extender: Extender) -> None:
        text = await (await client.get("/metrics")).text()
        for verb in ("filter", "prioritize"):
            for outcome in ("ok", "not_ready", "bad_request"):
                assert f'edpilot_extender_requests_total{{outcome="{outcome}",verb="{verb}"}} 0.0' in text
            assert f'edpilot_extender_request_duration_seconds_count{{verb="{verb}"}} 0.0' in text
        for reason in ("power_budget", "throttled"):
            assert f'edpilot_extender_filtered_nodes_total{{reason="{reason}"}} 0.0' in text

    with_client(fleet(), body, ops=True)


def test_host_priority_list_is_valid_json_even_for_odd_names() -> None:
    scores = {"gpu-1": 10, 'we"ird\\name': 0, "ünï": 3}
    assert json.loads(host_priority_list(scores)) == [
        {"Host": host, "Score": score} for host, score in scores.items()
    ]
