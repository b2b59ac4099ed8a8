"""The small interface every GPU backend (NVML, simulated) implements, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

EnergySource = Literal["counter", "sampled"]

# NVML's energy counter is an unsigned 64-bit count of millijoules; the simulator copies it.
ENERGY_COUNTER_WRAP_JOULES = 2**64 / 1000


class GpuBackendError(Exception):
    """A GPU operation failed; the message says why in words an operator can act on."""


@dataclass(frozen=True)
class GpuInfo:
    """What does not change while the agent runs."""

    index: int
    uuid: str
    model: str
    min_limit_watts: float
    max_limit_watts: float
    default_limit_watts: float
    mig_enabled: bool = False
    energy_source: EnergySource = "counter"
    # The lowest and highest SM clock the GPU supports, in MHz; 0 when NVML cannot tell (an old
    # driver), and then edpilot never locks its clocks.
    min_sm_clock_mhz: float = 0.0
    max_sm_clock_mhz: float = 0.0

    @property
    def highest_cap_watts(self) -> float:
        """edpilot lowers power limits and never raises one above the default, even where NVML
        allows more (an H100 PCIe: default 350 W, maximum 400 W): more power than the vendor's
        default is never "energy-aware", and a spec asking for it is wrong or hostile."""
        return min(self.max_limit_watts, self.default_limit_watts)

    def clamp(self, watts: float) -> float:
        return min(max(watts, self.min_limit_watts), self.highest_cap_watts)

    @property
    def clock_range_known(self) -> bool:
        return 0 < self.min_sm_clock_mhz <= self.max_sm_clock_mhz


@dataclass(frozen=True)
class GpuReading:
    """One sample of one GPU. `energy_joules` is the raw cumulative value of the backend's
    counter (or of its power integration), None when the caller did not ask for it; the agent
    folds resets and wraps into a monotonic total."""

    uuid: str
    energy_joules: float | None
    power_watts: float
    enforced_limit_watts: float
    utilization_percent: float = 0.0
    sm_clock_mhz: float = 0.0
    mem_clock_mhz: float = 0.0
    temperature_c: float = 0.0
    throttle_reasons: tuple[str, ...] = ()


class GpuBackend(Protocol):
    @property
    def name(self) -> Literal["nvml", "sim"]: ...

    def gpus(self) -> list[GpuInfo]: ...

    def read(self, uuid: str, energy: bool = True) -> GpuReading:
        """A sample; the energy counter only with `energy` (on an H100 reading it costs ~4 ms of
        CPU, a thousand times any other read, so the agent reads it only when it needs it)."""
        ...

    def set_power_limit(self, uuid: str, watts: float) -> None:
        """Set the GPU's power limit; raises GpuBackendError when the GPU refuses."""
        ...

    def set_locked_sm_clock(self, uuid: str, max_mhz: float | None) -> None:
        """Lock the GPU's SM clock to [its lowest supported clock, `max_mhz`]; None resets the
        lock (the driver's own clock management again). Raises GpuBackendError when the GPU
        refuses."""
        ...

    def close(self) -> None: ...
