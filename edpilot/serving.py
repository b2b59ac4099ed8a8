"""A simulated LLM serving engine under offered load: continuous batching on a `gpusim` GPU.

Pure: time is simulated seconds, randomness comes only through an injected ``random.Random``.

What it models (the way vLLM and SGLang schedule; their docs describe it)
-----------------------------------------------------------------------
* Requests arrive as a Poisson process at the rate the caller gives (a load trace sets it),
  each with a prompt and an output length drawn from log-normal distributions.
* Every engine step runs the sequences in flight: each decoding sequence emits one token, and
  new requests' prompts are prefilled in chunks within a per-step token budget (chunked
  prefill). The step takes the decode time of the running batch at its mean context (weights
  plus every sequence's KV cache read, `gpusim.llama_decode`) plus the prefill time of the
  chunk (`gpusim.llama_prefill`, compute-bound), both under the enforced power limit.
* The batch knob is the engine's limit on sequences in flight (`--max-num-seqs`): the running
  batch is min(limit, requests in flight), and a request is admitted only while the KV cache
  has room for its prompt and output (no preemption: a conservative scheduler).
* Time to first token (TTFT) = queueing + prefill + the step that emits the first token; the
  inter-token latency (ITL) of a token is the step that emitted it. Both are histograms, with
  counters of generated tokens and gauges of running and waiting requests, exposed under
  vLLM's metric names (`exposition`), so an agent reads the simulated engine as a real one.

Calibration: the step times and watts are gpusim's, which match the Llama-3-8B probes within
15% (tests/unit/test_gpusim_decoder.py). The scheduler is a model, not a measurement.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final

from edpilot import gpusim

# Share of HBM the engine may use (vLLM's --gpu-memory-utilization default), the rest being
# the CUDA context, activations and fragmentation.
GPU_MEMORY_UTILIZATION: Final = 0.90
# Prefill tokens and decode tokens one step may carry (vLLM's --max-num-batched-tokens for
# online serving on large GPUs is of this order).
MAX_BATCHED_TOKENS: Final = 2048

# Latency histogram buckets in seconds: the exposition's coarse ones (what a scraper sees) and
# fine log-spaced ones for the simulation's own quantiles (2% apart).
ITL_BUCKETS: Final = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
TTFT_BUCKETS: Final = (
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
)
_FINE_RATIO: Final = 1.02
_FINE_FLOOR_S: Final = 1e-4


def fine_bin(seconds: float) -> int:
    """Index of the fine histogram bin holding `seconds` (bins 2% wide from 0.1 ms)."""
    if seconds <= _FINE_FLOOR_S:
        return 0
    return 1 + int(math.log(seconds / _FINE_FLOOR_S) / math.log(_FINE_RATIO))


def fine_upper(index: int) -> float:
    """Upper edge of fine bin `index`."""
    return _FINE_FLOOR_S * _FINE_RATIO**index


def quantile(counts: dict[int, float], q: float) -> float | None:
    """The q-quantile of a fine histogram (upper edge of the bin it falls in); None if empty."""
    total = sum(counts.values())
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= rank:
            return fine_upper(index)
    return fine_upper(max(counts))


@dataclass(frozen=True)
class LengthDistribution:
    """Token lengths: log-normal around `median` with log-spread `sigma`, clipped to [least, most]."""

    median: float
    sigma: float
    least: int
    most: int

    def __post_init__(self) -> None:
        if not (self.median > 0 and self.sigma >= 0 and 1 <= self.least <= self.most):
            raise ValueError("a length distribution needs median > 0, sigma >= 0 and 1 <= least <= most")

    def draw(self, rng: random.Random) -> int:
        return min(self.most, max(self.least, round(self.median * math.exp(rng.gauss(0.0, self.sigma)))))

    @property
    def mean(self) -> float:
        """The mean before clipping (the clip moves it little for the defaults)."""
        return self.median * math.exp(0.5 * self.sigma**2)


# Chat-style traffic: prompts around 600 tokens, answers around 200 (the order of the
# ShareGPT-style conversation sets serving benchmarks draw from).
CHAT_PROMPTS: Final = LengthDistribution(median=600, sigma=0.7, least=16, most=4096)
CHAT_OUTPUTS: Final = LengthDistribution(median=200, sigma=0.7, least=8, most=1024)


@dataclass(frozen=True)
class ServedModel:
    """What a replica serves and on which GPU."""

    gpu: gpusim.GpuSpec = gpusim.H100_SXM
    shape: gpusim.DecoderShape = gpusim.LLAMA3_8B
    cuda_graphs: bool = True
    prompts: LengthDistribution = CHAT_PROMPTS
    outputs: LengthDistribution = CHAT_OUTPUTS
    max_batched_tokens: int = MAX_BATCHED_TOKENS

    def kv_capacity_tokens(self, precision: str) -> int:
        """Positions the KV cache can hold once the weights are loaded."""
        traits = gpusim.PRECISION_TRAITS[precision]
        weights = self.shape.linear_params * traits.weight_bytes + 2 * self.shape.head_params * 2.0
        free = self.gpu.memory_bytes * GPU_MEMORY_UTILIZATION - weights
        return max(0, int(free // self.shape.kv_bytes_per_position))


@dataclass(frozen=True)
class EngineConfig:
    """What the engine runs: its sequence limit, its weights' precision, the GPU's cap and, when
    locked, its SM clock ceiling."""

    max_num_seqs: int
    precision: str
    cap_watts: float
    locked_clock_mhz: float | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


# ---------------------------------------------------------------- step costs

# Batches and contexts at which gpusim is evaluated; others are interpolated linearly (the
# bytes a step reads are linear in both).
_CONTEXT_GRID: Final = (0, 512, 1024, 2048, 4096, 8192, 16384)


def _batch_grid(most: int) -> tuple[int, ...]:
    grid = {1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, most}
    return tuple(sorted(b for b in grid if b <= most))


@dataclass(frozen=True)
class StepCosts:
    """Decode seconds and watts per running batch (index = batch) at each context of the grid,
    and prefill seconds and watts per prompt token, under one cap and precision."""

    decode_seconds: tuple[tuple[float, ...], ...]  # [context index][batch]
    decode_watts: tuple[tuple[float, ...], ...]
    prefill_seconds_per_token: float
    prefill_watts: float
    idle_watts: float

    def decode(self, batch: int, context: float) -> tuple[float, float]:
        """(seconds, watts) of one decode step of `batch` sequences at mean `context` positions."""
        grid = _CONTEXT_GRID
        # Past the grid's last context the last stretch is extended (bytes grow linearly).
        i = len(grid) - 2 if context >= grid[-1] else max(0, bisect.bisect_right(grid, context) - 1)
        w = (context - grid[i]) / (grid[i + 1] - grid[i])
        s0, s1 = self.decode_seconds[i][batch], self.decode_seconds[i + 1][batch]
        p0, p1 = self.decode_watts[i][batch], self.decode_watts[i + 1][batch]
        return s0 + w * (s1 - s0), p0 + w * (p1 - p0)


def _interpolate(grid: Sequence[int], values: Sequence[float], most: int) -> tuple[float, ...]:
    out = [0.0]
    j = 0
    for b in range(1, most + 1):
        while j + 1 < len(grid) - 1 and grid[j + 1] < b:
            j += 1
        if len(grid) == 1:
            out.append(values[0])
            continue
        lo, hi = grid[j], grid[j + 1]
        out.append(values[j] + (b - lo) / (hi - lo) * (values[j + 1] - values[j]))
    return tuple(out)


@lru_cache(maxsize=512)
def step_costs(
    model: ServedModel,
    precision: str,
    cap_watts: float,
    most_batch: int,
    locked_clock_mhz: float | None = None,
) -> StepCosts:
    """Step costs of `model` at `precision` under `cap_watts` (and a locked SM clock ceiling, when
    given), for running batches up to `most_batch`."""
    grid = _batch_grid(most_batch)
    seconds, watts = [], []
    for context in _CONTEXT_GRID:
        profile = gpusim.llama_decode(context, cuda_graphs=model.cuda_graphs, shape=model.shape)
        points = [
            gpusim.operating_point(model.gpu, profile, b, precision, cap_watts, locked_clock_mhz)
            for b in grid
        ]
        seconds.append(_interpolate(grid, [p.step_seconds for p in points], most_batch))
        watts.append(_interpolate(grid, [p.power_watts for p in points], most_batch))
    prompt = max(1, round(model.prompts.mean))
    prefill = gpusim.operating_point(
        model.gpu, gpusim.llama_prefill(prompt, shape=model.shape), 1, precision, cap_watts, locked_clock_mhz
    )
    return StepCosts(
        decode_seconds=tuple(seconds),
        decode_watts=tuple(watts),
        prefill_seconds_per_token=prefill.step_seconds / prompt,
        prefill_watts=prefill.power_watts,
        idle_watts=model.gpu.idle_watts,
    )


# ---------------------------------------------------------------- the engine


@dataclass
class _Request:
    arrival: float
    prompt: int
    output: int
    prefilled: int = 0


@dataclass
class Counters:
    """Cumulative figures of an engine, the way its metrics endpoint reports them."""

    time: float = 0.0
    energy_joules: float = 0.0
    generation_tokens: int = 0
    prompt_tokens: int = 0
    arrived: int = 0
    finished: int = 0
    itl_fine: dict[int, float] = field(default_factory=dict)  # fine bin -> tokens
    ttft_fine: dict[int, float] = field(default_factory=dict)  # fine bin -> requests
    itl_sum: float = 0.0
    ttft_sum: float = 0.0
    in_system_seconds: float = 0.0  # integral of requests in flight over time (Little's law)
    sojourn_sum: float = 0.0  # time in system of finished requests


class ServingEngine:
    """One replica: a continuous-batching engine on one simulated GPU."""

    def __init__(self, model: ServedModel, config: EngineConfig, rng: random.Random) -> None:
        self.model = model
        self._rng = rng
        self.counters = Counters()
        self._waiting: deque[_Request] = deque()
        self._prefilling: deque[_Request] = deque()
        self._decoding: list[tuple[int, int, float]] = []  # heap of (last step, prompt+output, arrival)
        self._context_sum = 0  # positions held by decoding sequences
        self._kv_reserved = 0
        self._step = 0
        self._next_arrival = math.inf
        self._rate = 0.0
        self.reloading_until = 0.0
        self.config = config
        self._costs = self._costs_for(config)

    # ---- configuration

    def _costs_for(self, config: EngineConfig) -> StepCosts:
        if not self.model.gpu.supports(config.precision):
            raise ValueError(f"{self.model.gpu.name} cannot run precision {config.precision!r}")
        # Sequences admitted under a larger limit finish under the new one.
        most = max(config.max_num_seqs, self.running)
        return step_costs(self.model, config.precision, config.cap_watts, most, config.locked_clock_mhz)

    def configure(self, config: EngineConfig, reload_seconds: float = 0.0) -> None:
        """Apply a new configuration. A new precision reloads the weights: the engine serves
        nothing for `reload_seconds` (requests queue), then runs with the new one."""
        costs = self._costs_for(config)
        if config.precision != self.config.precision and reload_seconds > 0:
            self.reloading_until = self.counters.time + reload_seconds
        self.config, self._costs = config, costs

    def kv_capacity_tokens(self) -> int:
        return self.model.kv_capacity_tokens(self.config.precision)

    # ---- gauges

    @property
    def running(self) -> int:
        return len(self._decoding) + len(self._prefilling)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_usage(self) -> float:
        capacity = self.kv_capacity_tokens()
        return self._kv_reserved / capacity if capacity else 1.0

    # ---- running

    def run(self, seconds: float, arrival_rate: float) -> None:
        """Serve for `seconds` of simulated time while requests arrive at `arrival_rate` per second."""
        if not (
            math.isfinite(seconds) and seconds >= 0 and math.isfinite(arrival_rate) and arrival_rate >= 0
        ):
            raise ValueError("seconds and arrival rate must be finite and non-negative")
        c = self.counters
        end = c.time + seconds
        if arrival_rate != self._rate:
            # Memoryless: the next arrival at the new rate is drawn afresh from now.
            self._rate = arrival_rate
            self._next_arrival = c.time + self._gap()
        while c.time < end:
            self._arrive(c.time)
            if c.time < self.reloading_until:
                self._idle(min(end, self.reloading_until, self._next_arrival))
                continue
            self._admit()
            if not self._decoding and not self._prefilling:
                self._idle(min(end, self._next_arrival))
                continue
            self._engine_step()

    def _gap(self) -> float:
        return self._rng.expovariate(self._rate) if self._rate > 0 else math.inf

    def _arrive(self, now: float) -> None:
        while self._next_arrival <= now:
            m = self.model
            self._waiting.append(
                _Request(self._next_arrival, m.prompts.draw(self._rng), m.outputs.draw(self._rng))
            )
            self.counters.arrived += 1
            self._next_arrival += self._gap()

    def _idle(self, until: float) -> None:
        c = self.counters
        seconds = max(0.0, until - c.time)
        c.energy_joules += self._costs.idle_watts * seconds
        c.in_system_seconds += (self.running + self.waiting) * seconds
        c.time = max(c.time, until)

    def _admit(self) -> None:
        capacity = self.kv_capacity_tokens()
        limit = self.config.max_num_seqs
        while self._waiting and self.running < limit:
            r = self._waiting[0]
            need = r.prompt + r.output
            if self._kv_reserved + need > capacity and self.running > 0:
                break  # wait for room; an empty engine takes any request it can hold at all
            self._waiting.popleft()
            self._kv_reserved += need
            self._prefilling.append(r)

    def _engine_step(self) -> None:
        c, costs = self.counters, self._costs
        decoding = len(self._decoding)
        # Chunked prefill: what the step's token budget leaves after one token per decoding sequence.
        budget = max(0, self.model.max_batched_tokens - decoding)
        chunk = 0
        first_tokens: list[_Request] = []
        for r in self._prefilling:
            if budget <= 0:
                break
            take = min(budget, r.prompt - r.prefilled)
            r.prefilled += take
            chunk += take
            budget -= take
            if r.prefilled == r.prompt:
                first_tokens.append(r)
        seconds = joules = 0.0
        if decoding:
            decode_s, decode_w = costs.decode(decoding, self._context_sum / decoding)
            seconds, joules = decode_s, decode_s * decode_w
        if chunk:
            prefill_s = chunk * costs.prefill_seconds_per_token
            seconds += prefill_s
            joules += prefill_s * costs.prefill_watts
        in_flight = self.running + self.waiting
        c.time += seconds
        c.energy_joules += joules
        c.in_system_seconds += in_flight * seconds
        c.prompt_tokens += chunk
        self._step += 1
        step = self._step
        # Every decoding sequence emitted a token after `seconds`.
        if decoding:
            c.generation_tokens += decoding
            bin_ = fine_bin(seconds)
            c.itl_fine[bin_] = c.itl_fine.get(bin_, 0.0) + decoding
            c.itl_sum += seconds * decoding
            self._context_sum += decoding
        now = c.time
        for r in first_tokens:
            self._prefilling.remove(r)
            ttft = now - r.arrival
            bin_ = fine_bin(ttft)
            c.ttft_fine[bin_] = c.ttft_fine.get(bin_, 0.0) + 1.0
            c.ttft_sum += ttft
            c.generation_tokens += 1
            if r.output <= 1:
                self._finish(r.prompt + r.output, r.arrival)
            else:
                heapq.heappush(self._decoding, (step + r.output - 1, r.prompt + r.output, r.arrival))
                self._context_sum += r.prompt + 1
        while self._decoding and self._decoding[0][0] <= step:
            _, total, arrival = heapq.heappop(self._decoding)
            self._context_sum -= total
            self._finish(total, arrival)
        self._arrive(now)

    def _finish(self, total: int, arrival: float) -> None:
        c = self.counters
        self._kv_reserved -= total
        c.finished += 1
        c.sojourn_sum += c.time - arrival


# ---------------------------------------------------------------- what a scraper sees


def _cumulative(fine: dict[int, float], bounds: Sequence[float]) -> list[tuple[float, float]]:
    items = sorted(fine.items())
    out, total, j = [], 0.0, 0
    for bound in bounds:
        while j < len(items) and fine_upper(items[j][0]) <= bound * (1 + 1e-9):
            total += items[j][1]
            j += 1
        out.append((bound, total))
    out.append((math.inf, sum(fine.values())))
    return out


def exposition(engine: ServingEngine, model_name: str = "llama-3-8b") -> str:
    """The engine's metrics in Prometheus text format under vLLM's names (v1 engine metrics:
    generation/prompt token and finished-request counters, ITL and TTFT histograms, running,
    waiting and KV-cache gauges)."""
    c = engine.counters
    label = f'model_name="{model_name}"'
    lines = [
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{label}}} {c.generation_tokens}",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{label}}} {c.prompt_tokens}",
        "# TYPE vllm:request_success_total counter",
        f'vllm:request_success_total{{{label},finished_reason="stop"}} {c.finished}',
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{label}}} {engine.running}",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{label}}} {engine.waiting}",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{label}}} {engine.kv_usage:.6f}",
    ]
    for name, fine, total, bounds in (
        ("vllm:inter_token_latency_seconds", c.itl_fine, c.itl_sum, ITL_BUCKETS),
        ("vllm:time_to_first_token_seconds", c.ttft_fine, c.ttft_sum, TTFT_BUCKETS),
    ):
        lines.append(f"# TYPE {name} histogram")
        for bound, count in _cumulative(fine, bounds):
            le = "+Inf" if math.isinf(bound) else repr(bound)
            lines.append(f'{name}_bucket{{{label},le="{le}"}} {count:g}')
        lines.append(f"{name}_sum{{{label}}} {total!r}")
        lines.append(f"{name}_count{{{label}}} {sum(fine.values()):g}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- load


def diurnal_rate(
    t_seconds: float, peak: float, trough_fraction: float = 0.2, peak_hour: float = 15.0
) -> float:
    """A day's offered load: `peak` at `peak_hour`, `trough_fraction` of it twelve hours away,
    a cosine in between (the shape of interactive traffic, lowest at night)."""
    if not (peak >= 0 and 0 <= trough_fraction <= 1):
        raise ValueError("peak must be >= 0 and trough_fraction in [0, 1]")
    phase = 2.0 * math.pi * (t_seconds / 3600.0 - peak_hour) / 24.0
    return peak * (trough_fraction + (1.0 - trough_fraction) * 0.5 * (1.0 + math.cos(phase)))
