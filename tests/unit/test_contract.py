"""The agreements between processes (edpilot.contract), one table each, and the end-to-end
agreement issue 15 found broken: a throttled GPU as a simulated agent reports it is a node the
extender's filter drops."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pynvml
import pytest
from agent_helpers import FakeClock, decode_pod
from edpilot_agent.agent import NodeAgent
from edpilot_agent.kube import InMemoryKube
from edpilot_agent.kube import pod_info as agent_pod_info
from edpilot_agent.sim import SIM_THERMAL_CLOCK, SimBackend, SimWorkloads
from edpilot_operator.extender import Extender, ExtenderArgs
from edpilot_operator.extender_view import KINDS, NODES, REPORTS, ClusterView
from edpilot_operator.selection import pod_info as operator_pod_info

from edpilot.contract import (
    BLOCKING_THROTTLE_REASONS,
    NVML_REASON_BITS,
    Limits,
    ThrottleReason,
    cap_bounds,
    decode_batch_size,
    decode_power_cap,
    decode_quantization,
    encode_batch_size,
    encode_power_cap,
    gpu_request,
    is_excluded,
    parse_batch_range,
    throttle_reasons,
    transition,
)
from edpilot.models import Condition, ConditionStatus, PowerCapSpec

T0 = datetime(2026, 11, 27, tzinfo=UTC)


# ---------------------------------------------------------------- throttle reasons


@pytest.mark.parametrize("reason", list(ThrottleReason))
def test_every_throttle_reason_is_named_and_numbered_as_nvml_h_does(reason: ThrottleReason) -> None:
    assert getattr(pynvml, f"nvmlClocksEventReason{reason.value}") == NVML_REASON_BITS[reason]


def test_a_mask_reads_back_as_its_reasons_in_nvml_order() -> None:
    assert throttle_reasons(0x004 | 0x040) == (
        ThrottleReason.SW_POWER_CAP,
        ThrottleReason.HW_THERMAL_SLOWDOWN,
    )
    assert throttle_reasons(0) == ()
    assert set(BLOCKING_THROTTLE_REASONS) < set(ThrottleReason)


def extender_with(report_status: dict[str, Any]) -> Extender:
    view = ClusterView()
    for kind in KINDS:
        view.replace_all(kind, [])
    view.apply(NODES, "ADDED", {"metadata": {"name": "gpu-node-0", "labels": {}}})
    view.apply(REPORTS, "ADDED", {"metadata": {"name": "gpu-node-0"}, "status": report_status})
    return Extender(view)


@pytest.mark.parametrize(("clock_limit", "filtered"), [("1200", True), ("", False)])
def test_a_thermally_throttled_gpu_a_simulated_agent_reports_makes_the_extender_filter_its_node(
    clock_limit: str, filtered: bool
) -> None:
    clock = FakeClock()
    backend = SimBackend("gpu-node-0", gpus=2, seed=1, clock=clock.monotonic)
    annotations = {SIM_THERMAL_CLOCK: clock_limit} if clock_limit else {}
    kube = InMemoryKube(pods=[decode_pod(annotations=annotations)])
    workloads = SimWorkloads(backend)
    agent = NodeAgent(
        "gpu-node-0", backend, workloads, kube, clock, allocations=workloads, default_interval_seconds=1.0
    )
    for _ in range(3):
        agent.tick()
        clock.advance(1)
    status = kube.statuses[-1].model_dump(mode="json", exclude_none=True)
    extender = extender_with(status)
    args = ExtenderArgs.model_validate(
        {
            "Pod": {"metadata": {"name": "new", "namespace": "ml"}, "spec": {"containers": []}},
            "NodeNames": ["gpu-node-0"],
        }
    )
    result = extender.filter(args)
    if filtered:
        assert status["gpus"][0]["throttleReasons"] == ["HwThermalSlowdown"]
        assert result.NodeNames == []
        assert result.FailedAndUnresolvableNodes is not None
        assert "GPU 0 hardware thermal slowdown" in result.FailedAndUnresolvableNodes["gpu-node-0"]
    else:
        assert result.NodeNames == ["gpu-node-0"]


# ---------------------------------------------------------------- annotations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8-512", (8, 512)),
        ("16..64", (16, 64)),
        (" 8-8 ", (8, 8)),
        ("64-8", None),
        ("0-8", None),
        ("8", None),
        ("x", None),
        ("８-16", None),  # full-width digits: int() would take them, a tenant's text must not pass
        ("-8-16", None),
    ],
)
def test_batch_size_range_annotation(text: str, expected: tuple[int, int] | None) -> None:
    assert parse_batch_range(text) == expected


@pytest.mark.parametrize(
    ("annotations", "excluded"),
    [({"edpilot.io/exclude": "true"}, True), ({"edpilot.io/exclude": "True"}, True), ({}, False)],
)
def test_exclude_annotation(annotations: dict[str, str], excluded: bool) -> None:
    assert is_excluded(annotations) is excluded


def test_hints_read_back_as_they_are_written() -> None:
    assert decode_power_cap(encode_power_cap(412.6)) == 413.0
    assert (
        encode_power_cap(None) is None and decode_power_cap("nan") is None and decode_power_cap("-5") is None
    )
    assert decode_batch_size(encode_batch_size(64)) == 64 and decode_batch_size("0") is None
    assert decode_quantization("fp8") == "fp8" and decode_quantization("fp9") is None


# ---------------------------------------------------------------- GPU requests


@pytest.mark.parametrize(
    ("containers", "gpus"),
    [
        ([{"resources": {"limits": {"nvidia.com/gpu": "2"}}}, {"resources": {}}], 2),
        (
            [
                {"resources": {"requests": {"nvidia.com/gpu": 1}}},
                {"resources": {"limits": {"nvidia.com/gpu": 3}}},
            ],
            4,
        ),
        ([{"resources": {"limits": {"nvidia.com/gpu": "２"}}}], 0),  # full-width: not a quantity
        ([{"resources": {"limits": {"nvidia.com/gpu": "1.5"}}}], 0),
        ([], 0),
    ],
)
def test_gpu_request_is_read_the_same_by_operator_and_agent(
    containers: list[dict[str, Any]], gpus: int
) -> None:
    body: dict[str, Any] = {
        "metadata": {"namespace": "ml", "name": "p", "uid": "u"},
        "spec": {"nodeName": "n", "containers": containers},
        "status": {"phase": "Running"},
    }
    assert gpu_request(body["spec"]) == gpus
    agent_view = agent_pod_info(body)
    assert agent_view is not None and agent_view.gpu_request == gpus
    assert operator_pod_info(body).gpus == gpus


# ---------------------------------------------------------------- cap bounds


@pytest.mark.parametrize(
    ("spec", "limits", "expected"),
    [
        (PowerCapSpec(), (200, 700, 700), (350, 700, 700)),
        (PowerCapSpec(minPercent=10), (200, 700, 700), (200, 700, 700)),
        (PowerCapSpec(mode="Fixed", watts=900), (200, 700, 700), (700, 700, 700)),
        (PowerCapSpec(maxPercent=80), (200, 700, 700), (350, 560, 560)),
        (PowerCapSpec(mode="Off"), (200, 700, 700), None),
        (PowerCapSpec(minWatts=800), (200, 700, 700), None),
        (PowerCapSpec(), (None, 700, 700), None),
    ],
)
def test_cap_bounds(
    spec: PowerCapSpec, limits: tuple[float | None, float, float], expected: tuple[float, float, float] | None
) -> None:
    bounds = cap_bounds(spec, Limits("GPU-0", *limits))
    if expected is None:
        assert isinstance(bounds, str) and "GPU-0" in bounds
    else:
        assert not isinstance(bounds, str) and (bounds.lo, bounds.hi, bounds.baseline) == expected


# ---------------------------------------------------------------- conditions


@pytest.mark.parametrize(
    ("before", "status", "moves"),
    [(None, "True", True), ("True", "True", False), ("False", "True", True), ("True", "Unknown", True)],
)
def test_a_condition_transitions_only_when_its_status_changes(
    before: ConditionStatus | None, status: ConditionStatus, moves: bool
) -> None:
    previous = [Condition(type="Ready", status=before, reason="Was", lastTransitionTime=T0)] if before else []
    now = T0 + timedelta(minutes=5)
    cond = transition(previous, "Ready", status, "Now", "x" * 40000, now, generation=3)
    assert cond.lastTransitionTime == (now if moves else T0)
    assert (cond.reason, cond.observedGeneration, len(cond.message)) == ("Now", 3, 32768)
