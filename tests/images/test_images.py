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
from pathlib import Path

import pytest
from images_common import AGENT, OPERATOR, REPO, Podman

# What the chart's Deployments and DaemonSet run from each image (charts/edpilot/templates).
COMMANDS = {OPERATOR: ["operator", "extender"], AGENT: ["agent", "agent-setter"]}

# A cold build makes the Debian base and downloads every locked wheel; a warm one takes seconds.
pytestmark = [pytest.mark.images, pytest.mark.timeout(3600)]


# Prints the process's uid:gid, then what writing a file in the venv, /tmp and / gives.
PROBE = """
import os
print(f"{os.getuid()}:{os.getgid()}")
for path in ("/opt/edpilot/probe", "/tmp/probe", "/probe"):
    try:
        open(path, "w").close()
    except OSError as err:
        print(path, err.strerror)
    else:
        print(path, "written")
"""
READ_ONLY = [f"{p} Read-only file system" for p in ("/opt/edpilot/probe", "/tmp/probe", "/probe")]


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
    proc = podman.run(image, "-c", PROBE, entrypoint="python3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [user, *READ_ONLY]


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


def runc_run(
    podman: Podman, image: str, args: list[str], tmp: Path, entrypoint: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the image's root filesystem with runc alone, as containerd's shim would under a
    kubelet: an OCI bundle from `runc spec`, with the image's user, environment and entrypoint,
    the root read-only, no capabilities, no new privileges, and new namespaces (network included)."""
    (config,) = json.loads(podman("image", "inspect", image).stdout)
    uid, gid = (int(part) for part in config["Config"]["User"].split(":"))
    rootfs = podman("image", "mount", image).stdout.strip()
    try:
        bundle = tmp / "bundle"
        bundle.mkdir()
        subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True, timeout=60)
        spec = json.loads((bundle / "config.json").read_text())
        spec["root"] = {"path": rootfs, "readonly": True}
        spec["process"].update(
            terminal=False,
            user={"uid": uid, "gid": gid},
            args=[*(entrypoint or config["Config"]["Entrypoint"]), *args],
            env=config["Config"]["Env"],
            capabilities={},
            noNewPrivileges=True,
        )
        (bundle / "config.json").write_text(json.dumps(spec))
        state = tmp / "runc-state"
        return subprocess.run(
            ["runc", "--root", str(state), "run", "--bundle", str(bundle), f"edpilot-test-{os.getpid()}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        podman("image", "unmount", image)


@pytest.mark.parametrize("image", [OPERATOR, AGENT])
def test_runc_alone_runs_the_entrypoint(podman: Podman, image: str, tmp_path: Path) -> None:
    proc = runc_run(podman, image, ["--version"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == version()


@pytest.mark.parametrize("image", [OPERATOR, AGENT])
def test_runc_alone_enforces_the_user_and_the_read_only_root(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    (config,) = json.loads(podman("image", "inspect", image).stdout)
    proc = runc_run(podman, image, ["-c", PROBE], tmp_path, entrypoint=["/opt/edpilot/bin/python3"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [config["Config"]["User"], *READ_ONLY]
