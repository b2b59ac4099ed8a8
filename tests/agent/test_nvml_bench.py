"""The pure parts of bench/nvml_h100.py (the script itself needs a GPU)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "nvml_h100.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return importlib.import_module("bench.nvml_h100")


def test_integrate_interpolates_at_the_window_ends(bench: ModuleType) -> None:
    series = [(0.0, 100.0), (1.0, 200.0), (2.0, 200.0)]
    assert bench.integrate(series, 0.0, 2.0) == pytest.approx(350.0)
    assert bench.integrate(series, 0.5, 1.5) == pytest.approx(187.5)  # 150..200 then 200..200
    assert bench.integrate(series, 1.0, 1.0) == 0.0


def test_windows_compare_counter_and_sampled_energy(bench: ModuleType) -> None:
    series = {"usage": [(t / 10, 300.0) for t in range(0, 201)]}  # 300 W for 20 s
    boundaries = [(5.0 * i, 1000.0 + 5.0 * i * 330.0) for i in range(5)]  # the counter says 330 W
    rows = bench.windows("steady", boundaries, series, (5.0, 10.0, 20.0))
    assert [r["seconds"] for r in rows] == [5.0] * 4 + [10.0] * 2 + [20.0]
    assert all(r["counter_over_usage"] == pytest.approx(1.1) for r in rows)
    [five, ten, twenty] = bench.summarise(rows, ["usage"])
    assert (five["windows"], ten["windows"], twenty["windows"]) == (4, 2, 1)
    assert five["mean_abs_error_pct"] == pytest.approx(100 * (1 / 1.1 - 1) * -1)


def test_markdown_names_machine_inventory_and_ratios(bench: ModuleType) -> None:
    result = {
        "date": "2026-11-27T00:00:00+00:00",
        "machine": {
            "host": "h",
            "gpu": "NVIDIA H100 80GB HBM3",
            "driver": "580",
            "nvml": "13",
            "cuda_driver": "13.0",
            "torch": "2.9",
            "pynvml": "13.6",
            "python": "3.11",
        },
        "setters_forbidden": 60,
        "inventory": [
            {
                "index": 0,
                "model": "NVIDIA H100 80GB HBM3",
                "uuid": "GPU-1",
                "min_limit_watts": 200.0,
                "max_limit_watts": 700.0,
                "default_limit_watts": 700.0,
                "enforced_limit_watts": 700.0,
                "mig_enabled": False,
                "energy_source": "counter",
            }
        ],
        "summary": [
            {
                "pattern": "steady",
                "window_s": 5.0,
                "sampled": "usage",
                "windows": 4,
                "mean_ratio": 1.01,
                "min_ratio": 1.0,
                "max_ratio": 1.02,
                "mean_abs_error_pct": 1.0,
            }
        ],
        "overhead": {
            "gpus": 1,
            "sampler_cpu_ms_per_pass": 0.1,
            "sampler_core_fraction": 0.001,
            "sampler_late_ticks": 0,
            "read_cpu_ms_per_gpu": 0.01,
            "read_with_energy_cpu_ms_per_gpu": 4.0,
            "agent_energy_period_seconds": 10.0,
            "agent_core_fraction_at_1hz": 0.0005,
            "agent_core_fraction_at_1hz_8_gpus": 0.004,
        },
        "counter_update_period_ms": 100.0,
        "readings": {"steady": {"power_watts": 690.0}},
    }
    text = bench.render_markdown(result)
    assert "driver 580" in text and "| 0 | NVIDIA H100 80GB HBM3 | GPU-1 | 200-700 | 700 |" in text
    assert "| steady | 5 | usage | 4 | 1.0100 |" in text
    assert "0.4000% projected for 8 GPUs" in text


def test_without_a_gpu_the_script_fails_with_a_clear_message() -> None:
    proc = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        pytest.skip("this machine has a GPU")
    assert proc.returncode == 2
    assert "cannot use NVML here" in proc.stderr or "CUDA" in proc.stderr
