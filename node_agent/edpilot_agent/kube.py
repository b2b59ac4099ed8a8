"""The agent's only link to the API server: its own GPUNodeReport, the pods on its node and the
operator's Lease.

Informers (list, then watch, relist on expiry) keep in memory the node's report, read by
name so another node's spec never reaches this agent, the pods bound to the node
(fieldSelector spec.nodeName), so thousands of agents do not poll the API server, and, with DRA,
the ResourceSlices DRA drivers published for the node (fieldSelector spec.nodeName: the UUIDs of
the GPUs the kubelet hands out as DRA devices). A simulated node also reads ResourceClaims, to play
the kubelet's pod-resources answer for them (sim.py). The operator's liveness is the one
coordination.k8s.io Lease its report's spec names (`spec.operatorLease`), watched by name
(fieldSelector metadata.name, which RBAC's resourceNames can authorize): no GET per tick, and a
Lease nothing in the spec names is never read. Status is written through the status subresource
only.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from edpilot.contract import gpu_request
from edpilot.dra import ClaimView, DraConfig, SliceDevice, claim_view, slice_devices
from edpilot.models import GROUP, VERSION, GPUNodeReportSpec, GPUNodeReportStatus, Lease, LeaseRef
from edpilot_agent.pods import PodInfo

PLURAL = "gpunodereports"
KIND = "GPUNodeReport"
log = logging.getLogger(__name__)


class KubeError(Exception):
    pass


class KubeApi(Protocol):
    """What the agent needs from Kubernetes."""

    def report_spec(self) -> tuple[GPUNodeReportSpec | None, str]:
        """The node's report spec (None while unknown or absent) and why it is unusable, if it is."""
        ...

    def pods(self) -> list[PodInfo] | None:
        """The pods bound to the node; None until the first list arrived."""
        ...

    def operator_lease(self, ref: LeaseRef) -> tuple[Lease | None, str]:
        """The operator's Lease that a spec names (None while unknown, absent or unreadable) and
        why there is none, if there is a reason to tell."""
        ...

    def write_status(self, status: GPUNodeReportStatus) -> None: ...

    def close(self) -> None: ...


def pod_info(obj: dict[str, Any]) -> PodInfo | None:
    """A pod that holds (or will hold) its resources; None for finished or terminating pods,
    which no longer count as the owner of a cap."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    phase = status.get("phase") or "Pending"
    if meta.get("deletionTimestamp") or phase in ("Succeeded", "Failed"):
        return None
    return PodInfo(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        ip=status.get("podIP") or "",
        phase=phase,
        gpu_request=gpu_request(spec),
        host_network=spec.get("hostNetwork") is True,
        annotations=dict(meta.get("annotations") or {}),
        argv=_argv(spec),
    )


def lease_of(obj: Mapping[str, Any]) -> tuple[Lease | None, str]:
    """A coordination.k8s.io/v1 Lease object as the agent's `Lease` (holderIdentity, renewTime,
    leaseDurationSeconds), or None and why it cannot serve as one."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    where = f"Lease {meta.get('namespace', '')}/{meta.get('name', '')}"
    if not spec.get("renewTime"):
        return None, f"{where} has no renewTime"
    try:
        return Lease(
            holderIdentity=spec.get("holderIdentity") or "",
            renewTime=spec["renewTime"],
            leaseSeconds=spec.get("leaseDurationSeconds"),
        ), ""
    except ValidationError as exc:
        return None, f"{where} is not a lease the agent can judge: {exc.errors()[:2]}"


def _argv(spec: Mapping[str, Any]) -> tuple[str, ...]:
    containers = spec.get("containers") or [{}]
    first = containers[0] if isinstance(containers[0], Mapping) else {}
    parts = [*(first.get("command") or []), *(first.get("args") or [])]
    return tuple(str(p) for p in parts)[:256]


class Informer:
    """Keeps `items` (key -> raw object) in sync with a list+watch, in a daemon thread."""

    def __init__(
        self, what: str, list_fn: Callable[..., Any], key: Callable[[dict[str, Any]], str], **kwargs: Any
    ):
        self.what = what
        self._list_fn = list_fn
        self._key = key
        self._kwargs = kwargs
        self._lock = threading.Lock()
        self._items: dict[str, dict[str, Any]] = {}
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name=f"edpilot-informer-{what}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()  # type: ignore[no-untyped-call]

    def items(self) -> list[dict[str, Any]] | None:
        if not self.synced.is_set():
            return None
        with self._lock:
            return list(self._items.values())

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                self._list_and_watch()
                backoff = 1.0
            except Exception as exc:  # never let the thread die; the API server may come back
                self.errors += 1
                if not (isinstance(exc, ApiException) and exc.status == 410):
                    log.warning("watching %s failed (retry in %.0f s): %s", self.what, backoff, exc)
                    self._stop.wait(backoff * random.uniform(0.8, 1.2))
                    backoff = min(backoff * 2, 60.0)

    def _list_and_watch(self) -> None:
        response = self._list_fn(_preload_content=False, **self._kwargs)
        listed = json.loads(response.data)
        with self._lock:
            self._items = {self._key(o): o for o in listed.get("items") or []}
        self.synced.set()
        self._watch = watch.Watch()  # type: ignore[no-untyped-call]
        version = listed["metadata"]["resourceVersion"]
        for event in self._watch.stream(  # type: ignore[no-untyped-call]
            self._list_fn,
            resource_version=version,
            timeout_seconds=300,
            allow_watch_bookmarks=True,
            **self._kwargs,
        ):
            if self._stop.is_set():
                return
            kind, obj = event["type"], event["raw_object"]
            if kind == "ERROR":
                raise ApiException(status=obj.get("code", 500), reason=obj.get("message", "watch error"))
            if kind == "BOOKMARK":
                continue
            with self._lock:
                if kind == "DELETED":
                    self._items.pop(self._key(obj), None)
                else:
                    self._items[self._key(obj)] = obj


def _raw(list_fn: Callable[..., Any]) -> Callable[..., Any]:
    """`list_fn` for an informer, without the return type the watch would deserialize events into:
    the client has no model for some kinds (resource.k8s.io/v1's ResourceClaim), and the informer
    keeps the raw objects anyway."""

    def call(**kwargs: Any) -> Any:
        return list_fn(**kwargs)

    return call


def _pod_key(obj: dict[str, Any]) -> str:
    return f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def _name(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["name"])


class KubeClient:
    """`KubeApi` over the real API server (kubeconfig file, or in-cluster credentials)."""

    def __init__(
        self,
        node_name: str,
        kubeconfig: str | None = None,
        request_timeout: float = 10.0,
        dra: DraConfig | None = None,
        watch_claims: bool = False,
    ) -> None:
        """`dra`: read the node's ResourceSlices; `watch_claims`: read every ResourceClaim too (only
        a simulated node, which plays the kubelet, needs them)."""
        self.node_name = node_name
        self.dra = dra
        self.request_timeout = request_timeout
        if kubeconfig:
            api = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        else:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            api = client.ApiClient(configuration)
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._report_exists = False
        self.report_informer = Informer(
            f"GPUNodeReport {node_name}",
            self._list_reports,
            _name,
            field_selector=f"metadata.name={node_name}",
        )
        self.pod_informer = Informer(
            f"pods on {node_name}",
            self.core.list_pod_for_all_namespaces,
            _pod_key,
            field_selector=f"spec.nodeName={node_name}",
        )
        self.informers = [self.report_informer, self.pod_informer]
        self.coordination = client.CoordinationV1Api(api)
        self.lease_informer: Informer | None = None
        self._lease_ref: LeaseRef | None = None
        self.slice_informer: Informer | None = None
        self.claim_informer: Informer | None = None
        if dra is not None:
            resource = client.ResourceV1Api(api)
            self.slice_informer = Informer(
                f"ResourceSlices of {node_name}",
                _raw(resource.list_resource_slice),
                _name,
                field_selector=f"spec.nodeName={node_name}",
            )
            self.informers.append(self.slice_informer)
            if watch_claims:
                self.claim_informer = Informer(
                    "ResourceClaims", _raw(resource.list_resource_claim_for_all_namespaces), _pod_key
                )
                self.informers.append(self.claim_informer)
        for informer in self.informers:
            informer.start()

    def _list_reports(self, **kwargs: Any) -> Any:
        return self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)

    def report_spec(self) -> tuple[GPUNodeReportSpec | None, str]:
        items = self.report_informer.items()
        if items is None:
            return None, "the GPUNodeReport has not been read yet"
        if not items:
            return None, ""  # not created yet: nothing to apply
        try:
            return GPUNodeReportSpec.model_validate(items[0].get("spec") or {}), ""
        except ValidationError as exc:
            return (
                None,
                f"GPUNodeReport {self.node_name} has a spec the agent cannot read: {exc.errors()[:3]}",
            )

    def pods(self) -> list[PodInfo] | None:
        items = self.pod_informer.items()
        if items is None:
            return None
        return [p for p in (pod_info(o) for o in items) if p is not None]

    def operator_lease(self, ref: LeaseRef) -> tuple[Lease | None, str]:
        if ref != self._lease_ref or self.lease_informer is None:
            self._watch_lease(ref)
        assert self.lease_informer is not None
        items = self.lease_informer.items()
        if items is None:
            return None, f"the operator's Lease {ref.namespace}/{ref.name} has not been read yet"
        if not items:
            return None, f"the operator's Lease {ref.namespace}/{ref.name} does not exist"
        return lease_of(items[0])

    def _watch_lease(self, ref: LeaseRef) -> None:
        """Watch the Lease `ref` names (only it), instead of any other watched before."""
        if self.lease_informer is not None:
            self.lease_informer.stop()
            self.informers.remove(self.lease_informer)
        namespace = ref.namespace

        def list_leases(**kwargs: Any) -> Any:
            return self.coordination.list_namespaced_lease(namespace, **kwargs)

        self.lease_informer = Informer(
            f"Lease {ref.namespace}/{ref.name}",
            list_leases,
            _name,
            field_selector=f"metadata.name={ref.name}",
        )
        self._lease_ref = ref
        self.informers.append(self.lease_informer)
        self.lease_informer.start()

    def slice_devices(self) -> list[SliceDevice]:
        """The GPU devices DRA drivers published for this node (none until read, or without DRA)."""
        items = self.slice_informer.items() if self.slice_informer is not None and self.dra else None
        return [d for body in items or [] for d in slice_devices(body, self.dra or DraConfig())]

    def claims(self) -> list[ClaimView]:
        items = self.claim_informer.items() if self.claim_informer is not None else None
        return [claim_view(body, self.dra or DraConfig()) for body in items or []]

    def ensure_report(self) -> None:
        """Create the node's GPUNodeReport if it does not exist (spec empty: nothing to apply)."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": self.node_name, "labels": {"app.kubernetes.io/managed-by": "edpilot-agent"}},
            "spec": {},
        }
        try:
            self.custom.create_cluster_custom_object(
                GROUP, VERSION, PLURAL, body, _request_timeout=self.request_timeout
            )
            log.info("created GPUNodeReport %s", self.node_name)
        except ApiException as exc:
            if exc.status != 409:
                raise KubeError(
                    f"creating GPUNodeReport {self.node_name} failed: {exc.status} {exc.reason}"
                ) from exc
        self._report_exists = True

    def write_status(self, status: GPUNodeReportStatus) -> None:
        if not self._report_exists:
            self.ensure_report()
        body = {"status": status.model_dump(mode="json", exclude_none=True)}
        try:
            # The client would write NaN or Infinity, which is not JSON: the trackers keep every
            # number finite, and this keeps a slip from sending the API server a body it rejects.
            json.dumps(body, allow_nan=False)
        except ValueError as exc:
            raise KubeError(
                f"GPUNodeReport {self.node_name} status has a non-finite number; not written"
            ) from exc
        try:
            self.custom.patch_cluster_custom_object_status(
                GROUP,
                VERSION,
                PLURAL,
                self.node_name,
                body,
                _content_type="application/merge-patch+json",
                _request_timeout=self.request_timeout,
            )
        except ApiException as exc:
            if exc.status == 404:
                self._report_exists = False  # deleted under us: create it again on the next write
            detail = f"{exc.status} {exc.reason} {exc.body or ''}"[:500]
            raise KubeError(f"writing GPUNodeReport {self.node_name} status failed: {detail}") from exc
        except Exception as exc:  # connection refused, timeouts: the caller backs off
            raise KubeError(f"writing GPUNodeReport {self.node_name} status failed: {exc}") from exc

    def close(self) -> None:
        for informer in self.informers:
            informer.stop()
        self.api.close()


class InMemoryKube:
    """`KubeApi` without an API server: for benchmarks and unit tests of the agent's own logic
    (anything the API server decides is tested against the real one)."""

    def __init__(self, spec: GPUNodeReportSpec | None = None, pods: list[PodInfo] | None = None) -> None:
        self.spec = spec
        self.pod_list = pods if pods is not None else []
        self.leases: dict[LeaseRef, Lease] = {}
        self.statuses: list[GPUNodeReportStatus] = []
        self.fail_writes = 0

    def report_spec(self) -> tuple[GPUNodeReportSpec | None, str]:
        return self.spec, ""

    def pods(self) -> list[PodInfo] | None:
        return list(self.pod_list)

    def operator_lease(self, ref: LeaseRef) -> tuple[Lease | None, str]:
        lease = self.leases.get(ref)
        return (
            lease,
            "" if lease is not None else f"the operator's Lease {ref.namespace}/{ref.name} does not exist",
        )

    def write_status(self, status: GPUNodeReportStatus) -> None:
        if self.fail_writes > 0:
            self.fail_writes -= 1
            raise KubeError("the API server is unavailable (simulated)")
        self.statuses.append(status)

    def close(self) -> None:
        pass
