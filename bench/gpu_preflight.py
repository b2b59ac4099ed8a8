"""What both real-GPU benchmarks check before they touch a GPU, and how they say what is missing.

NVML is opened read-only with every pynvml setter disabled first, so nothing a benchmark runs can
change a GPU setting; PyTorch must see CUDA; the GPU asked for must exist.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edpilot_agent.backend import GpuInfo
    from edpilot_agent.nvml import NvmlBackend


@dataclass(frozen=True)
class OpenGpu:
    backend: NvmlBackend
    gpus: list[GpuInfo]  # every GPU NVML sees
    info: GpuInfo  # the one asked for
    torch: ModuleType
    setters_forbidden: int


def open_gpu(script: str, index: int) -> OpenGpu | None:
    """The GPU at `index`, read-only; None (after saying why on stderr) when it cannot be used."""

    def refuse(why: str) -> None:
        print(f"{script}: {why}", file=sys.stderr)

    try:
        from edpilot_agent.backend import GpuBackendError
        from edpilot_agent.nvml import NvmlBackend, forbid_setters

        disabled = forbid_setters()
        backend = NvmlBackend(read_only=True)
    except (ImportError, GpuBackendError) as exc:
        refuse(f"no usable NVIDIA GPU here (cannot use NVML here: {exc})")
        return None
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        refuse("PyTorch is not installed; it runs the GPU load")
        return None
    if not torch.cuda.is_available():
        refuse("PyTorch sees no CUDA GPU")
        return None
    gpus = list(backend.gpus())
    if not 0 <= index < len(gpus):
        refuse(f"no GPU {index}; NVML sees {len(gpus)}")
        return None
    return OpenGpu(backend, gpus, gpus[index], torch, len(disabled))
