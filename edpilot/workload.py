"""`edpilot.workload`: the small helper a Python workload needs to take part in edpilot.

edpilot steers a workload through annotations on its pod (`edpilot.io/batch-size`,
`edpilot.io/quantization`, ...), which the workload reads from a downward-API volume that the
kubelet refreshes when they change. edpilot measures the workload by scraping a work counter
(tokens, samples, requests) and the configuration it actually runs (an info metric with
`batch_size` and `quantization` labels): a hint counts only once the workload applied it.

    wl = Workload(work_metric="generated_tokens", unit="tokens", batch_size=8, quantization="bf16",
                  accuracy={"bf16": 1.0, "fp8": 0.995})
    wl.serve(9400)
    while True:
        if (change := wl.poll()) is not None:          # the hints changed: reconfigure, then
            engine.reconfigure(change.batch_size, change.quantization)
            wl.running(change.batch_size, change.quantization)   # ...say what runs now
        wl.add_work(engine.step())

An edge module: it reads files, serves HTTP and reads the clock.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from edpilot.contract import (
    ANNOTATION_BATCH_SIZE,
    ANNOTATION_BATCH_SIZE_RANGE,
    ANNOTATION_POLICY,
    ANNOTATION_POWER_CAP,
    ANNOTATION_QUANTIZATION,
    ANNOTATION_QUANTIZATION_ACCURACY,
    decode_batch_size,
    decode_power_cap,
    decode_quantization,
    parse_accuracy,
    parse_batch_range,
)
from edpilot.models import Profile, WorkMetric

log = logging.getLogger("edpilot.workload")

# Where the example manifests mount the downward-API annotations file.
DEFAULT_ANNOTATIONS_PATH = Path("/etc/podinfo/annotations")
CONFIG_METRIC = WorkMetric.model_fields["configMetric"].default.removesuffix("_info")
ACCURACY_METRIC = "edpilot_workload_quantization_accuracy_ratio"
DEFAULT_PORT = 9400
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"'}


# ---------------------------------------------------------------- the annotations file


def _unquote(text: str) -> str:
    """A Go-quoted string (strconv.Quote, how the kubelet writes values) without its quotes."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise ValueError(f"not a quoted value: {text!r}")
    body, out, i = text[1:-1], [], 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        code = body[i + 1 : i + 2]
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
            i += 2
        elif code in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[code]
            out.append(chr(int(body[i + 2 : i + 2 + width], 16)))
            i += 2 + width
        else:
            raise ValueError(f"unknown escape \\{code} in {text!r}")
    return "".join(out)


def parse_annotations(text: str) -> dict[str, str]:
    """The downward-API annotations file: one `key="value"` line per annotation. Lines that do not
    parse are skipped (with a warning): a workload must keep running on a bad annotation."""
    annotations = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        try:
            if not sep:
                raise ValueError("no '='")
            annotations[key.strip()] = _unquote(value.strip())
        except ValueError as exc:
            log.warning("annotations file: skipping line %r: %s", line[:200], exc)
    return annotations


@dataclass(frozen=True)
class Hints:
    """What edpilot asks of the workload; None: no hint (run your own choice)."""

    batch_size: int | None = None
    quantization: Profile | None = None
    power_cap_watts: float | None = None  # informational: the agent enforces it on the GPU
    policy: str | None = None

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str]) -> Hints:
        return cls(
            batch_size=decode_batch_size(annotations.get(ANNOTATION_BATCH_SIZE)),
            quantization=decode_quantization(annotations.get(ANNOTATION_QUANTIZATION)),
            power_cap_watts=decode_power_cap(annotations.get(ANNOTATION_POWER_CAP)),
            policy=annotations.get(ANNOTATION_POLICY) or None,
        )


class AnnotationsFile:
    """The downward-API annotations file, re-read at most every `interval` seconds. A missing or
    unreadable file means no annotations: outside Kubernetes the workload runs unsteered."""

    def __init__(
        self, path: Path | str, interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = Path(path)
        self.interval = interval
        self._clock = clock
        self._read_at: float | None = None
        self._text: str | None = None
        self.annotations: dict[str, str] = {}

    def refresh(self) -> bool:
        """Re-read the file when it is due; True when its content changed."""
        now = self._clock()
        if self._read_at is not None and now - self._read_at < self.interval:
            return False
        self._read_at = now
        try:
            text = self.path.read_text()
        except OSError:
            text = ""
        if text == self._text:
            return False
        self._text = text
        self.annotations = parse_annotations(text)
        return True


# ---------------------------------------------------------------- accuracy


def accuracy_annotation(accuracy: Mapping[str, float]) -> str:
    """The value of `edpilot.io/quantization-accuracy` for a pod manifest, checked the way the
    operator will parse it."""
    text = json.dumps(dict(accuracy), sort_keys=True)
    parse_accuracy(text)
    return text


# ---------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Running:
    """The configuration the workload runs (what edpilot attributes measurements to)."""

    batch_size: int | None
    quantization: Profile | None


class Workload:
    """One process's face to edpilot: hints in, work counter and running configuration out.

    `accuracy` declares the relative accuracy per quantization profile the workload can run (e.g.
    {"bf16": 1.0, "fp8": 0.995}); when not given, the pod's edpilot.io/quantization-accuracy
    annotation is read. Quantization hints for profiles not declared are not followed, and batch-size
    hints outside `batch_range` (default: the edpilot.io/batch-size-range annotation) neither.
    """

    def __init__(
        self,
        *,
        work_metric: str = "work_units",
        unit: str = "units",
        batch_size: int | None = None,
        quantization: Profile | None = None,
        accuracy: Mapping[str, float] | None = None,
        batch_range: tuple[int, int] | None = None,
        latency_metric: str | None = None,
        annotations_path: Path | str = DEFAULT_ANNOTATIONS_PATH,
        poll_interval: float = 1.0,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.unit = unit
        self.registry = registry if registry is not None else CollectorRegistry()
        self.file = AnnotationsFile(annotations_path, poll_interval, clock)
        self.file.refresh()
        annotations = self.file.annotations
        declared = annotations.get(ANNOTATION_QUANTIZATION_ACCURACY, "{}")
        if accuracy is not None:
            declared = json.dumps(dict(accuracy))
        try:
            self.accuracy: dict[Profile, float] = parse_accuracy(declared)
        except ValueError as exc:
            if accuracy is not None:
                raise  # the code's own declaration is wrong: fail at start, not later
            log.warning("%s; no quantization hint will be followed", exc)
            self.accuracy = {}
        self.batch_range = batch_range or parse_batch_range(annotations.get(ANNOTATION_BATCH_SIZE_RANGE, ""))
        self.hints = Hints.from_annotations(annotations)
        self._work = Counter(work_metric, f"Work done, in {unit}.", registry=self.registry)
        self._config = Info(CONFIG_METRIC, "The configuration the workload runs now.", registry=self.registry)
        accuracy_gauge = Gauge(
            ACCURACY_METRIC,
            "Relative accuracy the workload declares per quantization profile.",
            ["quantization"],
            registry=self.registry,
        )
        for profile, value in self.accuracy.items():
            accuracy_gauge.labels(profile).set(value)
        self._latency = (
            Histogram(latency_metric, "Latency of one unit of work, in seconds.", registry=self.registry)
            if latency_metric
            else None
        )
        self.current = Running(batch_size, quantization)
        self.running(batch_size, quantization)

    # -------------------------------------------------------- hints

    def wanted(self) -> Running:
        """The configuration the hints ask for, keeping the current value where a hint is absent or
        one this workload cannot follow."""
        batch, quant = self.current.batch_size, self.current.quantization
        h = self.hints
        if h.batch_size is not None:
            lo, hi = self.batch_range or (1, 1 << 30)
            if lo <= h.batch_size <= hi:
                batch = h.batch_size
            else:
                log.warning("batch-size hint %d outside %d-%d: not followed", h.batch_size, lo, hi)
        if h.quantization is not None:
            if h.quantization in self.accuracy:
                quant = h.quantization
            else:
                log.warning("quantization hint %s: no accuracy declared for it, not followed", h.quantization)
        return Running(batch, quant)

    def poll(self) -> Running | None:
        """Re-read the hints (at most every poll interval); the configuration to switch to when it
        differs from the running one, else None. Call `running()` once the switch is done."""
        if self.file.refresh():
            self.hints = Hints.from_annotations(self.file.annotations)
        wanted = self.wanted()
        return wanted if wanted != self.current else None

    def running(self, batch_size: int | None, quantization: Profile | None) -> None:
        """Declare the configuration the workload runs now (after applying a hint, or its own)."""
        self.current = replace(self.current, batch_size=batch_size, quantization=quantization)
        self._config.info(
            {
                "batch_size": str(batch_size) if batch_size is not None else "",
                "quantization": quantization or "",
            }
        )

    # -------------------------------------------------------- measurements

    def add_work(self, units: float) -> None:
        """Count work done: tokens generated, samples trained, requests served."""
        if units > 0:
            self._work.inc(units)

    def observe_latency(self, seconds: float) -> None:
        if self._latency is None:
            raise RuntimeError("Workload(latency_metric=...) was not given")
        self._latency.observe(seconds)

    def serve(self, port: int = DEFAULT_PORT, addr: str = "0.0.0.0") -> int:
        """Serve /metrics in a daemon thread; returns the bound port (useful with port 0)."""
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_port)
