"""The NVML backend's pure parts and its behaviour on a machine without a GPU (like this one)."""

from __future__ import annotations

from collections.abc import Callable

import pynvml
import pytest
from edpilot_agent.backend import GpuBackendError, GpuInfo, GpuReading
from edpilot_agent.nvml import NvmlBackend, describe_error, forbid_setters
from edpilot_agent.reporter import gpu_status

from edpilot import placement
from edpilot.contract import throttle_reasons


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "libnvidia-ml.so.1) was not found"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "needs root or CAP_SYS_ADMIN"),
        (pynvml.NVML_ERROR_NOT_SUPPORTED, "does not support the call"),
        (pynvml.NVML_ERROR_GPU_IS_LOST, "the GPU is lost"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "kernel driver is not loaded"),
    ],
)
def test_nvml_errors_become_clear_messages(code: int, words: str) -> None:
    message = describe_error(pynvml.NVMLError(code), "setting GPU-x's power limit to 300 W")
    assert message.startswith("setting GPU-x's power limit to 300 W: ")
    assert words in message


def test_throttle_reasons_are_named_like_nvml() -> None:
    assert throttle_reasons(0x004 | 0x040) == ("SwPowerCap", "HwThermalSlowdown")
    assert throttle_reasons(0) == ()


def test_without_a_driver_the_backend_fails_with_a_clear_message() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML")
    with pytest.raises(GpuBackendError, match=r"NVML library .* was not found|driver"):
        NvmlBackend(read_only=True)


def test_forbidding_setters_makes_every_gpu_changing_call_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in dir(pynvml):  # restored after the test
        if name.startswith("nvml"):
            monkeypatch.setattr(pynvml, name, getattr(pynvml, name))
    disabled = forbid_setters()
    # Every device call that changes a setting, power limits, clocks and MIG included.
    changing = [n for n in dir(pynvml) if n.startswith(("nvmlDeviceSet", "nvmlDeviceReset"))]
    assert len(changing) > 10
    for name in changing:
        assert name in disabled, name  # checked before the call: an unwrapped setter is never called
        with pytest.raises(GpuBackendError, match="forbidden"):
            getattr(pynvml, name)(None, 0)
    assert "nvmlDeviceGetPowerUsage" not in disabled


@pytest.mark.parametrize(
    ("mask", "blocked"),
    [
        (0x040, "hardware thermal slowdown"),
        (0x020, "software thermal slowdown"),
        (0x080, "power-brake slowdown"),
        (0x004, ""),  # the power cap is edpilot's own doing, not a reason to avoid the node
        (0x001, ""),
    ],
)
def test_a_throttle_the_agent_reports_from_nvml_is_the_one_placement_avoids(mask: int, blocked: str) -> None:
    """The agent's names travel through GPUStatus to the extender's filter unchanged."""
    info = GpuInfo(
        index=0,
        uuid="GPU-0",
        model="NVIDIA H100 80GB HBM3",
        min_limit_watts=200,
        max_limit_watts=700,
        default_limit_watts=700,
    )
    reading = GpuReading(
        uuid="GPU-0",
        energy_joules=1.0,
        power_watts=690,
        enforced_limit_watts=700,
        utilization_percent=100,
        sm_clock_mhz=1500,
        mem_clock_mhz=2619,
        temperature_c=88,
        throttle_reasons=throttle_reasons(mask),
    )
    text = placement.blocking_throttle([gpu_status(info, reading, 1.0, ["ml/p"])])
    assert (blocked in text and text != "") if blocked else text == ""


class FakeDriver:
    """The pynvml calls NvmlBackend makes for one H100, recording every setter call; `old` is a
    driver that cannot list supported clocks. Nothing reaches a real GPU: every pynvml setter is
    replaced first by one that fails the test, and only the recorded ones are put back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, old: bool = False) -> None:
        self.calls: list[tuple[object, ...]] = []

        def real_setter(*args: object) -> None:
            pytest.fail("a test reached a real NVML setter")

        for name in dir(pynvml):
            if name.startswith(("nvmlDeviceSet", "nvmlDeviceReset")):
                monkeypatch.setattr(pynvml, name, real_setter)

        def not_found(*args: object) -> object:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

        def record(name: str) -> Callable[..., None]:
            return lambda *args: self.calls.append((name, *args[1:]))

        fake: dict[str, Callable[..., object]] = {
            "nvmlInit": lambda: None,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetCount": lambda: 1,
            "nvmlDeviceGetHandleByIndex": lambda i: f"handle-{i}",
            "nvmlDeviceGetUUID": lambda h: "GPU-fake-0",
            "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
            "nvmlDeviceGetPowerManagementLimitConstraints": lambda h: (200000, 700000),
            "nvmlDeviceGetPowerManagementDefaultLimit": lambda h: 700000,
            "nvmlDeviceGetMigMode": lambda h: (0, 0),
            "nvmlDeviceGetTotalEnergyConsumption": lambda h: 1000,
            "nvmlDeviceGetSupportedMemoryClocks": not_found if old else lambda h: [2619, 1593],
            "nvmlDeviceGetSupportedGraphicsClocks": not_found
            if old
            else lambda h, mem: [1980, 1965, 1500, 345] if mem == 2619 else [1200, 210],
            "nvmlDeviceSetPowerManagementLimit": record("nvmlDeviceSetPowerManagementLimit"),
            "nvmlDeviceSetGpuLockedClocks": record("nvmlDeviceSetGpuLockedClocks"),
            "nvmlDeviceResetGpuLockedClocks": record("nvmlDeviceResetGpuLockedClocks"),
        }
        for name, fn in fake.items():
            monkeypatch.setattr(pynvml, name, fn)


def test_the_supported_sm_clocks_are_read_at_the_highest_memory_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FakeDriver(monkeypatch)
    [info] = NvmlBackend().gpus()
    assert (info.min_sm_clock_mhz, info.max_sm_clock_mhz) == (345.0, 1980.0)


def test_an_old_driver_yields_an_unknown_clock_range_and_no_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = FakeDriver(monkeypatch, old=True)
    backend = NvmlBackend()
    [info] = backend.gpus()
    assert (info.min_sm_clock_mhz, info.max_sm_clock_mhz) == (0.0, 0.0)
    with pytest.raises(GpuBackendError, match="supported SM clocks"):
        backend.set_locked_sm_clock(info.uuid, 1200)
    assert driver.calls == []


def test_a_lock_spans_the_lowest_supported_clock_to_the_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = FakeDriver(monkeypatch)
    backend = NvmlBackend()
    backend.set_locked_sm_clock("GPU-fake-0", 1200)
    backend.set_locked_sm_clock("GPU-fake-0", None)
    assert driver.calls == [
        ("nvmlDeviceSetGpuLockedClocks", 345, 1200),
        ("nvmlDeviceResetGpuLockedClocks",),
    ]
    for outside in (344.0, 1981.0, float("nan")):
        with pytest.raises(GpuBackendError, match="outside"):
            backend.set_locked_sm_clock("GPU-fake-0", outside)
    with pytest.raises(GpuBackendError, match="not on this node"):
        backend.set_locked_sm_clock("GPU-other", None)
    assert len(driver.calls) == 2


def test_a_read_only_backend_never_locks_nor_resets_clocks(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = FakeDriver(monkeypatch)
    backend = NvmlBackend(read_only=True)
    for mhz in (1200.0, None):
        with pytest.raises(GpuBackendError, match="read-only"):
            backend.set_locked_sm_clock("GPU-fake-0", mhz)
    with pytest.raises(GpuBackendError, match="read-only"):
        backend.set_power_limit("GPU-fake-0", 300)
    assert driver.calls == []
    # ...and a tool that forbids setters makes the clock calls raise before they reach the driver.
    for name in dir(pynvml):  # restored after the test
        if name.startswith("nvml"):
            monkeypatch.setattr(pynvml, name, getattr(pynvml, name))
    disabled = forbid_setters()
    assert {"nvmlDeviceSetGpuLockedClocks", "nvmlDeviceResetGpuLockedClocks"} <= set(disabled)
    backend.read_only = False
    with pytest.raises(GpuBackendError, match="forbidden"):
        backend.set_locked_sm_clock("GPU-fake-0", 1200)
    assert driver.calls == []
