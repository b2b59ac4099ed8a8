"""Who may read the agent's /metrics: the API server decides, as kube-rbac-proxy does.

The caller's bearer token goes to a TokenReview (who is it?), then its user to a
SubjectAccessReview for `get` on the non-resource URL /metrics (may it?). Answers are cached for
a short while by the token's hash, so a Prometheus scraping every 30 s costs the API server two
requests a minute per agent, not two per scrape. Anything unexpected denies.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from kubernetes import client

log = logging.getLogger(__name__)

# Service account tokens are about 1 KiB; a much longer header is not one.
MAX_TOKEN_BYTES = 8192


class KubeAuthorizer:
    def __init__(
        self,
        api: Any,
        path: str = "/metrics",
        cache_seconds: float = 60.0,
        denied_cache_seconds: float = 10.0,
        max_entries: int = 1024,
        request_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.cache_seconds = cache_seconds
        self.denied_cache_seconds = denied_cache_seconds
        self.max_entries = max_entries
        self.request_timeout = request_timeout
        self._clock = clock
        self._authn = client.AuthenticationV1Api(api)
        self._authz = client.AuthorizationV1Api(api)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def check(self, authorization: str | None) -> int:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_BYTES:
            return 401
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[1] > now:
                return cached[0]
        status = self._review(token)
        ttl = self.cache_seconds if status == 200 else self.denied_cache_seconds
        with self._lock:
            self._cache[key] = (status, now + ttl)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return status

    def _review(self, token: str) -> int:
        try:
            review = self._authn.create_token_review(
                client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token)),
                _request_timeout=self.request_timeout,
            )
            status = review.status
            if status is None or not status.authenticated or status.user is None:
                return 401
            user = status.user
            access = self._authz.create_subject_access_review(
                client.V1SubjectAccessReview(
                    spec=client.V1SubjectAccessReviewSpec(
                        user=user.username,
                        uid=user.uid,
                        groups=user.groups or [],
                        extra=user.extra or {},
                        non_resource_attributes=client.V1NonResourceAttributes(path=self.path, verb="get"),
                    )
                ),
                _request_timeout=self.request_timeout,
            )
        except Exception as exc:  # the API server unreachable or refusing us: deny, say why in the log
            log.warning("authorizing a /metrics request failed, denied: %s", type(exc).__name__)
            return 401
        return 200 if access.status is not None and access.status.allowed else 403
