"""How the operator's own writes turn client errors into kopf's retry timing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import NoReturn

import kopf
import pytest
import urllib3
import yaml
from edpilot_operator.kube import IO_THREADS, _call, load_client
from kubernetes.client.exceptions import ApiException


def raising(exc: Exception) -> NoReturn:
    raise exc


def test_an_unreachable_api_server_is_retried_in_seconds_not_a_minute() -> None:
    refused = urllib3.exceptions.MaxRetryError(None, "/api/v1/namespaces/ml/pods/p", "Connection refused")  # type: ignore[arg-type]
    with pytest.raises(kopf.TemporaryError) as caught:
        asyncio.run(_call(raising, refused))
    assert caught.value.delay == 2
    assert "unreachable" in str(caught.value)


@pytest.mark.parametrize(("status", "temporary"), [(409, True), (429, True), (503, True), (403, False)])
def test_api_errors_are_temporary_only_when_a_retry_can_help(status: int, temporary: bool) -> None:
    expected = kopf.TemporaryError if temporary else ApiException
    with pytest.raises(expected):
        asyncio.run(_call(raising, ApiException(status=status, reason="x")))


def test_a_missing_object_needs_nothing_when_allowed() -> None:
    assert asyncio.run(_call(raising, ApiException(status=404, reason="NotFound"), missing_ok=True)) is None
    with pytest.raises(ApiException):
        asyncio.run(_call(raising, ApiException(status=404, reason="NotFound")))


def test_the_client_keeps_a_connection_for_every_io_thread(tmp_path: Path) -> None:
    """Its default pool (CPU count x 5) is smaller than the operator's IO threads: each request
    beyond it would open a connection and drop it afterwards."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    api = load_client(str(kubeconfig))
    assert api.configuration.connection_pool_maxsize == IO_THREADS
    assert api.rest_client.pool_manager.connection_pool_kw["maxsize"] == IO_THREADS
    assert api.configuration.host == "https://127.0.0.1:6443"
