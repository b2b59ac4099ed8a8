"""A training loop that edpilot can steer: it follows the batch-size and precision hints on its pod
and exposes the samples it trained and the configuration it runs.

The loop, the hint handling and the metrics come from `edpilot.workload`; only `make_model` is
framework-specific. With `--framework torch` (the default when PyTorch is importable) it trains a
small MLP with PyTorch, on the GPU when there is one, in bf16 autocast when asked; with
`--framework numpy` the same loop trains a tiny numpy MLP on the CPU (what CI runs).

    python examples/training/train.py --annotations /etc/podinfo/annotations --metrics-port 9400
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from typing import Any, Protocol

import numpy as np

from edpilot.models import Profile
from edpilot.workload import DEFAULT_ANNOTATIONS_PATH, Workload

# Relative accuracy of the trained model per precision, from the owner's own evaluation; edpilot
# never picks a precision that loses more than the policy's maxAccuracyDropPercent.
ACCURACY = {"fp32": 1.0, "bf16": 0.998}
FEATURES = 64


class Trainer(Protocol):
    def step(self, batch_size: int) -> float:
        """One optimisation step on `batch_size` samples; returns the loss."""
        ...


class NumpyTrainer:
    """A two-layer MLP fitting a fixed random linear target; bf16 is emulated with float16 (numpy
    has no bfloat16), which is what changes the arithmetic, not what makes it faster."""

    def __init__(self, precision: Profile, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype: Any = np.float16 if precision in ("bf16", "fp16") else np.float32
        self.target = self.rng.standard_normal((FEATURES, 1)).astype(np.float32)
        self.w1 = (self.rng.standard_normal((FEATURES, 128)) * 0.1).astype(np.float32)
        self.w2 = (self.rng.standard_normal((128, 1)) * 0.1).astype(np.float32)

    def step(self, batch_size: int) -> float:
        x = self.rng.standard_normal((batch_size, FEATURES)).astype(np.float32)
        y = x @ self.target
        xd: Any = x.astype(self.dtype)
        w1: Any = self.w1.astype(self.dtype)
        w2: Any = self.w2.astype(self.dtype)
        hidden = np.maximum(xd @ w1, 0)
        error = (hidden @ w2).astype(np.float32) - y
        grad_w2 = hidden.astype(np.float32).T @ error / batch_size
        grad_hidden = (error @ self.w2.T) * (hidden > 0)
        grad_w1 = x.T @ grad_hidden / batch_size
        self.w1 -= 0.01 * grad_w1
        self.w2 -= 0.01 * grad_w2
        return float((error**2).mean())


class TorchTrainer:
    """The same MLP with PyTorch; bf16 runs under autocast, fp32 without."""

    def __init__(self, precision: Profile, seed: int = 0) -> None:
        torch: Any = importlib.import_module("torch")
        self.torch = torch
        torch.manual_seed(seed)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.autocast = precision == "bf16"
        self.target = torch.randn(FEATURES, 1, device=self.device)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1)
        ).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)

    def step(self, batch_size: int) -> float:
        torch = self.torch
        x = torch.randn(batch_size, FEATURES, device=self.device)
        y = x @ self.target
        with torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=self.autocast):
            loss = torch.nn.functional.mse_loss(self.model(x).float(), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.item())


def make_trainer(framework: str, precision: Profile) -> Trainer:
    return TorchTrainer(precision) if framework == "torch" else NumpyTrainer(precision)


def default_framework() -> str:
    return "torch" if importlib.util.find_spec("torch") is not None else "numpy"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--framework", choices=["torch", "numpy"], default=None, help="default: torch if importable"
    )
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps; 0 trains forever")
    p.add_argument("--batch-size", type=int, default=32, help="batch size until edpilot hints another")
    p.add_argument("--precision", choices=sorted(ACCURACY), default="fp32", help="precision until hinted")
    p.add_argument(
        "--annotations", default=str(DEFAULT_ANNOTATIONS_PATH), help="downward-API annotations file"
    )
    p.add_argument("--metrics-port", type=int, default=9400, help="port of /metrics (0: any free port)")
    p.add_argument(
        "--poll-interval", type=float, default=1.0, help="seconds between reads of the annotations"
    )
    p.add_argument("--pace", type=float, default=0.0, help="sleep this long per step (demos and CI)")
    args = p.parse_args(argv)
    framework = args.framework or default_framework()

    workload = Workload(
        work_metric="train_samples",
        unit="samples",
        batch_size=args.batch_size,
        quantization=args.precision,
        accuracy=ACCURACY,
        annotations_path=args.annotations,
        poll_interval=args.poll_interval,
    )
    port = workload.serve(args.metrics_port)
    print(f"training with {framework}; metrics on port {port}", flush=True)
    batch, precision = args.batch_size, args.precision
    trainer = make_trainer(framework, precision)
    step, loss = 0, float("nan")
    while args.steps == 0 or step < args.steps:
        change = workload.poll()
        if change is not None:
            batch = change.batch_size or batch
            if change.quantization is not None and change.quantization != precision:
                precision = change.quantization
                trainer = make_trainer(framework, precision)  # a real job would keep its weights
            workload.running(batch, precision)
            print(f"step {step}: now batch size {batch}, precision {precision}", flush=True)
        loss = trainer.step(batch)
        workload.add_work(batch)
        step += 1
        if step % 100 == 0:
            print(f"step {step}: loss {loss:.4f}", flush=True)
        if args.pace > 0:
            time.sleep(args.pace)
    print(f"done: {step} steps, loss {loss:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
