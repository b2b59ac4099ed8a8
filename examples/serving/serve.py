"""An LLM-serving loop that edpilot can steer: it follows the batch-size (the most sequences decoded
per step) and quantization hints on its pod, and exposes the tokens it generated, the time per
output token and the configuration it runs.

The loop, the hint handling and the metrics come from `edpilot.workload`; the "model" is a tiny
stack of matrices decoded with numpy (one token per sequence per step), with weights held in
bf16-like float16 or quantized to int8 with a per-column scale. A real server (vLLM, TGI, ...)
takes the place of `Decoder` and applies a new batch limit or reloads its weights quantized.

    python examples/serving/serve.py --annotations /etc/podinfo/annotations --metrics-port 9400
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from edpilot.models import Profile
from edpilot.workload import DEFAULT_ANNOTATIONS_PATH, Workload

# Relative accuracy per profile, from the owner's evaluation of the model (e.g. MMLU against bf16).
ACCURACY = {"bf16": 1.0, "int8": 0.992}
HIDDEN = 256
LAYERS = 4


class Decoder:
    """A stack of `LAYERS` HIDDEN x HIDDEN matrices; a step maps each sequence's state to the next."""

    def __init__(self, quantization: Profile, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        weights = [
            rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / np.sqrt(HIDDEN) for _ in range(LAYERS)
        ]
        self.quantization = quantization
        if quantization == "int8":
            self.scales = [np.abs(w).max(axis=0) / 127 for w in weights]
            self.weights: list[Any] = [
                np.round(w / s).astype(np.int8) for w, s in zip(weights, self.scales, strict=True)
            ]
        else:
            self.scales = [np.ones(HIDDEN, dtype=np.float32)] * LAYERS
            self.weights = [w.astype(np.float16) for w in weights]

    def step(self, state: Any) -> Any:
        for w, scale in zip(self.weights, self.scales, strict=True):
            state = np.tanh((state @ w.astype(np.float32)) * scale)
        return state


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=0, help="stop after this many decode steps; 0 serves forever")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step until edpilot hints another")
    p.add_argument("--quantization", choices=sorted(ACCURACY), default="bf16", help="weights until hinted")
    p.add_argument(
        "--annotations", default=str(DEFAULT_ANNOTATIONS_PATH), help="downward-API annotations file"
    )
    p.add_argument("--metrics-port", type=int, default=9400, help="port of /metrics (0: any free port)")
    p.add_argument(
        "--poll-interval", type=float, default=1.0, help="seconds between reads of the annotations"
    )
    p.add_argument("--pace", type=float, default=0.0, help="sleep this long per step (demos and CI)")
    args = p.parse_args(argv)

    workload = Workload(
        work_metric="generated_tokens",
        unit="tokens",
        batch_size=args.batch_size,
        quantization=args.quantization,
        accuracy=ACCURACY,
        batch_range=(1, 1024),
        latency_metric="time_per_output_token_seconds",
        annotations_path=args.annotations,
        poll_interval=args.poll_interval,
    )
    port = workload.serve(args.metrics_port)
    print(f"serving; metrics on port {port}", flush=True)
    batch, quantization = args.batch_size, args.quantization
    decoder = Decoder(quantization)
    rng = np.random.default_rng(1)
    state = rng.standard_normal((batch, HIDDEN)).astype(np.float32)
    step = 0
    while args.steps == 0 or step < args.steps:
        change = workload.poll()
        if change is not None:
            if change.quantization is not None and change.quantization != quantization:
                quantization = change.quantization
                decoder = Decoder(quantization)  # a real server reloads its weights here
            if change.batch_size is not None and change.batch_size != batch:
                batch = change.batch_size
                state = rng.standard_normal((batch, HIDDEN)).astype(np.float32)
            workload.running(batch, quantization)
            print(f"step {step}: now batch size {batch}, quantization {quantization}", flush=True)
        started = time.perf_counter()
        state = decoder.step(state)
        workload.observe_latency(time.perf_counter() - started)
        workload.add_work(batch)  # one token per sequence
        step += 1
        if args.pace > 0:
            time.sleep(args.pace)
    print(f"done: {step} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
