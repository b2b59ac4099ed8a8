"""DRA as edpilot reads it (edpilot.dra): slices, claims, the GPUs of a pod, and who else holds them."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from edpilot.dra import (
    DEFAULT_CONFIG,
    AllocatedDevice,
    ClaimView,
    DraConfig,
    PodGpu,
    SliceDevice,
    add_arguments,
    claim_view,
    config_from,
    device_catalog,
    holdings,
    pod_claim_sources,
    pod_gpus,
    requested_gpus,
    slice_devices,
)

DRIVER = "gpu.nvidia.com"


def attr(value: str) -> dict[str, str]:
    return {"string": value}


def resource_slice(
    devices: list[dict[str, Any]], generation: int = 1, driver: str = DRIVER
) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"node-a-{driver}-{generation}"},
        "spec": {
            "driver": driver,
            "nodeName": "node-a",
            "pool": {"name": "node-a", "generation": generation, "resourceSliceCount": 1},
            "devices": devices,
        },
    }


def test_a_slice_of_nvidias_driver_gives_each_gpu_its_uuid() -> None:
    body = resource_slice(
        [
            {"name": "gpu-0", "attributes": {"type": attr("gpu"), "uuid": attr("GPU-0000")}},
            # Qualified names are the same attribute (unqualified ones are in the driver's domain).
            {"name": "gpu-1", "attributes": {"gpu.nvidia.com/uuid": attr("GPU-1111")}},
            {
                "name": "gpu-2-mig-1g.10gb-0",
                "attributes": {"type": attr("mig"), "uuid": attr("MIG-aaaa"), "parentUUID": attr("GPU-2222")},
            },
            {"name": "gpu-vfio-3", "attributes": {"type": attr("vfio"), "uuid": attr("GPU-3333")}},
            {"name": "gpu-4", "attributes": {"uuid": attr("GPU 4444; rm -rf /")}},
            {"name": "gpu-5", "attributes": {"uuid": {"int": 5}}, "allowMultipleAllocations": True},
        ]
    )
    devices = {d.key[2]: d for d in slice_devices(body)}
    assert devices["gpu-0"] == SliceDevice((DRIVER, "node-a", "gpu-0"), "node-a", 1, "GPU-0000")
    assert devices["gpu-1"].uuid == "GPU-1111"
    # A MIG device is a part of its parent GPU: that is the GPU NVML (and the agent) know.
    assert devices["gpu-2-mig-1g.10gb-0"].uuid == "GPU-2222" and devices["gpu-2-mig-1g.10gb-0"].partition
    assert "gpu-vfio-3" not in devices  # passthrough: no GPU the node's NVML measures
    assert devices["gpu-4"].uuid is None  # not a UUID
    assert devices["gpu-5"].uuid is None and devices["gpu-5"].shareable


def test_slices_of_other_drivers_are_not_gpus() -> None:
    body = resource_slice(
        [{"name": "nic-0", "attributes": {"uuid": attr("NIC-0")}}], driver="rdma.example.com"
    )
    assert slice_devices(body) == ()
    other = DraConfig(drivers=frozenset({"rdma.example.com"}))
    assert [d.uuid for d in slice_devices(body, other)] == ["NIC-0"]


def test_a_configured_uuid_attribute() -> None:
    body = resource_slice([{"name": "gpu-0", "attributes": {"serial": attr("GPU-7")}}])
    assert slice_devices(body)[0].uuid is None
    assert slice_devices(body, DraConfig(uuid_attribute="serial"))[0].uuid == "GPU-7"


def test_only_a_pools_newest_generation_counts() -> None:
    old = slice_devices(resource_slice([{"name": "gpu-0", "attributes": {"uuid": attr("GPU-old")}}], 1))
    new = slice_devices(resource_slice([{"name": "gpu-0", "attributes": {"uuid": attr("GPU-new")}}], 2))
    gone = slice_devices(resource_slice([{"name": "gpu-9", "attributes": {"uuid": attr("GPU-9")}}], 1))
    catalog = device_catalog([*old, *new, *gone])
    assert {k[2]: d.uuid for k, d in catalog.items()} == {"gpu-0": "GPU-new"}


def claim(
    name: str = "c",
    namespace: str = "ml",
    reserved: tuple[str, ...] = ("uid-a",),
    results: list[dict[str, Any]] | None = None,
    requests: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "reservedFor": [{"resource": "pods", "name": f"pod-{u}", "uid": u} for u in reserved],
    }
    if results is not None:
        status["allocation"] = {"devices": {"results": results}}
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"devices": {"requests": requests or []}},
        "status": status,
    }


def result(device: str, driver: str = DRIVER, **extra: Any) -> dict[str, Any]:
    return {"request": "gpu", "driver": driver, "pool": "node-a", "device": device, **extra}


def test_a_claims_devices_and_consumers_come_from_its_status() -> None:
    view = claim_view(
        claim(
            reserved=("uid-a", "uid-b"),
            results=[result("gpu-0"), result("gpu-1", adminAccess=True), result("nic-0", "rdma.example.com")],
        )
    )
    assert view.consumers == ("uid-a", "uid-b")
    assert view.devices == (
        AllocatedDevice((DRIVER, "node-a", "gpu-0")),
        AllocatedDevice((DRIVER, "node-a", "gpu-1"), admin_access=True),
    )
    share = claim_view(claim(results=[result("gpu-0", shareID="8d2c")]))
    assert share.devices[0].share_id == "8d2c"
    # A consumer that is not a pod of the core API is nobody edpilot governs.
    other = claim(reserved=())
    other["status"]["reservedFor"] = [
        {"apiGroup": "example.com", "resource": "pods", "name": "x", "uid": "u"}
    ]
    assert claim_view(other).consumers == ()


@pytest.mark.parametrize(
    ("requests", "gpus"),
    [
        ([{"name": "g", "exactly": {"deviceClassName": "gpu.nvidia.com"}}], 1),
        ([{"name": "g", "exactly": {"deviceClassName": "gpu.nvidia.com", "count": 4}}], 4),
        ([{"name": "g", "exactly": {"deviceClassName": "mig.nvidia.com", "count": 2}}], 2),
        ([{"name": "g", "exactly": {"deviceClassName": "gpu.nvidia.com", "allocationMode": "All"}}], 1),
        ([{"name": "g", "exactly": {"deviceClassName": "gpu.nvidia.com", "count": 10**9}}], 32),
        ([{"name": "n", "exactly": {"deviceClassName": "rdma.example.com", "count": 2}}], 0),
        (
            [
                {
                    "name": "g",
                    "firstAvailable": [
                        {"name": "big", "deviceClassName": "gpu.nvidia.com", "count": 2},
                        {"name": "small", "deviceClassName": "mig.nvidia.com"},
                    ],
                }
            ],
            2,
        ),
        ([{"name": "g", "exactly": {"deviceClassName": "gpu.nvidia.com", "count": "2"}}], 1),
    ],
)
def test_what_a_claim_spec_asks_for(requests: list[dict[str, Any]], gpus: int) -> None:
    assert requested_gpus({"devices": {"requests": requests}}) == gpus


def test_a_pods_claims_by_name() -> None:
    spec = {
        "resourceClaims": [
            {"name": "gpu", "resourceClaimTemplateName": "one-gpu"},
            {"name": "shared", "resourceClaimName": "team-gpu"},
            {"name": "broken"},
        ]
    }
    assert pod_claim_sources(spec) == (("template", "one-gpu"), ("claim", "team-gpu"))


CATALOG = device_catalog(
    [
        SliceDevice((DRIVER, "node-a", "gpu-0"), "node-a", 1, "GPU-0"),
        SliceDevice((DRIVER, "node-a", "gpu-1"), "node-a", 1, "GPU-1"),
        SliceDevice((DRIVER, "node-a", "gpu-2-mig"), "node-a", 1, "GPU-2", partition=True),
        SliceDevice((DRIVER, "node-a", "gpu-3"), "node-a", 1, "GPU-3", shareable=True),
    ]
)


def test_a_pods_gpus_are_those_of_the_claims_reserved_for_it_in_its_namespace() -> None:
    mine = ClaimView("ml", "mine", ("uid-a",), (AllocatedDevice((DRIVER, "node-a", "gpu-0")),))
    not_reserved = ClaimView("ml", "named", ("uid-b",), (AllocatedDevice((DRIVER, "node-a", "gpu-1")),))
    elsewhere = ClaimView("other", "mine", ("uid-a",), (AllocatedDevice((DRIVER, "node-a", "gpu-1")),))
    unknown = ClaimView("ml", "odd", ("uid-a",), (AllocatedDevice((DRIVER, "node-a", "gpu-7")),))
    gpus = pod_gpus([mine, not_reserved, elsewhere, unknown], CATALOG, "ml", "uid-a")
    assert gpus == (
        PodGpu((DRIVER, "node-a", "gpu-0"), "GPU-0", "mine"),
        PodGpu((DRIVER, "node-a", "gpu-7"), None, "odd"),  # counted, never measured or capped
    )


@pytest.mark.parametrize(
    ("claims", "shared"),
    [
        pytest.param(
            [ClaimView("ml", "c", ("a",), (AllocatedDevice((DRIVER, "node-a", "gpu-0")),))], {}, id="alone"
        ),
        pytest.param(
            [ClaimView("ml", "c", ("a", "b"), (AllocatedDevice((DRIVER, "node-a", "gpu-0")),))],
            {"GPU-0": "claim c is reserved for 2 pods"},
            id="one claim, two pods",
        ),
        pytest.param(
            [
                ClaimView("ml", "c", ("a",), (AllocatedDevice((DRIVER, "node-a", "gpu-0")),)),
                ClaimView(
                    "ml", "d", ("b",), (AllocatedDevice((DRIVER, "node-a", "gpu-0"), admin_access=True),)
                ),
            ],
            {"GPU-0": "allocated for admin access, alongside its holder"},
            id="admin access",
        ),
        pytest.param(
            [ClaimView("ml", "c", ("a",), (AllocatedDevice((DRIVER, "node-a", "gpu-0"), share_id="s1"),))],
            {"GPU-0": "a share of a device that allows several allocations"},
            id="consumable capacity",
        ),
        pytest.param(
            [ClaimView("ml", "c", ("a",), (AllocatedDevice((DRIVER, "node-a", "gpu-3")),))],
            {"GPU-3": "a share of a device that allows several allocations"},
            id="a device that allows several allocations",
        ),
        pytest.param(
            [ClaimView("ml", "c", ("a",), (AllocatedDevice((DRIVER, "node-a", "gpu-2-mig")),))],
            {"GPU-2": "a MIG partition"},
            id="MIG",
        ),
    ],
)
def test_who_else_holds_a_gpu(claims: list[ClaimView], shared: dict[str, str]) -> None:
    allocated = {f"ml/{uid}": pod_gpus(claims, CATALOG, "ml", uid) for uid in ("a", "b")}
    held = holdings(allocated)
    assert dict(held.shared) == shared


def test_two_devices_of_one_gpu_share_it() -> None:
    catalog = {
        (DRIVER, "n", "x"): SliceDevice((DRIVER, "n", "x"), "n", 1, "GPU-9"),
        (DRIVER, "n", "y"): SliceDevice((DRIVER, "n", "y"), "n", 1, "GPU-9"),
    }
    c = ClaimView(
        "ml", "c", ("a",), (AllocatedDevice((DRIVER, "n", "x")), AllocatedDevice((DRIVER, "n", "y")))
    )
    assert holdings({"ml/a": pod_gpus([c], catalog, "ml", "a")}).shared == {
        "GPU-9": "published as 2 DRA devices"
    }


def test_the_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from(parser.parse_args([])) == DEFAULT_CONFIG
    assert config_from(parser.parse_args(["--no-dra"])) is None
    custom = config_from(parser.parse_args(["--dra-driver=a.example.com", "--dra-uuid-attribute=serial"]))
    assert custom == DraConfig(frozenset({"a.example.com"}), DEFAULT_CONFIG.device_classes, "serial")
