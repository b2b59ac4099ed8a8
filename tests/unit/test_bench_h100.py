"""The pure parts of bench/h100_closed_loop.py, and its whole sweep-and-loop driver on a simulated
H100 (edpilot.gpusim) with a virtual clock; the script itself needs a GPU."""

from __future__ import annotations

import importlib
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from edpilot import gpusim

BENCH = Path(__file__).resolve().parents[2] / "bench" / "h100_closed_loop.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return importlib.import_module("bench.h100_closed_loop")


def measured(bench: ModuleType, precision: str, batch: int, tokens_per_second: float, watts: float) -> Any:
    return bench.Measured(
        config=bench.RunConfig(precision, batch),
        seconds=2.0,
        joules=2.0 * watts,
        tokens=2.0 * tokens_per_second,
    )


class SimRig:
    """The simulated GPU behind the Rig protocol: counters advance with virtual time at the
    operating point of the configuration in force, with a little noise per reading."""

    def __init__(self, bench: ModuleType, seed: int = 0, noise: float = 0.003) -> None:
        self.bench = bench
        self.gpu = gpusim.H100_SXM
        self.profile = gpusim.llama_decode(bench.CONTEXT)
        self.uuid = "GPU-sim-0"
        self.min_limit_watts = self.gpu.min_power_limit_watts
        self.max_limit_watts = self.gpu.max_power_limit_watts
        self.rng = random.Random(seed)
        self.noise = noise
        self.now = 1000.0
        self.joules = 5000.0
        self.tokens = 0.0
        self.config = bench.DEFAULT
        self.applied: list[Any] = []

    def point(self) -> gpusim.OperatingPoint:
        c = self.config
        return gpusim.operating_point(
            self.gpu, self.profile, c.batch, c.precision, self.gpu.default_power_limit_watts
        )

    def apply(self, config: Any) -> None:
        if config != self.config:
            self.applied.append(config)
        self.config = config

    def wait(self, seconds: float) -> None:
        p = self.point()
        self.now += seconds
        self.joules += p.power_watts * seconds * (1.0 + self.rng.gauss(0.0, self.noise))
        self.tokens += p.units_per_second * seconds

    def read(self) -> Any:
        return self.bench.Reading(
            time=self.now,
            joules=self.joules,
            tokens=self.tokens,
            config=self.config,
            watts=self.point().power_watts,
            limit_watts=self.gpu.default_power_limit_watts,
        )


def test_the_workload_is_the_llama_shaped_decode_the_probes_measured(bench: ModuleType) -> None:
    assert bench.parameter_count() == gpusim.LLAMA3_8B.params
    assert (bench.LAYERS, bench.HIDDEN, bench.KV_HEADS, bench.CONTEXT) == (32, 4096, 8, 1088)
    rows = [bench.padded_rows(bench.RunConfig(q, b)) for q in ("bf16", "fp8") for b in (8, 16, 24, 256)]
    assert rows == [8, 16, 24, 256, 16, 16, 32, 256]


def test_a_measurement_is_a_ratio_of_sums_with_the_step_as_delay(bench: ModuleType) -> None:
    c = bench.RunConfig("bf16", 64)
    readings = [
        bench.Reading(time=0.0, joules=100.0, tokens=0.0, config=c),
        bench.Reading(time=2.0, joules=1300.0, tokens=128_000.0, config=c),
        bench.Reading(time=4.0, joules=2500.0, tokens=256_000.0, config=c),
    ]
    m = bench.measured_between(readings)
    assert m.tokens_per_second == pytest.approx(64_000.0)
    assert m.watts == pytest.approx(600.0)
    assert m.joules_per_token == pytest.approx(2400.0 / 256_000.0)
    assert m.step_seconds == pytest.approx(0.001)  # 64 tokens per step at 64 000 tokens/s
    assert m.edp == pytest.approx(2400.0 / 256_000.0 * 0.001)
    assert m.noise == pytest.approx(0.0)
    assert m.row()["step_ms"] == pytest.approx(1.0)


def test_a_measurement_refuses_a_config_change_or_a_silent_counter(bench: ModuleType) -> None:
    a, b = bench.RunConfig("bf16", 8), bench.RunConfig("fp8", 8)
    with pytest.raises(ValueError, match="changed configuration"):
        bench.measured_between([bench.Reading(0.0, 0.0, 0.0, a), bench.Reading(1.0, 500.0, 8000.0, b)])
    with pytest.raises(ValueError, match="no time, energy or work"):
        bench.measured_between([bench.Reading(0.0, 0.0, 0.0, a), bench.Reading(1.0, 500.0, 0.0, a)])


def test_the_oracle_is_the_lowest_edp_the_policy_allows(bench: ModuleType) -> None:
    policy = bench.policy_spec()
    # The Llama probes' figures (h100_llama8b_decode*.json): the KV cache makes big batches' steps
    # long, so EDP (J/token x step) is lowest at a moderate batch.
    rows = [
        measured(bench, "bf16", 8, 965.0, 380.0),  # the default
        measured(bench, "bf16", 128, 8640.0, 588.0),
        measured(bench, "bf16", 256, 11563.0, 673.0),
        measured(bench, "fp8", 64, 6808.0, 475.0),
        measured(bench, "fp8", 128, 9946.0, 569.0),
        measured(bench, "fp8", 256, 12677.0, 636.0),
    ]
    best = bench.oracle(rows, policy, bench.ACCURACY, bench.DEFAULT)
    assert best.config == bench.RunConfig("fp8", 64)
    # fp8 declared 2% less accurate than bf16: beyond maxAccuracyDropPercent (1%), so excluded.
    strict = bench.oracle(rows, policy, {"bf16": 1.0, "fp8": 0.98}, bench.DEFAULT)
    assert strict.config == bench.RunConfig("bf16", 128)
    # A batch outside the policy's range is no candidate, however good.
    outside = [*rows, measured(bench, "fp8", 512, 50_000.0, 600.0)]
    assert bench.oracle(outside, policy, bench.ACCURACY, bench.DEFAULT).config == bench.RunConfig("fp8", 64)


def test_the_oracle_respects_the_slowdown_limit(bench: ModuleType) -> None:
    policy = bench.policy_spec()
    # A frugal but slow configuration (J/token so low its EDP wins) loses to the feasible one.
    rows = [
        measured(bench, "bf16", 8, 8000.0, 480.0),
        measured(bench, "bf16", 16, 7000.0, 30.0),  # 12.5% slower than the default
        measured(bench, "bf16", 32, 30_000.0, 550.0),
    ]
    assert rows[1].edp < rows[2].edp
    assert bench.oracle(rows, policy, bench.ACCURACY, bench.DEFAULT).config == bench.RunConfig("bf16", 32)
    with pytest.raises(ValueError, match="no row for the default"):
        bench.oracle(rows[1:], policy, bench.ACCURACY, bench.DEFAULT)


def test_ratios_and_exploration_energy(bench: ModuleType) -> None:
    fast = measured(bench, "fp8", 256, 400_000.0, 600.0)
    slow = measured(bench, "bf16", 8, 8000.0, 480.0)
    r = bench.ratios(fast, slow)
    assert r["joules_per_token"] == pytest.approx((600 / 400_000) / (480 / 8000))
    assert r["tokens_per_second"] == pytest.approx(50.0)
    assert r["edp"] == pytest.approx(fast.edp / slow.edp)
    c = bench.DEFAULT
    x = bench.exploration_energy(
        bench.Reading(10.0, 1000.0, 0.0, c), bench.Reading(70.0, 31_000.0, 10_000_000.0, c), fast, slow
    )
    assert x["seconds"] == 60.0 and x["joules"] == 30_000.0
    assert x["joules_over_converged"] == pytest.approx(30_000.0 - 10_000_000 * 600 / 400_000)
    assert x["joules_saved_vs_default"] == pytest.approx(10_000_000 * 480 / 8000 - 30_000.0)


def test_the_closed_loop_on_a_simulated_h100_reaches_the_oracle(bench: ModuleType) -> None:
    rig = SimRig(bench)
    configs = [bench.RunConfig(q, b) for q in bench.PRECISIONS for b in bench.BATCHES]
    logged: list[str] = []
    result = bench.run_experiment(rig, configs, bench.policy_spec(), bench.TUNING, log=logged.append)
    loop = result["loop"]
    assert loop["converged"], logged
    assert loop["probes"] >= 2  # quantization, then batch sizes upwards
    assert [p["stage"] for p in loop["probe_log"]][:2] == ["baseline", "quantization"]
    # The workload ran each hint: baseline at the default, fp8 at the same batch, then batches upwards.
    ran = [(p["precision"], p["batch"]) for p in loop["probe_log"]]
    assert ran[:3] == [("bf16", 8), ("fp8", 8), ("fp8", 16)]
    assert all(p["windows"] >= bench.TUNING.probeWindows for p in loop["probe_log"])
    assert result["ratios"]["vs_oracle_sweep"]["edp"] <= bench.GOAL_EDP_RATIO
    assert result["ratios"]["vs_default_sweep"]["edp"] < 0.3  # the default is far from the optimum
    assert result["goal_met"]
    assert result["exploration"]["joules"] > 0
    assert result["exploration"]["seconds"] < bench.TUNING.applyTimeoutSeconds * 10
    assert not loop["dry_run_caps"]  # power cap Off: the optimizer never asks for another limit
    result |= {
        "date": "2026-11-27T00:00:00+00:00",
        "run_seconds": 1.0,
        "machine": {
            "gpu": "sim",
            "uuid": rig.uuid,
            "driver": "-",
            "cuda_driver": "-",
            "torch": "-",
            "torch_cuda": "-",
            "pynvml": "-",
            "python": "3",
            "cuda_graphs": False,
        },
        "workload": "sim",
        "safety": {
            "setters_forbidden": 57,
            "limit_before_watts": 700.0,
            "limit_after_watts": 700.0,
            "default_limit_watts": 700.0,
            "min_limit_watts": 200.0,
            "max_limit_watts": 700.0,
        },
    }
    md = bench.render_markdown(result)
    oracle = result["oracle"]
    assert f"**{oracle['precision']} b{oracle['batch']}**" in md
    assert "Goal: EDP within 5% of the oracle's: **met**" in md
    assert md.count("\n| fp8 |") == len(bench.BATCHES)


def test_without_a_gpu_the_script_says_so(tmp_path: Path) -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA GPU: the script would run the whole benchmark")
    done = subprocess.run(
        [sys.executable, str(BENCH), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "h100_closed_loop: no usable NVIDIA GPU here" in done.stderr
    assert not list(tmp_path.iterdir())
