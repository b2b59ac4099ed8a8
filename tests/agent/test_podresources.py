"""The pod-resources client against a gRPC server speaking the kubelet's protocol on a unix socket."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from edpilot_agent import podresources_pb2 as pb
from edpilot_agent import podresources_pb2_grpc
from edpilot_agent.holdings import DynamicDevice, PodDevices
from edpilot_agent.podresources import PodResourcesClient, PodResourcesError


class FakeKubelet(podresources_pb2_grpc.PodResourcesListerServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.pods: list[pb.PodResources] = []

    def List(self, request: pb.ListPodResourcesRequest, context: Any) -> pb.ListPodResourcesResponse:
        return pb.ListPodResourcesResponse(pod_resources=self.pods)


def container(
    name: str, resource: str = "", ids: tuple[str, ...] = (), claims: tuple[pb.DynamicResource, ...] = ()
) -> pb.ContainerResources:
    devices = [pb.ContainerDevices(resource_name=resource, device_ids=ids)] if resource else []
    return pb.ContainerResources(name=name, devices=devices, dynamic_resources=claims)


def claim(name: str, *devices: tuple[str, str, str, str | None]) -> pb.DynamicResource:
    """A DRA claim as the kubelet lists it: (driver, pool, device, share id or None) per device."""
    resources = []
    for driver, pool, device, share in devices:
        resource = pb.ClaimResource(driver_name=driver, pool_name=pool, device_name=device)
        if share is not None:
            resource.share_id = share
        resources.append(resource)
    return pb.DynamicResource(claim_name=name, claim_namespace="ml", claim_resources=resources)


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[tuple[FakeKubelet, str]]:
    socket_path = str(tmp_path / "kubelet.sock")
    servicer = FakeKubelet()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    podresources_pb2_grpc.add_PodResourcesListerServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    yield servicer, socket_path
    server.stop(grace=None)


def test_lists_the_gpus_each_pod_holds(kubelet: tuple[FakeKubelet, str]) -> None:
    servicer, socket_path = kubelet
    servicer.pods = [
        pb.PodResources(
            name="llm-0",
            namespace="serving",
            containers=[
                container("model", "nvidia.com/gpu", ("GPU-b", "GPU-a")),
                container("sidecar"),
            ],
        ),
        pb.PodResources(
            name="train-0",
            namespace="ml",
            containers=[
                container("trainer", "nvidia.com/gpu", ("GPU-c",)),
                container("nic", "example.com/rdma", ("mlx5_0",)),
            ],
        ),
        pb.PodResources(name="cpu-only", namespace="default", containers=[container("app")]),
    ]
    client = PodResourcesClient(socket_path)
    try:
        assert client.allocations([]) == {
            "serving/llm-0": PodDevices(plugin=("GPU-a", "GPU-b")),
            "ml/train-0": PodDevices(plugin=("GPU-c",)),
        }
    finally:
        client.close()


def test_lists_the_dra_devices_of_each_pods_claims(kubelet: tuple[FakeKubelet, str]) -> None:
    """What a v1.36 kubelet sends for DRA: the claims of each container, their devices by driver,
    pool and name, a share ID where the device allows several allocations. A device two
    containers share through one claim is listed once."""
    servicer, socket_path = kubelet
    gpu = claim("train-0-gpu-x7k2q", ("gpu.nvidia.com", "node-a", "gpu-3", None))
    servicer.pods = [
        pb.PodResources(
            name="train-0",
            namespace="ml",
            containers=[
                container(
                    "trainer", claims=(gpu, claim("nic", ("rdma.example.com", "node-a", "mlx5-0", None)))
                ),
                container("sidecar", claims=(gpu,)),
            ],
        ),
        pb.PodResources(
            name="both",
            namespace="ml",
            containers=[
                container("a", "nvidia.com/gpu", ("GPU-c::2",)),
                container("b", claims=(claim("s", ("gpu.nvidia.com", "node-a", "gpu-4", "7f3a")),)),
            ],
        ),
    ]
    client = PodResourcesClient(socket_path)
    try:
        assert client.allocations([]) == {
            "ml/train-0": PodDevices(
                dynamic=(
                    DynamicDevice("gpu.nvidia.com", "node-a", "gpu-3"),
                    DynamicDevice("rdma.example.com", "node-a", "mlx5-0"),
                )
            ),
            "ml/both": PodDevices(
                plugin=("GPU-c::2",), dynamic=(DynamicDevice("gpu.nvidia.com", "node-a", "gpu-4", "7f3a"),)
            ),
        }
    finally:
        client.close()


def test_an_absent_kubelet_is_a_clear_error(tmp_path: Path) -> None:
    client = PodResourcesClient(str(tmp_path / "missing.sock"), timeout_seconds=0.5)
    try:
        with pytest.raises(PodResourcesError, match="did not answer: UNAVAILABLE"):
            client.allocations([])
    finally:
        client.close()
