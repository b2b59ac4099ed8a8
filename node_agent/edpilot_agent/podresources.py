"""Which pod holds which GPU, from the kubelet's pod-resources v1 API (`List` over a unix socket).

The NVIDIA device plugin hands out GPUs by UUID (its default DEVICE_ID_STRATEGY), so the device
ids of resource `nvidia.com/gpu` are the UUIDs NVML reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc

from edpilot_agent import podresources_pb2, podresources_pb2_grpc
from edpilot_agent.pods import PodInfo

KUBELET_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
GPU_RESOURCE = "nvidia.com/gpu"


class PodResourcesError(Exception):
    pass


def gpus_by_pod(
    response: podresources_pb2.ListPodResourcesResponse, resource: str = GPU_RESOURCE
) -> dict[str, tuple[str, ...]]:
    """`namespace/name` -> the device ids of `resource` its containers hold (pods holding none left out)."""
    held: dict[str, tuple[str, ...]] = {}
    for pod in response.pod_resources:
        ids = [
            device_id
            for container in pod.containers
            for devices in container.devices
            if devices.resource_name == resource
            for device_id in devices.device_ids
        ]
        if ids:
            held[f"{pod.namespace}/{pod.name}"] = tuple(sorted(set(ids)))
    return held


class PodResourcesClient:
    """A `GpuAllocations` source for real nodes."""

    def __init__(self, socket_path: str = KUBELET_SOCKET, timeout_seconds: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout_seconds = timeout_seconds
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        self._stub = podresources_pb2_grpc.PodResourcesListerStub(self._channel)

    def allocations(self, pods: Sequence[PodInfo]) -> Mapping[str, tuple[str, ...]]:
        try:
            response = self._stub.List(
                podresources_pb2.ListPodResourcesRequest(), timeout=self.timeout_seconds
            )
        except grpc.RpcError as exc:
            raise PodResourcesError(
                f"kubelet pod-resources API at {self.socket_path} did not answer: "
                f"{exc.code().name} {exc.details()}"
            ) from exc
        return gpus_by_pod(response)

    def close(self) -> None:
        self._channel.close()
