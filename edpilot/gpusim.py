"""Simulated GPU physics: throughput, power and energy per unit of work.

Pure: no clock reads, no global randomness, no I/O. Time comes in as seconds
(float) and randomness only through an injected ``random.Random``.

The model (one GPU, one workload, steady state)
------------------------------------------------
A workload step moves ``bytes`` through HBM and does ``flops`` in ``k``
matmul kernels on one engine (SIMT fp32, or tensor cores for tf32 / fp16 /
fp8 / int8). At SM clock ``f``::

    t_mem  = bytes / min(HBM bandwidth, on-chip bandwidth ~ f)
    t_comp = flops / (peak(engine) * efficiency * f / f_max)  +  k * kernel_ramp * f_max / f
    t_step = t_fixed + max(t_host, (t_mem**p + t_comp**p) ** (1/p))   (imperfect overlap)

(a gemm's t_fixed is the launch gap between two matmul kernels, per matmul).

Power is a floor plus activity-weighted CMOS switching power, which goes as
``g(f) = (f / f_max) * (V(f) / V_max)**2``. The voltage sits at a floor (the
minimum operating voltage) at low clocks and above it rises like
``(f / f_max)**1.15``, joined by a smooth maximum::

    V / V_max = ((floor**s + (f / f_max)**(1.15 s)) / (floor**s + 1)) ** (1/s)

so below ~900 MHz switching power goes as f and from ~1350 MHz up as
f**3.0-3.3: the textbook DVFS cube law (V proportional to f, P = C f V**2)
and a little steeper near the top, where velocity saturation (the
alpha-power law of Sakurai and Newton, IEEE JSSC 1990: f_max ~ (V - V_t)**a / V
with a < 2) makes each extra MHz cost more voltage. Then::

    P(f) = idle + (awake - idle) * g(f)                          awake at clock f
         + (hbm_watts + data_movement_watts * g(f)) * bandwidth used
         + engine_watts * activity * (math time / t_step) * g(f)

Under a power limit the GPU runs at the highest clock whose power fits
(bisection: P rises with f). If even the lowest SM clock does not fit
(memory-bound work at a very low cap), memory is slowed as well (reported as
a lower memory clock). Hence:

* a cap above the workload's natural draw changes nothing;
* below it the SM clock and throughput fall; memory-bound work keeps its
  throughput until the SM side becomes the bottleneck;
* for compute-bound work energy per unit is U-shaped in the cap: near the
  limit it pays V**2, at low caps the floor over a longer runtime. The EDP
  minimum lies at a higher cap than the energy minimum, as EDP also rewards
  speed. EDP ~ P / f**2 falls with the clock while (d ln P_switching / d ln f)
  * P_switching / P > 2, which the cube law gives at the ~1420 MHz where
  large GEMMs and training sit at 700 W: a bf16 GEMM or ``training()`` capped
  to ~550 W runs 8-9% slower for 6-7% less EDP and 14% less energy per unit;
  the energy minimum is near 330-340 W (-30%), the EDP minimum near
  425-440 W (-9 to -10%, but 17% slower).

Published capping and frequency studies this shape follows
-----------------------------------------------------------
* J. You, J.-W. Chung, M. Chowdhury, "Zeus: Understanding and Optimizing GPU
  Energy Consumption of DNN Training", NSDI 2023: across four GPU generations
  power is not proportional to performance, the highest power limit has
  diminishing returns, and energy and time trade off over (batch size, power
  limit), so the energy optimum sits below the maximum limit.
* P. Patel et al., "Characterizing Power Management Opportunities for LLMs in
  the Cloud" (POLCA), ASPLOS 2024: LLM inference draws well below TDP on
  average, leaving headroom that power capping exploits with little
  performance loss.
* B. Ma et al., "The Illusion of Power Capping in LLM Decode", arXiv 2605.11999
  (2026): memory-bound decode on a 700 W H200 draws 137-300 W, so a power cap
  above that never binds.
* A. Afzal et al., "Modeling and Chasing the Energy-Efficiency Sweet Spots in
  Modern GPUs", arXiv 2607.00819 (2026): GPU power splits into a baseline, a
  linear and a non-linear part in frequency, giving a workload-dependent
  energy sweet spot below the maximum clock.
* The figure "GEMM on an A100 capped to 55-70% of TDP: up to 30% better energy
  efficiency" is quoted by the project's ``shared/data/README.md``; its paper
  was not located, so it guided the voltage-curve choice but is not relied on.

Calibration
-----------
``H100_SXM`` is fitted to ``edpilot/data/h100_probe.json`` (one NVIDIA H100
80GB HBM3 SXM, driver 580.159.04, measured read-only 2026-11-26) at the 700 W
default limit, and its waiting-rank power to ``h100x2_straggler.json``. The
probe has no measurement under a lowered limit, so the voltage curve is a
choice, not a measurement, and the probe limits how steep it can be: at the
same ~700 W the n = 2048 GEMMs run at 1695-1890 MHz and the n = 8192 ones at
1260-1440 MHz with only 9-38% more switching energy per FLOP, which a steep
V(f) can match only with the 2048s' clocks modelled 10-15% low. The floor
(0.53 V_max) and the exponent (1.15) come from a fit asked to keep every
probe row (J/token, TFLOP/J) within ~13% and a GEMM's and training's best
EDP gain within 10% slowdown at 6-7% or more; every row is within 13.6%.
With the previous linear-above-a-knee curve (worst row 11.4%) no cap below
700 W lowered a GEMM's or training's EDP.
``A100_SXM`` is an uncalibrated prior built from public spec-sheet figures.
fp16 is modelled like bf16; int8 like fp8 with int8 tensor peaks; int4-awq
(0.5-byte weights, fp16 math plus a dequantisation overhead) is an
uncalibrated extrapolation.

Noise
-----
``operating_point`` is deterministic. ``SimulatedGpu`` adds seeded noise to
what it reports: window energy and work are multiplied by a mean-one
log-normal factor whose spread scales as 1/sqrt(window) (white noise, so the
statistics do not depend on how finely a caller steps), and instantaneous
readings (power gauge, clocks, temperature) get their own jitter. The sizes
are the ``*_NOISE*`` constants below and are at least what the probe shows.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Literal

from edpilot.contract import ThrottleReason

Precision = Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8", "int4-awq"]
PRECISIONS: Final[tuple[Precision, ...]] = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "int4-awq")

# A compute engine of the GPU: SIMT fp32 or a tensor-core data type.
Engine = Literal["fp32", "tf32", "fp16", "fp8", "int8"]
WorkloadKind = Literal["decode", "prefill", "gemm", "training"]


# How imperfectly memory traffic and math overlap within a step: 1 would add
# them, infinity would take the max. Fitted to the probe's decode sweep.
OVERLAP_EXPONENT: Final = 2.79

# The GPU-side gap between two back-to-back matmul kernels of one stream
# (launch latency): fitted to the probe's n = 2048 GEMMs (~28 us each), a few
# microseconds like the usual CUDA launch-latency figures.
GEMM_LAUNCH_GAP_S: Final = 3e-6

# A decode step of a real decoder launches hundreds of short kernels besides its matmuls (norms,
# rotary and cache writes, activations, residual adds); each runs on its own for about this long
# at the maximum clock, whatever the batch. Fitted to h100_llama8b_decode*.json: with the ~870
# kernels of the Llama-3-8B-shaped step it explains the ~2 ms by which a CUDA-graph step exceeds
# the time to stream its bytes.
SMALL_KERNEL_S: Final = 2.85e-6

# Attention over the KV cache reads each sequence's cache in blocks per head and layer, and pays
# a fixed cost per sequence on top (launching the blocks, the softmax reduction). Counted as this
# many extra cache positions read: fitted so that the cache streams at about the HBM rate at
# 4,160 positions and about 15% slower at 1,088 (h100_llama8b_decode*.json).
ATTENTION_FIXED_POSITIONS: Final = 250

# Eager execution (no CUDA graph): the host issues kernels one by one while the GPU runs those
# already queued, so the step is a smooth maximum of host time and GPU time. Fitted to the eager
# rows of h100_llama8b_decode*.json (host-bound at small batches, GPU-bound at batch 64).
EAGER_OVERLAP_EXPONENT: Final = 3.6
# Host time per kernel launched from Python on the machine that took the H100 files (PyTorch
# 2.11). The H200 file's host needed 15.6 us (H200_EAGER_HOST_S_PER_KERNEL): a property of the
# host CPU, not of the GPU.
EAGER_HOST_S_PER_KERNEL: Final = 11.0e-6
H200_EAGER_HOST_S_PER_KERNEL: Final = 15.6e-6

# Energy of multiplying a zero (padding) row relative to a real one. Operand
# values change GPU power a lot (up to 67% for DGEMM on an A100: "Understanding
# the Impact of Input Entropy on FPU, CPU, and GPU Power", arXiv 2212.08805);
# zeros are the cheap end. Fitted to the probe's fp32 decode.
ZERO_OPERAND_ENERGY: Final = 0.422

# ---------------------------------------------------------------- noise sizes
# The probe's sampled-vs-counter energy differences over 3-4 s windows spread
# by 1.6% (std of sampled_err_pct over 32 windows, worst -5.7%), and 0.5 s
# sampling was 1.3% off: window energy gets 2% (1 sigma) at a 3.5 s window.
NOISE_REFERENCE_WINDOW_S: Final = 3.5
ENERGY_NOISE_REL: Final = 0.02
# Work done per window (throughput jitter: batching, scheduling), 1 sigma at 3.5 s.
WORK_NOISE_REL: Final = 0.01
# One instantaneous power-gauge reading, 1 sigma (the probe's idle 100 ms
# sampling read 14% under the counter; loaded windows 0-6%).
POWER_READING_NOISE_REL: Final = 0.03
SM_CLOCK_READING_NOISE_REL: Final = 0.01
TEMPERATURE_READING_NOISE_C: Final = 0.5


# ---------------------------------------------------------------- GPU models


@dataclass(frozen=True)
class EngineSpec:
    """One compute engine of a GPU model."""

    name: Engine
    peak_tflops: float  # dense peak at the maximum SM clock
    efficiency: float  # fraction of peak a large, well-shaped matmul reaches
    watts: float  # dynamic power at the maximum clock, engine 100% busy


@dataclass(frozen=True)
class GpuSpec:
    """A GPU model: limits, clocks, memory system and the power model's coefficients."""

    name: str
    min_power_limit_watts: float
    max_power_limit_watts: float
    default_power_limit_watts: float
    idle_watts: float  # settled idle at the lowest clock
    awake_watts: float  # awake at the maximum clock with no useful work (e.g. NCCL spinning)
    hbm_watts: float  # HBM at full effective bandwidth: does not depend on the SM clock
    data_movement_watts: float  # on-chip side of that traffic (L2, NoC, load units) at the maximum clock
    min_sm_clock_mhz: float
    max_sm_clock_mhz: float
    sm_clock_step_mhz: float  # spacing of the supported SM clocks (what readings snap to)
    mem_clock_mhz: float
    mem_bandwidth_tbps: float  # spec-sheet peak
    mem_efficiency: float  # fraction of the peak a streaming kernel reaches
    kernel_ramp_s: float  # per matmul kernel at the maximum clock: prologue, epilogue, tail wave
    small_kernel_s: float  # one short non-matmul kernel (norm, cache write, activation) at the maximum clock
    memory_bytes: float  # HBM capacity: weights and the KV cache must fit in it
    onchip_bandwidth_ratio: float  # what the SMs and L2 can stream at the maximum clock, in HBM bandwidths
    engines: tuple[EngineSpec, ...]
    voltage_floor: float  # V / V(max clock) at low clocks: the minimum operating voltage
    voltage_exponent: float  # above the floor V / V(max clock) ~ (f / f_max)**exponent
    voltage_knee_sharpness: float  # how abruptly the curve leaves the floor (a smooth-max exponent)
    ambient_c: float
    c_per_watt: float  # die temperature rise per watt
    slowdown_temp_c: float  # where hardware thermal slowdown holds the die
    calibrated: bool
    source: str = field(compare=False)

    def engine(self, name: Engine) -> EngineSpec:
        for e in self.engines:
            if e.name == name:
                return e
        raise ValueError(f"{self.name} has no {name} engine")

    def supports(self, precision: str) -> bool:
        traits = PRECISION_TRAITS.get(precision)
        return traits is not None and any(e.name == traits.engine for e in self.engines)

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.mem_bandwidth_tbps * 1e12 * self.mem_efficiency


# H100 SXM. Limits, clocks and idle from the probe's `nvml` block (200-700 W,
# default 700 W, 110 SM clocks 345-1980 MHz, memory clock 2619 MHz, 72 W at P0
# idle after settling; the 2 s counter right after load read 124 W, which this
# model reaches only while awake at a high clock). Peaks from NVIDIA's H100 SXM
# datasheet scaled to 1980 MHz (132 SMs; per SM and clock: 256 fp32 SIMT,
# 2048 tf32, 4096 fp16/bf16, 8192 fp8/int8 dense FLOP). Efficiencies, watts,
# bandwidth efficiency, kernel ramp, and the voltage floor and exponent: a
# least-squares fit to the probe's 32 rows (J/unit, step time, power, and the
# clocks large GEMMs settle at under the 700 W limit) and the straggler run,
# constrained to leave a GEMM and training an EDP gain below 700 W;
# tests/unit/test_gpusim.py checks the result. awake_watts: mostly set by the
# straggler run's waiting rank (full clock, little work). Engine watts are what
# the engine would draw 100% busy at 1980 MHz, which the 700 W limit never allows.
# On-chip bandwidth and the knee's sharpness: chosen, not measured.
H100_SXM: Final = GpuSpec(
    name="NVIDIA H100 80GB HBM3",
    min_power_limit_watts=200.0,
    max_power_limit_watts=700.0,
    default_power_limit_watts=700.0,
    idle_watts=72.0,
    awake_watts=133.0,
    hbm_watts=145.0,
    data_movement_watts=235.0,
    min_sm_clock_mhz=345.0,
    max_sm_clock_mhz=1980.0,
    sm_clock_step_mhz=15.0,
    mem_clock_mhz=2619.0,
    mem_bandwidth_tbps=3.35,
    mem_efficiency=0.90,
    kernel_ramp_s=4.19e-6,
    small_kernel_s=SMALL_KERNEL_S,
    memory_bytes=80e9,
    onchip_bandwidth_ratio=2.0,
    engines=(
        EngineSpec("fp32", peak_tflops=66.9, efficiency=0.856, watts=821.0),
        EngineSpec("tf32", peak_tflops=535.2, efficiency=0.943, watts=1780.0),
        EngineSpec("fp16", peak_tflops=1070.5, efficiency=0.949, watts=1755.0),
        EngineSpec("fp8", peak_tflops=2141.0, efficiency=0.921, watts=1720.0),
        EngineSpec("int8", peak_tflops=2141.0, efficiency=0.921, watts=1720.0),
    ),
    voltage_floor=0.53,
    voltage_exponent=1.15,
    voltage_knee_sharpness=12.0,
    ambient_c=30.0,
    c_per_watt=0.05,  # probe: 34 C at 72 W, 56-68 C at 600-700 W
    slowdown_temp_c=87.0,
    calibrated=True,
    source="fitted to h100_probe.json and h100x2_straggler.json (H100 80GB HBM3 SXM, 2026-11-26)",
)

# A100 SXM4 80GB: an UNCALIBRATED prior from public spec sheets (400 W TDP,
# 1410 MHz boost, 2.039 TB/s HBM2e, dense 19.5 fp32 / 156 tf32 / 312 fp16 /
# 624 int8 TFLOP/s; no fp8). Power coefficients are scaled from an earlier
# H100 fit so that a large bf16 GEMM is held by the 400 W limit (~1250 MHz),
# like on the H100; the voltage curve is the H100's. It is the less efficient
# node group placement can compare against.
A100_SXM: Final = GpuSpec(
    name="NVIDIA A100-SXM4-80GB",
    min_power_limit_watts=100.0,
    max_power_limit_watts=400.0,
    default_power_limit_watts=400.0,
    idle_watts=55.0,
    awake_watts=95.0,
    hbm_watts=110.0,
    data_movement_watts=150.0,
    min_sm_clock_mhz=210.0,
    max_sm_clock_mhz=1410.0,
    sm_clock_step_mhz=15.0,
    mem_clock_mhz=1593.0,
    mem_bandwidth_tbps=2.039,
    mem_efficiency=0.90,
    kernel_ramp_s=8e-6,
    small_kernel_s=SMALL_KERNEL_S,
    memory_bytes=80e9,
    onchip_bandwidth_ratio=2.0,
    engines=(
        EngineSpec("fp32", peak_tflops=19.5, efficiency=0.80, watts=250.0),
        EngineSpec("tf32", peak_tflops=156.0, efficiency=0.90, watts=380.0),
        EngineSpec("fp16", peak_tflops=312.0, efficiency=0.90, watts=460.0),
        EngineSpec("int8", peak_tflops=624.0, efficiency=0.90, watts=500.0),
    ),
    voltage_floor=0.53,
    voltage_exponent=1.15,
    voltage_knee_sharpness=12.0,
    ambient_c=30.0,
    c_per_watt=0.12,
    slowdown_temp_c=85.0,
    calibrated=False,
    source="uncalibrated prior from NVIDIA A100 spec-sheet figures",
)

# H200 SXM (141 GB HBM3e, 4.8 TB/s; the same GH100 die, clocks and tensor peaks as the H100 SXM).
# Fitted to h200_llama8b_decode_ctx4k.json (one NVIDIA H200, driver 580.159.04, 2026-12-06,
# read-only) with the H100's compute engines, voltage curve and kernel costs kept: the memory
# system (bandwidth efficiency, HBM and data-movement watts) and idle/awake power are the H200's
# own. The file has only a 4,160-position decode and prefill at the 700 W limit, so what the
# H200 does under a lowered cap is the H100's physics. Its power-limit constraints were not in
# the file: the H100's 200-700 W are assumed (on real nodes the agent reports NVML's).
H200_SXM: Final = replace(
    H100_SXM,
    name="NVIDIA H200",
    idle_watts=78.0,
    awake_watts=105.0,
    hbm_watts=135.0,
    data_movement_watts=300.0,
    mem_clock_mhz=3201.0,
    mem_bandwidth_tbps=4.8,
    mem_efficiency=0.82,
    memory_bytes=141e9,
    calibrated=True,
    source="H100 physics with the memory system fitted to h200_llama8b_decode_ctx4k.json (2026-12-06)",
)

GPU_MODELS: Final[Mapping[str, GpuSpec]] = {g.name: g for g in (H100_SXM, H200_SXM, A100_SXM)}


# ---------------------------------------------------------------- precisions


@dataclass(frozen=True)
class PrecisionTraits:
    """How a quantization profile maps onto memory traffic and an engine."""

    weight_bytes: float
    activation_bytes: float
    engine: Engine
    tile_rows: int  # a matmul kernel pads the batch (rows) up to a multiple of this
    min_rows: int  # rows the kernel needs at least (1: batch 1 runs as an unpadded GEMV)
    host_s_per_matmul: float  # host time to issue one matmul and its (de)quantisation ops
    compute_factor: float  # extra math per useful FLOP (dequantisation)
    calibrated: bool
    # Short kernels a matmul of this precision adds in a real decoder step: fp8 casts the
    # activations and pads the rows (h100_llama8b_decode_fp8.json's `lin`).
    extra_kernels_per_matmul: int = 0
    # Share of the engine's large-GEMM rate its kernels reach on prefill-shaped matmuls: the
    # probe's per-tensor-scaled fp8 matmuls with activation casts prefill only 1.35-1.39x faster
    # than bf16 (h100_llama8b_decode_fp8.json), not the 2x of the tensor peaks.
    prefill_efficiency: float = 1.0


# fp32 / bf16 / fp8 rows are fitted to the probe's decode sweep. There fp8 pads
# the batch to 16 rows and quantises activations with extra eager ops, so the
# host needs ~26 us per matmul and small batches are host-bound; batch 1 of
# fp32 / bf16 runs as a GEMV, larger fp32 batches as 64-row SIMT tiles. The
# other rows are extrapolations (fp16 = bf16, int8 = fp8 on int8 peaks,
# int4-awq = half-byte weights on fp16 math + 15% dequantisation), uncalibrated.
PRECISION_TRAITS: Final[Mapping[str, PrecisionTraits]] = {
    # weight B, activation B, engine, tile rows, min rows, host s per matmul, compute factor, calibrated
    "fp32": PrecisionTraits(4.0, 4.0, "fp32", 64, 1, 10e-6, 1.0, True),
    "tf32": PrecisionTraits(4.0, 4.0, "tf32", 16, 1, 10e-6, 1.0, False),
    "bf16": PrecisionTraits(2.0, 2.0, "fp16", 16, 1, 10e-6, 1.0, True),
    "fp16": PrecisionTraits(2.0, 2.0, "fp16", 16, 1, 10e-6, 1.0, False),
    "fp8": PrecisionTraits(1.0, 2.0, "fp8", 16, 16, 26.5e-6, 1.0, True, 3, prefill_efficiency=0.74),
    "int8": PrecisionTraits(1.0, 2.0, "int8", 16, 16, 26.5e-6, 1.0, False, 3, prefill_efficiency=0.74),
    "int4-awq": PrecisionTraits(0.5, 2.0, "fp16", 16, 1, 15e-6, 1.15, False),
}


def _traits(precision: str) -> PrecisionTraits:
    traits = PRECISION_TRAITS.get(precision)
    if traits is None:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return traits


# ---------------------------------------------------------------- workloads


@dataclass(frozen=True)
class DecoderShape:
    """A decoder-only transformer: what one decode step streams from HBM and computes.

    Grouped-query attention: `heads` query heads share `kv_heads` key/value heads of `head_dim`.
    The KV cache holds keys and values of every layer in 16-bit floats (2 bytes), whatever
    precision the weights use, as the probe and most serving deployments do.
    """

    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn_size: int  # SwiGLU: gate and up projections of this width, then down
    vocab_size: int
    # Kernels one layer of the probe's step launches: 4 matmuls, 2 RMSNorms of ~8 elementwise
    # kernels each, 2 cache writes, attention, SiLU, a product and 2 residual adds.
    kernels_per_layer: int = 27

    def __post_init__(self) -> None:
        if min(self.layers, self.hidden_size, self.heads, self.kv_heads, self.head_dim, self.ffn_size) < 1:
            raise ValueError("a decoder shape needs positive sizes")
        if self.heads % self.kv_heads:
            raise ValueError("query heads must be a multiple of KV heads")
        if self.kernels_per_layer < 4:
            raise ValueError("a layer launches at least its 4 matmuls")

    @property
    def layer_params(self) -> int:
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim * self.hidden_size
        out = self.heads * self.head_dim * self.hidden_size
        return qkv + out + 3 * self.hidden_size * self.ffn_size

    @property
    def linear_params(self) -> int:
        """Weights of the layers' matmuls: quantization applies to these."""
        return self.layers * self.layer_params

    @property
    def head_params(self) -> int:
        """The output projection over the vocabulary: read every step, kept in 16 bits."""
        return self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        """Every parameter, the input embedding included (a step reads only its rows)."""
        return self.linear_params + 2 * self.head_params

    @property
    def kv_bytes_per_position(self) -> int:
        """Cache bytes one sequence adds per position: keys and values of every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    @property
    def attention_flops_per_position(self) -> int:
        """One query token against one cached position: Q.K and P.V over every head and layer."""
        return 4 * self.layers * self.heads * self.head_dim


# Llama 3 8B (Meta's published configuration): the shape of h100_llama8b_decode*.json.
LLAMA3_8B: Final = DecoderShape(
    layers=32, hidden_size=4096, heads=32, kv_heads=8, head_dim=128, ffn_size=14336, vocab_size=128256
)


@dataclass(frozen=True)
class WorkloadProfile:
    """What a simulated workload does per step. Build one with `llama_decode`, `llama_prefill`,
    `llm_decode` (the older projection-only stack), `gemm` or `training`."""

    kind: WorkloadKind
    name: str
    unit: str  # what the work counter counts: "token", "matmul", "sample"
    params: int = 0  # decode / training: model parameters
    hidden_size: int = 0  # decode / training
    n: int = 0  # gemm: square matrix size
    seq_len: int = 0  # training: tokens per sample
    step_overhead_s: float = 0.0  # not shortened by a faster SM clock; a gemm pays it per matmul
    compute_efficiency: float = 1.0  # FLOP/s relative to a large GEMM (training kernels mix in slower ops)
    compute_activity: float = 1.0  # energy per FLOP relative to a large GEMM (operand traffic, reuse)
    thermal_clock_limit_mhz: float | None = None  # a thermally throttled GPU's sustained clock ceiling
    # A real decoder (decode and prefill): its layers, attention over a KV cache of
    # `context_tokens` positions per sequence (prefill: the prompt length), and how the host
    # launches a step: 0 replays a CUDA graph, more is eager launching at that cost per kernel.
    shape: DecoderShape | None = None
    context_tokens: int = 0
    host_s_per_kernel: float = 0.0

    def __post_init__(self) -> None:
        if self.kind == "prefill" and (self.shape is None or self.context_tokens < 1):
            raise ValueError("a prefill profile needs a decoder shape and a prompt length >= 1")
        if self.shape is not None and (self.kind not in ("decode", "prefill") or self.context_tokens < 0):
            raise ValueError("a decoder shape belongs to a decode or prefill profile with context >= 0")
        if self.host_s_per_kernel < 0:
            raise ValueError("host time per kernel must be non-negative")
        if self.kind == "gemm" and self.n < 1:
            raise ValueError("a gemm profile needs n >= 1")
        if self.kind != "gemm" and (self.params < 1 or self.hidden_size < 1):
            raise ValueError(f"a {self.kind} profile needs params and hidden_size >= 1")
        if self.kind == "training" and self.seq_len < 1:
            raise ValueError("a training profile needs seq_len >= 1")
        if self.compute_efficiency <= 0 or self.compute_activity <= 0 or self.step_overhead_s < 0:
            raise ValueError("compute efficiency and activity must be positive, overhead non-negative")

    @property
    def matmuls_per_step(self) -> int:
        """Matmul launches per step: the probe's stack has 4 per layer of 12*d*d parameters."""
        if self.kind == "gemm":
            return 1
        layers = max(1, round(self.params / (12 * self.hidden_size**2)))
        return 4 * layers * (3 if self.kind == "training" else 1)

    @property
    def activation_elems_per_token(self) -> float:
        """Activations read and written per token: 16*d per layer of 12*d*d parameters."""
        return 4.0 * self.params / (3.0 * self.hidden_size) if self.kind != "gemm" else 0.0

    @property
    def flops_per_unit(self) -> float:
        if self.shape is not None:
            return 2.0 * (self.shape.linear_params + self.shape.head_params)
        if self.kind == "gemm":
            return 2.0 * self.n**3
        if self.kind == "training":
            return 6.0 * self.params * self.seq_len
        return 2.0 * self.params


def llm_decode(
    params: int = 1_207_959_552,
    hidden_size: int = 4096,
    step_overhead_s: float = 150e-6,
    compute_activity: float = 0.618,
    name: str = "llm-decode",
) -> WorkloadProfile:
    """LLM decode: one token per sequence per step; the defaults are the probe's 1.21 B stack.

    compute_activity 0.618: in the probe, decode's skinny matmuls reach the same
    TFLOP/J as a large square GEMM while also streaming weights, so they spend
    less energy per FLOP (fitted).
    """
    return WorkloadProfile(
        kind="decode",
        name=name,
        unit="token",
        params=params,
        hidden_size=hidden_size,
        step_overhead_s=step_overhead_s,
        compute_activity=compute_activity,
    )


# A real decoder's decode matmuls spend less energy per FLOP than a large square GEMM (skinny
# operands, weights streamed once), as the older projection stack's did (0.618, llm_decode).
DECODER_COMPUTE_ACTIVITY: Final = 0.63
# Prefill's matmuls, attention and elementwise work reach this share of a large GEMM's FLOP rate
# and spend this share of its energy per FLOP: fitted to the 1 x 1,024 and 8 x 1,024-token
# prefill rows of h100_llama8b_decode*.json (700 W limit, SM clock held at 1,560-1,725 MHz).
PREFILL_COMPUTE_EFFICIENCY: Final = 0.65
PREFILL_COMPUTE_ACTIVITY: Final = 0.50


def llama_decode(
    context_tokens: int = 1088,
    cuda_graphs: bool = True,
    shape: DecoderShape = LLAMA3_8B,
    host_s_per_kernel: float = EAGER_HOST_S_PER_KERNEL,
    name: str = "llama3-8b-decode",
) -> WorkloadProfile:
    """Decode of a real decoder (default Llama 3 8B): one token per sequence per step, every
    weight and each sequence's whole KV cache of `context_tokens` positions read per step.
    cuda_graphs=False launches kernels eagerly from the host (engines without CUDA graphs)."""
    return WorkloadProfile(
        kind="decode",
        name=name,
        unit="token",
        params=shape.params,
        hidden_size=shape.hidden_size,
        compute_activity=DECODER_COMPUTE_ACTIVITY,
        shape=shape,
        context_tokens=context_tokens,
        host_s_per_kernel=0.0 if cuda_graphs else host_s_per_kernel,
    )


def llama_prefill(
    prompt_tokens: int = 1024,
    shape: DecoderShape = LLAMA3_8B,
    host_s_per_kernel: float = EAGER_HOST_S_PER_KERNEL,
    name: str = "llama3-8b-prefill",
) -> WorkloadProfile:
    """Prefill: one causal pass over a prompt of `prompt_tokens` per sequence (batch_size
    prompts at once), compute-bound; a unit is a prompt token."""
    return WorkloadProfile(
        kind="prefill",
        name=name,
        unit="token",
        params=shape.params,
        hidden_size=shape.hidden_size,
        compute_efficiency=PREFILL_COMPUTE_EFFICIENCY,
        compute_activity=PREFILL_COMPUTE_ACTIVITY,
        shape=shape,
        context_tokens=prompt_tokens,
        host_s_per_kernel=host_s_per_kernel,
    )


def gemm(n: int = 8192, name: str = "gemm", launch_gap_s: float = GEMM_LAUNCH_GAP_S) -> WorkloadProfile:
    """Square matmuls of size n, back to back; batch_size is matmuls per step, a unit is one matmul.

    launch_gap_s: the GPU idles this long between two matmul kernels (its step
    overhead, counted per matmul); it matters only for small, short matmuls.
    """
    return WorkloadProfile(kind="gemm", name=name, unit="matmul", n=n, step_overhead_s=launch_gap_s)


def training(
    params: int = 350_000_000,
    hidden_size: int = 1024,
    seq_len: int = 1024,
    compute_efficiency: float = 0.6,
    step_overhead_s: float = 2e-3,
    name: str = "training",
) -> WorkloadProfile:
    """Transformer training, compute-bound: 6 * params FLOP per token; a unit is one sample."""
    return WorkloadProfile(
        kind="training",
        name=name,
        unit="sample",
        params=params,
        hidden_size=hidden_size,
        seq_len=seq_len,
        step_overhead_s=step_overhead_s,
        compute_efficiency=compute_efficiency,
    )


def throttled(profile: WorkloadProfile, clock_limit_mhz: float = 1500.0) -> WorkloadProfile:
    """The same workload on a GPU that cooling holds to `clock_limit_mhz` (hardware thermal slowdown)."""
    return replace(profile, thermal_clock_limit_mhz=clock_limit_mhz)


# ---------------------------------------------------------------- the physics


@dataclass(frozen=True)
class OperatingPoint:
    """Steady state of one GPU running one workload under one cap (no noise)."""

    units_per_second: float
    power_watts: float
    sm_clock_mhz: float
    mem_clock_mhz: float
    step_seconds: float
    joules_per_unit: float
    utilization: float  # fraction of time a kernel runs (NVML's GPU utilisation / 100)
    cap_watts: float
    throttle_reasons: tuple[ThrottleReason, ...]

    @property
    def seconds_per_unit(self) -> float:
        return 1.0 / self.units_per_second if self.units_per_second > 0 else math.inf

    @property
    def edp_per_unit(self) -> float:
        """Energy-delay product per unit: J/unit * s/unit."""
        return self.joules_per_unit * self.seconds_per_unit


@dataclass(frozen=True)
class _Step:
    seconds: float
    memory_s: float  # HBM time at full bandwidth (so memory_s / seconds is achieved bandwidth share)
    compute_s: float
    busy_s: float  # kernels running (everything but the fixed host gaps)
    units: int
    activity: float  # switching activity of the math relative to dense real operands


def _voltage(gpu: GpuSpec, f_mhz: float) -> float:
    """V / V_max: a smooth maximum of the minimum operating voltage and (f / f_max)**exponent.

    Smooth, because a real V-f table has no corner, and a corner would put the
    energy and the EDP optimum of compute-bound work on the same clock.
    """
    p = gpu.voltage_knee_sharpness
    floor = gpu.voltage_floor**p
    rise = (f_mhz / gpu.max_sm_clock_mhz) ** (gpu.voltage_exponent * p)
    return float(((floor + rise) / (floor + 1.0)) ** (1.0 / p))


def _dynamic_scale(gpu: GpuSpec, f_mhz: float) -> float:
    """g(f) = (f / f_max) * (V / V_max)**2: CMOS switching power relative to the maximum clock."""
    return (f_mhz / gpu.max_sm_clock_mhz) * _voltage(gpu, f_mhz) ** 2


def _overlap(a: float, b: float) -> float:
    big = max(a, b)
    if big <= 0.0:
        return 0.0
    p = OVERLAP_EXPONENT
    return big * float(((a / big) ** p + (b / big) ** p) ** (1.0 / p))


def _step(
    gpu: GpuSpec,
    profile: WorkloadProfile,
    batch: int,
    traits: PrecisionTraits,
    f_mhz: float,
    mem_scale: float,
) -> _Step:
    if profile.shape is not None:
        return _decoder_step(gpu, profile, profile.shape, batch, traits, f_mhz, mem_scale)
    eng = gpu.engine(traits.engine)
    clock = f_mhz / gpu.max_sm_clock_mhz
    flops_per_s = eng.peak_tflops * 1e12 * eng.efficiency * profile.compute_efficiency * clock
    rows = batch
    if profile.kind == "decode":
        # Batch 1 runs as a GEMV; larger batches as tiled matmuls padded to whole tiles.
        if batch > 1:
            rows = math.ceil(batch / traits.tile_rows) * traits.tile_rows
        rows = max(rows, traits.min_rows)
        nbytes = (
            profile.params * traits.weight_bytes
            + batch * profile.activation_elems_per_token * traits.activation_bytes
        )
        flops = profile.flops_per_unit * rows
        kernels = profile.matmuls_per_step
    elif profile.kind == "gemm":
        # `batch` matmuls back to back: A and B read, C written.
        nbytes = batch * 3.0 * profile.n**2 * traits.weight_bytes
        flops = batch * profile.flops_per_unit
        kernels = batch
    else:
        # Weights, gradients and Adam state (~16 B/parameter) plus activations.
        nbytes = (
            16.0 * profile.params
            + batch * profile.seq_len * profile.activation_elems_per_token * traits.activation_bytes
        )
        flops = batch * profile.flops_per_unit
        kernels = profile.matmuls_per_step
    memory_s = nbytes / gpu.bandwidth_bytes_per_s
    compute_s = flops * traits.compute_factor / flops_per_s
    # Each matmul kernel also spends SM cycles outside its main loop (prologue,
    # epilogue, the last partial wave); streaming weights from HBM hides them.
    ramp_s = kernels * gpu.kernel_ramp_s / clock
    # The SMs must issue the loads and L2 must carry them: below some SM clock
    # they, not HBM, limit the bandwidth.
    bandwidth_share = min(mem_scale, gpu.onchip_bandwidth_ratio * clock)
    busy = _overlap(memory_s / bandwidth_share, compute_s + ramp_s)
    # Host time to issue the step's kernels (and any activation (de)quantisation
    # ops): the GPU works meanwhile, so it shows only when it is the longer.
    host = 0.0 if profile.kind == "gemm" else kernels * traits.host_s_per_matmul
    # A gemm's overhead is the gap between back-to-back matmul kernels, so it comes once per matmul.
    overhead = profile.step_overhead_s * (batch if profile.kind == "gemm" else 1)
    # Padding rows are multiplied as zeros, which toggle few bits: they take
    # time but only a fraction of the switching energy of real operands.
    real = batch / rows
    activity = profile.compute_activity * (real + ZERO_OPERAND_ENERGY * (1.0 - real))
    return _Step(
        seconds=overhead + max(host, busy),
        memory_s=memory_s,
        compute_s=compute_s,
        busy_s=busy,
        units=batch,
        activity=activity,
    )


def _decoder_step(
    gpu: GpuSpec,
    profile: WorkloadProfile,
    shape: DecoderShape,
    batch: int,
    traits: PrecisionTraits,
    f_mhz: float,
    mem_scale: float,
) -> _Step:
    """One step of a real decoder: `batch` sequences decode one token each against their KV
    caches, or (prefill) `batch` prompts of `context_tokens` pass through once."""
    eng = gpu.engine(traits.engine)
    clock = f_mhz / gpu.max_sm_clock_mhz
    flops_per_s = eng.peak_tflops * 1e12 * eng.efficiency * profile.compute_efficiency * clock
    if profile.kind == "prefill":
        flops_per_s *= traits.prefill_efficiency
    ctx = profile.context_tokens
    weights = shape.linear_params * traits.weight_bytes + shape.head_params * 2.0
    if profile.kind == "prefill":
        tokens = batch * ctx
        rows = tokens
        # Causal attention: a prompt token attends to the positions before it, ctx / 2 on average.
        attention_flops = tokens * (ctx / 2.0) * shape.attention_flops_per_position
        cache_bytes = tokens * shape.kv_bytes_per_position  # written once
    else:
        tokens = batch
        rows = batch if batch == 1 else math.ceil(batch / traits.tile_rows) * traits.tile_rows
        rows = max(rows, traits.min_rows)
        attention_flops = batch * ctx * shape.attention_flops_per_position
        cache_bytes = batch * (ctx + ATTENTION_FIXED_POSITIONS) * shape.kv_bytes_per_position
    activations = tokens * 16.0 * shape.hidden_size * shape.layers * traits.activation_bytes
    memory_s = (weights + cache_bytes + activations) / gpu.bandwidth_bytes_per_s
    compute_s = (2.0 * (shape.linear_params + shape.head_params) * rows * traits.compute_factor) / flops_per_s
    compute_s += attention_flops / flops_per_s
    matmuls = 4 * shape.layers + 1
    small = shape.layers * (shape.kernels_per_layer - 4 + 4 * traits.extra_kernels_per_matmul)
    ramp_s = matmuls * gpu.kernel_ramp_s / clock
    bandwidth_share = min(mem_scale, gpu.onchip_bandwidth_ratio * clock)
    # Short kernels run one after another between the matmuls: nothing hides them.
    busy = _overlap(memory_s / bandwidth_share, compute_s + ramp_s) + small * gpu.small_kernel_s / clock
    host = (matmuls + small) * profile.host_s_per_kernel
    seconds = busy
    if host > 0.0:
        big = max(host, busy)
        p = EAGER_OVERLAP_EXPONENT
        seconds = big * float(((host / big) ** p + (busy / big) ** p) ** (1.0 / p))
    real = tokens / rows
    activity = profile.compute_activity * (real + ZERO_OPERAND_ENERGY * (1.0 - real))
    return _Step(
        seconds=seconds,
        memory_s=memory_s,
        compute_s=compute_s,
        busy_s=busy,
        units=tokens,
        activity=activity,
    )


def _power(gpu: GpuSpec, eng: EngineSpec, step: _Step, f_mhz: float) -> float:
    g = _dynamic_scale(gpu, f_mhz)
    return (
        gpu.idle_watts
        + (gpu.awake_watts - gpu.idle_watts) * g
        + (gpu.hbm_watts + gpu.data_movement_watts * g) * step.memory_s / step.seconds
        + eng.watts * step.activity * (step.compute_s / step.seconds) * g
    )


def _check_cap(gpu: GpuSpec, cap_watts: float) -> None:
    lo, hi = gpu.min_power_limit_watts, gpu.max_power_limit_watts
    if not (math.isfinite(cap_watts) and lo - 1e-9 <= cap_watts <= hi + 1e-9):
        raise ValueError(f"power cap {cap_watts} W is outside {gpu.name}'s constraints [{lo:g}, {hi:g}] W")


def _check_locked_clock(gpu: GpuSpec, mhz: float) -> None:
    lo, hi = gpu.min_sm_clock_mhz, gpu.max_sm_clock_mhz
    if not (math.isfinite(mhz) and lo <= mhz <= hi):
        raise ValueError(
            f"locked SM clock {mhz} MHz is outside the supported clocks of {gpu.name}: [{lo:g}, {hi:g}] MHz"
        )


def _bisect(fits: Callable[[float], bool], lo: float, hi: float) -> float:
    """Largest x in [lo, hi] (to ~1e-12 of the range) with fits(x), given fits(lo) and monotonicity."""
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def operating_point(
    gpu: GpuSpec,
    profile: WorkloadProfile,
    batch_size: int,
    precision: str,
    cap_watts: float,
    locked_clock_mhz: float | None = None,
) -> OperatingPoint:
    """Steady state of `profile` at `batch_size` and `precision` on `gpu` limited to `cap_watts`
    and, when `locked_clock_mhz` is given, to SM clocks locked at or below that ceiling.

    A locked clock is modelled as the same operating point the power governor would settle on at
    that clock: the power model is calibrated on clocks that caps chose, and no probe locked one.
    Deterministic. Raises ValueError for a batch below 1, an unknown precision
    or one the GPU has no engine for, a cap outside the GPU's constraints, and a locked clock
    outside the GPU's supported SM clocks.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    traits = _traits(precision)
    eng = gpu.engine(traits.engine)
    _check_cap(gpu, cap_watts)

    def power(f_mhz: float, mem_scale: float) -> float:
        return _power(gpu, eng, _step(gpu, profile, batch_size, traits, f_mhz, mem_scale), f_mhz)

    reasons: list[ThrottleReason] = []
    ceiling = gpu.max_sm_clock_mhz
    if locked_clock_mhz is not None:
        _check_locked_clock(gpu, locked_clock_mhz)
        if locked_clock_mhz < ceiling:
            ceiling = locked_clock_mhz
            # NVML reports clocks held below the maximum by a clock setting under this reason.
            reasons.append(ThrottleReason.APPLICATIONS_CLOCKS_SETTING)
    if profile.thermal_clock_limit_mhz is not None and profile.thermal_clock_limit_mhz < ceiling:
        ceiling = max(gpu.min_sm_clock_mhz, profile.thermal_clock_limit_mhz)
        reasons.append(ThrottleReason.HW_THERMAL_SLOWDOWN)
    f, mem_scale = ceiling, 1.0
    if power(ceiling, 1.0) > cap_watts:
        # Power rises with the clock, so the highest clock that fits is found by bisection.
        reasons.insert(0, ThrottleReason.SW_POWER_CAP)
        f = gpu.min_sm_clock_mhz
        if power(f, 1.0) <= cap_watts:
            f = _bisect(lambda x: power(x, 1.0) <= cap_watts, f, ceiling)
        else:
            # Even the lowest SM clock draws too much (memory-bound work at a very
            # low cap): the memory system is slowed as well.
            mem_scale = _bisect(lambda m: power(f, m) <= cap_watts, 1e-3, 1.0)

    step = _step(gpu, profile, batch_size, traits, f, mem_scale)
    watts = _power(gpu, eng, step, f)
    rate = step.units / step.seconds
    return OperatingPoint(
        units_per_second=rate,
        power_watts=watts,
        sm_clock_mhz=f,
        mem_clock_mhz=gpu.mem_clock_mhz * mem_scale,
        step_seconds=step.seconds,
        joules_per_unit=watts / rate,
        utilization=step.busy_s / step.seconds,
        cap_watts=cap_watts,
        throttle_reasons=tuple(reasons),
    )


def sweep_caps(
    gpu: GpuSpec, profile: WorkloadProfile, batch_size: int, precision: str, caps: Sequence[float]
) -> list[OperatingPoint]:
    """`operating_point` at each cap (an oracle for the optimizer's cap search)."""
    return [operating_point(gpu, profile, batch_size, precision, c) for c in caps]


# ---------------------------------------------------------------- multi-GPU jobs

# All-reduce and the rest of a step that no rank can shorten: the straggler
# run's step minus its slowest rank's compute was 0.6-0.8 ms.
DEFAULT_SYNC_S: Final = 0.7e-3
# Share of the busy-phase power (above awake) that lingers into the wait, per
# unit of busy fraction; fitted to h100x2_straggler.json's waiting rank.
WAIT_POWER_CARRYOVER: Final = 0.65


@dataclass(frozen=True)
class JobPoint:
    """One synchronous step of a job spread over ranks (one GPU each)."""

    step_seconds: float
    units_per_second: float  # the whole job
    critical_rank: int  # the rank everyone waits for
    per_rank_compute_seconds: tuple[float, ...]
    per_rank_busy_fraction: tuple[float, ...]
    per_rank_power_watts: tuple[float, ...]  # averaged over the step
    per_rank_wait_watts: tuple[float, ...]  # while waiting for the others
    ranks: tuple[OperatingPoint, ...]  # per rank, averaged over the step; feed to SimulatedGpu.advance_at


def _wait_watts(gpu: GpuSpec, busy_watts: float, busy_fraction: float, cap: float) -> float:
    """Power while a rank waits in the collective.

    The waiting GPU keeps its clock up spinning in NCCL (awake_watts), and the
    power it drew while busy does not fall away within a short wait: over
    h100x2_straggler.json's runs (busy 11-92%, 13 ms steps) the wait draw
    rises from ~190 W to ~650 W, close to
    awake + WAIT_POWER_CARRYOVER * busy * (busy power - awake).
    An empirical fit, not a mechanism.
    """
    carried = WAIT_POWER_CARRYOVER * busy_fraction * max(0.0, busy_watts - gpu.awake_watts)
    return min(cap, gpu.awake_watts + carried)


def job_step(
    gpu: GpuSpec,
    profile: WorkloadProfile,
    precision: str,
    work_per_rank: Sequence[float],
    caps: Sequence[float],
    batch_size: int = 1,
    sync_seconds: float = DEFAULT_SYNC_S,
    locked_clocks: Sequence[float | None] | None = None,
) -> JobPoint:
    """A synchronous step: rank r does work_per_rank[r] units at its own cap, then all synchronise.

    The step lasts as long as the slowest rank's compute plus `sync_seconds`;
    lowering the cap of a rank that waits saves its energy without slowing the
    step until that rank becomes the slowest.
    """
    if len(work_per_rank) != len(caps) or not caps:
        raise ValueError("need one cap per rank and at least one rank")
    locks = [None] * len(caps) if locked_clocks is None else list(locked_clocks)
    if len(locks) != len(caps):
        raise ValueError("need one locked clock (or None) per rank")
    if any(w < 0 for w in work_per_rank) or sync_seconds < 0:
        raise ValueError("work and sync time must be non-negative")
    busy_points = [
        operating_point(gpu, profile, batch_size, precision, c, lock)
        for c, lock in zip(caps, locks, strict=True)
    ]
    compute = tuple(w / p.units_per_second for w, p in zip(work_per_rank, busy_points, strict=True))
    step = max(compute) + sync_seconds
    if step <= 0:
        raise ValueError("a step with no work and no sync takes no time")
    idle_clock = min(gpu.max_sm_clock_mhz, profile.thermal_clock_limit_mhz or gpu.max_sm_clock_mhz)
    busy_frac, power, wait, ranks = [], [], [], []
    for w, p, c, cap, lock in zip(work_per_rank, busy_points, compute, caps, locks, strict=True):
        x = c / step
        pw = _wait_watts(gpu, p.power_watts, x, cap)
        avg = x * p.power_watts + (1.0 - x) * pw
        busy_frac.append(x)
        wait.append(pw)
        power.append(avg)
        rate = w / step
        ranks.append(
            replace(
                p,
                units_per_second=rate,
                power_watts=avg,
                sm_clock_mhz=x * p.sm_clock_mhz + (1.0 - x) * min(idle_clock, lock or idle_clock),
                step_seconds=step,
                joules_per_unit=avg / rate if rate > 0 else math.inf,
                utilization=1.0,  # NCCL's wait is a running kernel
            )
        )
    return JobPoint(
        step_seconds=step,
        units_per_second=sum(work_per_rank) / step,
        critical_rank=max(range(len(compute)), key=compute.__getitem__),
        per_rank_compute_seconds=compute,
        per_rank_busy_fraction=tuple(busy_frac),
        per_rank_power_watts=tuple(power),
        per_rank_wait_watts=tuple(wait),
        ranks=tuple(ranks),
    )


# ---------------------------------------------------------------- a stateful device


@dataclass(frozen=True)
class Assignment:
    """The workload a simulated GPU runs and the configuration it actually applies."""

    profile: WorkloadProfile
    batch_size: int
    precision: str


@dataclass(frozen=True)
class WindowResult:
    """What the device reports after `seconds` more of running (noisy readings)."""

    seconds: float
    energy_joules: float  # this window: the counter's advance
    work_units: float  # this window
    energy_counter_mj: int  # cumulative, like nvmlDeviceGetTotalEnergyConsumption
    work_counter: float  # cumulative
    power_watts: float  # instantaneous gauge reading at the window's end
    sm_clock_mhz: int
    mem_clock_mhz: int
    utilization_percent: int
    temperature_c: float
    throttle_reasons: tuple[ThrottleReason, ...]
    power_limit_watts: float
    point: OperatingPoint | None  # the noiseless truth, None when idle


def _mean_one(rng: random.Random, sigma: float) -> float:
    """A positive multiplicative noise factor with mean 1 and (log) spread sigma."""
    return math.exp(rng.gauss(0.0, sigma) - 0.5 * sigma * sigma)


def _window_sigma(rel_at_reference: float, seconds: float) -> float:
    return rel_at_reference * math.sqrt(NOISE_REFERENCE_WINDOW_S / seconds)


def _snap_clock(spec: GpuSpec, mhz: float) -> int:
    """A clock reading: one of the GPU's supported SM clocks."""
    mhz = min(max(mhz, spec.min_sm_clock_mhz), spec.max_sm_clock_mhz)
    steps = round((mhz - spec.min_sm_clock_mhz) / spec.sm_clock_step_mhz)
    return int(spec.min_sm_clock_mhz + steps * spec.sm_clock_step_mhz)


def gpu_uuid(seed_name: str, index: int) -> str:
    """A stable NVML-style UUID for simulated GPU `index` of `seed_name` (e.g. the node name)."""
    h = hashlib.sha256(f"{seed_name}/{index}".encode()).hexdigest()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class SimulatedGpu:
    """One simulated GPU: an enforced power limit, cumulative energy and work counters, one workload."""

    def __init__(self, spec: GpuSpec = H100_SXM, index: int = 0, seed_name: str = "sim") -> None:
        self.spec = spec
        self.index = index
        self.uuid = gpu_uuid(seed_name, index)
        self._limit = spec.default_power_limit_watts
        self._locked_clock: float | None = None
        self._energy_j = 0.0  # float internally; reported as whole mJ
        self._work = 0.0
        self.assignment: Assignment | None = None

    @property
    def power_limit_watts(self) -> float:
        return self._limit

    @property
    def energy_counter_mj(self) -> int:
        return int(self._energy_j * 1000.0)

    @property
    def work_counter(self) -> float:
        return self._work

    def set_power_limit(self, watts: float) -> None:
        """Enforce a new limit; like NVML, refuse anything outside the GPU's constraints."""
        lo, hi = self.spec.min_power_limit_watts, self.spec.max_power_limit_watts
        if not (math.isfinite(watts) and lo <= watts <= hi):
            raise ValueError(
                f"power limit {watts} W is outside the constraints of GPU {self.index} "
                f"({self.spec.name}): [{lo:g}, {hi:g}] W"
            )
        self._limit = float(watts)

    def reset_power_limit(self) -> None:
        self._limit = self.spec.default_power_limit_watts

    @property
    def locked_clock_mhz(self) -> float | None:
        return self._locked_clock

    def lock_sm_clock(self, max_mhz: float) -> None:
        """Lock the SM clock to [lowest supported, max_mhz]; like NVML, refuse a clock the GPU
        does not support."""
        _check_locked_clock(self.spec, max_mhz)
        self._locked_clock = float(max_mhz)

    def reset_locked_clock(self) -> None:
        self._locked_clock = None

    def assign(self, profile: WorkloadProfile, batch_size: int, precision: str) -> None:
        if not self.spec.supports(precision):
            raise ValueError(f"{self.spec.name} cannot run precision {precision!r}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.assignment = Assignment(profile, batch_size, precision)

    def clear(self) -> None:
        self.assignment = None

    def current_point(self) -> OperatingPoint | None:
        """The noiseless steady state of the assigned workload under the enforced limit."""
        a = self.assignment
        if a is None:
            return None
        return operating_point(
            self.spec, a.profile, a.batch_size, a.precision, self._limit, self._locked_clock
        )

    def advance(self, seconds: float, rng: random.Random) -> WindowResult:
        """Run the assigned workload (or idle) for `seconds` and report."""
        return self._run(self.current_point(), seconds, rng)

    def advance_at(self, point: OperatingPoint, seconds: float, rng: random.Random) -> WindowResult:
        """Run at an externally computed point, e.g. this GPU's rank of a `job_step`."""
        return self._run(point, seconds, rng)

    def _run(self, point: OperatingPoint | None, seconds: float, rng: random.Random) -> WindowResult:
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds must be positive, got {seconds}")
        spec = self.spec
        true_watts = spec.idle_watts if point is None else point.power_watts
        before_mj = self.energy_counter_mj
        self._energy_j += true_watts * seconds * _mean_one(rng, _window_sigma(ENERGY_NOISE_REL, seconds))
        work = 0.0
        if point is not None:
            work = point.units_per_second * seconds * _mean_one(rng, _window_sigma(WORK_NOISE_REL, seconds))
        self._work += work

        gauge = true_watts * _mean_one(rng, POWER_READING_NOISE_REL)
        clock = spec.min_sm_clock_mhz if point is None else point.sm_clock_mhz
        clock = _snap_clock(spec, clock * _mean_one(rng, SM_CLOCK_READING_NOISE_REL))
        if self._locked_clock is not None:
            clock = min(clock, _snap_clock(spec, self._locked_clock))  # a locked GPU never reads above it
        reasons = () if point is None else point.throttle_reasons
        if ThrottleReason.HW_THERMAL_SLOWDOWN in reasons:
            temp = spec.slowdown_temp_c
        else:
            temp = spec.ambient_c + spec.c_per_watt * true_watts
        temp += rng.gauss(0.0, TEMPERATURE_READING_NOISE_C)
        return WindowResult(
            seconds=seconds,
            energy_joules=(self.energy_counter_mj - before_mj) / 1000.0,
            work_units=work,
            energy_counter_mj=self.energy_counter_mj,
            work_counter=self._work,
            power_watts=gauge,
            sm_clock_mhz=clock,
            mem_clock_mhz=round(spec.mem_clock_mhz if point is None else point.mem_clock_mhz),
            utilization_percent=0 if point is None else round(100.0 * point.utilization),
            temperature_c=temp,
            throttle_reasons=reasons,
            power_limit_watts=self._limit,
            point=point,
        )
