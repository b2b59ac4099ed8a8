"""`edpilot demo` leaves nothing running when a signal ends it: a closed terminal (SIGHUP) or a CI
timeout (SIGTERM) tears down the control plane, the operator and the agents, as Ctrl-C does."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
NODES = 1

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


def processes_of(cluster_dir: Path) -> dict[int, list[str]]:
    """pid -> argv of every process whose command line names the cluster's directory: the
    control plane's state, logs and kubeconfig, the operator's and agents' kubeconfig."""
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone meanwhile
            continue
        if any(str(cluster_dir) in arg for arg in argv):
            found[int(entry.name)] = argv
    return found


def role(argv: list[str]) -> str:
    """What a process is: a control-plane binary, or the edpilot subcommand it runs."""
    if "edpilot.cli" in argv:
        return argv[argv.index("edpilot.cli") + 1]
    return Path(argv[0]).name


def wait_for_output(demo: subprocess.Popen[bytes], out: Path, text: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while text not in out.read_text(errors="replace"):
        assert demo.poll() is None, f"the demo exited early:\n{out.read_text(errors='replace')[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {seconds} s:\n{out.read_text()[-4000:]}"
        time.sleep(0.5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_that_ends_the_demo_tears_everything_down(sig: signal.Signals, tmp_path: Path) -> None:
    cluster_dir = tmp_path / "demo"
    out = tmp_path / "demo.out"
    with out.open("wb") as sink:
        demo = subprocess.Popen(
            [sys.executable, "-m", "edpilot.cli", "demo", f"--nodes={NODES}", f"--cluster-dir={cluster_dir}"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # the signal reaches the demo alone, as from a supervisor
        )
    try:
        wait_for_output(demo, out, "simulated agents running", seconds=240)
        running = {pid: argv for pid, argv in processes_of(cluster_dir).items() if pid != demo.pid}
        roles = collections.Counter(role(argv) for argv in running.values())
        del roles["kubectl"]  # the demo's own short-lived reads
        assert roles == collections.Counter(
            {**dict.fromkeys(CONTROL_PLANE, 1), "operator": 1, "agent": NODES}
        )

        demo.send_signal(sig)
        code = demo.wait(timeout=120)
        left = processes_of(cluster_dir)
        assert not left, f"left running after {sig.name}: {[' '.join(argv) for argv in left.values()]}"
        assert "tearing down" in out.read_text()
        assert code == 128 + sig, out.read_text()[-4000:]  # the shell's convention for "ended by sig"
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        # Whatever a failed run left behind must not outlive the test.
        env = {**os.environ, "CLUSTER_DIR": str(cluster_dir)}
        subprocess.run([str(REPO / "hack" / "cluster-down.sh")], env=env, capture_output=True, check=False)
        for pid in processes_of(cluster_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
