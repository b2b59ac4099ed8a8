"""edpilot.workload: hints from the downward-API annotations file, and the metrics the agent reads."""

from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path

import pytest
from edpilot_agent.scraper import MetricsParser
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edpilot.models import MeasuredWorkload
from edpilot.workload import (
    AnnotationsFile,
    Hints,
    Running,
    Workload,
    accuracy_annotation,
    parse_annotations,
)

# What the kubelet writes (Go's %q quoting), including a JSON value with escaped quotes.
KUBELET_FILE = (
    'edpilot.io/batch-size="64"\n'
    'edpilot.io/policy="decode"\n'
    'edpilot.io/power-cap-watts="450"\n'
    'edpilot.io/quantization="fp8"\n'
    'edpilot.io/quantization-accuracy="{\\"bf16\\": 1.0, \\"fp8\\": 0.995}"\n'
    'kubectl.kubernetes.io/last-applied="line\\none\\ttab \\u00e9"\n'
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write_atomically(path: Path, text: str) -> None:
    """Like the kubelet: the new content appears at once, never half-written."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_parses_the_kubelet_format() -> None:
    annotations = parse_annotations(KUBELET_FILE + "garbage line\nbad=unquoted\n")
    assert annotations["edpilot.io/batch-size"] == "64"
    assert json.loads(annotations["edpilot.io/quantization-accuracy"]) == {"bf16": 1.0, "fp8": 0.995}
    assert annotations["kubectl.kubernetes.io/last-applied"] == "line\none\ttab é"
    assert "bad" not in annotations and len(annotations) == 6


def test_hints_ignore_values_a_workload_cannot_use() -> None:
    assert Hints.from_annotations(parse_annotations(KUBELET_FILE)) == Hints(64, "fp8", 450.0, "decode")
    odd = {
        "edpilot.io/batch-size": "-3",
        "edpilot.io/quantization": "fp7",
        "edpilot.io/power-cap-watts": "lots",
    }
    assert Hints.from_annotations(odd) == Hints()


def test_file_is_reread_at_most_every_interval_and_reports_changes(tmp_path: Path) -> None:
    path = tmp_path / "annotations"
    clock = FakeClock()
    watched = AnnotationsFile(path, interval=1.0, clock=clock)
    assert watched.refresh() is True and watched.annotations == {}  # missing file: no annotations
    write_atomically(path, 'edpilot.io/batch-size="16"\n')
    clock.now = 0.5
    assert watched.refresh() is False and watched.annotations == {}  # not due yet
    clock.now = 1.0
    assert watched.refresh() is True and watched.annotations == {"edpilot.io/batch-size": "16"}
    clock.now = 2.0
    assert watched.refresh() is False  # due, but unchanged


def _exposed(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(registry).decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_poll_follows_hints_it_can_and_reports_what_runs(tmp_path: Path) -> None:
    path = tmp_path / "annotations"
    clock = FakeClock()
    wl = Workload(
        work_metric="generated_tokens",
        batch_size=8,
        quantization="bf16",
        accuracy={"bf16": 1.0, "fp8": 0.995},
        batch_range=(1, 256),
        annotations_path=path,
        clock=clock,
    )
    assert wl.poll() is None
    assert _exposed(wl.registry)["edpilot_workload_config_info"] == [
        ({"batch_size": "8", "quantization": "bf16"}, 1.0)
    ]

    write_atomically(path, 'edpilot.io/batch-size="64"\nedpilot.io/quantization="fp8"\n')
    clock.now = 5
    assert wl.poll() == Running(64, "fp8")
    assert wl.poll() == Running(64, "fp8")  # still wanted until the workload says it runs it
    wl.running(64, "fp8")
    assert wl.poll() is None
    exposed = _exposed(wl.registry)
    assert exposed["edpilot_workload_config_info"] == [({"batch_size": "64", "quantization": "fp8"}, 1.0)]

    # A profile without declared accuracy, a batch size out of range: not followed.
    write_atomically(path, 'edpilot.io/batch-size="512"\nedpilot.io/quantization="int8"\n')
    clock.now = 10
    assert wl.poll() is None
    # The hints removed (policy deleted): the workload keeps what it runs; its owner decides.
    write_atomically(path, "")
    clock.now = 15
    assert wl.poll() is None


def test_work_counter_accuracy_and_latency_are_exposed(tmp_path: Path) -> None:
    wl = Workload(
        work_metric="generated_tokens",
        quantization="bf16",
        accuracy={"bf16": 1.0, "int8": 0.99},
        latency_metric="time_per_output_token_seconds",
        annotations_path=tmp_path / "none",
    )
    wl.add_work(10)
    wl.add_work(0)
    wl.add_work(5)
    wl.observe_latency(0.02)
    exposed = _exposed(wl.registry)
    assert exposed["generated_tokens_total"] == [({}, 15.0)]
    accuracy = {
        labels["quantization"]: v for labels, v in exposed["edpilot_workload_quantization_accuracy_ratio"]
    }
    assert accuracy == {"bf16": 1.0, "int8": 0.99}
    assert exposed["time_per_output_token_seconds_count"] == [({}, 1.0)]


def test_accuracy_and_batch_range_come_from_the_pod_when_the_code_does_not_declare_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "annotations"
    path.write_text(KUBELET_FILE + 'edpilot.io/batch-size-range="8-32"\n')
    wl = Workload(batch_size=8, quantization="bf16", annotations_path=path)
    assert wl.accuracy == {"bf16": 1.0, "fp8": 0.995}
    assert wl.batch_range == (8, 32)
    assert wl.poll() == Running(8, "fp8")  # batch 64 is outside 8-32, fp8 is declared


def test_a_bad_declaration_in_code_fails_at_start_and_in_the_pod_only_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ValueError, match="unknown profile 'fp7'"):
        Workload(accuracy={"fp7": 1.0}, annotations_path=tmp_path / "none")
    path = tmp_path / "annotations"
    path.write_text('edpilot.io/quantization-accuracy="not json"\nedpilot.io/quantization="fp8"\n')
    with caplog.at_level(logging.WARNING):
        wl = Workload(quantization="bf16", annotations_path=path)
    assert wl.accuracy == {} and wl.poll() is None
    assert "not valid JSON" in caplog.text


def test_accuracy_annotation_is_what_the_operator_parses() -> None:
    assert json.loads(accuracy_annotation({"fp8": 0.995, "bf16": 1.0})) == {"bf16": 1.0, "fp8": 0.995}
    with pytest.raises(ValueError, match="positive number"):
        accuracy_annotation({"bf16": -1.0})


def test_the_agent_reads_what_the_helper_serves(tmp_path: Path) -> None:
    wl = Workload(
        work_metric="train_samples",
        batch_size=32,
        quantization="bf16",
        accuracy={"bf16": 1.0},
        latency_metric="step_seconds",
        annotations_path=tmp_path / "none",
    )
    port = wl.serve(0, addr="127.0.0.1")
    wl.add_work(96)
    wl.observe_latency(0.25)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    target = MeasuredWorkload(
        namespace="ns", pod="p", metricName="train_samples_total", latencyMetric="step_seconds"
    )
    reading = MetricsParser().parse(target, text)
    assert reading.error == ""
    assert (reading.work_units, reading.batch_size, reading.quantization) == (96.0, 32, "bf16")
    assert reading.latency_seconds == pytest.approx(0.25)
