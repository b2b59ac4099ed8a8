"""The stored optimizer state's versions: migrations run in order when a state is read back, a
state of the previous version resumes where it was, and one from a newer optimizer is refused.

The fixtures are what the optimizer stored (`model_dump(mode="json", exclude_none=True)`, as the
operator writes it into the policy's status) before `schemaVersion` existed, for the decode
workload of test_optimizer_clock: one mid-way through the SM clock search (the decision of its
report at 200 s) and one converged (its report at 2395 s).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from builders import REPORT_SECONDS, clock_policy, decode_at_batch_8, drive

from edpilot import optimizer
from edpilot.optimizer import (
    MIGRATIONS,
    SCHEMA_VERSION,
    UNVERSIONED,
    Decision,
    OptimizerState,
    StateTooNew,
    load_state,
    migrate,
    step,
    stored_version,
)
from edpilot.simulate import SimWorkloadSpec

FIXTURES = Path(__file__).parent / "fixtures"

MID_CLOCK_AT = 200.0
CONVERGED_AT = 2395.0


def decode() -> SimWorkloadSpec:
    """test_optimizer_clock's eager Llama-3-8B decode at batch 8 on an H100, under its policy."""
    return decode_at_batch_8(clock_policy())


def fixture(name: str) -> dict[str, Any]:
    stored: dict[str, Any] = json.loads((FIXTURES / f"optimizer_state_unversioned_{name}.json").read_text())
    assert "schemaVersion" not in stored  # the previous version's shape, as it was stored
    return stored


def resume(stored: dict[str, Any], decided_at: float, seconds: float) -> list[Decision]:
    """The workload as it ran when `stored` was decided, then the optimizer again from the state
    read back: what an operator restarted (or upgraded) at that moment does."""
    spec = decode()
    sim, _ = drive(spec, seconds=decided_at + REPORT_SECONDS)
    info, rng = sim.info(), random.Random(1)
    state = load_state(stored)
    decisions = []
    now = decided_at + REPORT_SECONDS
    while now < decided_at + REPORT_SECONDS + seconds:
        d = step(spec.policy, info, state, sim.observation(now), now)
        decisions.append(d)
        state = load_state(json.loads(json.dumps(d.state.model_dump(mode="json", exclude_none=True))))
        sim.apply(d, now)
        sim.advance(now, REPORT_SECONDS, rng)
        now += REPORT_SECONDS
    return decisions


def test_a_state_of_the_previous_version_reads_back_whole_and_labelled() -> None:
    for name in ("clock_stage_decode", "converged_decode"):
        stored = fixture(name)
        state = load_state(stored)
        assert state.schemaVersion == SCHEMA_VERSION
        assert state.model_dump(mode="json", exclude_none=True) == {**stored, "schemaVersion": SCHEMA_VERSION}


def test_a_state_stored_mid_exploration_resumes_where_it_was_not_from_scratch() -> None:
    stored = fixture("clock_stage_decode")
    before = OptimizerState.model_validate({**stored, "schemaVersion": SCHEMA_VERSION})
    assert before.phase == "Exploring" and before.stage == "clock"
    assert sum(p.stage == "clock" for p in before.probes) >= 2
    decisions = resume(stored, MID_CLOCK_AT, seconds=1200.0)
    first = decisions[0].state
    assert first.phase == "Exploring" and first.stage == "clock" and first.exploration == before.exploration
    assert first.baseline == before.baseline and first.noise == before.noise
    # No new baseline, ever: every probe measured before the restart is kept, and more follow.
    assert all(d.phase != "Baseline" and d.state.baseline == before.baseline for d in decisions)
    final = decisions[-1].state
    assert final.phase == "Converged"
    assert final.probes[: len(before.probes)] == before.probes
    assert sum(p.stage == "clock" for p in final.probes) > sum(p.stage == "clock" for p in before.probes)
    assert final.target.smClockMHz is not None  # the clock search it resumed found a lock


def test_a_converged_state_of_the_previous_version_stays_converged_on_its_choice() -> None:
    stored = fixture("converged_decode")
    before = load_state(stored)
    assert before.phase == "Converged" and before.target.smClockMHz is not None
    decisions = resume(stored, CONVERGED_AT, seconds=300.0)
    assert all(d.phase == "Converged" for d in decisions)
    assert decisions[-1].state.target == before.target
    assert decisions[-1].state.probes == before.probes and decisions[-1].state.incumbent == before.incumbent


def test_a_state_from_a_newer_optimizer_is_refused_not_read() -> None:
    newer = {**fixture("converged_decode"), "schemaVersion": SCHEMA_VERSION + 1, "fieldOfTheFuture": [1]}
    with pytest.raises(StateTooNew) as raised:
        load_state(newer)
    assert raised.value.version == SCHEMA_VERSION + 1
    # Nor does validating it directly pass it off as the current shape, even without new fields.
    with pytest.raises(ValueError):
        OptimizerState.model_validate({**fixture("converged_decode"), "schemaVersion": SCHEMA_VERSION + 1})


@pytest.mark.parametrize("version", [-1, "1", 1.0, True, None])
def test_an_invalid_version_is_unreadable(version: object) -> None:
    with pytest.raises(ValueError):
        load_state({**fixture("converged_decode"), "schemaVersion": version})


def test_the_chain_has_one_step_for_every_version() -> None:
    assert len(MIGRATIONS) == SCHEMA_VERSION - UNVERSIONED
    for version in range(UNVERSIONED, SCHEMA_VERSION):
        out = MIGRATIONS[version]({"schemaVersion": version} if version != UNVERSIONED else {})
        assert stored_version(out) == version + 1


def test_the_unversioned_step_labels_and_changes_nothing_else() -> None:
    stored = fixture("clock_stage_decode")
    assert migrate(stored) == {**stored, "schemaVersion": 1}
    assert stored_version(stored) == UNVERSIONED
    assert "schemaVersion" not in stored  # the stored dict itself is not modified


def step_to(version: int, trail: list[int]) -> Any:
    def migration(d: dict[str, Any]) -> dict[str, Any]:
        assert d.get("schemaVersion", UNVERSIONED) == version - 1, "ran out of order"
        trail.append(version)
        return {**d, "schemaVersion": version, f"v{version}": True}

    return migration


@pytest.mark.parametrize(("start", "expected"), [(UNVERSIONED, [1, 2, 3]), (1, [2, 3]), (2, [3]), (3, [])])
def test_every_step_from_the_stored_version_runs_once_in_order(
    monkeypatch: pytest.MonkeyPatch, start: int, expected: list[int]
) -> None:
    trail: list[int] = []
    monkeypatch.setattr(optimizer, "SCHEMA_VERSION", 3)
    monkeypatch.setattr(optimizer, "MIGRATIONS", tuple(step_to(v, trail) for v in (1, 2, 3)))
    stored = {} if start == UNVERSIONED else {"schemaVersion": start}
    out = migrate(stored)
    assert trail == expected
    assert out["schemaVersion"] == 3 and all(out.get(f"v{v}") for v in expected)


def test_a_step_that_does_not_reach_the_next_version_stops_the_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    trail: list[int] = []
    monkeypatch.setattr(optimizer, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(optimizer, "MIGRATIONS", (step_to(1, trail), lambda d: {**d, "forgot": True}))
    with pytest.raises(RuntimeError, match="from schemaVersion 1"):
        migrate({})
