"""The operator and the agent stop promptly on SIGTERM, as a rollout or scale-down sends it.

Kubernetes waits `terminationGracePeriodSeconds` (30 s by default) and then SIGKILLs: a process
that never exits on its own holds every rollout for that long, and is killed mid-write (the agent
while it restores default power limits).
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from edpilot_operator.localrun import Processes, agent_argv, operator_argv, wait_until
from kubetest import Cluster

EXIT_SECONDS = 10.0


@pytest.mark.parametrize(
    ("component", "started"),
    [("operator", "Initial authentication has finished"), ("agent", "agent for node")],
)
def test_exits_cleanly_within_seconds_of_sigterm(
    component: str, started: str, crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    procs = Processes(logs=tmp_path_factory.mktemp("exit-logs"))
    log = procs.logs / f"{component}.log"
    kubeconfig = crds_installed.kubeconfig
    argv = operator_argv(kubeconfig) if component == "operator" else agent_argv(kubeconfig, "gpu-node-2", 1)
    proc = procs.start(component, argv)
    try:
        wait_until(f"the {component} to start", lambda: started in log.read_text(errors="replace"), 60, 0.5)
        time.sleep(3)  # its watches up
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the {component} was still running {EXIT_SECONDS:.0f} s after SIGTERM")
        print(f"exited with {code} {time.monotonic() - sent:.1f} s after SIGTERM")
        assert code == 0
    finally:
        procs.stop_all()
