"""List and watch the objects the extender's view needs, on the extender's own event loop.

Per kind: list (paginated), then watch from the list's resourceVersion with bookmarks; a watch
that ends is resumed from the last resourceVersion seen, a 410 Gone starts over with a fresh
list, and errors back off exponentially (with jitter) up to 30 s.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import random
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from edpilot.models import GROUP, VERSION
from edpilot_operator.extender_view import (
    BUDGETS,
    CLAIMS,
    NODES,
    PODS,
    POLICIES,
    REPORTS,
    TEMPLATES,
    ClusterView,
)

log = logging.getLogger(__name__)

# kind -> (path, extra query parameters)
RESOURCES: Final[Mapping[str, tuple[str, Mapping[str, str]]]] = {
    NODES: ("/api/v1/nodes", {}),
    # Finished pods hold no GPU; the API server sends DELETED when a pod leaves the selector.
    PODS: ("/api/v1/pods", {"fieldSelector": "status.phase!=Succeeded,status.phase!=Failed"}),
    REPORTS: (f"/apis/{GROUP}/{VERSION}/gpunodereports", {}),
    BUDGETS: (f"/apis/{GROUP}/{VERSION}/powerbudgets", {}),
    POLICIES: (f"/apis/{GROUP}/{VERSION}/energypolicies", {}),
    CLAIMS: ("/apis/resource.k8s.io/v1/resourceclaims", {}),
    TEMPLATES: ("/apis/resource.k8s.io/v1/resourceclaimtemplates", {}),
}
PAGE_SIZE: Final = 500
WATCH_SECONDS: Final = 300
BACKOFF_MIN_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0


@dataclass(frozen=True)
class ApiEndpoint:
    """Where the API server is and how to authenticate to it."""

    host: str
    ssl: ssl.SSLContext | bool
    authorization: Callable[[], str | None]  # refreshed per request (projected tokens rotate)


def load_endpoint(kubeconfig: str | None = None) -> ApiEndpoint:
    """In-cluster credentials when running in a pod and no kubeconfig is given, else the kubeconfig."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ and "KUBECONFIG" not in os.environ:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=cfg
        )
    tls: ssl.SSLContext | bool
    if not cfg.verify_ssl:
        tls = False
    else:
        tls = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if cfg.cert_file:
            tls.load_cert_chain(cfg.cert_file, cfg.key_file)

    def authorization() -> str | None:
        # auth_settings() runs the client's refresh hook (rotating service-account tokens).
        bearer: Mapping[str, Any] = cfg.auth_settings().get("BearerToken") or {}
        value = bearer.get("value")
        return str(value) if value else None

    return ApiEndpoint(host=str(cfg.host).rstrip("/"), ssl=tls, authorization=authorization)


class Gone(Exception):
    """The resourceVersion is too old (HTTP 410): list again."""


class Watcher:
    """Keeps one kind of the view current until stopped."""

    def __init__(
        self, kind: str, endpoint: ApiEndpoint, session: aiohttp.ClientSession, view: ClusterView
    ) -> None:
        self.kind = kind
        self.path, self.params = RESOURCES[kind]
        self.endpoint = endpoint
        self.session = session
        self.view = view

    def _headers(self) -> dict[str, str]:
        token = self.endpoint.authorization()
        return (
            {"Authorization": token, "Accept": "application/json"}
            if token
            else {"Accept": "application/json"}
        )

    async def run(self) -> None:
        backoff = BACKOFF_MIN_S
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._list()
                version = await self._watch(version)
                backoff = BACKOFF_MIN_S
            except Gone:
                log.info("watch of %s: resourceVersion expired, listing again", self.kind)
                version = None
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                log.warning(
                    "watch of %s failed (%s: %s); retrying in %.1f s",
                    self.kind,
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(BACKOFF_MAX_S, backoff * 2)

    async def _list(self) -> str:
        items: list[Mapping[str, Any]] = []
        token = ""
        while True:
            params = {**self.params, "limit": str(PAGE_SIZE)}
            if token:
                params["continue"] = token
            async with self.session.get(
                self.endpoint.host + self.path, params=params, headers=self._headers(), ssl=self.endpoint.ssl
            ) as resp:
                if resp.status == 410:
                    raise Gone
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=resp.status, message=(await resp.text())[:300]
                    )
                body = await resp.json(loads=json.loads)
            items.extend(body.get("items") or [])
            token = (body.get("metadata") or {}).get("continue") or ""
            if not token:
                self.view.replace_all(self.kind, items)
                log.info("listed %d %s", len(items), self.kind)
                version = str(body["metadata"]["resourceVersion"])
                # What a list brings lives until the next list: frozen, the garbage collector stops
                # walking it during requests (filter p99 at 5,000 nodes: 5.7 ms -> 1.8 ms).
                del items, body
                gc.freeze()
                return version

    async def _watch(self, version: str) -> str:
        params = {
            **self.params,
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=WATCH_SECONDS + 30)
        async with self.session.get(
            self.endpoint.host + self.path,
            params=params,
            headers=self._headers(),
            ssl=self.endpoint.ssl,
            timeout=timeout,
        ) as resp:
            if resp.status == 410:
                raise Gone
            if resp.status != 200:
                raise aiohttp.ClientResponseError(
                    resp.request_info, (), status=resp.status, message=(await resp.text())[:300]
                )
            pending = b""
            async for chunk in resp.content.iter_any():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        version = self._event(json.loads(line), version)
        return version

    def _event(self, event: Mapping[str, Any], version: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone
            raise ValueError(f"watch error: {obj.get('message')}")
        new_version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self.view.apply(self.kind, str(kind), obj)
        return new_version
