"""Read-only check of the NVML backend on a real GPU (written for an H100), beside a PyTorch load.

It records the GPU inventory and power limits NVML reports, compares the energy from the
hardware counter with energy integrated from 100 ms power samples (the agent's fallback) over
windows of 5, 10 and 20 s under idle, steady and bursty loads, and measures what the agent's
own sampling costs. It NEVER changes anything on the GPU: the backend is read-only and every
pynvml setter is replaced by one that raises before anything else runs.

Needs only torch, nvidia-ml-py and this repository:
    python bench/nvml_h100.py [--gpu 0] [--seconds 40]
Writes bench/results/nvml_h100.json and bench/results/nvml_h100.md; takes about 2.5 minutes.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import multiprocessing as mp
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "node_agent")]

from edpilot_agent.sampler import PowerSampler  # noqa: E402

from bench.gpu_preflight import open_gpu  # noqa: E402

RESULTS = REPO / "bench" / "results"
WINDOW_STEP_SECONDS = 5.0
WINDOW_LENGTHS = (5.0, 10.0, 20.0)
SAMPLE_PERIOD_SECONDS = 0.1
AGENT_ENERGY_PERIOD_SECONDS = 10.0  # edpilot agent --energy-period default
Series = list[tuple[float, float]]


# ---------------------------------------------------------------- pure parts (tested)


def integrate(series: Series, t0: float, t1: float) -> float:
    """Energy (J) of (time, watts) samples between t0 and t1: trapezoids, linear at the ends."""
    points = sorted(series)
    if len(points) < 2 or t1 <= t0:
        return 0.0

    def at(t: float) -> float:
        for (ta, wa), (tb, wb) in itertools.pairwise(points):
            if ta <= t <= tb:
                return wa if tb == ta else wa + (wb - wa) * (t - ta) / (tb - ta)
        return points[0][1] if t < points[0][0] else points[-1][1]

    inside = [(t, w) for t, w in points if t0 < t < t1]
    knots = [(t0, at(t0)), *inside, (t1, at(t1))]
    return sum((wa + wb) / 2 * (tb - ta) for (ta, wa), (tb, wb) in itertools.pairwise(knots))


def windows(
    pattern: str,
    boundaries: Sequence[tuple[float, float]],
    series: dict[str, Series],
    lengths: Sequence[float],
) -> list[dict[str, Any]]:
    """Non-overlapping windows of each length built from counter readings (time, joules) taken
    every WINDOW_STEP_SECONDS; for each, counter energy against each sampled series' energy."""
    rows = []
    for length in lengths:
        k = round(length / WINDOW_STEP_SECONDS)
        for i in range(0, len(boundaries) - k, k):
            (ta, ea), (tb, eb) = boundaries[i], boundaries[i + k]
            row: dict[str, Any] = {"pattern": pattern, "seconds": round(tb - ta, 3), "counter_j": eb - ea}
            for name, points in series.items():
                sampled = integrate(points, ta, tb)
                row[f"{name}_j"] = sampled
                row[f"counter_over_{name}"] = (eb - ea) / sampled if sampled > 0 else None
            rows.append(row)
    return rows


def summarise(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per (pattern, window length, sampled series): mean, min and max of counter/sampled."""
    out = []
    keys = sorted(
        {(r["pattern"], round(r["seconds"] / WINDOW_STEP_SECONDS) * WINDOW_STEP_SECONDS) for r in rows}
    )
    for pattern, length in keys:
        group = [r for r in rows if r["pattern"] == pattern and abs(r["seconds"] - length) < 1]
        for name in names:
            ratios = [r[f"counter_over_{name}"] for r in group if r.get(f"counter_over_{name}")]
            if ratios:
                out.append(
                    {
                        "pattern": pattern,
                        "window_s": length,
                        "sampled": name,
                        "windows": len(ratios),
                        "mean_ratio": statistics.fmean(ratios),
                        "min_ratio": min(ratios),
                        "max_ratio": max(ratios),
                        "mean_abs_error_pct": statistics.fmean(abs(1 / r - 1) * 100 for r in ratios),
                    }
                )
    return out


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# NVML backend on a real GPU (read-only)",
        "",
        f"{result['date']}; host {m['host']}; {m['gpu']}; driver {m['driver']}, NVML {m['nvml']}, "
        f"CUDA {m['cuda_driver']}; torch {m['torch']}, nvidia-ml-py {m['pynvml']}, Python {m['python']}. "
        f"Produced by `bench/nvml_h100.py` with {result['setters_forbidden']} NVML setters disabled.",
        "",
        "## Inventory",
        "",
        "| index | model | UUID | limits (W) | default (W) | enforced (W) | MIG | energy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in result["inventory"]:
        lines.append(
            f"| {g['index']} | {g['model']} | {g['uuid']} | {g['min_limit_watts']:g}-{g['max_limit_watts']:g} | "
            f"{g['default_limit_watts']:g} | {g['enforced_limit_watts']:g} | {g['mig_enabled']} | {g['energy_source']} |"
        )
    lines += [
        "",
        f"## Energy: hardware counter / {SAMPLE_PERIOD_SECONDS * 1000:.0f} ms power sampling",
        "",
        "`usage` integrates nvmlDeviceGetPowerUsage (what the agent samples when a GPU has no counter); "
        "`instant` integrates the NVML_FI_DEV_POWER_INSTANT field.",
        "",
        "| load | window (s) | sampled | windows | counter/sampled mean | min | max | mean abs error % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['pattern']} | {s['window_s']:g} | {s['sampled']} | {s['windows']} | {s['mean_ratio']:.4f} | "
            f"{s['min_ratio']:.4f} | {s['max_ratio']:.4f} | {s['mean_abs_error_pct']:.2f} |"
        )
    o = result["overhead"]
    lines += [
        "",
        "## The agent's own cost",
        "",
        f"- 10 Hz power sampling of {o['gpus']} GPUs: {o['sampler_cpu_ms_per_pass']:.3f} ms CPU per pass, "
        f"{o['sampler_core_fraction']:.4%} of one core; {o['sampler_late_ticks']} late ticks.",
        f"- a sample without energy (power, limit, utilisation, clocks, temperature, throttle reasons): "
        f"{o['read_cpu_ms_per_gpu']:.3f} ms CPU per GPU; with the energy counter: "
        f"{o['read_with_energy_cpu_ms_per_gpu']:.3f} ms.",
        f"- the agent at 1 Hz (energy counter every {o['agent_energy_period_seconds']:g} s): "
        f"{o['agent_core_fraction_at_1hz']:.4%} of one core for this machine's {o['gpus']} GPU(s), "
        f"{o['agent_core_fraction_at_1hz_8_gpus']:.4%} projected for 8 GPUs.",
        f"- energy counter update period under load: {result['counter_update_period_ms']} ms.",
        "- CPU per NVML call (ms): "
        + ", ".join(f"{k} {v:.3f}" for k, v in o.get("nvml_call_cpu_ms", {}).items())
        + ".",
        "",
        "## Last reading per load",
        "",
    ]
    for pattern, reading in result["readings"].items():
        lines.append(f"- {pattern}: {reading}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the GPU load (a child process)


def load_worker(pattern: str, seconds: float, device: int, ready: Any) -> None:
    """bf16 8192^3 matmuls: back to back (steady) or in random bursts of 50-600 ms (bursty)."""
    torch = importlib.import_module("torch")
    torch.cuda.set_device(device)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    ready.set()
    rng = random.Random(42)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        busy_until = time.monotonic() + (rng.uniform(0.05, 0.6) if pattern == "bursty" else 1.0)
        while time.monotonic() < busy_until:
            for _ in range(4):
                a @ b
            torch.cuda.synchronize()
        if pattern == "bursty":
            time.sleep(rng.uniform(0.05, 0.6))


# ---------------------------------------------------------------- measuring


def counter_update_period_ms(read_counter: Callable[[], float], seconds: float = 2.0) -> float | None:
    """Poll the energy counter every ms and return the median time between changes."""
    changes, last, end = [], read_counter(), time.monotonic() + seconds
    while time.monotonic() < end:
        value = read_counter()
        if value != last:
            changes.append(time.monotonic())
            last = value
        time.sleep(0.001)
    gaps = [b - a for a, b in itertools.pairwise(changes)]
    return round(statistics.median(gaps) * 1000, 1) if gaps else None


def measure_phase(backend: Any, uuid: str, pattern: str, seconds: float, device: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    child = None
    update_period = None
    if pattern != "idle":
        ready = ctx.Event()
        child = ctx.Process(target=load_worker, args=(pattern, seconds + 4.0, device, ready), daemon=True)
        child.start()
        if not ready.wait(120):
            raise RuntimeError("the PyTorch load did not start within 120 s")
        update_period = counter_update_period_ms(lambda: backend.energy_counter_joules(uuid))
    series: dict[str, Series] = {"usage": [], "instant": []}

    def sample(_: str) -> float:
        watts = backend.power_watts(uuid)
        t = time.monotonic()
        series["usage"].append((t, watts))
        instant = backend.power_instant_watts(uuid)
        if instant is not None:
            series["instant"].append((t, instant))
        return float(watts)

    sampler = PowerSampler(sample, [uuid], SAMPLE_PERIOD_SECONDS)
    sampler.start()
    time.sleep(0.5)
    boundaries = []
    start = time.monotonic()
    for i in range(int(seconds / WINDOW_STEP_SECONDS) + 1):
        time.sleep(max(0.0, start + i * WINDOW_STEP_SECONDS - time.monotonic()))
        boundaries.append((time.monotonic(), backend.energy_counter_joules(uuid)))
    reading = backend.read(uuid)
    sampler.stop()
    if child is not None:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    series = {k: v for k, v in series.items() if v}
    return {
        "windows": windows(pattern, boundaries, series, WINDOW_LENGTHS),
        "series_names": list(series),
        "update_period_ms": update_period,
        "reading": asdict(reading),
    }


def measure_overhead(backend: Any, seconds: float = 10.0) -> dict[str, Any]:
    uuids = [g.uuid for g in backend.gpus()]
    sampler = PowerSampler(backend.power_watts, uuids, SAMPLE_PERIOD_SECONDS)
    sampler.start()
    time.sleep(seconds)
    sampler.stop()
    passes = max(1, sampler.integrator(uuids[0]).samples)
    read_cpu, read_wall = {}, {}
    for energy in (False, True):
        cpu0, wall0, n = time.process_time(), time.perf_counter(), 20
        for _ in range(n):
            for uuid in uuids:
                backend.read(uuid, energy=energy)
        read_cpu[energy] = (time.process_time() - cpu0) / (n * len(uuids))
        read_wall[energy] = (time.perf_counter() - wall0) / (n * len(uuids))
    # The agent at 1 Hz: a read without energy every tick, one with it every AGENT_ENERGY_PERIOD.
    per_gpu_per_second = read_cpu[False] + read_cpu[True] / AGENT_ENERGY_PERIOD_SECONDS
    return {
        "gpus": len(uuids),
        "sampler_passes": passes,
        "sampler_cpu_ms_per_pass": sampler.cpu_seconds / passes * 1000,
        "sampler_core_fraction": sampler.cpu_seconds / seconds,
        "sampler_late_ticks": sampler.late_ticks,
        "read_ms_per_gpu": read_wall[False] * 1000,
        "read_cpu_ms_per_gpu": read_cpu[False] * 1000,
        "read_with_energy_ms_per_gpu": read_wall[True] * 1000,
        "read_with_energy_cpu_ms_per_gpu": read_cpu[True] * 1000,
        "agent_energy_period_seconds": AGENT_ENERGY_PERIOD_SECONDS,
        "agent_core_fraction_at_1hz": per_gpu_per_second * len(uuids),
        "agent_core_fraction_at_1hz_8_gpus": per_gpu_per_second * 8,
        "nvml_call_cpu_ms": backend.call_costs(uuids[0]),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", type=int, default=0, help="index of the GPU to load and compare")
    p.add_argument("--seconds", type=float, default=40.0, help="length of each loaded phase")
    p.add_argument("--idle-seconds", type=float, default=20.0)
    args = p.parse_args(argv)
    opened = open_gpu("nvml_h100", args.gpu)
    if opened is None:
        return 2
    backend, gpus, torch = opened.backend, opened.gpus, opened.torch
    uuid = opened.info.uuid
    inventory = [
        {**asdict(g), "enforced_limit_watts": backend.read(g.uuid).enforced_limit_watts} for g in gpus
    ]
    from importlib.metadata import version

    machine = {
        "host": platform.node(),
        "gpu": gpus[args.gpu].model,
        **backend.versions(),
        "torch": torch.__version__,
        "pynvml": version("nvidia-ml-py"),
        "python": sys.version.split()[0],
    }
    started = time.monotonic()
    overhead = measure_overhead(backend)
    phases = {
        "idle": measure_phase(backend, uuid, "idle", args.idle_seconds, args.gpu),
        "steady": measure_phase(backend, uuid, "steady", args.seconds, args.gpu),
        "bursty": measure_phase(backend, uuid, "bursty", args.seconds, args.gpu),
    }
    backend.close()
    rows = [row for phase in phases.values() for row in phase["windows"]]
    names = sorted({n for phase in phases.values() for n in phase["series_names"]})
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "setters_forbidden": opened.setters_forbidden,
        "gpu_index": args.gpu,
        "inventory": inventory,
        "overhead": overhead,
        "counter_update_period_ms": phases["steady"]["update_period_ms"],
        "windows": rows,
        "summary": summarise(rows, names),
        "readings": {name: phase["reading"] for name, phase in phases.items()},
        "run_seconds": round(time.monotonic() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "nvml_h100.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / "nvml_h100.md").write_text(render_markdown(result))
    print(f"{'load':<8}{'window':>8}  {'sampled':<8}{'counter/sampled':>16}{'min':>8}{'max':>8}")
    for s in result["summary"]:
        print(
            f"{s['pattern']:<8}{s['window_s']:>7g}s  {s['sampled']:<8}{s['mean_ratio']:>16.4f}"
            f"{s['min_ratio']:>8.4f}{s['max_ratio']:>8.4f}"
        )
    print(
        f"sampling 10 Hz x {overhead['gpus']} GPUs: {overhead['sampler_core_fraction']:.4%} of a core; "
        f"read() {overhead['read_cpu_ms_per_gpu']:.3f} ms/GPU, with energy "
        f"{overhead['read_with_energy_cpu_ms_per_gpu']:.3f} ms; agent at 1 Hz on 8 GPUs "
        f"{overhead['agent_core_fraction_at_1hz_8_gpus']:.3%} of a core; counter updates every "
        f"{result['counter_update_period_ms']} ms; run took {result['run_seconds']} s"
    )
    print(f"wrote {RESULTS / 'nvml_h100.json'} and {RESULTS / 'nvml_h100.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
