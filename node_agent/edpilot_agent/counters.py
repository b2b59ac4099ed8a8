"""Cumulative counters the agent can trust: resets and wraps folded in, bad samples rejected.

Both the GPU energy counters and the workloads' work counters go through `CounterTracker`,
so the operator can take deltas over any window and a missed report loses nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A float counts by one up to 2^53: a raw value beyond it is absurd (a hostile or broken source).
MAX_RAW = 2.0**53
# Finite and far beyond any real total, so that no sequence of accepted samples reaches infinity.
MAX_TOTAL = 2.0**63


@dataclass
class CounterTracker:
    """Folds a raw counter that may reset (process restart, driver reload) or wrap (fixed width)
    into a monotonic total.

    The total starts at the first raw value rather than at zero, so an agent restart without a
    counter reset keeps the series continuous. After a reset the new raw value is what was done
    since the reset (Prometheus `rate()` semantics).
    """

    wrap_at: float | None = None
    max_raw: float = MAX_RAW
    total: float | None = None
    last_raw: float | None = None
    resets: int = 0
    wraps: int = 0
    rejected: int = 0
    last_increase_at: float | None = None
    problem: str = ""

    def update(self, raw: float, now: float) -> bool:
        """Take one raw sample at monotonic time `now`; False (and `problem` set) if rejected."""
        limit = self.wrap_at if self.wrap_at is not None else self.max_raw
        if not (math.isfinite(raw) and 0 <= raw <= limit):
            self.rejected += 1
            self.problem = (
                f"counter value {raw!r} is not a finite non-negative number up to {limit:g}; sample ignored"
            )
            return False
        self.problem = ""
        if self.total is None or self.last_raw is None:
            self.total, self.last_raw, self.last_increase_at = raw, raw, now
            return True
        delta = raw - self.last_raw
        wrapped = (
            delta < 0 and self.wrap_at is not None and self.wrap_at - self.last_raw + raw < self.wrap_at / 2
        )
        if wrapped and self.wrap_at is not None:
            delta = self.wrap_at - self.last_raw + raw
        elif delta < 0:
            delta = raw
        if self.total + delta > MAX_TOTAL:
            self.rejected += 1
            self.problem = f"the counter's total would pass {MAX_TOTAL:g}; sample ignored"
            return False
        if wrapped:
            self.wraps += 1
        elif raw < self.last_raw:
            self.resets += 1
        if delta > 0:
            self.total += delta
            self.last_increase_at = now
        self.last_raw = raw
        return True

    def silent_for(self, now: float) -> float:
        """Seconds since the counter last increased (0 before the first sample)."""
        return 0.0 if self.last_increase_at is None else max(0.0, now - self.last_increase_at)


@dataclass
class PowerIntegrator:
    """Energy from power samples (trapezoids), for GPUs without a hardware energy counter.

    A gap longer than `max_gap_seconds` is bridged with the mean of its ends but counted, since
    the energy inside it is a guess.
    """

    max_gap_seconds: float = 1.0
    energy_joules: float = 0.0
    samples: int = 0
    gaps: int = 0
    last_t: float | None = None
    last_watts: float | None = None

    def add(self, watts: float, t: float) -> None:
        if not math.isfinite(watts) or watts < 0:
            return
        if self.last_t is not None and self.last_watts is not None and t > self.last_t:
            dt = t - self.last_t
            if dt > self.max_gap_seconds:
                self.gaps += 1
            self.energy_joules += (watts + self.last_watts) / 2 * dt
        if self.last_t is None or t > self.last_t:
            self.last_t, self.last_watts = t, watts
            self.samples += 1
