"""Where a GPU pod should run: which nodes a power budget or throttling rules out, and how
much energy per unit of work the pod is expected to spend on each of the others. Pure.

Budget accounting (shared with `edpilot.budget` and the operator): a GPU that holds pods
commits its enforced power limit (what it may draw); an idle GPU commits what it draws now,
because edpilot caps GPUs per pod and cannot lower an idle one's limit. A budget's headroom is
`maxWatts` minus what its GPUs commit. A pod fits when its GPUs, at the lowest limit the operator
may give them under that budget, fit in that headroom: the lowest its Auto policy allows; for a pod
no Auto policy steers, its default limit (a Governed budget never caps it) or, under an AllGPUs
budget, what `DEFAULT_CAP` allows.

Expected energy per unit of work, best evidence first:
1. what edpilot measured for this policy and image on this GPU model (EnergyPolicy status rows);
2. the same measurements taken on another GPU model, carried over by the models' prior ratio;
3. the same with measurements of the policy's other images;
4. the GPU model's prior alone (relative figures: they only rank nodes against each other).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Final, Literal

from edpilot import gpusim
from edpilot.models import GPUStatus, PowerCapSpec

MAX_SCORE: Final = 10  # MaxExtenderPriority of the kube-scheduler extender API
# Energy decides; budget headroom breaks near-ties and spreads load away from full budgets.
ENERGY_WEIGHT: Final = 0.7
HEADROOM_WEIGHT: Final = 1.0 - ENERGY_WEIGHT

# NVML clocks-event reasons that mean the GPU is already losing work to heat or to the
# power brake: a new pod there would run slower and spend more energy per unit.
BLOCKING_THROTTLE_REASONS: Final[Mapping[str, str]] = {
    "HwThermalSlowdown": "hardware thermal slowdown",
    "SwThermalSlowdown": "software thermal slowdown",
    "HwPowerBrakeSlowdown": "power-brake slowdown",
}

THROTTLED_PREFIX: Final = "edpilot: node GPUs are throttled: "

# What a budget of scope AllGPUs allows a pod no Auto policy steers (operator: budgets.UNMANAGED_CAP).
DEFAULT_CAP: Final = PowerCapSpec()


# ---------------------------------------------------------------- GPU model priors


@dataclass(frozen=True, slots=True)
class GpuPrior:
    default_limit_watts: float
    min_limit_watts: float
    max_limit_watts: float
    relative_joules_per_unit: float  # energy per unit of compute-bound work; H100 SXM = 1.0
    source: str
    # (power limit W, units/s relative to the default limit) of compute-bound work: the shape of the
    # model's clock-power curve, knee included. Empty for spec-sheet priors.
    compute_curve: tuple[tuple[float, float], ...] = ()  # see compute_bound_curve


def model_key(model: str) -> str:
    """NVML names ("NVIDIA H100 80GB HBM3") and GFD labels ("NVIDIA-H100-80GB-HBM3") compare equal."""
    return " ".join(model.upper().replace("-", " ").replace("_", " ").split())


# Spec-sheet priors for models gpusim does not simulate: (default/TDP W, min limit W, dense bf16
# TFLOP/s). Relative J/unit = (TDP / TFLOP/s) over the H100 SXM's (700 W / 989 TFLOP/s), NVIDIA
# datasheets. Uncalibrated: they only order nodes until edpilot has measured the workload.
_SPEC_SHEET: Final[Mapping[str, tuple[float, float, float]]] = {
    "H200": (700.0, 200.0, 989.0),
    "H100 PCIE": (350.0, 200.0, 756.0),
    "H100 NVL": (400.0, 200.0, 835.0),
    "A100 PCIE": (300.0, 150.0, 312.0),
    "L40S": (350.0, 100.0, 362.0),
    "L4": (72.0, 40.0, 121.0),
}
_H100_SXM_WATTS_PER_TFLOPS: Final = 700.0 / 989.0
COMPUTE_CURVE_STEP_WATTS: Final = 10.0


@cache
def _gpusim_priors() -> dict[str, GpuPrior]:
    """Priors for the simulated models: J per large bf16 GEMM at the default limit, relative to the
    H100 SXM, and the GEMM's throughput over the power limit. The H100 figures are fitted to the
    team's probe (data/h100_probe.json); the A100's are gpusim's spec-sheet prior."""
    reference = gpusim.gemm()

    def joules(spec: gpusim.GpuSpec) -> float:
        return gpusim.operating_point(
            spec, reference, 1, "bf16", spec.default_power_limit_watts
        ).joules_per_unit

    def compute_curve(spec: gpusim.GpuSpec) -> tuple[tuple[float, float], ...]:
        def rate(cap: float) -> float:
            return gpusim.operating_point(spec, reference, 1, "bf16", cap).units_per_second

        lo, hi = spec.min_power_limit_watts, spec.max_power_limit_watts
        steps = max(1, round((hi - lo) / COMPUTE_CURVE_STEP_WATTS))
        top = rate(spec.default_power_limit_watts)
        return tuple((c, rate(c) / top) for c in (lo + (hi - lo) * i / steps for i in range(steps + 1)))

    h100 = joules(gpusim.H100_SXM)
    return {
        model_key(spec.name): GpuPrior(
            default_limit_watts=spec.default_power_limit_watts,
            min_limit_watts=spec.min_power_limit_watts,
            max_limit_watts=spec.max_power_limit_watts,
            relative_joules_per_unit=joules(spec) / h100,
            source=spec.source,
            compute_curve=compute_curve(spec),
        )
        for spec in gpusim.GPU_MODELS.values()
    }


@cache
def prior_for(model: str) -> GpuPrior | None:
    """The prior of a GPU model by its NVML name or GFD product label; None when unknown."""
    key = model_key(model)
    if not key:
        return None
    simulated = _gpusim_priors()
    if key in simulated:
        return simulated[key]
    for family, (tdp, min_w, tflops) in _SPEC_SHEET.items():
        if family in key:
            return GpuPrior(tdp, min_w, tdp, (tdp / tflops) / _H100_SXM_WATTS_PER_TFLOPS, "NVIDIA datasheet")
    for sim_key, prior in simulated.items():  # e.g. "NVIDIA H100 80GB HBM3" for "NVIDIA H100 SXM5 80GB"
        family = sim_key.split()[1] if len(sim_key.split()) > 1 else sim_key
        if family in key and ("PCIE" not in key):
            return prior
    return None


def relative_joules_per_unit(model: str) -> float:
    """The model's prior factor; unknown hardware gets the least efficient known factor, so edpilot
    never attracts pods to GPUs it knows nothing about."""
    prior = prior_for(model)
    if prior is not None:
        return prior.relative_joules_per_unit
    return max(p.relative_joules_per_unit for p in _gpusim_priors().values())


Curve = tuple[tuple[float, float], ...]


def stretched(curve: Curve, min_watts: float, max_watts: float) -> Curve:
    """A cap curve moved linearly onto another power range, its knee where that range puts it."""
    c0, c1 = curve[0][0], curve[-1][0]
    return tuple((min_watts + (c - c0) * (max_watts - min_watts) / (c1 - c0), t) for c, t in curve)


def compute_bound_curve(model: str, min_watts: float, max_watts: float) -> Curve:
    """A GPU's compute-bound throughput over its power limit: its model's own curve when gpusim
    simulates the model, otherwise the H100 SXM's stretched over the GPU's limits. The stretch
    assumes the knee sits at the same place in every model's range; a knee somewhere still misleads
    a budget less than none (bench/budget_allocation.py: the A100's knee on an H100 kept 97% of runs
    within 5% of the optimum, a bare power law 69%). Empty when the limits are unknown."""
    prior = prior_for(model)
    if prior is not None and prior.compute_curve:
        return prior.compute_curve
    if not 0 < min_watts < max_watts:
        return ()
    h100 = _gpusim_priors()[model_key(gpusim.H100_SXM.name)].compute_curve
    return stretched(h100, min_watts, max_watts)


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class PodDemand:
    """What placement needs of the pod being scheduled."""

    key: str  # namespace/name
    gpus: int
    image: str
    policy: str | None = None  # namespace/name of the governing EnergyPolicy
    power_cap: PowerCapSpec | None = None  # that policy's bounds


NodeGroup = tuple[str, float, float, float, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as placement sees it (built from the Node and its GPUNodeReport)."""

    name: str
    gpu_model: str = ""
    default_limit_watts: float = 0.0  # 0: unknown
    min_limit_watts: float = 0.0
    max_limit_watts: float = 0.0
    blocking_throttle: str = ""  # why the node is throttled, empty when it is not
    budgets: tuple[str, ...] = ()  # PowerBudgets whose selector selects the node
    # Nodes of one group get the same verdict and score, so placement decides each group once.
    group: NodeGroup = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        limits = (self.default_limit_watts, self.min_limit_watts, self.max_limit_watts)
        object.__setattr__(self, "group", (self.gpu_model, *limits, self.budgets))


@dataclass(frozen=True, slots=True)
class BudgetView:
    name: str
    max_watts: float
    committed_watts: float
    all_gpus: bool = False  # scope AllGPUs: the operator caps every busy GPU, governed or not

    @property
    def headroom_watts(self) -> float:
        return self.max_watts - self.committed_watts


def blocking_throttle(gpus: Iterable[GPUStatus]) -> str:
    """Human-readable throttling that rules a node out, or "" (what `kubectl describe pod` shows)."""
    hits = [
        f"GPU {g.index} {BLOCKING_THROTTLE_REASONS[r]}"
        for g in gpus
        for r in g.throttleReasons
        if r in BLOCKING_THROTTLE_REASONS
    ]
    if not hits:
        return ""
    more = f" (+{len(hits) - 2} more)" if len(hits) > 2 else ""
    return THROTTLED_PREFIX + ", ".join(hits[:2]) + more


def committed_watts(gpus: Sequence[GPUStatus], unreported_gpus: int, default_limit_watts: float) -> float:
    """Watts a node's GPUs hold against its budgets.

    A GPU holding pods commits its enforced limit, an idle one its present draw. GPUs of pods the
    scheduler has bound to the node but the agent has not reported yet count at the default limit
    (that is where they start), taking the place of the idle GPUs that draw least.
    """
    busy = [g for g in gpus if g.pods]
    idle_draws = sorted(g.powerWatts for g in gpus if not g.pods)
    total = sum(g.enforcedLimitWatts for g in busy) + sum(idle_draws)
    for draw in idle_draws[:unreported_gpus]:
        total += default_limit_watts - draw
    total += max(0, unreported_gpus - len(idle_draws)) * default_limit_watts
    return total


def lowest_cap_watts(cap: PowerCapSpec | None, node: NodeView, all_gpus: bool = False) -> float:
    """The lowest power limit the operator may give the pod's GPUs on this node under a budget
    (0 when unknown). `cap` is the governing policy's; a GPU no Auto policy steers keeps its
    default (or Fixed) limit unless the budget is of scope AllGPUs."""
    default, hw_min = node.default_limit_watts, node.min_limit_watts
    hw_max = node.max_limit_watts or default
    if default <= 0:
        return 0.0

    def floor(spec: PowerCapSpec) -> float:
        return min(max(hw_min, default * spec.minPercent / 100.0, spec.minWatts or 0.0), hw_max)

    if cap is not None and cap.mode == "Auto":
        return floor(cap)
    left = default
    if cap is not None and cap.mode == "Fixed" and cap.watts is not None:
        left = min(max(cap.watts, hw_min), hw_max)
    return min(left, floor(DEFAULT_CAP)) if all_gpus else left


# ---------------------------------------------------------------- filter


@dataclass(frozen=True, slots=True)
class FilterResult:
    passed: list[str]
    failed: dict[str, str]


def _budget_verdict(pod: PodDemand, node: NodeView, budgets: Mapping[str, BudgetView]) -> str:
    for name in node.budgets:
        budget = budgets.get(name)
        if budget is None:
            continue
        cap = lowest_cap_watts(pod.power_cap, node, budget.all_gpus)
        need = pod.gpus * cap
        if need <= budget.headroom_watts:
            continue
        left = max(0.0, budget.headroom_watts)
        return (
            f"edpilot: PowerBudget {name} cannot take {pod.gpus} GPU(s): {need:.0f} W needed at the lowest "
            f"allowed cap of {cap:.0f} W, {left:.0f} W left of {budget.max_watts:.0f} W"
        )
    return ""


def filter_nodes(
    pod: PodDemand, nodes: Iterable[NodeView], budgets: Mapping[str, BudgetView]
) -> FilterResult:
    """Nodes that can take the pod, and a reason for each node that cannot."""
    passed: list[str] = []
    failed: dict[str, str] = {}
    verdicts: dict[NodeGroup, str] = {}
    for node in nodes:
        if node.blocking_throttle:
            failed[node.name] = node.blocking_throttle
            continue
        if not node.budgets or pod.gpus <= 0:
            passed.append(node.name)
            continue
        # Many nodes share a model and a budget: decide each combination once.
        key = (
            node.gpu_model,
            node.default_limit_watts,
            node.min_limit_watts,
            node.max_limit_watts,
            node.budgets,
        )
        verdict = verdicts.get(key)
        if verdict is None:
            verdict = verdicts[key] = _budget_verdict(pod, node, budgets)
        if verdict:
            failed[node.name] = verdict
        else:
            passed.append(node.name)
    return FilterResult(passed=passed, failed=failed)


# ---------------------------------------------------------------- history and expected energy


@dataclass(frozen=True, slots=True)
class EnergySample:
    """One measured workload: J per unit of work of a policy's pods with an image on a GPU model."""

    policy: str
    image: str
    gpu_model: str
    joules_per_unit: float


Basis = Literal["measured", "transferred", "policy", "prior"]


@dataclass(frozen=True)
class EnergyHistory:
    """Medians of measured J/unit, indexed for placement."""

    by_image: Mapping[tuple[str, str], Mapping[str, float]] = field(default_factory=dict)  # (policy, image)
    by_policy: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # policy -> model -> J/unit


def build_history(samples: Iterable[EnergySample]) -> EnergyHistory:
    image_rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    policy_rows: dict[str, dict[str, list[float]]] = {}
    for s in samples:
        if not (s.joules_per_unit > 0) or not s.gpu_model:
            continue
        model = model_key(s.gpu_model)
        image_rows.setdefault((s.policy, s.image), {}).setdefault(model, []).append(s.joules_per_unit)
        policy_rows.setdefault(s.policy, {}).setdefault(model, []).append(s.joules_per_unit)

    def medians(rows: dict[str, list[float]]) -> dict[str, float]:
        return {model: statistics.median(values) for model, values in rows.items()}

    return EnergyHistory(
        by_image={k: medians(v) for k, v in image_rows.items()},
        by_policy={k: medians(v) for k, v in policy_rows.items()},
    )


def _carried_over(measured: Mapping[str, float], model: str) -> float:
    """Measurements on other models scaled by the priors' ratio; the median over source models."""
    factor = relative_joules_per_unit(model)
    return statistics.median(j * factor / relative_joules_per_unit(src) for src, j in measured.items())


def expected_joules_per_unit(pod: PodDemand, gpu_model: str, history: EnergyHistory) -> tuple[float, Basis]:
    """Expected energy per unit of this pod's work on a GPU model, and what the figure rests on.

    All nodes scored for one pod get figures on the same scale: absolute J/unit when anything was
    measured for the workload, prior factors when nothing was.
    """
    model = model_key(gpu_model)
    if pod.policy is not None:
        measured = history.by_image.get((pod.policy, pod.image))
        if measured:
            if model in measured:
                return measured[model], "measured"
            return _carried_over(measured, model), "transferred"
        related = history.by_policy.get(pod.policy)
        if related:
            if model in related:
                return related[model], "policy"
            return _carried_over(related, model), "policy"
    return relative_joules_per_unit(gpu_model), "prior"


# ---------------------------------------------------------------- prioritize


def _headroom_fraction(pod: PodDemand, node: NodeView, budgets: Mapping[str, BudgetView]) -> float:
    """The tightest budget's headroom left after placing the pod, as a fraction of its maxWatts."""
    fraction = 1.0
    for name in node.budgets:
        budget = budgets.get(name)
        if budget is not None and budget.max_watts > 0:
            need = pod.gpus * lowest_cap_watts(pod.power_cap, node, budget.all_gpus)
            fraction = min(fraction, (budget.headroom_watts - need) / budget.max_watts)
    return min(1.0, max(0.0, fraction))


def score_nodes(
    pod: PodDemand, nodes: Sequence[NodeView], budgets: Mapping[str, BudgetView], history: EnergyHistory
) -> dict[str, int]:
    """Scores 0..MAX_SCORE: energy efficiency relative to the best candidate, plus budget headroom."""
    if not nodes:
        return {}
    energy_by_model: dict[str, float] = {}
    for node in nodes:
        if node.gpu_model not in energy_by_model:
            energy_by_model[node.gpu_model] = expected_joules_per_unit(pod, node.gpu_model, history)[0]
    best = min(energy_by_model.values())
    scores: dict[str, int] = {}
    memo: dict[NodeGroup, int] = {}
    for node in nodes:
        key = (
            node.gpu_model,
            node.default_limit_watts,
            node.min_limit_watts,
            node.max_limit_watts,
            node.budgets,
        )
        score = memo.get(key)
        if score is None:
            efficiency = best / energy_by_model[node.gpu_model]
            headroom = _headroom_fraction(pod, node, budgets) if node.budgets else 1.0
            score = memo[key] = round(MAX_SCORE * (ENERGY_WEIGHT * efficiency + HEADROOM_WEIGHT * headroom))
        scores[node.name] = score
    return scores
