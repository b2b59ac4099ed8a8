"""Run edpilot's processes against a local control plane: the demo and the end-to-end tests share
this, so what the tests prove is what the demo shows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fast loop settings for a demo or a test: short windows, frequent reports, simulated time at
# 20x so an exploration takes a few minutes instead of an hour.
FAST_OPERATOR_ARGS = (
    "--reconcile-interval=1",
    "--report-interval=1",
    "--fast-report-interval=1",
    "--slow-report-interval=5",
    "--lease-seconds=15",
    "--window-seconds=5",
    "--baseline-windows=3",
    "--probe-windows=2",
    "--apply-timeout=30",
    "--metrics-port=0",  # several operators may share one machine in tests
)
FAST_AGENT_ARGS = (
    "--backend=sim",
    "--sim-speed=20",
    "--tick=0.5",
    "--min-interval=1",
    "--default-interval=5",
)


def repo_root() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "hack" / "cluster-up.sh").exists():
            return parent
    raise RuntimeError("edpilot demo runs from a checkout of the edpilot repository (hack/ not found)")


@dataclass
class Processes:
    """Child processes started here, stopped together (SIGTERM, then SIGKILL). With `pids`, each
    one's pid is also written there as <name>.pid, where hack/cluster-down.sh stops it should this
    process die without stopping its children."""

    logs: Path
    pids: Path | None = None
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.children[name] = proc
        if self.pids is not None:
            self.pids.mkdir(parents=True, exist_ok=True)
            (self.pids / f"{name}.pid").write_text(f"{proc.pid}\n")
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        proc = self.children.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.pids is not None:
            # Its pid may be reused from now on: cluster-down.sh must not signal it.
            (self.pids / f"{name}.pid").unlink(missing_ok=True)

    def stop_all(self) -> None:
        for name in list(self.children):
            self.stop(name)

    def dead(self) -> list[str]:
        return [name for name, proc in self.children.items() if proc.poll() is not None]


def edpilot_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "edpilot.cli", *args]


def operator_argv(kubeconfig: Path, *extra: str) -> list[str]:
    return edpilot_argv("operator", f"--kubeconfig={kubeconfig}", *FAST_OPERATOR_ARGS, *extra)


def agent_argv(kubeconfig: Path, node: str, seed: int, *extra: str) -> list[str]:
    return edpilot_argv(
        "agent", f"--kubeconfig={kubeconfig}", f"--node-name={node}", f"--seed={seed}", "--metrics-port=0",
        *FAST_AGENT_ARGS, *extra,
    )  # fmt: skip


def kubectl(bin_dir: Path, kubeconfig: Path, *args: str, input: str | None = None) -> str:
    proc = subprocess.run(
        [str(bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def get_json(bin_dir: Path, kubeconfig: Path, *args: str) -> Any:
    return json.loads(kubectl(bin_dir, kubeconfig, "get", *args, "-o", "json"))


def wait_until(what: str, predicate: Any, timeout: float, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
