"""Shared fixtures. `cluster` is a real control plane (hack/cluster-up.sh), one per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from images_common import TAG, Podman
from kubetest import CRDS, REPO, Cluster, tool_dir


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.k8s)
    # The image tests (tests/images) build the images first, and the Prometheus tests
    # (tests/prometheus) need Debian's prometheus: each kind runs only when a marker expression
    # names it (`make test-images` runs `-m images`, `make test-prometheus` `-m prometheus`), never
    # in a plain `pytest`.
    markexpr = config.getoption("markexpr") or ""
    for marker in ("images", "prometheus"):
        if marker in markexpr:
            continue
        skipped = [item for item in items if item.get_closest_marker(marker)]
        if skipped:
            config.hook.pytest_deselected(items=skipped)
            items[:] = [item for item in items if not item.get_closest_marker(marker)]


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


@pytest.fixture(scope="session")
def podman() -> Podman:
    """For the image tests (tests/images): builds both images with hack/build-images.sh (its cache makes a second build quick) and
    returns podman on the build's own container storage."""
    proc = subprocess.run(
        [str(REPO / "hack" / "build-images.sh")],
        env={**os.environ, "IMAGE_TAG": TAG},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"hack/build-images.sh exited {proc.returncode}:\n{proc.stderr[-6000:]}")
    cache = Path(proc.stdout.strip().splitlines()[-1])
    env = {
        **os.environ,
        "CONTAINERS_STORAGE_CONF": str(cache / "storage.conf"),
        "CONTAINERS_CONF": str(cache / "containers.conf"),
    }
    return Podman(env)
