"""The image tests' fixture: both images built once per session."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from images_common import REPO, TAG, Podman


@pytest.fixture(scope="session")
def podman() -> Podman:
    """Builds both images with hack/build-images.sh (its cache makes a second build quick) and
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
