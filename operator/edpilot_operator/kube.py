"""The operator's writes that kopf's own `patch` cannot make: other objects than the one handled.

Every call runs the blocking kubernetes client in a worker thread, so the kopf event loop stays free.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import kopf
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from edpilot.contract import STATE_PLURAL
from edpilot.models import GROUP, VERSION

# Threads for the blocking API client (and the decisions) and connections to the API server. With
# asyncio's default (CPU count + 4: 6 on two cores) a burst of writes queued every other write,
# each decision and the Lease renewal behind it: 400 first state writes took 4-5 s per policy and
# 400 pod claims 20 s at 2,000 nodes (`bench.operator_scale`). The client's pool (CPU count x 5)
# would open and drop a connection per request beyond its size.
IO_THREADS = 32


def load_client(kubeconfig: str | None) -> client.ApiClient:
    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    cfg.connection_pool_maxsize = IO_THREADS
    return client.ApiClient(cfg)


PARTIAL_METADATA = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self._core = client.CoreV1Api(api)
        self._custom = client.CustomObjectsApi(api)
        self._apps = client.AppsV1Api(api)

    async def patch_owner(self, namespace: str, key: str, patch: Sequence[Mapping[str, Any]]) -> bool:
        """Apply a JSON patch to a Deployment or StatefulSet ("Kind/name"). False when the owner
        is gone or changed since it was read (the patch's resourceVersion test failed: 422, or
        409): the caller retries on fresh data."""
        kind, name = key.split("/", 1)
        fn = (
            self._apps.patch_namespaced_deployment
            if kind == "Deployment"
            else self._apps.patch_namespaced_stateful_set
        )

        def call() -> Any:
            return fn(
                name, namespace, [dict(op) for op in patch], _content_type="application/json-patch+json"
            )

        try:
            await _call(call)
        except ApiException as exc:
            if exc.status in (404, 422):
                return False
            raise
        except kopf.TemporaryError:
            return False
        return True

    async def node_labels(self) -> dict[str, dict[str, str]]:
        """Every node's labels, from one list of the nodes' metadata only (a PartialObjectMetadata
        list: no status, no images; about 1 KB a node)."""

        def call() -> Any:
            response: Any = self._core.list_node(
                resource_version="0",  # served from the API server's watch cache
                _headers={"Accept": PARTIAL_METADATA},
                _preload_content=False,
            )
            return json.loads(response.data)

        listed = await _call(call)
        return {
            str(meta["name"]): {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
            for item in listed.get("items", [])
            if (meta := item.get("metadata")) and meta.get("name")
        }

    async def patch_pod_annotations(
        self, namespace: str, name: str, annotations: Mapping[str, str | None]
    ) -> None:
        """Merge-patch annotations; None removes one. A pod that is gone needs nothing."""
        body = {"metadata": {"annotations": dict(annotations)}}
        await _call(self._core.patch_namespaced_pod, name, namespace, body, missing_ok=True)

    async def patch_report_spec(self, node: str, spec: Mapping[str, Any]) -> None:
        body = {"spec": dict(spec)}
        await _call(
            self._custom.patch_cluster_custom_object,
            GROUP,
            VERSION,
            "gpunodereports",
            node,
            body,
            missing_ok=True,
        )

    async def apply_state(self, body: Mapping[str, Any], manager: str) -> None:
        """Create or update one WorkloadOptimizerState (server-side apply: one request either way)."""
        meta = body["metadata"]
        await _call(
            lambda: self._custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                meta["namespace"],
                STATE_PLURAL,
                meta["name"],
                dict(body),
                field_manager=manager,
                force=True,
                _content_type="application/apply-patch+yaml",
            )
        )

    async def delete_state(self, namespace: str, name: str) -> None:
        await _call(
            self._custom.delete_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            STATE_PLURAL,
            name,
            missing_ok=True,
        )


async def _call(fn: Any, *args: Any, missing_ok: bool = False) -> Any:
    try:
        return await asyncio.to_thread(fn, *args)
    except urllib3.exceptions.HTTPError as exc:
        # The API server is restarting or unreachable: retry in seconds, not kopf's default minute.
        raise kopf.TemporaryError(f"API server unreachable: {exc}", delay=2) from exc
    except ApiException as exc:
        if missing_ok and exc.status == 404:
            return None
        if exc.status in (409, 429) or exc.status >= 500:
            raise kopf.TemporaryError(f"API server answered {exc.status}: {exc.reason}", delay=2) from exc
        raise
