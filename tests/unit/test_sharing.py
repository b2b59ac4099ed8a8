"""The shared-GPU rule (edpilot.sharing): a policy caps only a whole GPU that one pod holds alone."""

from __future__ import annotations

import pytest

from edpilot.dra import DraHoldings
from edpilot.sharing import Exclusivity, exclusivity

GPU = "GPU-0"


@pytest.mark.parametrize(
    ("pods", "mig", "shared", "dra", "expected"),
    [
        pytest.param(["ml/a"], False, False, DraHoldings(), Exclusivity("ml/a"), id="device plugin, one pod"),
        pytest.param([], False, False, DraHoldings(), Exclusivity(None), id="idle"),
        pytest.param(
            ["ml/a", "ml/b"],
            False,
            False,
            DraHoldings(),
            Exclusivity(None, "used by 2 pods (ml/a, ml/b)"),
            id="two",
        ),
        pytest.param(
            ["ml/a"],
            False,
            True,
            DraHoldings(),
            Exclusivity(None, "handed out as a shared device (time-slicing, MPS or a DRA share)"),
            id="time-slicing replica, one pod now",
        ),
        pytest.param(
            ["ml/a"],
            True,
            False,
            DraHoldings(),
            Exclusivity(None, "MIG is enabled: its partitions share the board's power limit"),
            id="MIG",
        ),
        pytest.param(
            ["ml/a"],
            False,
            False,
            DraHoldings({GPU: frozenset({"ml/a"})}),
            Exclusivity("ml/a"),
            id="DRA agrees",
        ),
        pytest.param(
            [],
            False,
            False,
            DraHoldings({GPU: frozenset({"ml/a"})}),
            Exclusivity("ml/a"),
            id="DRA, agent not yet",
        ),
        pytest.param(
            ["ml/a"],
            False,
            False,
            DraHoldings({GPU: frozenset({"other/b"})}),
            Exclusivity(None, "used by 2 pods (ml/a, other/b)"),
            id="DRA names another pod",
        ),
        pytest.param(
            ["ml/a"],
            False,
            False,
            DraHoldings({GPU: frozenset({"ml/a"})}, {GPU: "claim c is reserved for 2 pods"}),
            Exclusivity(None, "shared through DRA: claim c is reserved for 2 pods"),
            id="shared claim",
        ),
        pytest.param(
            [f"ml/p{i}" for i in range(5)],
            False,
            False,
            DraHoldings(),
            Exclusivity(None, "used by 5 pods (ml/p0, ml/p1, ml/p2, ...)"),
            id="many",
        ),
    ],
)
def test_only_a_whole_gpu_one_pod_holds_alone_has_a_holder(
    pods: list[str], mig: bool, shared: bool, dra: DraHoldings, expected: Exclusivity
) -> None:
    result = exclusivity(GPU, pods, mig_enabled=mig, reported_shared=shared, dra=dra)
    assert result == expected
    assert result.shared == (expected.holder is None and bool(expected.reason))
