"""`edpilot demo`: a local control plane with KWOK GPU nodes, the CRDs, the operator and one
simulated agent per node, sample workloads and policies; shows the policies converging."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from .localrun import Processes, agent_argv, get_json, kubectl, operator_argv, repo_root

NAMESPACE = "edpilot-demo"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="edpilot demo", description=__doc__)
    p.add_argument("--nodes", type=int, default=2, help="KWOK GPU nodes")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--timeout", type=float, default=900, help="give up waiting for convergence after this")
    p.add_argument(
        "--exit", action="store_true", help="tear down once converged instead of waiting for Ctrl-C"
    )
    p.add_argument(
        "--manifests", type=Path, default=None, help="workloads and policies (default: deploy/demo)"
    )
    p.add_argument(
        "--cluster-dir",
        type=Path,
        default=None,
        help="the control plane's state, logs and kubeconfig (default: .cluster/demo in the checkout)",
    )
    return p.parse_args(argv)


class Ended(BaseException):
    """A signal that ends the demo arrived. Like KeyboardInterrupt it is no `Exception`, so nothing
    on the way swallows it, and the teardown in `main`'s `finally` runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Besides Ctrl-C (SIGINT, raised as KeyboardInterrupt): a closed terminal (SIGHUP), Ctrl-\ (SIGQUIT)
# and a supervisor or CI timeout (SIGTERM). Their default would end the demo without a teardown and
# leave the control plane, the operator and the agents running. SIGKILL cannot be caught; the
# next demo's first `cluster-down.sh` stops what it left (every process has a pid file).
ENDING_SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM)


def _raise_ended(signum: int, _frame: FrameType | None) -> None:
    raise Ended(signum)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    root = repo_root()
    cluster_dir = (args.cluster_dir or root / ".cluster" / "demo").resolve()
    env = {**os.environ, "CLUSTER_DIR": str(cluster_dir), "NODES": str(args.nodes), "GPUS": str(args.gpus)}
    procs = Processes(logs=cluster_dir / "logs", pids=cluster_dir / "pids")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *ENDING_SIGNALS)}
    for sig in ENDING_SIGNALS:
        signal.signal(sig, _raise_ended)
    try:
        return run(args, root, cluster_dir, env, procs)
    except KeyboardInterrupt:
        return 0
    except Ended as ended:
        return 128 + ended.signum  # the shell's convention for "ended by this signal"
    finally:
        # A second signal (an impatient Ctrl-C) must not cut the teardown short.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        _say("\ntearing down...")
        procs.stop_all()
        # The logs stay for a post-mortem; the next demo or `make cluster-down` removes them.
        subprocess.run([str(root / "hack" / "cluster-down.sh"), "--keep-logs"], env=env, check=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(
    args: argparse.Namespace, root: Path, cluster_dir: Path, env: dict[str, str], procs: Processes
) -> int:
    """The demo from start to end; `main` tears down whatever this started, however it ends."""
    # A demo that could not tear down (SIGKILL) left processes with pid files: stop them first.
    subprocess.run([str(root / "hack" / "cluster-down.sh")], env=env, check=False)
    print("starting the local control plane (etcd, kube-apiserver, scheduler, controller-manager, KWOK)...")
    up = subprocess.run([str(root / "hack" / "cluster-up.sh")], env=env, text=True, capture_output=True)
    if up.returncode != 0:
        print(up.stderr, file=sys.stderr)
        return 1
    print(up.stderr.strip().splitlines()[-1])
    bin_dir = Path(
        subprocess.run(
            [str(root / "hack" / "build-tools.sh")], capture_output=True, text=True, check=True
        ).stdout.split()[-1]
    )
    kubeconfig = cluster_dir / "kubeconfig"
    kubectl(bin_dir, kubeconfig, "apply", "--server-side", "-f", str(root / "crds"))
    kubectl(bin_dir, kubeconfig, "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    procs.start("operator", operator_argv(kubeconfig))
    for i in range(args.nodes):
        procs.start(f"agent-gpu-node-{i}", agent_argv(kubeconfig, f"gpu-node-{i}", seed=i))
    manifests = args.manifests or root / "deploy" / "demo"
    kubectl(bin_dir, kubeconfig, "apply", "-f", str(manifests))
    print(f"operator and {args.nodes} simulated agents running; logs in {procs.logs}")
    print(f"watch it yourself: export KUBECONFIG={kubeconfig}; make kubectl ARGS='get epol -A'\n")
    converged = watch(bin_dir, kubeconfig, procs, args.timeout)
    print_table(get_json(bin_dir, kubeconfig, "energypolicies", "-n", NAMESPACE)["items"])
    if not converged:
        print("not every workload converged in time; see the logs above", file=sys.stderr)
    if not args.exit:
        print("\nrunning; press Ctrl-C to tear everything down")
        while not procs.dead():
            time.sleep(1)
        print(f"a process exited: {procs.dead()}", file=sys.stderr)
        return 1
    return 0 if converged else 1


def _say(text: str) -> None:
    """Print, unless the terminal is gone (after SIGHUP): that must not stop the teardown."""
    with contextlib.suppress(OSError):
        print(text, flush=True)


def watch(bin_dir: Path, kubeconfig: Path, procs: Processes, timeout: float) -> bool:
    """Print progress until every workload of the demo's policies converged."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if procs.dead():
            print(f"stopped early: {', '.join(procs.dead())} exited (see {procs.logs})", file=sys.stderr)
            return False
        items = get_json(bin_dir, kubeconfig, "energypolicies", "-n", NAMESPACE)["items"]
        rows = [row for item in items for row in (item.get("status") or {}).get("workloads") or []]
        line = "  ".join(
            f"{row['name']}: {row.get('phase', '?')} ({row.get('probes', 0)} probes)" for row in rows
        )
        if line != last:
            print(time.strftime("%H:%M:%S"), line or "waiting for the first reports...", flush=True)
            last = line
        if rows and all(row.get("phase") == "Converged" for row in rows):
            return True
        time.sleep(2)
    return False


def print_table(items: list[dict[str, Any]]) -> None:
    header = (
        "policy",
        "workload",
        "phase",
        "cap W",
        "batch",
        "prec",
        "J/unit base",
        "J/unit now",
        "EDP -%",
        "slow %",
        "probes",
    )
    lines = [header]
    for item in items:
        for row in (item.get("status") or {}).get("workloads") or []:
            base, cur = row.get("baseline") or {}, row.get("current") or {}
            lines.append(
                (
                    item["metadata"]["name"],
                    row["name"],
                    row.get("phase", ""),
                    _num(row.get("powerCapWatts"), "{:.0f}"),
                    str(row.get("batchSize") or "-"),
                    str(row.get("quantization") or "-"),
                    _num(base.get("joulesPerUnit"), "{:.4g}"),
                    _num(cur.get("joulesPerUnit"), "{:.4g}"),
                    _num(row.get("edpReductionPercent"), "{:.1f}"),
                    _num(row.get("slowdownPercent"), "{:.1f}"),
                    str(row.get("probes", 0)),
                )
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


def _num(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, int | float) else "-"
