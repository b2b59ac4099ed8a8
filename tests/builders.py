"""Objects many tests build: an H100's report entry with the fields a test cares about, and one
simulated workload driven by the optimizer."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from edpilot import gpusim
from edpilot.models import EnergyPolicySpec, GPUStatus, LabelSelector, PowerCapSpec, SmClockSpec, WorkMetric
from edpilot.optimizer import Decision, OptimizerState, Tuning, WorkloadInfo, step
from edpilot.simulate import SimWorkload, SimWorkloadSpec

REPORT_SECONDS = 5.0
Hook = Callable[[float, SimWorkload, WorkloadInfo], WorkloadInfo]

H100_NVML_NAME = "NVIDIA H100 80GB HBM3"


def h100_status(index: int = 0, uuid: str | None = None, **fields: Any) -> GPUStatus:
    """An H100 SXM as the agent reports it (limits 200-700 W, at its default 700 W, idle at 70 W);
    `fields` override any GPUStatus field."""
    values: dict[str, Any] = {
        "index": index,
        "uuid": uuid or f"GPU-{index}",
        "model": H100_NVML_NAME,
        "minLimitWatts": 200,
        "maxLimitWatts": 700,
        "defaultLimitWatts": 700,
        "enforcedLimitWatts": 700,
        "powerWatts": 70,
        "energyJoules": 0,
    }
    return GPUStatus.model_validate({**values, **fields})


def drive(
    spec: SimWorkloadSpec,
    seconds: float = 2400.0,
    seed: int = 0,
    tuning: Tuning | None = None,
    hook: Hook | None = None,
    roundtrip: bool = False,
) -> tuple[SimWorkload, list[Decision]]:
    """Run one simulated workload under the optimizer, the way `edpilot simulate` does; `hook`
    may change what the operator knows between reports."""
    sim = SimWorkload(spec, 0)
    info = sim.info()
    rng = random.Random(seed)
    state: OptimizerState | None = None
    decisions: list[Decision] = []
    now = 0.0
    while now < seconds:
        if hook is not None:
            info = hook(now, sim, info)
        d = step(spec.policy, info, state, sim.observation(now), now, tuning or Tuning())
        decisions.append(d)
        state = d.state
        if roundtrip:  # what a restarted operator reads back from the policy's status
            state = OptimizerState.model_validate(json.loads(json.dumps(d.state.model_dump(mode="json"))))
        sim.apply(d, now)
        sim.advance(now, REPORT_SECONDS, rng)
        now += REPORT_SECONDS
    return sim, decisions


EAGER_DECODE = gpusim.llama_decode(cuda_graphs=False)


def clock_policy(**overrides: object) -> EnergyPolicySpec:
    """The SM clock tests' policy: EDP, 10% slowdown, caps and clocks Auto."""
    return EnergyPolicySpec.model_validate(
        {
            "selector": LabelSelector(),
            "workMetric": WorkMetric(name="work_total"),
            "maxSlowdownPercent": 10,
            "objective": "EDP",
            # Caps from 60% of TDP: above the eager decode's natural draw, so they cannot bind.
            "powerCap": PowerCapSpec(mode="Auto", minPercent=60),
            "smClock": SmClockSpec(mode="Auto"),
            **overrides,
        }
    )


def decode_at_batch_8(
    pol: EnergyPolicySpec, profile: gpusim.WorkloadProfile = EAGER_DECODE
) -> SimWorkloadSpec:
    """A Llama-3-8B-shaped decode at batch 8 in bf16 on a simulated H100 (eager unless `profile`)."""
    return SimWorkloadSpec("decode", profile, 8, "bf16", pol)
