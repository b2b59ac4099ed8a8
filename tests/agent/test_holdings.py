"""The agent's map from what the kubelet gave each pod (device-plugin IDs, DRA devices) to the GPUs
it holds: table tests of `holdings.resolve`, the setter's wire format, the agent's report and caps
for DRA and shared GPUs, and the simulated kubelet's DRA devices."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_helpers import NODE, FakeClock, cap_spec, decode_pod
from edpilot_agent.agent import NodeAgent
from edpilot_agent.holdings import DynamicDevice, PodDevices, decode, encode, resolve
from edpilot_agent.kube import InMemoryKube
from edpilot_agent.podresources import PodResourcesClient
from edpilot_agent.pods import PodInfo
from edpilot_agent.setter import SetterServer
from edpilot_agent.sim import SimBackend, SimWorkloads

from edpilot.dra import DEFAULT_CONFIG, AllocatedDevice, ClaimView, DraConfig, SliceDevice, device_catalog

DRIVER = "gpu.nvidia.com"
SLICES = (
    SliceDevice((DRIVER, NODE, "gpu-0"), NODE, 1, "GPU-aaa"),
    SliceDevice((DRIVER, NODE, "gpu-1"), NODE, 1, "GPU-bbb", shareable=True),
    SliceDevice((DRIVER, NODE, "gpu-2-mig-1g.10gb-0"), NODE, 1, "GPU-ccc", partition=True),
    SliceDevice((DRIVER, NODE, "gpu-3"), NODE, 1, None),  # the slice gives no UUID
)
CATALOG = device_catalog(SLICES)


def dra(device: str, share: str = "", driver: str = DRIVER, pool: str = NODE) -> DynamicDevice:
    return DynamicDevice(driver, pool, device, share)


@pytest.mark.parametrize(
    ("given", "by_pod", "shared"),
    [
        pytest.param(
            PodDevices(plugin=("GPU-b", "GPU-a")), ("GPU-a", "GPU-b"), set(), id="device plugin by UUID"
        ),
        pytest.param(PodDevices(plugin=("GPU-a::3",)), ("GPU-a",), {"GPU-a"}, id="time-slicing replica"),
        pytest.param(PodDevices(plugin=("not a uuid",)), None, set(), id="unknown device ID"),
        pytest.param(PodDevices(dynamic=(dra("gpu-0"),)), ("GPU-aaa",), set(), id="DRA GPU by its slice"),
        pytest.param(PodDevices(dynamic=(dra("gpu-1", "9c1e"),)), ("GPU-bbb",), {"GPU-bbb"}, id="DRA share"),
        pytest.param(
            PodDevices(dynamic=(dra("gpu-2-mig-1g.10gb-0"),)), ("GPU-ccc",), {"GPU-ccc"}, id="MIG: its GPU"
        ),
        pytest.param(PodDevices(dynamic=(dra("gpu-3"),)), None, set(), id="slice without a UUID"),
        pytest.param(PodDevices(dynamic=(dra("gpu-9"),)), None, set(), id="device no slice publishes"),
        pytest.param(PodDevices(dynamic=(dra("gpu-0", pool="other-node"),)), None, set(), id="another pool"),
        pytest.param(
            PodDevices(dynamic=(dra("gpu-0", driver="rdma.example.com"),)), None, set(), id="not a GPU driver"
        ),
        pytest.param(
            PodDevices(plugin=("GPU-zzz",), dynamic=(dra("gpu-0"),)), ("GPU-aaa", "GPU-zzz"), set(), id="both"
        ),
    ],
)
def test_each_allocation_style_maps_to_the_gpu_it_names(
    given: PodDevices, by_pod: tuple[str, ...] | None, shared: set[str]
) -> None:
    held = resolve({"ml/p": given}, CATALOG, DEFAULT_CONFIG)
    assert held.by_pod.get("ml/p") == by_pod
    assert held.shared == shared


def test_dra_devices_are_ignored_without_dra_or_for_other_drivers() -> None:
    given = {"ml/p": PodDevices(dynamic=(dra("gpu-0"),))}
    assert resolve(given, CATALOG, None).by_pod == {}
    assert resolve(given, CATALOG, DraConfig(drivers=frozenset({"other.example.com"}))).by_pod == {}


def test_a_claim_reserved_for_two_pods_gives_both_the_gpu() -> None:
    held = resolve(
        {"ml/a": PodDevices(dynamic=(dra("gpu-0"),)), "ml/b": PodDevices(dynamic=(dra("gpu-0"),))},
        CATALOG,
        DEFAULT_CONFIG,
    )
    assert held.holders() == {"GPU-aaa": {"ml/a", "ml/b"}}


def test_the_setter_sends_what_the_kubelet_said_and_the_agent_reads_it_back() -> None:
    sent = {
        "ml/p": PodDevices(plugin=("GPU-a::1",), dynamic=(dra("gpu-0"), dra("gpu-1", "9c1e"))),
        "serving/llm-0": PodDevices(plugin=("GPU-b",)),
    }

    class Kubelet:
        def allocations(self, pods: object) -> dict[str, PodDevices]:
            return sent

    server = SetterServer(FakeBackend(), "/unused", None, Kubelet())  # type: ignore[arg-type]
    answer = server.handle(b"ALLOCATIONS\n")
    assert answer.startswith(b"OK ") and answer.endswith(b"\n")
    assert decode(answer[3:].decode()) == sent
    assert decode(encode(sent)) == sent


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        '{"ml/p": []}',
        '{"not a pod": {"plugin": []}}',
        '{"ml/p": {"plugin": "GPU-a"}}',
        '{"ml/p": {"plugin": ["GPU a"]}}',
        '{"ml/p": {"plugin": ["GPU-a\\n"]}}',
        '{"ml/p": {"dynamic": [["gpu.nvidia.com", "n", "gpu-0"]]}}',
        '{"ml/p": {"dynamic": [["gpu.nvidia.com", "n", "gpu-0", 7]]}}',
        '{"ml/p": {"dynamic": [["gpu.nvidia.com", "", "gpu-0", ""]]}}',
        '{"ml/p": {"plugin": [' + ",".join(['"GPU-a"'] * 257) + "]}}",
        "{" + ",".join(f'"ml/p{i}": {{}}' for i in range(2049)) + "}",
    ],
)
def test_a_malformed_answer_is_refused_whole(text: str) -> None:
    with pytest.raises(ValueError):
        decode(text)


class FakeBackend:
    """A GPU backend with no GPU: the setter's allocation path needs none."""

    name = "nvml"

    def gpus(self) -> list[object]:
        return []


# ---------------------------------------------------------------- the agent


def agent_with(given: dict[str, PodDevices], pods: list[PodInfo], spec_uuid: str, spec_pod: str) -> NodeAgent:
    clock = FakeClock()
    backend = SimBackend(NODE, gpus=2, seed=1, clock=clock.monotonic)
    slices = [
        SliceDevice((DRIVER, NODE, "gpu-0"), NODE, 1, backend.devices[0].uuid),
        SliceDevice((DRIVER, NODE, "gpu-1"), NODE, 1, backend.devices[1].uuid),
    ]

    class Kubelet:
        def allocations(self, pods: object) -> dict[str, PodDevices]:
            return given

        def slice_devices(self) -> list[SliceDevice]:
            return slices

    kubelet = Kubelet()
    kube = InMemoryKube(cap_spec(clock, spec_uuid, 400, pod=spec_pod), pods)
    return NodeAgent(NODE, backend, SimWorkloads(backend), kube, clock, allocations=kubelet, slices=kubelet)


def test_the_agent_reports_and_caps_a_gpu_held_through_dra() -> None:
    pod = decode_pod("llm-0", gpus=0)
    probe = SimBackend(NODE, gpus=2, seed=1)
    agent = agent_with({pod.key: PodDevices(dynamic=(dra("gpu-1"),))}, [pod], probe.devices[1].uuid, pod.key)
    agent.tick()
    assert agent.snapshot is not None
    held = {g.uuid: (g.pods, g.shared) for g in agent.snapshot.gpus}
    assert held[probe.devices[1].uuid] == ([pod.key], False)
    assert held[probe.devices[0].uuid] == ([], False)
    assert agent.last_plan is not None and agent.last_plan.reasons[probe.devices[1].uuid] == "Spec"


@pytest.mark.parametrize("shared_by", ["two pods", "a share"])
def test_the_agent_never_caps_a_shared_gpu(shared_by: str) -> None:
    a, b = decode_pod("a", gpus=0), decode_pod("b", gpus=0)
    probe = SimBackend(NODE, gpus=2, seed=1)
    if shared_by == "two pods":
        given = {a.key: PodDevices(dynamic=(dra("gpu-0"),)), b.key: PodDevices(dynamic=(dra("gpu-0"),))}
    else:
        given = {a.key: PodDevices(dynamic=(dra("gpu-0", "4e1f"),))}
    agent = agent_with(given, [a, b], probe.devices[0].uuid, a.key)
    agent.tick()
    assert agent.last_plan is not None
    assert [r.reason for r in agent.last_plan.refusals] == ["GPUShared"]
    assert agent.last_plan.targets[probe.devices[0].uuid] == probe.devices[0].spec.default_power_limit_watts
    assert agent.snapshot is not None
    gpu = next(g for g in agent.snapshot.gpus if g.uuid == probe.devices[0].uuid)
    assert gpu.shared == (shared_by == "a share")


# ---------------------------------------------------------------- the simulated kubelet


def test_the_simulated_kubelet_gives_dra_pods_their_devices_and_plugin_pods_the_rest() -> None:
    backend = SimBackend(NODE, gpus=4, seed=1)
    uuids = [d.uuid for d in backend.devices]
    # A DRA driver publishes GPUs 2 and 3; the scheduler allocated GPU 3 to pod "dra".
    slices = [SliceDevice((DRIVER, NODE, f"gpu-{i}"), NODE, 1, uuids[i]) for i in (2, 3)]
    dra_pod = PodInfo("ml", "dra", uid="u-dra", phase="Running")
    other = PodInfo("ml", "other", uid="u-other", phase="Running")  # names the claim, not reserved
    plugin = [PodInfo("ml", f"plugin-{i}", uid=f"u-p{i}", phase="Running", gpu_request=1) for i in range(3)]
    claim = ClaimView(
        "ml", "dra-gpu", consumers=("u-dra",), devices=(AllocatedDevice((DRIVER, NODE, "gpu-3")),)
    )
    workloads = SimWorkloads(backend, claims=lambda: [claim], slices=lambda: slices)
    given = workloads.allocations([dra_pod, other, *plugin])
    assert given[dra_pod.key] == PodDevices(dynamic=(dra("gpu-3"),))
    assert other.key not in given
    # Device-plugin pods get GPUs no DRA driver publishes first, then the free published one.
    assert [given[p.key].plugin for p in plugin] == [(uuids[0],), (uuids[1],), (uuids[2],)]
    held = resolve(given, device_catalog(slices), DEFAULT_CONFIG)
    assert held.by_pod[dra_pod.key] == (uuids[3],)
    assert backend.jobs[dra_pod.key].gpu_indices == (3,)


def test_on_a_real_kubelet_simulated_pods_play_on_the_gpus_it_gave_them() -> None:
    backend = SimBackend(NODE, gpus=4, seed=1)
    uuids = [d.uuid for d in backend.devices]
    trainer = PodInfo("ml", "trainer", uid="u-t", phase="Running", gpu_request=2)
    waiting = PodInfo("ml", "waiting", uid="u-w", phase="Pending", gpu_request=1)
    # The kubelet gave the trainer GPUs 3 and 1 (not the lowest free ones the simulator would pick)
    # and has not admitted the other pod yet.
    kubelet_says = {trainer.key: PodDevices(plugin=(uuids[3], uuids[1]))}

    class Kubelet:
        def allocations(self, pods: object) -> dict[str, PodDevices]:
            return kubelet_says

    workloads = SimWorkloads(backend, kubelet=Kubelet())
    given = workloads.allocations([trainer, waiting])
    assert given == {trainer.key: PodDevices(plugin=(uuids[3], uuids[1]))}
    assert backend.jobs[trainer.key].gpu_indices == (3, 1)
    assert waiting.key not in backend.jobs
    kubelet_says[waiting.key] = PodDevices(plugin=(uuids[0],))
    assert workloads.allocations([trainer, waiting])[waiting.key] == PodDevices(plugin=(uuids[0],))
    # A pod the kubelet has let go of stops playing.
    assert trainer.key not in workloads.allocations([waiting])


def test_an_allocations_only_setter_relays_the_kubelet_and_refuses_every_change(tmp_path: Path) -> None:
    from edpilot_agent import setter

    assert setter.parse_args(["--allocations-only"]).allocations_only
    server = SetterServer(None, "/unused", None, PodResourcesClient(str(tmp_path / "absent.sock")))
    uuid = SimBackend(NODE, gpus=1).devices[0].uuid  # a simulated GPU the agent would ask about
    for change in (f"SET {uuid} 300000", f"RESTORE {uuid}", f"LOCK {uuid} 1000", f"UNLOCK {uuid}"):
        assert server.handle(f"{change}\n".encode()) == b"ERR no such GPU on this node\n"
    # No kubelet listening: the setter says so and keeps serving.
    assert server.handle(b"ALLOCATIONS\n").startswith(b"ERR the kubelet's pod-resources API did not answer")
    assert server.restore_changed() == []
