"""Caps, locked SM clocks, or both: side by side on the same serving load.

One simulated chat replica (a Llama-3-8B-shaped decode with a KV cache, `edpilot.serving`, steady
Poisson arrivals) runs under the chat policy four times per seed, with the same arrivals each time:

  none     powerCap Off, smClock Off (the GPU as shipped: default limit, clocks unlocked)
  caps     powerCap Auto (40-100% of the default limit), smClock Off
  clocks   powerCap Off, smClock Auto (40-100% of the highest SM clock)
  both     powerCap Auto and smClock Auto (the clock is searched at the cap the cap stage chose)

The policy is the chat policy of `edpilot simulate`: EDP, 20% slowdown allowed, median inter-token
latency (ITL) at most 50 ms and p99 time to first token at most 1 s. The batch limit and the
precision stay the engine's own: this bench compares the GPU actuators alone. Reported per row,
after the optimizer converged: J/token (and its ratio to `none` on the same arrivals), p99 ITL,
seconds of report windows over either SLO during the whole run, the settings kept, the probes
spent. Scenarios: an H100 with CUDA graphs, where a Llama-8B decode draws enough for caps to bind,
at a busy and a light load, and engines without CUDA graphs on an H100 and an H200, which draw less
(the H200 file's eager rows: 232-290 W): a cap reaches its floor (40% of the default limit, 280 W)
before the energy optimum there, where a locked clock can go further.

    .venv/bin/python bench/serving_clocks.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from edpilot import gpusim, serving
from edpilot.models import PowerCapSpec, SmClockSpec
from edpilot.simulate import ACTUATORS, CHAT_ITL_SLO, CHAT_TTFT_SLO, ServingOutcome, run_serving

RESULTS: Final = Path(__file__).resolve().parent / "results"
VARIANTS: Final[dict[str, tuple[PowerCapSpec, SmClockSpec]]] = {
    "none": (PowerCapSpec(mode="Off"), SmClockSpec(mode="Off")),
    **ACTUATORS,
}


@dataclass(frozen=True)
class Scenario:
    name: str
    gpu: gpusim.GpuSpec
    cuda_graphs: bool
    requests_per_second: float

    def model(self) -> serving.ServedModel:
        return serving.ServedModel(gpu=self.gpu, cuda_graphs=self.cuda_graphs)


SCENARIOS: Final = (
    Scenario("H100, CUDA graphs, 8 req/s", gpusim.H100_SXM, True, 8.0),
    Scenario("H100, CUDA graphs, 2 req/s", gpusim.H100_SXM, True, 2.0),
    Scenario("H100, eager, 8 req/s", gpusim.H100_SXM, False, 8.0),
    Scenario("H200, eager, 8 req/s", gpusim.H200_SXM, False, 8.0),
)


def run(scenario: Scenario, variant: str, seed: int) -> ServingOutcome:
    power_cap, sm_clock = VARIANTS[variant]
    return run_serving(
        power_cap,
        sm_clock,
        gpu=scenario.gpu,
        requests_per_second=scenario.requests_per_second,
        model=scenario.model(),
        seed=seed,
    )


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summarise(runs: dict[str, list[ServingOutcome]]) -> dict[str, dict[str, Any]]:
    """Per variant: means over seeds; energy ratios are taken seed by seed against `none`."""
    none = runs["none"]
    out: dict[str, dict[str, Any]] = {}
    for variant, outcomes in runs.items():
        steady = [o.steadyJoulesPerToken or o.joulesPerToken for o in outcomes]
        base = [n.steadyJoulesPerToken or n.joulesPerToken for n in none]
        out[variant] = {
            "joulesPerToken": statistics.fmean(steady),
            "vsNone": statistics.fmean(s / b for s, b in zip(steady, base, strict=True)),
            "p99ItlSeconds": _mean([o.steadyP99ItlSeconds or o.p99ItlSeconds for o in outcomes]),
            "sloViolationSeconds": statistics.fmean(o.sloViolationSeconds for o in outcomes),
            "converged": sum(o.phase == "Converged" for o in outcomes),
            "runs": len(outcomes),
            "capWatts": _mean([o.capWatts for o in outcomes]),
            "capsKept": sum(o.capWatts is not None for o in outcomes),
            "smClockMHz": _mean([o.smClockMHz for o in outcomes]),
            "locksKept": sum(o.smClockMHz is not None for o in outcomes),
            "probes": statistics.fmean(o.probes for o in outcomes),
            "trueJoulesPerToken": statistics.fmean(o.trueJoulesPerToken for o in outcomes),
            "trueVsNone": statistics.fmean(
                o.trueJoulesPerToken / o.trueBaselineJoulesPerToken for o in outcomes
            ),
        }
    return out


def _setting(r: dict[str, Any]) -> str:
    parts = []
    if r["capsKept"]:
        parts.append(f"cap {r['capWatts']:.0f} W ({r['capsKept']}/{r['runs']})")
    if r["locksKept"]:
        parts.append(f"SM clock <= {r['smClockMHz']:.0f} MHz ({r['locksKept']}/{r['runs']})")
    return ", ".join(parts) or "none kept"


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    rows = [
        "| scenario | actuators | J/token | vs none | gpusim J/token vs none | p99 ITL (ms) "
        "| s over an SLO | kept (runs) | probes | converged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario in SCENARIOS:
        for variant in VARIANTS:
            r = results[scenario.name][variant]
            itl = "n/a" if r["p99ItlSeconds"] is None else f"{1000 * r['p99ItlSeconds']:.1f}"
            rows.append(
                f"| {scenario.name} | {variant} | {r['joulesPerToken']:.4f} | {r['vsNone']:.3f} "
                f"| {r['trueVsNone']:.3f} | {itl} | {r['sloViolationSeconds']:.0f} | {_setting(r)} "
                f"| {r['probes']:.1f} | {r['converged']}/{r['runs']} |"
            )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    args = parser.parse_args(argv)
    results = {
        scenario.name: summarise({v: [run(scenario, v, s) for s in range(args.seeds)] for v in VARIANTS})
        for scenario in SCENARIOS
    }
    text = table(results)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        meta = {"machine": platform.platform(), "date": datetime.now(UTC).isoformat(timespec="seconds")}
        slo = (
            f"SLOs: ITL p{100 * (CHAT_ITL_SLO.quantile or 0.5):.0f} <= {1000 * CHAT_ITL_SLO.maxSeconds:.0f} ms, "
            f"TTFT p{100 * (CHAT_TTFT_SLO.quantile or 0.99):.0f} <= {CHAT_TTFT_SLO.maxSeconds:g} s"
        )
        (RESULTS / "serving_clocks.json").write_text(
            json.dumps({**meta, "seeds": args.seeds, "results": results}, indent=1) + "\n"
        )
        (RESULTS / "serving_clocks.md").write_text(
            "# Caps, locked SM clocks, or both on one serving load (`bench/serving_clocks.py`)\n\n"
            + "\n\n".join((__doc__ or "").split("\n\n")[1:4])
            + f"\n\nSimulated (gpusim, calibrated on the H100/H200 Llama-8B decode probes); {args.seeds} seeds "
            + f"per row, each seed the same arrivals for every variant; {slo}; run {meta['date']}.\n\n"
            + text
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
