"""What the image tests share: the images' names, and podman on the build's own container storage
(the `podman` fixture in conftest.py builds both images first)."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TAG = "edpilot-test"
OPERATOR = f"localhost/edpilot/edpilot:{TAG}"
AGENT = f"localhost/edpilot/edpilot-agent:{TAG}"


@dataclass(frozen=True)
class Podman:
    env: dict[str, str]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            pytest.fail(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        return proc

    def run(self, image: str, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
        """`podman run` as the chart's securityContexts ask (SECURITY), with no network."""
        flags = ["--rm", *SECURITY, "--network=none"]
        if entrypoint is not None:
            flags.append(f"--entrypoint={entrypoint}")
        return self("run", *flags, image, *args, check=False)

    def start(
        self, name: str, image: str, args: Sequence[str], env: Mapping[str, str], secrets: Path
    ) -> None:
        """A detached container run as the chart's pods run: SECURITY, a writable /tmp (the chart's
        emptyDir), and a ServiceAccount's files where the kubelet mounts them. It shares the host's
        network, where the local control plane listens on loopback."""
        flags = [*SECURITY, "--network=host", "--tmpfs=/tmp:rw,size=64m,mode=1777"]
        flags.append(f"--volume={secrets}:{SERVICE_ACCOUNT_DIR}:ro")
        flags += [f"--env={key}={value}" for key, value in env.items()]
        self("run", "--detach", f"--name={name}", *flags, image, *args)


# The chart's securityContexts as podman flags: the image's USER (no --user), readOnlyRootFilesystem
# with no tmpfs podman would add on its own, capabilities dropped, allowPrivilegeEscalation false.
SECURITY = ("--read-only", "--read-only-tmpfs=false", "--cap-drop=all", "--security-opt=no-new-privileges")
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
