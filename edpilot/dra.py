"""GPUs allocated through Dynamic Resource Allocation (`resource.k8s.io/v1`), as edpilot reads them.
Pure: API bodies (plain mappings) in, small frozen values out.

What is trusted for what (docs/security.md, "GPUs allocated through DRA"):
- a device's GPU UUID comes only from the ResourceSlice its DRA driver published (tenants cannot
  write ResourceSlices), never from a claim, a template or a pod;
- which devices a claim holds comes only from `status.allocation` (written by kube-scheduler), and
  which pods use a claim only from `status.reservedFor` (kube-scheduler and the resource-claim
  controller); a tenant writes a claim's spec, never its status;
- a claim's or a template's spec (tenant-written) only sizes a pod that has no allocation yet, for
  the extender's placement of that tenant's own pod.

NVIDIA's DRA driver (driver and DeviceClass `gpu.nvidia.com`) names a whole GPU `gpu-<minor>` with
attributes `type: gpu` and `uuid`, and a MIG device with `type: mig`, its own `uuid` and its
GPU's `parentUUID`. The attribute that carries the UUID is configurable for other drivers.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

DEFAULT_DRIVERS: Final = ("gpu.nvidia.com",)
DEFAULT_DEVICE_CLASSES: Final = ("gpu.nvidia.com", "mig.nvidia.com")
DEFAULT_UUID_ATTRIBUTE: Final = "uuid"
PARENT_UUID_ATTRIBUTE: Final = "parentUUID"
TYPE_ATTRIBUTE: Final = "type"
# Device types of NVIDIA's driver that are (part of) a GPU the node's NVML sees; others (vfio
# passthrough) are not GPUs edpilot can measure or cap.
GPU_TYPES: Final = frozenset({"gpu", "mig"})
PARTITION_TYPES: Final = frozenset({"mig"})
# What NVML prints as a UUID (GPU-..., MIG-...), and what the agent's setter accepts.
_UUID: Final = re.compile(r"[A-Za-z0-9-]{1,96}")
# A claim holds at most 32 results; a request asks for at most that many devices.
MAX_DEVICES_PER_REQUEST: Final = 32

DeviceKey = tuple[str, str, str]  # (driver, pool, device): the name of a device in DRA


@dataclass(frozen=True)
class DraConfig:
    """Which DRA devices are GPUs: those of `drivers` (allocated) or of `device_classes` (requested),
    and the slice attribute that carries a GPU's UUID."""

    drivers: frozenset[str] = frozenset(DEFAULT_DRIVERS)
    device_classes: frozenset[str] = frozenset(DEFAULT_DEVICE_CLASSES)
    uuid_attribute: str = DEFAULT_UUID_ATTRIBUTE


DEFAULT_CONFIG: Final = DraConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The DRA flags the operator, the extender and the agent share."""
    group = parser.add_argument_group("GPUs allocated through DRA (resource.k8s.io/v1)")
    group.add_argument("--no-dra", action="store_true", help="read no DRA objects (a cluster without DRA)")
    group.add_argument(
        "--dra-driver",
        action="append",
        help=f"a DRA driver whose devices are GPUs (repeatable; default {', '.join(DEFAULT_DRIVERS)})",
    )
    group.add_argument(
        "--dra-device-class",
        action="append",
        help="a DeviceClass whose requests ask for GPUs (repeatable; default "
        f"{', '.join(DEFAULT_DEVICE_CLASSES)})",
    )
    group.add_argument(
        "--dra-uuid-attribute",
        default=DEFAULT_UUID_ATTRIBUTE,
        help=f"the ResourceSlice device attribute holding a GPU's UUID (default {DEFAULT_UUID_ATTRIBUTE})",
    )


def config_from(args: argparse.Namespace) -> DraConfig | None:
    """The DRA configuration `add_arguments`' flags give; None with --no-dra."""
    if args.no_dra:
        return None
    return DraConfig(
        drivers=frozenset(args.dra_driver or DEFAULT_DRIVERS),
        device_classes=frozenset(args.dra_device_class or DEFAULT_DEVICE_CLASSES),
        uuid_attribute=args.dra_uuid_attribute,
    )


# ---------------------------------------------------------------- ResourceSlices (driver-written)


@dataclass(frozen=True)
class SliceDevice:
    """One device a driver published. `uuid` is the UUID of the whole GPU the device is (or is part
    of, for a partition); None when the slice gives none."""

    key: DeviceKey
    node: str
    generation: int
    uuid: str | None
    partition: bool = False  # a MIG device: a part of the GPU `uuid`
    shareable: bool = False  # allowMultipleAllocations: several claims may hold it at once


def _attribute(attributes: Mapping[str, Any], driver: str, name: str) -> str | None:
    """A string attribute by its name, unqualified (the driver's own domain) or qualified."""
    for key in (name, f"{driver}/{name}"):
        value = attributes.get(key)
        if isinstance(value, Mapping) and isinstance(value.get("string"), str):
            return str(value["string"])
    return None


def slice_devices(body: Mapping[str, Any], config: DraConfig = DEFAULT_CONFIG) -> tuple[SliceDevice, ...]:
    """The GPU devices of one ResourceSlice of a configured driver (none for other drivers)."""
    spec = body.get("spec") or {}
    driver = str(spec.get("driver") or "")
    pool = spec.get("pool") or {}
    if driver not in config.drivers or not isinstance(pool, Mapping):
        return ()
    generation = pool.get("generation")
    generation = generation if isinstance(generation, int) else 0
    node = str(spec.get("nodeName") or "")
    devices: list[SliceDevice] = []
    for device in spec.get("devices") or []:
        if not isinstance(device, Mapping) or not isinstance(device.get("name"), str):
            continue
        attributes = device.get("attributes") or {}
        attributes = attributes if isinstance(attributes, Mapping) else {}
        kind = _attribute(attributes, driver, TYPE_ATTRIBUTE)
        if kind is not None and kind not in GPU_TYPES:
            continue
        partition = kind in PARTITION_TYPES
        # A partition stands for the GPU it is part of (which `edpilot.sharing` never caps).
        uuid = _attribute(attributes, driver, PARENT_UUID_ATTRIBUTE if partition else config.uuid_attribute)
        devices.append(
            SliceDevice(
                key=(driver, str(pool.get("name") or ""), str(device["name"])),
                node=str(device.get("nodeName") or node),
                generation=generation,
                uuid=uuid if uuid is not None and _UUID.fullmatch(uuid) else None,
                partition=partition,
                shareable=device.get("allowMultipleAllocations") is True,
            )
        )
    return tuple(devices)


def device_catalog(devices: Iterable[SliceDevice]) -> dict[DeviceKey, SliceDevice]:
    """The devices of every pool's newest generation: a driver that republishes a pool bumps its
    generation, and slices of older generations still around are stale."""
    listed = list(devices)
    newest: dict[tuple[str, str], int] = {}
    for d in listed:
        pool = d.key[:2]
        newest[pool] = max(newest.get(pool, d.generation), d.generation)
    return {d.key: d for d in listed if d.generation == newest[d.key[:2]]}


# ---------------------------------------------------------------- ResourceClaims


@dataclass(frozen=True)
class AllocatedDevice:
    """One result of a claim's allocation (`status.allocation.devices.results[]`)."""

    key: DeviceKey
    admin_access: bool = False  # given alongside whoever else holds the device
    share_id: str | None = None  # one share of a device that allows multiple allocations


@dataclass(frozen=True)
class ClaimView:
    """What edpilot reads of one ResourceClaim."""

    namespace: str
    name: str
    consumers: tuple[str, ...] = ()  # UIDs of the pods in status.reservedFor
    devices: tuple[AllocatedDevice, ...] = ()  # status.allocation: the scheduler's
    requested_gpus: int = 0  # from the spec (a tenant's): only for a claim not allocated yet

    @property
    def allocated(self) -> bool:
        return bool(self.devices)


def requested_gpus(claim_spec: Mapping[str, Any], config: DraConfig = DEFAULT_CONFIG) -> int:
    """GPUs a claim's spec asks for: the requests of a configured DeviceClass, `count` each (one
    for allocationMode All: at least one). Of a request with `firstAvailable` alternatives, the
    first one (the one the scheduler tries first) counts."""
    total = 0
    devices = claim_spec.get("devices") or {}
    for request in (devices.get("requests") or []) if isinstance(devices, Mapping) else []:
        if not isinstance(request, Mapping):
            continue
        exactly = request.get("exactly")
        alternatives = request.get("firstAvailable") or []
        wanted = exactly if isinstance(exactly, Mapping) else (alternatives[0] if alternatives else None)
        if not isinstance(wanted, Mapping) or wanted.get("deviceClassName") not in config.device_classes:
            continue
        count = wanted.get("count", 1)
        if wanted.get("allocationMode") == "All" or not isinstance(count, int):
            count = 1
        total += min(max(count, 1), MAX_DEVICES_PER_REQUEST)
    return total


def claim_view(body: Mapping[str, Any], config: DraConfig = DEFAULT_CONFIG) -> ClaimView:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    consumers = tuple(
        str(ref["uid"])
        for ref in status.get("reservedFor") or []
        if isinstance(ref, Mapping)
        and ref.get("resource") == "pods"
        and not ref.get("apiGroup")
        and ref.get("uid")
    )
    allocation = status.get("allocation") or {}
    results = (
        ((allocation.get("devices") or {}).get("results") or []) if isinstance(allocation, Mapping) else []
    )
    devices = tuple(
        AllocatedDevice(
            key=(str(r.get("driver")), str(r.get("pool") or ""), str(r.get("device") or "")),
            admin_access=r.get("adminAccess") is True,
            share_id=str(r["shareID"]) if r.get("shareID") else None,
        )
        for r in results
        if isinstance(r, Mapping) and r.get("driver") in config.drivers
    )
    return ClaimView(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        consumers=consumers,
        devices=devices,
        requested_gpus=requested_gpus(body.get("spec") or {}, config),
    )


def pod_claim_sources(pod_spec: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The claims a pod's spec names, as ("claim" | "template", name): what a pending pod will get.
    Tenant-written: it sizes only that pod's own placement."""
    sources: list[tuple[str, str]] = []
    for entry in pod_spec.get("resourceClaims") or []:
        if not isinstance(entry, Mapping):
            continue
        if entry.get("resourceClaimName"):
            sources.append(("claim", str(entry["resourceClaimName"])))
        elif entry.get("resourceClaimTemplateName"):
            sources.append(("template", str(entry["resourceClaimTemplateName"])))
    return tuple(sources)


# ---------------------------------------------------------------- a pod's GPUs


@dataclass(frozen=True)
class PodGpu:
    """One GPU device allocated to a pod through DRA. `uuid` is None where the driver's slice gives
    none (the device is counted but cannot be measured or capped); `shared` says why the pod does
    not hold the whole GPU alone, empty when it does (as far as its own claim tells)."""

    key: DeviceKey
    uuid: str | None
    claim: str = ""  # the claim's name, in the pod's namespace
    shared: str = ""


def pod_gpus(
    claims: Iterable[ClaimView], catalog: Mapping[DeviceKey, SliceDevice], namespace: str, pod_uid: str
) -> tuple[PodGpu, ...]:
    """The GPU devices of the claims reserved for the pod (by UID, in its namespace): a claim of
    another namespace, or one not reserved for this pod, never speaks for it."""
    gpus: list[PodGpu] = []
    for claim in claims:
        if claim.namespace != namespace or pod_uid not in claim.consumers:
            continue
        for device in claim.devices:
            published = catalog.get(device.key)
            gpus.append(
                PodGpu(
                    key=device.key,
                    uuid=published.uuid if published is not None else None,
                    claim=claim.name,
                    shared=_why_shared(claim, device, published),
                )
            )
    return tuple(gpus)


def _why_shared(claim: ClaimView, device: AllocatedDevice, published: SliceDevice | None) -> str:
    if device.admin_access:
        return "allocated for admin access, alongside its holder"
    if device.share_id is not None or (published is not None and published.shareable):
        return "a share of a device that allows several allocations"
    if published is not None and published.partition:
        return "a MIG partition"
    if len(claim.consumers) > 1:
        return f"claim {claim.name} is reserved for {len(claim.consumers)} pods"
    return ""


@dataclass(frozen=True)
class DraHoldings:
    """Per GPU UUID of a node: the pods DRA allocated it to, and why it is shared if it is."""

    holders: Mapping[str, frozenset[str]] = field(default_factory=dict)
    shared: Mapping[str, str] = field(default_factory=dict)


def holdings(allocated: Mapping[str, Sequence[PodGpu]]) -> DraHoldings:
    """`allocated` maps each pod (key) to its DRA GPUs (`pod_gpus`)."""
    holders: dict[str, set[str]] = {}
    shared: dict[str, str] = {}
    devices: dict[str, set[DeviceKey]] = {}
    for pod, gpus in allocated.items():
        for gpu in gpus:
            if gpu.uuid is None:
                continue
            holders.setdefault(gpu.uuid, set()).add(pod)
            devices.setdefault(gpu.uuid, set()).add(gpu.key)
            if gpu.shared:
                shared.setdefault(gpu.uuid, gpu.shared)
    for uuid, keys in devices.items():
        if len(keys) > 1:
            # Two devices of one GPU: partitions, or a driver listing it twice.
            shared.setdefault(uuid, f"published as {len(keys)} DRA devices")
    return DraHoldings({u: frozenset(p) for u, p in holders.items()}, shared)
