"""The examples run (numpy path, on the CPU), follow their annotations file when it changes, expose
what their manifests' EnergyPolicy tells the agent to scrape, and their manifests are accepted by
a real API server."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from edpilot_agent.scraper import MetricsParser, WorkReading
from kubetest import Cluster
from prometheus_client.parser import text_string_to_metric_families

from edpilot.models import EnergyPolicy, LabelSelector, MeasuredWorkload

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


@dataclass(frozen=True)
class Example:
    name: str
    script: Path
    manifests: Path
    extra_args: tuple[str, ...]
    hint: dict[str, str]  # annotations the test writes, and expects to see followed


CASES = [
    Example(
        "training",
        EXAMPLES / "training" / "train.py",
        EXAMPLES / "training" / "manifests.yaml",
        ("--framework", "numpy", "--batch-size", "32", "--precision", "fp32"),
        {"edpilot.io/batch-size": "128", "edpilot.io/quantization": "bf16"},
    ),
    Example(
        "serving",
        EXAMPLES / "serving" / "serve.py",
        EXAMPLES / "serving" / "manifests.yaml",
        ("--batch-size", "8", "--quantization", "bf16"),
        {"edpilot.io/batch-size": "64", "edpilot.io/quantization": "int8"},
    ),
]


def documents(path: Path) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def pod_template(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    workload = docs.get("Deployment") or docs["Job"]
    template: dict[str, Any] = workload["spec"]["template"]
    return template


def flag(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"{name}="))


def load(script: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def annotations_file(annotations: dict[str, str]) -> str:
    """The kubelet's format: key="Go-quoted value" per line."""
    return "".join(f"{k}={json.dumps(v)}\n" for k, v in sorted(annotations.items()))


# ---------------------------------------------------------------- the manifests


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_manifests_wire_the_example_to_its_policy(case: Example) -> None:
    docs = documents(case.manifests)
    policy = EnergyPolicy.model_validate(docs["EnergyPolicy"])
    template = pod_template(docs)
    assert LabelSelector.model_validate(policy.spec.selector).matches(template["metadata"]["labels"])
    container = template["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == f"/examples/{case.script.name}"
    assert int(flag(args, "--metrics-port")) == policy.spec.workMetric.port
    assert {p["containerPort"] for p in container["ports"]} == {policy.spec.workMetric.port}
    # The annotations file the script reads is the downward-API volume of the pod's annotations.
    mount = next(
        m for m in container["volumeMounts"] if flag(args, "--annotations").startswith(m["mountPath"])
    )
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
    item = volume["downwardAPI"]["items"][0]
    assert item["fieldRef"]["fieldPath"] == "metadata.annotations"
    assert f"{mount['mountPath']}/{item['path']}" == flag(args, "--annotations")
    # The accuracy the pod declares is what the code declares, and the policy allows only those.
    declared = json.loads(template["metadata"]["annotations"]["edpilot.io/quantization-accuracy"])
    assert declared == load(case.script).ACCURACY
    assert set(policy.spec.quantization.allowed) <= set(declared)


def test_manifests_are_accepted_by_the_api_server(crds_installed: Cluster) -> None:
    for case in CASES:
        crds_installed.kubectl("apply", "--dry-run=server", "-f", str(case.manifests))


# ---------------------------------------------------------------- running the examples


class Running:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc, self.port = proc, port

    def scrape(self) -> str:
        text: str = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read().decode()
        return text


def start(case: Example, annotations: Path) -> Running:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(case.script),
            *case.extra_args,
            "--annotations",
            str(annotations),
            "--metrics-port",
            "0",
            "--poll-interval",
            "0.2",
            "--pace",
            "0.02",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    match = re.search(r"metrics on port (\d+)", first)
    assert match, f"{case.name} did not start: {first}{proc.stdout.read() if proc.poll() is not None else ''}"
    return Running(proc, int(match.group(1)))


@pytest.fixture
def started(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Example, Running, Path]]:
    case: Example = request.param
    annotations = tmp_path / "annotations"
    annotations.write_text(annotations_file({"edpilot.io/policy": "example"}))
    running = start(case, annotations)
    try:
        yield case, running, annotations
    finally:
        running.proc.terminate()
        running.proc.wait(timeout=10)


def read(case: Example, text: str) -> WorkReading:
    """What the agent reads from the example, told where by the example's own EnergyPolicy."""
    policy = EnergyPolicy.model_validate(documents(case.manifests)["EnergyPolicy"])
    target = MeasuredWorkload(
        namespace="default",
        pod="example",
        metricName=policy.spec.workMetric.name,
        configMetric=policy.spec.workMetric.configMetric,
        latencyMetric=policy.spec.latencySLO.metricName if policy.spec.latencySLO else None,
    )
    return MetricsParser().parse(target, text)


def wait_for(running: Running, case: Example, ok: Any, timeout: float = 30.0) -> WorkReading:
    deadline = time.monotonic() + timeout
    reading = WorkReading(None)
    while time.monotonic() < deadline:
        assert running.proc.poll() is None, f"{case.name} exited early"
        reading = read(case, running.scrape())
        if ok(reading):
            return reading
        time.sleep(0.2)
    raise AssertionError(f"{case.name}: timed out; last reading {reading}")


@pytest.mark.parametrize("started", CASES, ids=lambda c: c.name, indirect=True)
def test_example_follows_its_annotations_file(started: tuple[Example, Running, Path]) -> None:
    case, running, annotations = started
    initial_batch = int(case.extra_args[case.extra_args.index("--batch-size") + 1])
    before = wait_for(running, case, lambda r: (r.work_units or 0) > 0)
    assert before.batch_size == initial_batch
    assert before.quantization == case.extra_args[-1]
    if case.name == "serving":
        assert before.latency_seconds is not None and before.latency_seconds > 0

    tmp = annotations.with_suffix(".new")
    tmp.write_text(annotations_file({"edpilot.io/policy": "example", **case.hint}))
    tmp.replace(annotations)  # atomically, as the kubelet swaps the volume's content
    after = wait_for(running, case, lambda r: r.batch_size == int(case.hint["edpilot.io/batch-size"]))
    assert after.quantization == case.hint["edpilot.io/quantization"]
    assert after.work_units is not None and before.work_units is not None
    later = wait_for(running, case, lambda r: (r.work_units or 0) > (after.work_units or 0))
    assert later.batch_size == after.batch_size

    # A hint for a profile the example did not declare is not followed.
    tmp.write_text(annotations_file({"edpilot.io/policy": "example", "edpilot.io/quantization": "int4-awq"}))
    tmp.replace(annotations)
    time.sleep(1.0)
    assert read(case, running.scrape()).quantization == case.hint["edpilot.io/quantization"]
    families = {f.name for f in text_string_to_metric_families(running.scrape())}
    assert "edpilot_workload_quantization_accuracy_ratio" in families


def test_training_runs_a_few_steps_and_exits(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "training" / "train.py"),
            "--framework",
            "numpy",
            "--steps",
            "5",
            "--annotations",
            str(tmp_path / "absent"),
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "done: 5 steps" in proc.stdout
