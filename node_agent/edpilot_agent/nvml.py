"""The NVML backend: the only module of edpilot that imports pynvml.

Energy comes from the hardware counter (`nvmlDeviceGetTotalEnergyConsumption`, mJ since the
driver loaded) where the GPU has one (Volta and newer), otherwise from power sampled at 10 Hz.
MIG-enabled GPUs are reported and never capped nor clock-locked. With `read_only` no setter is
ever called.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, TypeVar

import pynvml

from edpilot.contract import throttle_reasons
from edpilot_agent.backend import EnergySource, GpuBackendError, GpuInfo, GpuReading
from edpilot_agent.sampler import PowerSampler

log = logging.getLogger(__name__)
T = TypeVar("T")

_HINTS: dict[int, str] = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: (
        "the NVML library (libnvidia-ml.so.1) was not found: is the NVIDIA driver installed on the node "
        "and the library visible in this container (NVIDIA container toolkit)?"
    ),
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA kernel driver is not loaded on this node",
    pynvml.NVML_ERROR_NO_PERMISSION: (
        "permission denied: changing power limits needs root or CAP_SYS_ADMIN on the node"
    ),
    pynvml.NVML_ERROR_NOT_SUPPORTED: "this GPU or driver does not support the call",
    pynvml.NVML_ERROR_GPU_IS_LOST: (
        "the GPU is lost (fell off the bus or an XID error); it needs a reset or a reboot before use"
    ),
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: "the installed NVIDIA driver is too old for this NVML call",
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: (
        "the NVML library and the kernel driver differ in version (driver updated without a reboot?)"
    ),
    pynvml.NVML_ERROR_INVALID_ARGUMENT: "NVML rejected the argument (a limit outside the GPU's constraints?)",
    pynvml.NVML_ERROR_UNINITIALIZED: "NVML is not initialised",
    pynvml.NVML_ERROR_TIMEOUT: "the GPU did not answer in time",
}


def describe_error(exc: BaseException, what: str) -> str:
    """A sentence saying what failed and what to do about it."""
    code = getattr(exc, "value", None)
    hint = _HINTS.get(code, str(exc)) if isinstance(code, int) else str(exc)
    return f"{what}: {hint} (NVML: {exc})"


# Prefixes of the pynvml functions that change a GPU: a read-only tool can disable them all.
_SETTER_PREFIXES = (
    "nvmlDeviceSet",
    "nvmlDeviceReset",
    "nvmlDeviceClear",
    "nvmlSystemSet",
    "nvmlUnitSet",
    "nvmlGpuInstanceSet",
    "nvmlVgpuInstanceSet",
    "nvmlDeviceCreate",
    "nvmlGpuInstanceCreate",
)


def forbid_setters() -> list[str]:
    """Make every pynvml call that changes a GPU raise instead (for read-only benchmarks on
    machines we do not own); returns the names disabled."""

    def forbidden(name: str) -> Callable[..., None]:
        def refuse(*args: object, **kwargs: object) -> None:
            raise GpuBackendError(f"{name} was called, but NVML setters are forbidden in this process")

        return refuse

    names = [n for n in dir(pynvml) if n.startswith(_SETTER_PREFIXES) and callable(getattr(pynvml, n))]
    for name in names:
        setattr(pynvml, name, forbidden(name))
    return names


def _field_value(value: Any) -> float:
    """The number inside an nvmlFieldValue_t, whatever its type."""
    member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
    return float(getattr(value.value, member.get(int(value.valueType), "uiVal")))


# What `read()` asks NVML for each sample: (name, call, required). A GPU that does not support an
# optional one reports 0 for it rather than failing the whole sample.
_READS: tuple[tuple[str, Callable[[Any], float], bool], ...] = (
    ("power_mw", lambda h: float(pynvml.nvmlDeviceGetPowerUsage(h)), True),
    ("enforced_limit_mw", lambda h: float(pynvml.nvmlDeviceGetEnforcedPowerLimit(h)), True),
    ("utilization_percent", lambda h: float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu), False),
    ("sm_clock_mhz", lambda h: float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)), False),
    ("mem_clock_mhz", lambda h: float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)), False),
    (
        "temperature_c",
        lambda h: float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
        False,
    ),
    ("throttle_mask", lambda h: float(pynvml.nvmlDeviceGetCurrentClocksEventReasons(h)), False),
)


def _is(exc: BaseException, code: int) -> bool:
    return isinstance(exc, pynvml.NVMLError) and getattr(exc, "value", None) == code


class NvmlBackend:
    def __init__(self, read_only: bool = False, sample_period_seconds: float = 0.1) -> None:
        self.read_only = read_only
        self._call(pynvml.nvmlInit, "initialising NVML")
        self._handles: dict[str, Any] = {}
        self._infos: list[GpuInfo] = []
        count = self._call(pynvml.nvmlDeviceGetCount, "counting GPUs")
        for index in range(count):
            handle = self._call(partial(pynvml.nvmlDeviceGetHandleByIndex, index), f"opening GPU {index}")
            info = self._inventory(index, handle)
            self._handles[info.uuid] = handle
            self._infos.append(info)
        self._sampled = {i.uuid for i in self._infos if i.energy_source == "sampled"}
        self._sampler: PowerSampler | None = None
        if self._sampled:
            self._sampler = PowerSampler(self.power_watts, self._sampled, sample_period_seconds)
            self._sampler.start()

    @property
    def name(self) -> Literal["nvml"]:
        return "nvml"

    def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return fn()
        except pynvml.NVMLError as exc:
            raise GpuBackendError(describe_error(exc, what)) from exc

    def _optional(self, fn: Callable[[], T], default: T) -> T:
        """Reads that some GPUs do not support: report the default instead of failing the sample,
        but a lost GPU is still an error."""
        try:
            return fn()
        except pynvml.NVMLError as exc:
            if _is(exc, pynvml.NVML_ERROR_GPU_IS_LOST):
                raise GpuBackendError(describe_error(exc, "reading the GPU")) from exc
            return default

    def _inventory(self, index: int, handle: Any) -> GpuInfo:
        uuid = str(self._call(lambda: pynvml.nvmlDeviceGetUUID(handle), f"reading GPU {index}'s UUID"))
        model = str(self._call(lambda: pynvml.nvmlDeviceGetName(handle), f"reading GPU {index}'s name"))
        lo, hi = self._call(
            lambda: pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle),
            f"reading GPU {uuid}'s power-limit constraints",
        )
        default = self._call(
            lambda: pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle),
            f"reading GPU {uuid}'s default limit",
        )
        mig_current = self._optional(lambda: pynvml.nvmlDeviceGetMigMode(handle)[0], 0)
        min_clock, max_clock = self._sm_clock_range(handle)
        source: EnergySource = "counter"
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except pynvml.NVMLError as exc:
            if not (
                _is(exc, pynvml.NVML_ERROR_NOT_SUPPORTED) or _is(exc, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            ):
                raise GpuBackendError(describe_error(exc, f"reading GPU {uuid}'s energy counter")) from exc
            source = "sampled"
        return GpuInfo(
            index=index,
            uuid=uuid,
            model=model,
            min_limit_watts=lo / 1000,
            max_limit_watts=hi / 1000,
            default_limit_watts=default / 1000,
            mig_enabled=mig_current == pynvml.NVML_DEVICE_MIG_ENABLE,
            energy_source=source,
            min_sm_clock_mhz=min_clock,
            max_sm_clock_mhz=max_clock,
        )

    def _sm_clock_range(self, handle: Any) -> tuple[float, float]:
        """The lowest and highest graphics (SM) clock the GPU supports at its highest memory
        clock, the range locked clocks may take; (0, 0) where the driver cannot list them."""
        none: list[float] = []
        memory = self._optional(
            lambda: [float(c) for c in pynvml.nvmlDeviceGetSupportedMemoryClocks(handle)], none
        )
        if not memory:
            return 0.0, 0.0
        top = round(max(memory))
        clocks = self._optional(
            lambda: [float(c) for c in pynvml.nvmlDeviceGetSupportedGraphicsClocks(handle, top) if c > 0],
            none,
        )
        return (min(clocks), max(clocks)) if clocks else (0.0, 0.0)

    def _handle(self, uuid: str) -> Any:
        try:
            return self._handles[uuid]
        except KeyError:
            raise GpuBackendError(f"GPU {uuid} is not on this node") from None

    def power_watts(self, uuid: str) -> float:
        handle = self._handle(uuid)
        return float(
            self._call(lambda: pynvml.nvmlDeviceGetPowerUsage(handle), f"reading GPU {uuid}'s power") / 1000
        )

    def gpus(self) -> list[GpuInfo]:
        return list(self._infos)

    def energy_counter_joules(self, uuid: str) -> float:
        handle = self._handle(uuid)
        mj = self._call(
            lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle), f"reading GPU {uuid}'s energy"
        )
        return float(mj) / 1000

    def read(self, uuid: str, energy: bool = True) -> GpuReading:
        handle = self._handle(uuid)
        joules: float | None = None
        if self._sampler is not None and uuid in self._sampled:
            joules = self._sampler.energy_joules(uuid)
        elif energy:
            joules = self.energy_counter_joules(uuid)
        v = {
            name: self._call(partial(call, handle), f"reading GPU {uuid}'s {name}")
            if required
            else self._optional(partial(call, handle), 0.0)
            for name, call, required in _READS
        }
        return GpuReading(
            uuid=uuid,
            energy_joules=joules,
            power_watts=v["power_mw"] / 1000,
            enforced_limit_watts=v["enforced_limit_mw"] / 1000,
            utilization_percent=v["utilization_percent"],
            sm_clock_mhz=v["sm_clock_mhz"],
            mem_clock_mhz=v["mem_clock_mhz"],
            temperature_c=v["temperature_c"],
            throttle_reasons=throttle_reasons(int(v["throttle_mask"])),
        )

    def call_costs(self, uuid: str, repeats: int = 20) -> dict[str, float]:
        """Milliseconds of CPU each NVML read of `read()` costs (for the overhead benchmark)."""
        handle = self._handle(uuid)
        reads = [
            *_READS,
            ("energy_mj", lambda h: float(pynvml.nvmlDeviceGetTotalEnergyConsumption(h)), False),
        ]
        costs = {}
        for name, call, _ in reads:
            start = time.thread_time()
            for _ in range(repeats):
                self._optional(partial(call, handle), 0.0)
            costs[name] = (time.thread_time() - start) / repeats * 1000
        return costs

    def set_power_limit(self, uuid: str, watts: float) -> None:
        info = next((i for i in self._infos if i.uuid == uuid), None)
        if info is None:
            raise GpuBackendError(f"GPU {uuid} is not on this node")
        if self.read_only:
            raise GpuBackendError(f"refusing to set GPU {uuid}'s power limit: the NVML backend is read-only")
        if info.mig_enabled:
            raise GpuBackendError(f"refusing to set GPU {uuid}'s power limit: MIG is enabled on it")
        if not info.min_limit_watts <= watts <= info.max_limit_watts:
            raise GpuBackendError(
                f"{watts} W is outside GPU {uuid}'s constraints "
                f"[{info.min_limit_watts}, {info.max_limit_watts}] W"
            )
        handle = self._handles[uuid]
        self._call(
            lambda: pynvml.nvmlDeviceSetPowerManagementLimit(handle, round(watts * 1000)),
            f"setting GPU {uuid}'s power limit to {watts} W",
        )

    def set_locked_sm_clock(self, uuid: str, max_mhz: float | None) -> None:
        """Lock the SM clock to [lowest supported, `max_mhz`] (nvmlDeviceSetGpuLockedClocks), or
        with None reset it (nvmlDeviceResetGpuLockedClocks)."""
        info = next((i for i in self._infos if i.uuid == uuid), None)
        if info is None:
            raise GpuBackendError(f"GPU {uuid} is not on this node")
        what = "reset" if max_mhz is None else "lock"
        if self.read_only:
            raise GpuBackendError(f"refusing to {what} GPU {uuid}'s SM clocks: the NVML backend is read-only")
        if info.mig_enabled:
            raise GpuBackendError(f"refusing to {what} GPU {uuid}'s SM clocks: MIG is enabled on it")
        handle = self._handles[uuid]
        if max_mhz is None:
            self._call(
                lambda: pynvml.nvmlDeviceResetGpuLockedClocks(handle), f"resetting GPU {uuid}'s locked clocks"
            )
            return
        if not info.clock_range_known:
            raise GpuBackendError(
                f"refusing to lock GPU {uuid}'s SM clocks: NVML lists no supported SM clocks"
            )
        lo, hi = info.min_sm_clock_mhz, info.max_sm_clock_mhz
        if not lo <= max_mhz <= hi:
            raise GpuBackendError(
                f"{max_mhz} MHz is outside GPU {uuid}'s supported SM clocks [{lo:g}, {hi:g}] MHz"
            )
        self._call(
            lambda: pynvml.nvmlDeviceSetGpuLockedClocks(handle, round(lo), math.floor(max_mhz)),
            f"locking GPU {uuid}'s SM clocks to [{lo:g}, {max_mhz:g}] MHz",
        )

    def power_instant_watts(self, uuid: str) -> float | None:
        """The instantaneous power field (Hopper and newer drivers); None where unsupported.
        `read()` reports nvmlDeviceGetPowerUsage, which recent drivers average over a second."""
        handle = self._handle(uuid)
        try:
            [value] = pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_POWER_INSTANT])
        except pynvml.NVMLError:
            return None
        return _field_value(value) / 1000 if value.nvmlReturn == pynvml.NVML_SUCCESS else None

    def versions(self) -> dict[str, str]:
        cuda = self._optional(pynvml.nvmlSystemGetCudaDriverVersion, 0)
        return {
            "driver": str(self._call(pynvml.nvmlSystemGetDriverVersion, "reading the driver version")),
            "nvml": str(self._optional(pynvml.nvmlSystemGetNVMLVersion, "")),
            "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else "",
        }

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
        self._optional(pynvml.nvmlShutdown, None)
