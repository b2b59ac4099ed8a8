"""Objects many tests build: an H100's report entry with the fields a test cares about."""

from __future__ import annotations

from typing import Any

from edpilot.models import GPUStatus

H100_NVML_NAME = "NVIDIA H100 80GB HBM3"


def h100_status(index: int = 0, uuid: str | None = None, **fields: Any) -> GPUStatus:
    """An H100 SXM as the agent reports it (limits 200-700 W, at its default 700 W, idle at 70 W);
    `fields` override any GPUStatus field."""
    values: dict[str, Any] = {
        "index": index,
        "uuid": uuid or f"GPU-{index}",
        "model": H100_NVML_NAME,
        "minLimitWatts": 200,
        "maxLimitWatts": 700,
        "defaultLimitWatts": 700,
        "enforcedLimitWatts": 700,
        "powerWatts": 70,
        "energyJoules": 0,
    }
    return GPUStatus.model_validate({**values, **fields})
