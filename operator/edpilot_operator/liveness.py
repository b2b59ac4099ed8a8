"""The operator's liveness: one coordination.k8s.io/v1 Lease for the whole cluster.

Every node's GPUNodeReport spec names this Lease (`spec.operatorLease`); each agent watches it and
restores its GPUs' defaults once it runs out (node_agent: `LeaseTracker`). Before, the operator
renewed a lease inside every report's spec: one PATCH per node every leaseSeconds/3 (100 PATCH/s
at 2,000 nodes with the default 60 s lease); now it is one write per leaseSeconds/3 in total.

The lease is renewed from the report sweep (`LeaseKeeper.renew_if_due` after the specs were
composed), which the policy and budget timers run, never from a task of its own: kopf stops every
timer while peering pauses a replica and when the operator exits, so a standby, paused, dead or
wedged operator stops renewing without any check of ours, and the lease then says what the agents
need to know: specs are being kept up to date. With no policy and no budget there is nothing to
keep, and the lease runs out: the agents hold their defaults, which is what they should enforce.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from edpilot.models import LeaseRef

log = logging.getLogger(__name__)


def micro_time(at: datetime) -> str:
    """Kubernetes' MicroTime: RFC 3339 in UTC with microseconds."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_spec(holder: str, seconds: int, now: datetime) -> dict[str, Any]:
    """The spec of the operator's Lease as renewed at `now` by `holder`."""
    return {"holderIdentity": holder, "leaseDurationSeconds": seconds, "renewTime": micro_time(now)}


def lease_body(ref: LeaseRef, holder: str, seconds: int, now: datetime) -> dict[str, Any]:
    """A new Lease object, acquired at `now`."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": ref.name,
            "namespace": ref.namespace,
            "labels": {"app.kubernetes.io/managed-by": "edpilot-operator"},
        },
        "spec": {**lease_spec(holder, seconds, now), "acquireTime": micro_time(now)},
    }


class LeaseWriter:
    """The two writes the keeper needs, over the real API server (blocking; called from a timer's
    worker thread)."""

    def __init__(self, api: client.ApiClient, request_timeout: float = 10.0) -> None:
        self._api = client.CoordinationV1Api(api)
        self._timeout = request_timeout

    def renew(self, ref: LeaseRef, holder: str, seconds: int, now: datetime) -> None:
        """Patch the Lease's spec; create the Lease where it does not exist yet."""
        try:
            self._api.patch_namespaced_lease(
                ref.name,
                ref.namespace,
                {"spec": lease_spec(holder, seconds, now)},
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            self._api.create_namespaced_lease(
                ref.namespace,
                lease_body(ref, holder, seconds, now),  # type: ignore[arg-type]
                _request_timeout=self._timeout,
            )


class LeaseKeeper:
    """Renews the operator's Lease at most once per leaseSeconds/3, whichever timer asks first.

    `renew_if_due` never raises: a failed renewal is logged and retried by the next timer after
    `retry_seconds` (so many timers do not all retry at once)."""

    def __init__(
        self,
        ref: LeaseRef,
        holder: str,
        seconds: int,
        renew: Callable[[LeaseRef, str, int, datetime], None],
        monotonic: Callable[[], float],
        retry_seconds: float = 2.0,
    ) -> None:
        self.ref = ref
        self.holder = holder
        self.seconds = seconds
        self._renew = renew
        self._monotonic = monotonic
        self.retry_seconds = retry_seconds
        self._lock = threading.Lock()
        self._next_at: float | None = None  # monotonic; None: renew at the first call
        self.renewals = 0
        self.failures = 0

    @property
    def period(self) -> float:
        return self.seconds / 3

    def due(self) -> bool:
        """Whether the next `renew_if_due` would write (a cheap check, without the lock)."""
        return self._next_at is None or self._monotonic() >= self._next_at

    def renew_if_due(self, now: datetime) -> bool:
        """Renew when due (True when this call wrote the Lease)."""
        if not self._lock.acquire(blocking=False):
            return False  # another timer is renewing right now
        try:
            if not self.due():
                return False
            started = self._monotonic()
            try:
                self._renew(self.ref, self.holder, self.seconds, now)
            except Exception as exc:  # the API server may be gone; the next timer retries
                self.failures += 1
                self._next_at = started + min(self.retry_seconds, self.period)
                log.warning(
                    "renewing the operator's Lease %s/%s failed: %s", self.ref.namespace, self.ref.name, exc
                )
                return False
            self.renewals += 1
            self._next_at = started + self.period
            return True
        finally:
            self._lock.release()
