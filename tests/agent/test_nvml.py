"""The NVML backend's pure parts and its behaviour on a machine without a GPU (like this one)."""

from __future__ import annotations

import pynvml
import pytest
from edpilot_agent.backend import GpuBackendError
from edpilot_agent.nvml import NvmlBackend, describe_error, forbid_setters, throttle_reason_names


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
    assert throttle_reason_names(0x004 | 0x040) == ("SwPowerCap", "HwThermalSlowdown")
    assert throttle_reason_names(0) == ()


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
    for name in (
        "nvmlDeviceSetPowerManagementLimit",
        "nvmlDeviceResetGpuLockedClocks",
        "nvmlDeviceSetMigMode",
    ):
        assert name in disabled
        with pytest.raises(GpuBackendError, match="forbidden"):
            getattr(pynvml, name)(None, 0)
    assert "nvmlDeviceGetPowerUsage" not in disabled
