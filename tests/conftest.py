"""Shared fixtures. `cluster` is a real control plane (hack/cluster-up.sh), one per test session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO / "crds"


@dataclass(frozen=True)
class Cluster:
    """A running local control plane and the pinned binaries that drive it."""

    dir: Path
    kubeconfig: Path
    bin: Path

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bin / "helm"), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc


def tool_dir() -> Path:
    proc = subprocess.run([str(REPO / "hack" / "build-tools.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"building the control-plane binaries failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.k8s)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The real control plane. It fails (never skips) when it cannot start, unless a developer
    explicitly asked for no cluster with EDPILOT_NO_CLUSTER=1 outside CI."""
    if os.environ.get("EDPILOT_NO_CLUSTER") == "1" and os.environ.get("CI") != "true":
        pytest.skip("EDPILOT_NO_CLUSTER=1: the developer asked to run without a control plane")
    state = Path(tempfile.mkdtemp(prefix="edpilot-cluster-"))
    env = {**os.environ, "CLUSTER_DIR": str(state), "NODES": os.environ.get("TEST_NODES", "3"), "GPUS": "8"}
    proc = subprocess.run([str(REPO / "hack" / "cluster-up.sh")], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"the local control plane did not start:\n{proc.stderr[-6000:]}")
    try:
        yield Cluster(dir=state, kubeconfig=state / "kubeconfig", bin=tool_dir())
    finally:
        subprocess.run([str(REPO / "hack" / "cluster-down.sh")], env=env, capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def crds_installed(cluster: Cluster) -> Cluster:
    """The edpilot CRDs applied and established."""
    cluster.kubectl("apply", "--server-side", "-f", str(CRDS))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    return cluster
