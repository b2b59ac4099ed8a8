"""Which pod holds which GPU of this node, from what the kubelet says each pod's containers were
given (the pod-resources API): device-plugin device IDs and DRA devices. Pure.

- Device plugin (`nvidia.com/gpu`): NVIDIA's plugin hands GPUs out by UUID (its default
  DEVICE_ID_STRATEGY); with time-slicing or MPS it hands out replicas named `<uuid>::<n>`, the same
  GPU for several pods: such a GPU is shared, whoever holds it now.
- DRA: a device (driver, pool, device) of a configured driver is the GPU whose UUID the driver
  published in this node's ResourceSlices (`edpilot.dra`), never a UUID from anywhere else; a share
  of a device (`share_id`) or a MIG partition is shared.

The setter (the agent's privileged half, which alone may read the kubelet's socket) sends what the
kubelet said as JSON (`encode`); the agent parses it strictly (`decode`) and resolves it here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from edpilot.dra import DeviceKey, DraConfig, SliceDevice
from edpilot_agent.pods import PodInfo

# `<uuid>` or a time-slicing/MPS replica `<uuid>::<n>`.
_PLUGIN_ID: Final = re.compile(r"([A-Za-z0-9-]{1,96})(::[0-9]{1,6})?")
# Bounds on what the setter's answer may hold: Kubernetes' own limits on these names.
MAX_PODS: Final = 2048
MAX_DEVICES: Final = 256
_NAME: Final = re.compile(r"[A-Za-z0-9._/:-]{1,253}")
_POD_KEY: Final = re.compile(r"[a-z0-9.-]{1,63}/[a-z0-9.-]{1,253}")


@dataclass(frozen=True)
class DynamicDevice:
    """One DRA device the kubelet prepared for a pod's container."""

    driver: str
    pool: str
    device: str
    share_id: str = ""

    @property
    def key(self) -> DeviceKey:
        return (self.driver, self.pool, self.device)


@dataclass(frozen=True)
class PodDevices:
    """What one pod's containers were given: device IDs of nvidia.com/gpu and DRA devices."""

    plugin: tuple[str, ...] = ()
    dynamic: tuple[DynamicDevice, ...] = ()


class GpuAllocations(Protocol):
    """What each pod was given (device-plugin IDs, DRA devices): the kubelet's pod-resources API,
    the setter relaying it, or the simulator playing the kubelet."""

    def allocations(self, pods: Sequence[PodInfo]) -> Mapping[str, PodDevices]: ...


@dataclass(frozen=True)
class Holdings:
    """Pod (namespace/name) -> the UUIDs of the GPUs it holds, and the GPUs handed out as shared."""

    by_pod: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    shared: frozenset[str] = frozenset()

    def holders(self) -> dict[str, set[str]]:
        """GPU UUID -> the pods holding it."""
        result: dict[str, set[str]] = {}
        for pod, uuids in self.by_pod.items():
            for uuid in uuids:
                result.setdefault(uuid, set()).add(pod)
        return result


def resolve(
    devices: Mapping[str, PodDevices], catalog: Mapping[DeviceKey, SliceDevice], dra: DraConfig | None
) -> Holdings:
    """The GPUs each pod holds. A DRA device of a driver not in `dra` (a NIC), or one that no slice
    of this node gives a UUID, is not a GPU edpilot knows: left out, like an unknown device ID."""
    by_pod: dict[str, tuple[str, ...]] = {}
    shared: set[str] = set()
    for pod, given in devices.items():
        uuids: set[str] = set()
        for device_id in given.plugin:
            match = _PLUGIN_ID.fullmatch(device_id)
            if match is None:
                continue
            uuids.add(match.group(1))
            if match.group(2):
                shared.add(match.group(1))
        drivers = dra.drivers if dra is not None else frozenset()
        for device in given.dynamic:
            published = catalog.get(device.key)
            if device.driver not in drivers or published is None or published.uuid is None:
                continue
            uuids.add(published.uuid)
            if device.share_id or published.partition:
                shared.add(published.uuid)
        if uuids:
            by_pod[pod] = tuple(sorted(uuids))
    return Holdings(by_pod, frozenset(shared))


# ---------------------------------------------------------------- the setter's wire format


def encode(devices: Mapping[str, PodDevices]) -> str:
    """`{"namespace/pod": {"plugin": [id, ...], "dynamic": [[driver, pool, device, share id], ...]}}`"""
    return json.dumps(
        {
            pod: {
                "plugin": list(given.plugin),
                "dynamic": [[d.driver, d.pool, d.device, d.share_id] for d in given.dynamic],
            }
            for pod, given in devices.items()
        },
        separators=(",", ":"),
    )


def decode(text: str) -> dict[str, PodDevices]:
    """The inverse of `encode`; anything else (a wrong type, a name Kubernetes would not allow, too
    many entries) is a ValueError: the whole answer is refused, never half read."""
    body: Any = json.loads(text)
    if not isinstance(body, dict) or len(body) > MAX_PODS:
        raise ValueError("the allocations are not an object of at most 2048 pods")
    result: dict[str, PodDevices] = {}
    for pod, given in body.items():
        if not _POD_KEY.fullmatch(pod) or not isinstance(given, dict):
            raise ValueError("an allocation names no pod")
        plugin, dynamic = given.get("plugin", []), given.get("dynamic", [])
        if (
            not isinstance(plugin, list)
            or not isinstance(dynamic, list)
            or len(plugin) + len(dynamic) > MAX_DEVICES
        ):
            raise ValueError("a pod's devices are not two lists of at most 256 entries")
        if not all(isinstance(i, str) and _NAME.fullmatch(i) for i in plugin):
            raise ValueError("a device ID is not a name")
        entries = []
        for entry in dynamic:
            if (
                not isinstance(entry, list)
                or len(entry) != 4
                or not all(isinstance(part, str) for part in entry)
                or not all(_NAME.fullmatch(part) for part in entry[:3])
                or not (entry[3] == "" or _NAME.fullmatch(entry[3]))
            ):
                raise ValueError("a DRA device is not [driver, pool, device, share id]")
            entries.append(DynamicDevice(*entry))
        result[pod] = PodDevices(tuple(plugin), tuple(entries))
    return result
