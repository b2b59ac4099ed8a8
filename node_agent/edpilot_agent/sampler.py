"""A background thread that samples GPU power at a fixed rate (10 Hz by default) and integrates
it into energy, independent of the report interval. Used for GPUs without an energy counter,
and by the H100 benchmark to compare sampled energy with the hardware counter."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from edpilot_agent.counters import PowerIntegrator

log = logging.getLogger(__name__)


class PowerSampler:
    def __init__(
        self,
        read_power_watts: Callable[[str], float],
        uuids: Iterable[str],
        period_seconds: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read_power_watts
        self._clock = clock
        self.period_seconds = period_seconds
        self._integrators = {uuid: PowerIntegrator(max_gap_seconds=3 * period_seconds) for uuid in uuids}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        # CPU the sampling thread itself used, so its overhead can be reported.
        self.cpu_seconds = 0.0
        self.late_ticks = 0

    def sample_once(self) -> None:
        for uuid, integrator in self._integrators.items():
            try:
                watts = self._read(uuid)
            except Exception as exc:  # a lost GPU must not stop sampling of the others
                self.errors += 1
                log.warning("power sample of GPU %s failed: %s", uuid, exc)
                continue
            t = self._clock()
            with self._lock:
                integrator.add(watts, t)

    def energy_joules(self, uuid: str) -> float:
        with self._lock:
            return self._integrators[uuid].energy_joules

    def integrator(self, uuid: str) -> PowerIntegrator:
        with self._lock:
            i = self._integrators[uuid]
            return PowerIntegrator(
                i.max_gap_seconds, i.energy_joules, i.samples, i.gaps, i.last_t, i.last_watts
            )

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edpilot-power-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        cpu_start = time.thread_time()
        next_at = self._clock()
        while not self._stop.is_set():
            self.sample_once()
            self.cpu_seconds = time.thread_time() - cpu_start
            next_at += self.period_seconds
            delay = next_at - self._clock()
            if delay < 0:
                # Fell behind (a slow NVML call): count it and restart the schedule from now.
                self.late_ticks += 1
                next_at = self._clock()
                delay = 0
            self._stop.wait(delay)
