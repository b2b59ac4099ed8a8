"""Finding 8 (LOW) of issue 14, operator part: a tenant's `edpilot.io/quantization-accuracy`
annotation nested deeply enough to exhaust the parser's recursion is refused with a clear
ValueError, and the policy's reconcile carries on with a warning instead of failing every time."""

from __future__ import annotations

import pytest

from edpilot.contract import parse_accuracy

DEEP = "[" * 200_000 + "]" * 200_000
DEEP_OBJECT = '{"bf16":' * 100_000 + "1" + "}" * 100_000


@pytest.mark.parametrize("text", [DEEP, DEEP_OBJECT, "[" * 200_000])
def test_a_deeply_nested_annotation_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="quantization-accuracy"):
        parse_accuracy(text)


def test_the_policy_reconcile_warns_and_goes_on() -> None:
    from datetime import UTC, datetime

    from builders import h100_status
    from edpilot_operator.selection import PodInfo, PolicyRef, governance
    from edpilot_operator.services import reconcile_policy

    from edpilot.models import EnergyPolicySpec, GPUNodeReportStatus, WorkloadSample

    now = datetime(2026, 11, 27, tzinfo=UTC)
    spec = EnergyPolicySpec.model_validate(
        {"selector": {"matchLabels": {"app": "x"}}, "workMetric": {"name": "w"}}
    )
    policy = PolicyRef("t", "p", spec)
    pod = PodInfo("t", "a", "u", "n0", "Running", 1, {"app": "x"}, {"edpilot.io/quantization-accuracy": DEEP})
    report = GPUNodeReportStatus(
        nodeName="n0",
        agentVersion="t",
        backend="sim",
        time=now,
        gpus=[h100_status(0, "GPU-0", pods=["t/a"])],
        workloads=[WorkloadSample(namespace="t", pod="a", workUnits=1.0)],
    )
    outcome = reconcile_policy(
        policy=policy,
        status={},
        generation=1,
        pods=[pod],
        governance=governance([pod], [policy]),
        reports={"n0": report},
        now=now,
    )
    warnings = [e.message for e in outcome.events if e.reason == "WorkloadInput"]
    assert any("nested too deeply" in w for w in warnings), outcome.events
    assert outcome.status["workloads"][0]["phase"] == "Baseline"
