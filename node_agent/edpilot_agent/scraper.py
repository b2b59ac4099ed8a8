"""Work counters of selected pods, scraped from their Prometheus text endpoints.

A `WorkSource` returns the raw counter as the workload exposes it; the agent folds resets into a
cumulative value with `CounterTracker`. Simulated workloads implement the same interface.

A tenant controls what its endpoint sends, so `HttpScraper` reads it as hostile input:
- scrapes run in a background thread, concurrently, never inside the agent's tick: `read()` only
  returns the last completed result;
- one deadline covers a whole scrape (connect, headers, body), not each read;
- the body is cut at `MAX_BODY_BYTES` while it streams in, and parsing keeps running aggregates of
  the wanted series only, never a list of every sample;
- a 3xx is an error: nothing is fetched from anywhere but the pod's own IP, which must be an IP
  literal (no DNS), not link-local (cloud metadata) and not a host-network pod's (the node's);
- a failing pod is scraped less and less often (exponential backoff, per pod);
- values must be finite and at most 2^53, above which a float no longer counts by one;
- messages say what failed in the agent's words and never quote what the endpoint sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

from edpilot.models import MeasuredWorkload
from edpilot.textnum import ascii_float, ascii_int, positive_int
from edpilot_agent import AGENT_VERSION
from edpilot_agent.pods import PodInfo

log = logging.getLogger(__name__)

# Labels of the workload's config info metric (edpilot.workload exposes them).
BATCH_SIZE_LABEL = "batch_size"
QUANTIZATION_LABEL = "quantization"

MAX_BODY_BYTES = 1 << 20
MAX_LINE_BYTES = 64 << 10
MAX_HEADER_LINES = 64
# Samples of the wanted metrics one scrape may parse: a histogram has a few dozen, and parsing is
# the one per-sample cost, so this bounds the CPU a pod can make each of its scrapes take.
MAX_WANTED_SAMPLES = 1024
MAX_BUCKETS = 256
# A float counts by one up to 2^53; a counter beyond it is absurd, and summing two could overflow.
MAX_COUNTER = 2.0**53
MAX_BATCH_SIZE = 1 << 20

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Linear: the two alternatives never match the same character.
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(.)")
_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?\r?\n")
# Printable ASCII without blanks: nothing in the path can end the request line or add a header.
_PATH = re.compile(r"/[\x21-\x7e]{0,2047}")


@dataclass(frozen=True)
class WorkReading:
    """One read of a workload: its raw work counter and what it says it runs.
    `work_units` is None when the counter could not be read; `error` then says why. `pending`:
    no scrape of the pod has completed yet."""

    work_units: float | None
    batch_size: int | None = None
    quantization: str | None = None
    latency_seconds: float | None = None
    error: str = ""
    pending: bool = False
    # A serving engine's: time to first token, requests running and waiting, requests finished.
    first_token_seconds: float | None = None
    requests_running: float | None = None
    requests_waiting: float | None = None
    requests_finished: float | None = None


class WorkSource(Protocol):
    def read(self, workload: MeasuredWorkload, pod: PodInfo | None) -> WorkReading: ...


class ScrapeError(Exception):
    """A scrape failed; the message is the agent's own words, never the endpoint's."""


def _counter_names(name: str) -> set[str]:
    names = {name, f"{name}_total"}
    if name.endswith("_total"):
        names.add(name.removesuffix("_total"))
    return names


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of cumulative (upper bound, count) buckets, interpolating linearly inside
    the bucket, as Prometheus' histogram_quantile does. None without observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for upper_bound, count in buckets:
        if count >= rank:
            if math.isinf(upper_bound):
                return lower_bound
            if count == lower_count:
                return upper_bound
            return lower_bound + (upper_bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = upper_bound, count
    return buckets[-1][0]


# ---------------------------------------------------------------- parsing, one line at a time


def _blank(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def parse_sample(line: str) -> tuple[str, dict[str, str], float]:
    """name, labels and value of one sample line of the Prometheus text format; ScrapeError if it
    is not one. Hand-written and linear, so a hostile line costs its length and no more."""
    i = _blank(line, 0)
    name_match = _NAME.match(line, i)
    if name_match is None:
        raise ScrapeError("no metric name")
    name, i = name_match.group(), name_match.end()
    labels: dict[str, str] = {}
    if line[i : i + 1] == "{":
        i += 1
        while True:
            i = _blank(line, i)
            if line[i : i + 1] == "}":
                i += 1
                break
            label = _LABEL_NAME.match(line, i)
            if label is None:
                raise ScrapeError("a label has no valid name")
            i = _blank(line, label.end())
            if line[i : i + 1] != "=":
                raise ScrapeError("a label has no '='")
            quoted = _QUOTED.match(line, _blank(line, i + 1))
            if quoted is None:
                raise ScrapeError("a label value is not quoted")
            labels[label.group()] = _ESCAPE.sub(
                lambda m: "\n" if m.group(1) == "n" else m.group(1), quoted.group(1)
            )
            i = _blank(line, quoted.end())
            if line[i : i + 1] == ",":
                i += 1
            elif line[i : i + 1] != "}":
                raise ScrapeError("labels are not separated by ','")
    fields = line[i:].split()
    value = ascii_float(fields[0]) if 1 <= len(fields) <= 2 else None
    if value is None:
        raise ScrapeError("a sample has no valid value")
    return name, labels, value


@dataclass
class _Latency:
    buckets: dict[float, float]
    total: float
    count: float


@dataclass
class LatencyScrape:
    """One latency metric of a scrape: a summary's quantile, a histogram, or a plain gauge."""

    base: str
    quantile_wanted: float | None
    quantile: float | None = None
    buckets: dict[float, float] = field(default_factory=dict)
    total: float | None = None
    count: float | None = None
    plain: float | None = None

    @property
    def names(self) -> set[str]:
        return {self.base, f"{self.base}_bucket", f"{self.base}_sum", f"{self.base}_count"}

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        base, q = self.base, self.quantile_wanted
        usable = math.isfinite(value) and value >= 0
        if name == base and "quantile" in labels:
            at = ascii_float(labels["quantile"])
            if q is not None and at is not None and math.isclose(at, q) and self.quantile is None:
                self.quantile = value if usable else None
        elif name == base and not labels:
            self.plain = value if usable and self.plain is None else self.plain
        # A histogram's series are summed: an engine serves one per data-parallel engine (vLLM's
        # `engine` label), all with the same buckets, and the pod's latency covers them all.
        elif name == f"{base}_bucket" and "le" in labels:
            le = ascii_float(labels["le"])
            if le is not None and not math.isnan(le) and usable:
                self.buckets[le] = min(self.buckets.get(le, 0.0) + value, MAX_COUNTER)
                if len(self.buckets) > MAX_BUCKETS:
                    raise ScrapeError(f"the latency histogram has more than {MAX_BUCKETS} buckets")
        elif name == f"{base}_sum" and usable:
            self.total = min((self.total or 0.0) + value, MAX_COUNTER)
        elif name == f"{base}_count" and usable:
            self.count = min((self.count or 0.0) + value, MAX_COUNTER)


@dataclass
class Scrape:
    """Running aggregates of one scrape: only what the workload's spec asks for."""

    workload: MeasuredWorkload
    counters: set[str]
    configs: set[str]
    latencies: list[LatencyScrape]
    # A serving engine's load: gauges and a counter, each summed over its series.
    load: dict[str, float | None] = field(default_factory=dict)
    work: float | None = None
    batch_size: int | None = None
    quantization: str | None = None
    config_seen: bool = False
    samples: int = 0
    _wanted: re.Pattern[bytes] | None = None

    def feed(self, data: bytes) -> bytes:
        """Takes the body's next bytes; returns the unfinished last line for the next call. Only
        the lines of wanted series are decoded and parsed: a regular expression finds them at C
        speed, so a body of a million unwanted series costs about as much as reading it."""
        if self._wanted is None:
            wanted = self.counters | self.configs | set(self.load)
            for latency in self.latencies:
                wanted |= latency.names
            names = b"|".join(re.escape(n.encode()) for n in sorted(wanted))
            self._wanted = re.compile(rb"^[ \t]*(?:" + names + rb")(?=[{ \t])[^\n]*", re.MULTILINE)
        end = data.rfind(b"\n") + 1
        for match in self._wanted.finditer(data, 0, end):
            self._sample(match.group().decode("utf-8", errors="replace").strip())
        return data[end:]

    def _sample(self, line: str) -> None:
        self.samples += 1
        if self.samples > MAX_WANTED_SAMPLES:
            raise ScrapeError(
                f"the response has more than {MAX_WANTED_SAMPLES} samples of the wanted metrics"
            )
        try:
            name, labels, value = parse_sample(line)
        except ScrapeError as exc:
            raise ScrapeError(f"a sample of a wanted metric is not Prometheus text format: {exc}") from None
        if name in self.counters:
            if not (math.isfinite(value) and 0 <= value <= MAX_COUNTER):
                raise ScrapeError("the work counter is not a finite number in [0, 2^53]")
            self.work = (self.work or 0.0) + value
            if self.work > MAX_COUNTER:
                raise ScrapeError("the work counter's series add up to more than 2^53")
        elif name in self.configs:
            if not self.config_seen and value == 1:
                self.config_seen = True
                self.batch_size = positive_int(labels.get(BATCH_SIZE_LABEL), MAX_BATCH_SIZE)
                self.quantization = labels.get(QUANTIZATION_LABEL) or None
        elif name in self.load:
            if not (math.isfinite(value) and 0 <= value <= MAX_COUNTER):
                raise ScrapeError("a load metric is not a finite number in [0, 2^53]")
            self.load[name] = min((self.load[name] or 0.0) + value, MAX_COUNTER)
        else:
            for latency in self.latencies:
                latency.sample(name, labels, value)


class MetricsParser:
    """Turns one scrape's lines into a `WorkReading`. It keeps the previous histogram of each
    workload, so latency quantiles cover the last scrape interval rather than the pod's lifetime."""

    def __init__(self) -> None:
        self._latency: dict[str, _Latency] = {}

    @staticmethod
    def begin(workload: MeasuredWorkload) -> Scrape:
        latencies = [
            LatencyScrape(name, quantile)
            for name, quantile in (
                (workload.latencyMetric, workload.latencyQuantile),
                (workload.firstTokenMetric, workload.firstTokenQuantile),
            )
            if name is not None
        ]
        configs = {workload.configMetric, f"{workload.configMetric}_info"}
        load: dict[str, float | None] = {
            name: None
            for name in (workload.runningMetric, workload.waitingMetric, workload.finishedMetric)
            if name is not None
        }
        return Scrape(workload, _counter_names(workload.metricName), configs, latencies, load)

    def parse(self, workload: MeasuredWorkload, text: str) -> WorkReading:
        """A whole response at once (tests, tools); the scraper feeds lines as they arrive."""
        scrape = self.begin(workload)
        try:
            scrape.feed(text.encode() + b"\n")
        except ScrapeError as exc:
            return WorkReading(None, error=f"the metrics endpoint's response was refused: {exc}")
        return self.finish(scrape)

    def finish(self, scrape: Scrape) -> WorkReading:
        workload = scrape.workload
        key = f"{workload.namespace}/{workload.pod}"
        by_name = {lat.base: self._latency_seconds(key, lat) for lat in scrape.latencies}
        latency = by_name.get(workload.latencyMetric or "")
        first_token = by_name.get(workload.firstTokenMetric or "")
        load = scrape.load

        def gauge(name: str | None) -> float | None:
            return None if name is None else load.get(name)

        reading = WorkReading(
            scrape.work,
            scrape.batch_size,
            scrape.quantization,
            latency,
            first_token_seconds=first_token,
            requests_running=gauge(workload.runningMetric),
            requests_waiting=gauge(workload.waitingMetric),
            requests_finished=gauge(workload.finishedMetric),
        )
        if scrape.work is None:
            return replace(reading, error=f"metric {workload.metricName} is not exposed by the pod")
        return reading

    def _latency_seconds(self, pod: str, s: LatencyScrape) -> float | None:
        """The metric over the last scrape interval: a quantile of its histogram's increase, or
        its mean; a summary's quantile or a gauge as they are."""
        if s.quantile is not None:
            return s.quantile
        if s.total is None or s.count is None:
            return s.plain
        buckets, total, count = dict(s.buckets), s.total, s.count
        key = f"{pod}/{s.base}"
        previous = self._latency.get(key)
        self._latency[key] = _Latency(buckets, total, count)
        if previous is not None and count >= previous.count:
            # The window since the last scrape; on a counter reset the whole new histogram is the window.
            buckets = {le: c - previous.buckets.get(le, 0.0) for le, c in buckets.items()}
            total, count = total - previous.total, count - previous.count
        if count <= 0:
            return None
        if s.quantile_wanted is not None and buckets:
            return histogram_quantile(s.quantile_wanted, list(buckets.items()))
        return total / count

    def forget(self, pods: Iterable[str]) -> None:
        """Drop the histograms kept for these pods (namespace/name)."""
        prefixes = tuple(f"{p}/" for p in pods)
        for key in [k for k in self._latency if k.startswith(prefixes)] if prefixes else []:
            del self._latency[key]


# ---------------------------------------------------------------- one bounded scrape


def target_problem(workload: MeasuredWorkload, pod: PodInfo | None) -> str:
    """Why the pod must not be scraped at all ("" when it may be)."""
    if pod is None:
        return f"pod {workload.namespace}/{workload.pod} is not on this node"
    if not pod.ip:
        return f"pod {pod.key} has no IP yet"
    if pod.host_network:
        return f"pod {pod.key} uses the node's network, so its port is the node's; it is not scraped"
    try:
        ip = ipaddress.ip_address(pod.ip)
    except ValueError:
        return f"pod {pod.key} has an address that is not an IP literal; it is not scraped"
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return f"pod {pod.key} has IP {ip}, which is not a pod address; it is not scraped"
    if not _PATH.fullmatch(workload.path):
        return f"the metrics path of pod {pod.key} is not printable ASCII without blanks; it is not scraped"
    return ""


async def _fetch(ip: str, port: int, path: str, scrape: Scrape, max_body: int) -> None:
    """GET the path over HTTP/1.0 (no chunked encoding, no keep-alive) and feed the body's lines
    to `scrape` as they arrive. Raises ScrapeError or OSError; the caller holds the deadline."""
    reader, writer = await asyncio.open_connection(ip, port, limit=MAX_LINE_BYTES)
    try:
        host = f"[{ip}]" if ":" in ip else ip
        writer.write(
            f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: edpilot-agent/{AGENT_VERSION}\r\n"
            "Accept: text/plain;version=0.0.4\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status = _STATUS.fullmatch(await _line(reader))
        if status is None:
            raise ScrapeError("the endpoint did not answer with an HTTP/1 status line")
        code = int(status.group(1))
        if 300 <= code < 400:
            raise ScrapeError(f"the endpoint answered HTTP {code}; redirects are not followed")
        if code != 200:
            raise ScrapeError(f"the endpoint answered HTTP {code}")
        length = await _headers(reader, max_body)
        remaining = max_body + 1 if length is None else length
        unfinished = b""
        while remaining > 0:
            chunk = await reader.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)
            if length is None and remaining <= 0:
                raise ScrapeError(f"the response body exceeds {max_body / 2**20:g} MiB")
            unfinished = scrape.feed(unfinished + chunk)
            if len(unfinished) > MAX_LINE_BYTES:
                raise ScrapeError(f"the body has a line longer than {MAX_LINE_BYTES // 1024} KiB")
        scrape.feed(unfinished + b"\n")
    finally:
        writer.transport.abort()  # never wait on a peer that stopped reading


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readline()
    except ValueError:  # asyncio's LimitOverrunError, as readline reports it
        raise ScrapeError(f"the headers have a line longer than {MAX_LINE_BYTES // 1024} KiB") from None


async def _headers(reader: asyncio.StreamReader, max_body: int) -> int | None:
    """Reads the headers; returns the Content-Length if there is one."""
    length: int | None = None
    for _ in range(MAX_HEADER_LINES):
        line = await _line(reader)
        if line in (b"\r\n", b"\n"):
            return length
        if not line:
            raise ScrapeError("the connection closed inside the headers")
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = ascii_int(value)
            if length is None:
                raise ScrapeError("the Content-Length header is not a number")
            if length > max_body:
                raise ScrapeError(f"the response body exceeds {max_body / 2**20:g} MiB")
        elif name == "transfer-encoding" and value != "identity":
            raise ScrapeError("the endpoint sent a transfer encoding to an HTTP/1.0 request")
        elif name == "content-encoding" and value not in ("", "identity"):
            raise ScrapeError("the endpoint sent a compressed body although none was asked for")
    raise ScrapeError(f"the response has more than {MAX_HEADER_LINES} header lines")


# ---------------------------------------------------------------- the background scraper


@dataclass
class _Target:
    workload: MeasuredWorkload
    pod: PodInfo | None
    reading: WorkReading = field(
        default_factory=lambda: WorkReading(
            None, error="no scrape of the pod has completed yet", pending=True
        )
    )
    due: float = 0.0
    failures: int = 0
    running: bool = False
    asked_at: float = 0.0


class HttpScraper:
    """A `WorkSource` for real pods: http://<pod IP>:<port><path>, scraped in the background.

    `read()` never blocks: it returns the pod's last completed scrape and keeps the pod on the
    background thread's list, which scrapes each pod every `interval_seconds` (after a failure,
    every interval x 2^(failures-1), at most `max_backoff_seconds`), at most `concurrency` at
    once, each within `timeout_seconds` in all. A pod nobody asked about for a while is dropped.
    """

    def __init__(
        self,
        timeout_seconds: float = 2.0,
        interval_seconds: float = 1.0,
        max_backoff_seconds: float = 60.0,
        concurrency: int = 8,
        max_body_bytes: int = MAX_BODY_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self.interval_seconds = interval_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.concurrency = concurrency
        self.max_body_bytes = max_body_bytes
        self._clock = clock
        self._parser = MetricsParser()
        self._lock = threading.Lock()
        self._targets: dict[str, _Target] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.scrapes = 0

    # ------------------------------------------------------------ the agent's side (any thread)

    def read(self, workload: MeasuredWorkload, pod: PodInfo | None) -> WorkReading:
        key = f"{workload.namespace}/{workload.pod}"
        now = self._clock()
        with self._lock:
            target = self._targets.get(key)
            changed = target is None or target.workload != workload or _address(target.pod) != _address(pod)
            if target is None or changed:
                target = _Target(workload, pod, due=now)
                self._targets[key] = target
                self._parser.forget([key])
            target.pod, target.asked_at = pod, now
            reading = target.reading
        if changed:
            self._start()
            self._poke()
        return reading

    def close(self) -> None:
        self._closed = True
        self._poke()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_seconds + 1)

    # ------------------------------------------------------------ one scrape (any event loop)

    async def scrape(self, workload: MeasuredWorkload, pod: PodInfo | None) -> WorkReading:
        """One bounded scrape of the pod."""
        problem = target_problem(workload, pod)
        if problem or pod is None:
            return WorkReading(None, error=problem)
        where = f"pod {pod.key} port {workload.port}"
        scrape = self._parser.begin(workload)
        self.scrapes += 1
        try:
            async with asyncio.timeout(self.timeout_seconds):
                await _fetch(pod.ip, workload.port, workload.path, scrape, self.max_body_bytes)
        except TimeoutError:
            return WorkReading(
                None, error=f"scraping {where} took longer than {self.timeout_seconds:g} s; abandoned"
            )
        except ScrapeError as exc:
            return WorkReading(None, error=f"scraping {where}: {exc}")
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            return WorkReading(None, error=f"scraping {where}: connection failed ({reason})")
        return self._parser.finish(scrape)

    def scrape_now(self, workload: MeasuredWorkload, pod: PodInfo | None) -> WorkReading:
        """One bounded scrape in the calling thread (tools and tests; the agent uses `read`)."""
        return asyncio.run(self.scrape(workload, pod))

    # ------------------------------------------------------------ the background thread

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(
                target=lambda: asyncio.run(self._main()), name="edpilot-scraper", daemon=True
            )
            self._thread.start()

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(wake.set)

    async def _main(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        while not self._closed:
            now = self._clock()
            with self._lock:
                forgotten = [k for k, t in self._targets.items() if now - t.asked_at > self._forget_after]
                for key in forgotten:
                    del self._targets[key]
                self._parser.forget(forgotten)
                due = [t for t in self._targets.values() if not t.running and t.due <= now]
                for target in due:
                    target.running = True
                waiting = [t.due for t in self._targets.values() if not t.running]
            for target in due:
                task = asyncio.create_task(self._run(target, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            sleep = min(waiting, default=now + self.interval_seconds) - now
            self._wake.clear()
            try:
                async with asyncio.timeout(max(sleep, 0.01)):
                    await self._wake.wait()
            except TimeoutError:
                pass
        for task in tasks:
            task.cancel()

    @property
    def _forget_after(self) -> float:
        return max(30.0, 10 * self.interval_seconds)

    async def _run(self, target: _Target, slots: asyncio.Semaphore) -> None:
        async with slots:
            started = self._clock()
            try:
                reading = await self.scrape(target.workload, target.pod)
            except Exception:  # a bug here must not leave the pod marked as in flight forever
                reading = WorkReading(None, error="the scrape failed inside the agent; see its log")
                log.exception("scraping pod %s/%s failed", target.workload.namespace, target.workload.pod)
        with self._lock:
            target.reading, target.running = reading, False
            if reading.work_units is None:
                target.failures += 1
                backoff = self.interval_seconds * 2 ** min(target.failures - 1, 16)
                target.due = self._clock() + min(backoff, self.max_backoff_seconds)
            else:
                target.failures = 0
                target.due = started + self.interval_seconds
        if self._wake is not None:
            self._wake.set()


def _address(pod: PodInfo | None) -> tuple[str, bool] | None:
    return None if pod is None else (pod.ip, pod.host_network)
