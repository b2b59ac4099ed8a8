"""The optimizer when hints are delivered by rollout (delivery.mode Rollout): every change of the
batch limit or the precision costs a rollout of the owner, so they are counted, bounded, and spent
on what the running replicas already measured; a configuration whose pods never become Ready is a
failed probe that rolls back."""

from __future__ import annotations

import itertools
import random

from edpilot import gpusim
from edpilot.models import EnergyPolicySpec
from edpilot.optimizer import Decision, OptimizerState, Probe, fail_target, step
from edpilot.simulate import SimServing, chat, serving_policy

REPORT_SECONDS = 5.0


def by_rollout(policy: EnergyPolicySpec, max_rollouts: int = 4) -> EnergyPolicySpec:
    raw = policy.model_dump(exclude_none=True)
    raw["delivery"] = {
        "mode": "Rollout",
        "batchSize": {"arg": "--max-num-seqs"},
        "quantization": [{"profile": "bf16"}, {"profile": "fp8", "args": ["--quantization=fp8"]}],
        "maxRollouts": max_rollouts,
    }
    return EnergyPolicySpec.model_validate(raw)


def run(
    policy: EnergyPolicySpec, rate: float, seconds: float, until_batch_probe: bool = False
) -> list[Decision]:
    """A serving replica under `policy` for `seconds` (or until the first batch probe is asked)."""
    spec = chat("chat", gpusim.H100_SXM, rate, policy)
    sim = SimServing(spec, 0, seed=3)
    info = sim.info()
    state: OptimizerState | None = None
    decisions: list[Decision] = []
    rng = random.Random(0)
    now = 0.0
    while now < seconds:
        decision = step(policy, info, state, sim.observation(now), now)
        decisions.append(decision)
        state = decision.state
        incumbent = state.incumbent
        kept = incumbent.config.batchSize if incumbent is not None else None
        if until_batch_probe and state.stage == "batch" and state.target.batchSize != kept:
            return decisions
        sim.apply(decision, now)
        sim.advance(now, REPORT_SECONDS, rng)
        now += REPORT_SECONDS
    return decisions


def template_changes(decisions: list[Decision]) -> int:
    """How many times the (precision, batch limit) the owner's template must carry changed."""
    carried = [(d.quantization, d.batchSize) for d in decisions]
    return sum(1 for before, after in itertools.pairwise(carried) if before != after)


def test_rollouts_are_counted_and_held_to_the_budget() -> None:
    # 24 requests/s on an H100 keeps 256 sequences busy: the batch limit binds, so it is searched.
    policy = by_rollout(serving_policy(), max_rollouts=4)
    decisions = run(policy, 24.0, 2400.0)
    final = decisions[-1].state
    assert final.rollouts == template_changes(decisions)
    assert 1 <= final.rollouts <= 4
    assert final.phase == "Converged"


def test_a_rollout_budget_of_one_allows_no_probe() -> None:
    """A probe costs its rollout and the one back: a budget of one leaves the template alone."""
    decisions = run(by_rollout(serving_policy(), max_rollouts=1), 24.0, 1800.0)
    assert template_changes(decisions) == 0
    assert decisions[-1].state.rollouts == 0
    assert any("rollout budget" in r for d in decisions for r in d.reasons)


def test_the_batch_limit_is_sized_from_the_running_replicas_demand_in_one_rollout() -> None:
    live = run(serving_policy(), 24.0, 2400.0)
    rolled = run(by_rollout(serving_policy(), max_rollouts=8), 24.0, 2400.0)
    live_batch_probes = [p for p in live[-1].state.probes if p.stage == "batch"]
    rolled_batch_probes = [p for p in rolled[-1].state.probes if p.stage == "batch"]
    assert len(rolled_batch_probes) == 1
    assert len(live_batch_probes) >= len(rolled_batch_probes)
    # The one probe carries what ran and waited at the baseline.
    baseline = rolled[-1].state.baseline
    assert baseline is not None and baseline.metrics is not None
    demand = (baseline.metrics.peakRunning or 0.0) + (baseline.metrics.peakWaiting or 0.0)
    (probe,) = rolled_batch_probes
    assert probe.config.batchSize is not None
    assert probe.config.batchSize >= min(demand, 1024)


def test_a_probe_whose_pods_never_become_ready_fails_and_rolls_back() -> None:
    policy = by_rollout(serving_policy(), max_rollouts=8)
    decisions = run(policy, 24.0, 2400.0, until_batch_probe=True)
    state = decisions[-1].state
    assert state.incumbent is not None and state.stage == "batch"
    probed, kept = state.target.batchSize, state.incumbent.config.batchSize
    spec = chat("chat", gpusim.H100_SXM, 24.0, policy)
    info = SimServing(spec, 0).info()
    decision = fail_target(policy, info, state, 9999.0, "pods not Ready within 600 s")
    after = decision.state
    failed = [p for p in after.probes if p.failed]
    assert [p.config.batchSize for p in failed] == [probed]
    assert isinstance(failed[0], Probe) and "not Ready" in (failed[0].failed or "")
    assert after.stage != "batch"  # a neighbour of a limit that cannot start is no better bet
    assert decision.batchSize == kept  # back to the template that ran
    assert after.rollouts == state.rollouts + 1
    assert after.last is None  # no window spans the pods that ran before and those that run next
    assert any(e.reason == "ProbeFailed" for e in decision.events)
