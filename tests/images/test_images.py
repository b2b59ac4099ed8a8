"""The images `make images` builds, run under a real container runtime (podman with runc) the way
the chart runs them: as the image's own non-root user, read-only root filesystem, no capabilities,
no privilege escalation, no network. Each image's entrypoint must answer `--version` and the
`--help` of the commands the chart runs from it.

Not part of `make test` (a cold build downloads a Debian base and every wheel): `make test-images`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TAG = "edpilot-test"
OPERATOR = f"localhost/edpilot/edpilot:{TAG}"
AGENT = f"localhost/edpilot/edpilot-agent:{TAG}"
# What the chart's Deployments and DaemonSet run from each image (charts/edpilot/templates).
COMMANDS = {OPERATOR: ["operator", "extender"], AGENT: ["agent", "agent-setter"]}

# A cold build makes the Debian base and downloads every locked wheel; a warm one takes seconds.
pytestmark = [pytest.mark.images, pytest.mark.timeout(3600)]


@dataclass(frozen=True)
class Podman:
    env: dict[str, str]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            pytest.fail(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        return proc

    def run(self, image: str, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
        """`podman run` as the chart's securityContexts ask: the image's USER (no --user),
        readOnlyRootFilesystem with no tmpfs podman would add on its own, capabilities dropped,
        allowPrivilegeEscalation false; and no network."""
        flags = ["--rm", "--read-only", "--read-only-tmpfs=false", "--cap-drop=all"]
        flags += ["--security-opt=no-new-privileges", "--network=none"]
        if entrypoint is not None:
            flags.append(f"--entrypoint={entrypoint}")
        return self("run", *flags, image, *args, check=False)


@pytest.fixture(scope="module")
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


def version() -> str:
    match = re.search(r'^__version__ = "([^"]+)"', (REPO / "edpilot" / "__init__.py").read_text(), re.M)
    assert match
    return match.group(1)


def test_the_runtime_is_runc(podman: Podman) -> None:
    info = json.loads(podman("info", "--format=json").stdout)
    assert info["host"]["ociRuntime"]["name"] == "runc"


@pytest.mark.parametrize("image", [OPERATOR, AGENT])
def test_image_runs_as_its_numeric_non_root_user(podman: Podman, image: str) -> None:
    (config,) = json.loads(podman("image", "inspect", image).stdout)
    user = config["Config"]["User"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"{image}: USER {user!r} is not numeric and non-root"
    assert config["Config"]["Entrypoint"] == ["edpilot"]
    # Inside: that user, and a root filesystem nothing can write to (not even the venv it owns).
    probe = (
        "import os, sys\n"
        "print(f'{os.getuid()}:{os.getgid()}')\n"
        "for path in ('/opt/edpilot/probe', '/tmp/probe', '/probe'):\n"
        "    try:\n"
        "        open(path, 'w').close()\n"
        "    except OSError as err:\n"
        "        print(path, err.strerror)\n"
        "    else:\n"
        "        print(path, 'written')\n"
    )
    proc = podman.run(image, "-c", probe, entrypoint="python3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == user
    assert lines[1:] == [f"{p} Read-only file system" for p in ("/opt/edpilot/probe", "/tmp/probe", "/probe")]


@pytest.mark.parametrize("image", [OPERATOR, AGENT])
def test_entrypoint_prints_the_version(podman: Podman, image: str) -> None:
    proc = podman.run(image, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == version()


@pytest.mark.parametrize("image", [OPERATOR, AGENT])
def test_entrypoint_help_lists_the_commands(podman: Podman, image: str) -> None:
    proc = podman.run(image, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: edpilot <command>")
    listed = re.findall(r"^  (\S+)\s", proc.stdout, re.M)
    assert set(COMMANDS[image]) <= set(listed), listed


@pytest.mark.parametrize(("image", "command"), [(i, c) for i, cs in COMMANDS.items() for c in cs])
def test_the_charts_commands_load_in_the_image(podman: Podman, image: str, command: str) -> None:
    """`<command> --help` imports the command's module and its dependencies (kopf, the Kubernetes
    client, pynvml, grpc) from the image's venv: a dependency the lock missed fails here."""
    proc = podman.run(image, command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: edpilot {command} "), proc.stdout[:200]
    assert not proc.stderr, proc.stderr
