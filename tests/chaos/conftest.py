"""A control plane of the chaos suite's own: its faults (killed API server, etcd) must never reach
the session cluster the other suites share."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubetest import CRDS, REPO, Cluster, tool_dir


@pytest.fixture(scope="module")
def chaos_cluster() -> Iterator[Cluster]:
    if os.environ.get("EDPILOT_NO_CLUSTER") == "1" and os.environ.get("CI") != "true":
        pytest.skip("EDPILOT_NO_CLUSTER=1: the developer asked to run without a control plane")
    state = Path(tempfile.mkdtemp(prefix="edpilot-chaos-"))
    env = {**os.environ, "CLUSTER_DIR": str(state), "NODES": "2", "GPUS": "8"}
    proc = subprocess.run([str(REPO / "hack" / "cluster-up.sh")], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"the chaos control plane did not start:\n{proc.stderr[-6000:]}")
    cluster = Cluster(dir=state, kubeconfig=state / "kubeconfig", bin=tool_dir())
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(CRDS))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        yield cluster
    finally:
        subprocess.run([str(REPO / "hack" / "cluster-down.sh")], env=env, capture_output=True)
        shutil.rmtree(state, ignore_errors=True)
