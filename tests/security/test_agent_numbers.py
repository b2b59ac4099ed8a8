"""Issue 14, finding 8 (agent side): `str.isdigit()` accepts '²' and other non-ASCII digits, and
`int()` then raises. Every place that reads a number a tenant wrote (pod annotations, a pod's GPU
request, the labels its endpoint serves) must treat such text as no number, never raise."""

from __future__ import annotations

from pathlib import Path

import pytest
from edpilot_agent.kube import pod_info
from edpilot_agent.pods import PodInfo
from edpilot_agent.sim import SIM_BATCH_SIZE, SIM_WORKLOAD, SimBackend, SimWorkloads

from edpilot.contract import ANNOTATION_BATCH_SIZE, ANNOTATION_BATCH_SIZE_RANGE
from edpilot.workload import Hints, Workload

NOT_ASCII_NUMBERS = ["²", "¹²", "٣", "𝟡", "1²", "９"]


@pytest.mark.parametrize("text", NOT_ASCII_NUMBERS)
def test_workload_hints_ignore_unicode_digits(text: str) -> None:
    assert Hints.from_annotations({ANNOTATION_BATCH_SIZE: text}).batch_size is None


@pytest.mark.parametrize("text", NOT_ASCII_NUMBERS)
def test_workload_batch_range_ignores_unicode_digits(text: str, tmp_path: Path) -> None:
    annotations = tmp_path / "annotations"
    annotations.write_text(f'{ANNOTATION_BATCH_SIZE_RANGE}="{text}-64"\n')
    assert Workload(annotations_path=annotations).batch_range is None


@pytest.mark.parametrize("text", NOT_ASCII_NUMBERS)
def test_simulated_pods_ignore_unicode_digits(text: str) -> None:
    backend = SimBackend("gpu-node-0", gpus=1)
    pod = PodInfo(
        "tenant-a",
        "p",
        phase="Running",
        gpu_request=1,
        annotations={SIM_WORKLOAD: "llm-decode", SIM_BATCH_SIZE: text, ANNOTATION_BATCH_SIZE: text},
    )
    assert SimWorkloads(backend).allocations([pod])
    assert backend.jobs["tenant-a/p"].batch_size == 8  # the default


@pytest.mark.parametrize("text", NOT_ASCII_NUMBERS)
def test_a_pods_gpu_request_in_unicode_digits_is_no_request(text: str) -> None:
    raw = {
        "metadata": {"namespace": "tenant-a", "name": "p"},
        "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": text}}}]},
        "status": {"phase": "Running"},
    }
    info = pod_info(raw)
    assert info is not None and info.gpu_request == 0
