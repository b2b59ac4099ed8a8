"""The agent's view of a pod on its node."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    uid: str = ""
    ip: str = ""
    phase: str = "Pending"
    gpu_request: int = 0
    # A host-network pod's IP is its node's: the agent never scrapes it.
    host_network: bool = False
    annotations: dict[str, str] = field(default_factory=dict)
    # The first container's command and args: a simulated engine starts with them (as vLLM reads
    # --max-num-seqs once), so a rollout of its owner's template reaches it.
    argv: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def running(self) -> bool:
        return self.phase == "Running"
