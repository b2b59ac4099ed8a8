"""The operator's activities: login, the one startup handler (settings and `memo.runtime`), and
the liveness probe."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from edpilot.models import GROUP

from ..kube import IO_THREADS, Kube, load_client
from ..liveness import LeaseKeeper, LeaseWriter
from ..selection import PolicyEntry
from .runtime import OperatorConfig, Runtime

PROGRESS_PREFIX = GROUP


def login(cfg: OperatorConfig, **kwargs: Any) -> kopf.ConnectionInfo | None:
    # An explicit kubeconfig wins. In a pod: the mounted ServiceAccount token, sent to the API
    # server the kubelet names in KUBERNETES_SERVICE_HOST/PORT, as client-go and the Kubernetes
    # client find it (kopf's own service-account login dials the DNS name kubernetes.default.svc,
    # which a pod without cluster DNS cannot resolve).
    if cfg.kubeconfig:
        return kopf.login_with_kubeconfig(**kwargs)
    return kopf.login_via_client(**kwargs)


async def configure(cfg: OperatorConfig, settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    persistence = settings.persistence
    persistence.finalizer = f"{GROUP}/finalizer"
    persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PROGRESS_PREFIX)
    persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PROGRESS_PREFIX,
        key="last-handled-configuration",
        # No handler reacts to spec changes (timers read the spec afresh). A copy of a spec the
        # API accepts (a 32x64 selector: 420 KiB) can exceed the 256 KiB annotations limit, and
        # kopf then could not even remove its finalizer from a deleted policy.
        ignored_fields=["spec"],
    )
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    # A policy deleted while its reconcile timer runs waits this long before release_policy
    # (kopf's default, 60 s, held caps and hints for a minute after a delete in bench/soak.py).
    settings.background.cancellation_polling = 1
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(IO_THREADS, "edpilot-io"))
    api = load_client(cfg.kubeconfig)
    writer = LeaseWriter(api).renew
    keeper = LeaseKeeper(cfg.lease, cfg.identity, cfg.lease_seconds, writer, time.monotonic)
    memo.runtime = Runtime.of(cfg, Kube(api), keeper)


def probe_policies(policies_by_namespace: kopf.Index[str, PolicyEntry], **_: Any) -> int:
    return sum(len(v) for v in policies_by_namespace.values())
