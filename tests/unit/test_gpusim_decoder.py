"""The real-decoder model (KV cache, prefill, eager launches, the H200) against the Llama-3-8B probes."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pytest

from edpilot import gpusim
from edpilot.contract import ThrottleReason
from edpilot.gpusim import (
    H100_SXM,
    H200_EAGER_HOST_S_PER_KERNEL,
    H200_SXM,
    LLAMA3_8B,
    llama_decode,
    llama_prefill,
    operating_point,
)

TOLERANCE = 0.15
FILES = (
    "h100_llama8b_decode.json",
    "h100_llama8b_decode_ctx4k.json",
    "h100_llama8b_decode_fp8.json",
    "h200_llama8b_decode_ctx4k.json",
)


def _packaged(name: str) -> Any:
    # The copies shipped in the package; tests never read ../shared.
    return json.loads((resources.files("edpilot") / "data" / name).read_text(encoding="utf-8"))


def _rows() -> list[tuple[str, gpusim.GpuSpec, str, dict[str, Any]]]:
    rows = []
    for name in FILES:
        data = _packaged(name)
        gpu = H200_SXM if "H200" in data["info"]["gpu"] else H100_SXM
        precision = data["info"].get("weights", "bf16")
        rows += [(name, gpu, precision, r) for r in data["rows"]]
    return rows


def _simulate(gpu: gpusim.GpuSpec, precision: str, row: dict[str, Any]) -> gpusim.OperatingPoint:
    host = H200_EAGER_HOST_S_PER_KERNEL if gpu is H200_SXM else gpusim.EAGER_HOST_S_PER_KERNEL
    if row["phase"] == "prefill":
        profile = llama_prefill(row["ctx"], host_s_per_kernel=host)
    else:
        profile = llama_decode(row["ctx"], cuda_graphs=row["mode"] == "cudagraph", host_s_per_kernel=host)
    return operating_point(gpu, profile, row["batch"], precision, 700.0)


# The set: every CUDA-graph row of the four files, and their bf16 eager rows (decode and
# the eager prefill passes). Eager fp8 is reported but not held to 15%: see the last test.
CALIBRATED = [
    (name, gpu, precision, r)
    for name, gpu, precision, r in _rows()
    if r["mode"] == "cudagraph" or precision == "bf16"
]


@pytest.mark.parametrize(
    ("name", "gpu", "precision", "row"),
    CALIBRATED,
    ids=[f"{n.removesuffix('.json')}-{r['phase']}-{r['mode']}-b{r['batch']}" for n, _, _, r in CALIBRATED],
)
def test_tokens_per_second_and_watts_match_the_llama_probes_within_15_percent(
    name: str, gpu: gpusim.GpuSpec, precision: str, row: dict[str, Any]
) -> None:
    p = _simulate(gpu, precision, row)
    speed = p.units_per_second / row["units_per_s"] - 1.0
    watts = p.power_watts / row["watts_counter"] - 1.0
    print(f"{name} {row['phase']} {row['mode']} b{row['batch']}: tok/s {speed:+.1%}, W {watts:+.1%}")
    assert abs(speed) <= TOLERANCE
    assert abs(watts) <= TOLERANCE


def test_the_calibrated_set_covers_every_file_both_contexts_and_both_precisions() -> None:
    assert {n for n, *_ in CALIBRATED} == set(FILES)
    assert {r["ctx"] for *_, r in CALIBRATED if r["phase"] == "decode"} == {1088, 4160}
    assert {p for _, _, p, _ in CALIBRATED} == {"bf16", "fp8"}
    assert len(CALIBRATED) == 35


def test_eager_fp8_rows_stay_within_15_percent_too() -> None:
    rows = [(g, p, r) for _, g, p, r in _rows() if r["mode"] == "eager" and p == "fp8"]
    assert len(rows) == 5
    for gpu, precision, row in rows:
        p = _simulate(gpu, precision, row)
        assert p.units_per_second == pytest.approx(row["units_per_s"], rel=TOLERANCE)
        assert p.power_watts == pytest.approx(row["watts_counter"], rel=TOLERANCE)


def test_the_llama_shape_has_llama_3_8b_parameters_and_a_128_kib_cache_per_position() -> None:
    # Meta's published count, 8,030,261,248, also holds the RMSNorm weights (266,240), which the
    # model leaves out: they are not matmul weights.
    assert LLAMA3_8B.params == 8_030_261_248 - 266_240
    assert LLAMA3_8B.kv_bytes_per_position == 128 * 1024


def test_the_kv_cache_slows_decode_as_batch_times_context_grows() -> None:
    # At 4,160 positions batch 64 runs at ~58% of the 1,088-position throughput (the probes).
    short = operating_point(H100_SXM, llama_decode(1088), 64, "bf16", 700.0)
    long = operating_point(H100_SXM, llama_decode(4160), 64, "bf16", 700.0)
    assert long.units_per_second / short.units_per_second == pytest.approx(0.58, abs=0.06)
    assert long.joules_per_unit / short.joules_per_unit == pytest.approx(1.8, abs=0.2)
    # Batch 1 barely notices the context: the weights dominate what a step reads.
    assert operating_point(H100_SXM, llama_decode(4160), 1, "bf16", 700.0).units_per_second == pytest.approx(
        operating_point(H100_SXM, llama_decode(1088), 1, "bf16", 700.0).units_per_second, rel=0.05
    )


def test_eager_launching_draws_less_and_runs_slower_than_a_cuda_graph() -> None:
    graph = operating_point(H100_SXM, llama_decode(cuda_graphs=True), 8, "bf16", 700.0)
    eager = operating_point(H100_SXM, llama_decode(cuda_graphs=False), 8, "bf16", 700.0)
    assert eager.units_per_second < 0.9 * graph.units_per_second
    assert eager.power_watts < graph.power_watts


def test_decode_draws_under_the_limit_while_prefill_is_held_by_it() -> None:
    for batch in (1, 8, 64, 256):
        p = operating_point(H100_SXM, llama_decode(), batch, "bf16", 700.0)
        assert p.throttle_reasons == ()
        assert 330.0 <= p.power_watts <= 690.0
    prefill = operating_point(H100_SXM, llama_prefill(), 1, "bf16", 700.0)
    assert prefill.throttle_reasons == (ThrottleReason.SW_POWER_CAP,)
    assert prefill.power_watts == pytest.approx(700.0, rel=1e-6)


def test_a_cap_binds_decode_at_moderate_batches_and_costs_little_throughput() -> None:
    # The serving premise of the issue: a cap at 55-70% of TDP binds from moderate batches on.
    free = operating_point(H100_SXM, llama_decode(), 128, "bf16", 700.0)
    capped = operating_point(H100_SXM, llama_decode(), 128, "bf16", 420.0)
    assert ThrottleReason.SW_POWER_CAP in capped.throttle_reasons
    assert capped.units_per_second >= 0.85 * free.units_per_second
    assert capped.joules_per_unit < 0.85 * free.joules_per_unit


def test_the_h200_is_faster_at_decode_and_no_faster_at_prefill() -> None:
    for batch in (1, 64):
        h100 = operating_point(H100_SXM, llama_decode(4160), batch, "bf16", 700.0)
        h200 = operating_point(H200_SXM, llama_decode(4160), batch, "bf16", 700.0)
        assert h200.units_per_second > 1.15 * h100.units_per_second
    p100 = operating_point(H100_SXM, llama_prefill(), 1, "bf16", 700.0)
    p200 = operating_point(H200_SXM, llama_prefill(), 1, "bf16", 700.0)
    assert p200.units_per_second == pytest.approx(p100.units_per_second, rel=0.05)
    assert H200_SXM.memory_bytes > H100_SXM.memory_bytes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "prefill", "shape": None, "context_tokens": 8}, "prefill profile needs"),
        ({"kind": "gemm", "n": 8, "shape": LLAMA3_8B}, "decoder shape belongs"),
        ({"kind": "decode", "context_tokens": -1}, "decoder shape belongs"),
        ({"kind": "decode", "host_s_per_kernel": -1.0}, "host time"),
    ],
)
def test_inconsistent_decoder_profiles_are_refused(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {
        "name": "x",
        "unit": "token",
        "params": LLAMA3_8B.params,
        "hidden_size": 4096,
        "shape": LLAMA3_8B,
        "context_tokens": 16,
    }
    with pytest.raises(ValueError, match=message):
        gpusim.WorkloadProfile(**(base | kwargs))
