"""What each pod was given, from the kubelet's pod-resources v1 API (`List` over a unix socket):
the device IDs of `nvidia.com/gpu` (device plugin) and the DRA devices of its claims. Which GPUs
those are is `holdings.resolve`'s business.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc

from edpilot.contract import GPU_RESOURCE
from edpilot_agent import podresources_pb2, podresources_pb2_grpc
from edpilot_agent.holdings import DynamicDevice, PodDevices
from edpilot_agent.pods import PodInfo

KUBELET_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"


class PodResourcesError(Exception):
    pass


def pod_devices(
    response: podresources_pb2.ListPodResourcesResponse, resource: str = GPU_RESOURCE
) -> dict[str, PodDevices]:
    """`namespace/name` -> the device IDs of `resource` and the DRA devices its containers hold
    (pods holding neither left out; a device two containers share is listed once)."""
    held: dict[str, PodDevices] = {}
    for pod in response.pod_resources:
        ids = {
            device_id
            for container in pod.containers
            for devices in container.devices
            if devices.resource_name == resource
            for device_id in devices.device_ids
        }
        dynamic = {
            DynamicDevice(
                claimed.driver_name,
                claimed.pool_name,
                claimed.device_name,
                claimed.share_id if claimed.HasField("share_id") else "",
            )
            for container in pod.containers
            for resource_of_claim in container.dynamic_resources
            for claimed in resource_of_claim.claim_resources
            if claimed.device_name
        }
        if ids or dynamic:
            held[f"{pod.namespace}/{pod.name}"] = PodDevices(
                tuple(sorted(ids)), tuple(sorted(dynamic, key=lambda d: (d.key, d.share_id)))
            )
    return held


class PodResourcesClient:
    """A `GpuAllocations` source for real nodes."""

    def __init__(self, socket_path: str = KUBELET_SOCKET, timeout_seconds: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout_seconds = timeout_seconds
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        self._stub = podresources_pb2_grpc.PodResourcesListerStub(self._channel)

    def allocations(self, pods: Sequence[PodInfo]) -> Mapping[str, PodDevices]:
        try:
            response = self._stub.List(
                podresources_pb2.ListPodResourcesRequest(), timeout=self.timeout_seconds
            )
        except grpc.RpcError as exc:
            raise PodResourcesError(
                f"kubelet pod-resources API at {self.socket_path} did not answer: "
                f"{exc.code().name} {exc.details()}"
            ) from exc
        return pod_devices(response)

    def close(self) -> None:
        self._channel.close()
