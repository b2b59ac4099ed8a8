"""Finding 5 (MEDIUM) of issue 14: a tenant that creates many large policies must not make the
operator's cycle quadratic. One cycle reconciles every policy of a namespace; the work it does is
counted in label-selector evaluations (the expensive part with maximum-size selectors), so the test
asserts how it scales, not how long it takes on this machine."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from edpilot_operator.selection import GovernanceCache, PodInfo, PolicyEntry, PolicyRef
from edpilot_operator.services import reconcile_policy

from edpilot.models import EnergyPolicySpec, LabelSelector

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
NS = "tenant"
PODS = 8


def policies(count: int) -> list[PolicyRef]:
    """`count` policies of one namespace, each selecting every pod (the worst case for conflicts)."""
    return [
        PolicyRef(
            NS,
            f"p{i:04d}",
            EnergyPolicySpec.model_validate(
                {
                    "selector": {
                        "matchLabels": {"app": "llm"},
                        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}],
                    },
                    "priority": i % 7,
                    "workMetric": {"name": "tokens_total"},
                }
            ),
        )
        for i in range(count)
    ]


def pods() -> list[PodInfo]:
    labels = {"app": "llm", "tier": "a"}
    return [PodInfo(NS, f"pod-{i}", f"uid-{i}", f"node-{i}", "Running", 1, labels) for i in range(PODS)]


@pytest.fixture
def evaluations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    count = [0]
    original = LabelSelector.matches

    def counted(self: LabelSelector, labels: dict[str, str]) -> bool:
        count[0] += 1
        return original(self, labels)

    monkeypatch.setattr(LabelSelector, "matches", counted)
    yield count


def one_cycle(refs: list[PolicyRef]) -> None:
    """What the operator's policy timers do in one reconcile interval: every policy once."""
    cache = GovernanceCache()
    members = pods()
    entries = [PolicyEntry(ref) for ref in refs]  # what the operator's index holds
    for ref in refs:
        reconcile_policy(
            policy=ref,
            status={},
            generation=1,
            pods=members,
            governance=cache.get(NS, members, entries),
            reports={},
            now=NOW,
        )


def test_a_cycle_evaluates_each_selector_once_per_pod(evaluations: list[int]) -> None:
    one_cycle(policies(250))
    small = evaluations[0]
    evaluations[0] = 0
    one_cycle(policies(1000))
    large = evaluations[0]
    # Linear: four times the policies, four times the evaluations (quadratic would be sixteen).
    assert large <= 4.5 * small, (small, large)
    assert large <= 1000 * PODS, large
