"""Issue 14, findings 2, 3 and 8 (agent side): a tenant's /metrics endpoint is hostile. Each test is an
exploit from the issue against the agent's scraper, on loopback: it must end within one deadline, read
at most the body limit, never follow a redirect, connect only to the pod's own address, and never copy
what the tenant sent into a message."""

from __future__ import annotations

import threading
import time
import tracemalloc
from typing import Any

from edpilot_agent.kube import pod_info
from edpilot_agent.pods import PodInfo
from edpilot_agent.scraper import HttpScraper, MetricsParser, WorkReading

from bench.hostile_http import body, drip, hostile_server, huge, redirect
from edpilot.models import MeasuredWorkload

POD = PodInfo("tenant-a", "hostile-0", ip="127.0.0.1", phase="Running")
SECRET = "S3CRET-tenant-text"


def workload(port: int, **kw: Any) -> MeasuredWorkload:
    return MeasuredWorkload(namespace="tenant-a", pod="hostile-0", port=port, metricName="tokens", **kw)


def settle(scraper: HttpScraper, w: MeasuredWorkload, pod: PodInfo | None, timeout: float) -> WorkReading:
    """The first finished reading of the pod, or AssertionError when none finished in `timeout`.
    `read()` never blocks: it answers `pending` until a scrape of the pod has completed."""
    box: list[WorkReading] = []

    def poll() -> None:
        while True:
            reading = scraper.read(w, pod)
            if not getattr(reading, "pending", False):
                box.append(reading)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    thread.join(timeout)
    assert box, f"no reading within {timeout} s"
    return box[0]


def test_a_slow_drip_ends_at_one_deadline_per_scrape_not_per_read() -> None:
    # One byte every 0.5 s: every read finishes well inside a per-read timeout, forever.
    with hostile_server(drip(period_seconds=0.5, for_seconds=20)) as server:
        scraper = HttpScraper(timeout_seconds=2.0)
        start = time.monotonic()
        reading = settle(scraper, workload(server.port), POD, timeout=6.0)
        elapsed = time.monotonic() - start
    assert reading.work_units is None
    assert "2 s" in reading.error
    assert elapsed < 8.0  # far below the 20 s the drip lasts, with room for a loaded machine


def test_a_huge_body_is_cut_at_the_limit_while_reading_without_building_every_sample() -> None:
    # 8 MiB of valid `a 1` lines took 7.2 s and 424 MiB in the issue.
    with hostile_server(huge(megabytes=8)) as server:
        scraper = HttpScraper()
        tracemalloc.start()
        try:
            start = time.monotonic()
            reading = settle(scraper, workload(server.port), POD, timeout=20.0)
            elapsed = time.monotonic() - start
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert reading.work_units is None
    assert "1 MiB" in reading.error
    assert peak < 4 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    assert elapsed < 6.0


def test_a_redirect_is_an_error_and_is_never_followed() -> None:
    with (
        hostile_server(body("tokens 42\n")) as internal,  # another tenant's pod, a cluster service...
        hostile_server(redirect(internal.url)) as tenant,
    ):
        reading = settle(HttpScraper(), workload(tenant.port), POD, timeout=5.0)
    assert internal.requests == []
    assert reading.work_units is None
    assert "redirect" in reading.error
    assert str(internal.port) not in reading.error


def test_only_the_pods_own_ip_is_contacted() -> None:
    with hostile_server(body("tokens 1\n")) as server:
        scraper = HttpScraper(timeout_seconds=1.0)
        # An address that is not an IP literal would be resolved (DNS, /etc/hosts): never.
        named = PodInfo("tenant-a", "hostile-0", ip="localhost", phase="Running")
        assert settle(scraper, workload(server.port), named, timeout=5.0).work_units is None
        # Cloud metadata and other link-local addresses are not pod addresses.
        start = time.monotonic()
        metadata = PodInfo("tenant-a", "hostile-0", ip="169.254.169.254", phase="Running")
        refused = settle(scraper, workload(80), metadata, timeout=5.0)
        assert refused.work_units is None and "not a pod address" in refused.error
        assert time.monotonic() - start < 0.5, "refused without connecting"
        # A host-network pod's IP is the node's: its port would be any service of the node.
        raw = {
            "metadata": {"namespace": "tenant-a", "name": "hostile-0"},
            "spec": {"hostNetwork": True, "containers": []},
            "status": {"phase": "Running", "podIP": "127.0.0.1"},
        }
        host_pod = pod_info(raw)
        assert host_pod is not None
        assert settle(scraper, workload(server.port), host_pod, timeout=5.0).work_units is None
        assert server.requests == []


def test_a_path_cannot_inject_headers_or_change_the_host() -> None:
    with hostile_server(body("tokens 1\n")) as server:
        scraper = HttpScraper(timeout_seconds=1.0)
        for path in ("/metrics\r\nX-Injected: 1", "/metrics HTTP/1.1\r\nHost: evil"):
            w = workload(server.port, path=path)
            reading = settle(scraper, w, POD, timeout=5.0)
            assert reading.work_units is None
            assert "path" in reading.error
        assert server.requests == []


def test_no_tenant_text_reaches_a_message() -> None:
    cases = [
        body(f"tokens{{{SECRET} 12\n"),  # not Prometheus text: the parser's error quotes the line
        body("", status=f"302 {SECRET}", headers=f"Location: http://{SECRET}/\r\n"),
        body(f"{SECRET}\n", status=f"500 {SECRET}"),
        body(f'tokens 1\nlat{{quantile="{SECRET}"}} 0.1\n'),
    ]
    for behaviour in cases:
        with hostile_server(behaviour) as server:
            w = workload(server.port, latencyMetric="lat", latencyQuantile=0.5)
            reading = settle(HttpScraper(), w, POD, timeout=5.0)
        assert SECRET not in reading.error


def test_a_failing_pod_is_scraped_less_and_less_often() -> None:
    with hostile_server(body("nope", status="500 Internal Server Error")) as server:
        scraper = HttpScraper(timeout_seconds=1.0)
        w = workload(server.port)
        end = time.monotonic() + 6.0
        while time.monotonic() < end:  # the agent asks every tick; here ten times a second
            scraper.read(w, POD)
            time.sleep(0.1)
    # Every second without backoff (6); 0, 1, 3 s with it.
    assert 1 <= len(server.requests) <= 4, len(server.requests)


def test_absurd_values_are_rejected_not_summed() -> None:
    spec = MeasuredWorkload(namespace="d", pod="p", metricName="tokens")
    for value in ("1e308", "+Inf", "NaN", "-5", "1e17"):
        reading = MetricsParser().parse(spec, f"tokens {value}\n")
        assert reading.work_units is None, value
        assert reading.error, value
    # Two series that are each plausible but whose sum is not.
    assert MetricsParser().parse(spec, 'tokens{a="1"} 9e15\ntokens{a="2"} 9e15\n').work_units is None


def test_superscript_and_other_unicode_digits_are_not_numbers() -> None:
    # str.isdigit() accepts '²' and int() then raises; float() accepts Arabic-Indic digits.
    spec = MeasuredWorkload(namespace="d", pod="p", metricName="tokens")
    text = 'tokens 5\nedpilot_workload_config_info{batch_size="²",quantization="bf16"} 1\n'
    reading = MetricsParser().parse(spec, text)
    assert (reading.work_units, reading.batch_size) == (5, None)
    assert MetricsParser().parse(spec, "tokens ١٢\n").work_units is None
