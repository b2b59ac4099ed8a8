"""Every client of the local control plane verifies the API server's certificate: the admin
kubeconfig carries the cluster's CA, a kubeconfig with another CA is refused by kubectl and by the
Python clients the operator, the agent, the extender, `edpilot report` and the benches use, and
none of them warns about an unverified request."""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import subprocess
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import urllib3
import yaml
from edpilot_operator.extender_watch import load_endpoint
from edpilot_operator.kube import load_client
from kubernetes import client

from bench.fleet import Api

if TYPE_CHECKING:
    from kubetest import Cluster

REPO = Path(__file__).resolve().parents[2]


def other_ca(directory: Path) -> bytes:
    """A fresh self-signed CA that never signed the API server's certificate."""
    key, cert = directory / "other-ca.key", directory / "other-ca.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=not-the-cluster-ca"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert.read_bytes()


def kubeconfig_with_ca(cluster: Cluster, ca_pem: bytes, path: Path) -> Path:
    """The admin kubeconfig with its CA replaced."""
    config: dict[str, Any] = yaml.safe_load(cluster.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def wrong_ca_kubeconfig(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("wrong-ca")
    return kubeconfig_with_ca(cluster, other_ca(directory), directory / "kubeconfig")


def test_the_admin_kubeconfig_carries_the_ca_and_never_skips_verification(cluster: Cluster) -> None:
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    (entry,) = config["clusters"]
    assert "insecure-skip-tls-verify" not in entry["cluster"]
    ca = base64.b64decode(entry["cluster"]["certificate-authority-data"])
    assert ca.startswith(b"-----BEGIN CERTIFICATE-----")
    # The API server's serving certificate is signed by that CA, for the address clients dial.
    served = ssl.get_server_certificate(("127.0.0.1", int(entry["cluster"]["server"].rsplit(":", 1)[1])))
    ca_file = cluster.dir / "test-ca.pem"
    ca_file.write_bytes(ca)
    served_file = cluster.dir / "test-served.pem"
    served_file.write_text(served)
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_file), "-verify_ip", "127.0.0.1", str(served_file)],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_kubectl_refuses_a_server_its_ca_did_not_sign(cluster: Cluster, wrong_ca_kubeconfig: Path) -> None:
    refused = subprocess.run(
        [str(cluster.bin / "kubectl"), "--kubeconfig", str(wrong_ca_kubeconfig), "get", "--raw", "/readyz"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "certificate signed by unknown authority" in refused.stderr, refused.stderr
    assert cluster.kubectl("get", "--raw", "/readyz").stdout == "ok"


def test_the_kubernetes_client_verifies_the_server(cluster: Cluster, wrong_ca_kubeconfig: Path) -> None:
    """The client the operator, the agent and `edpilot report` build from a kubeconfig."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nodes = client.CoreV1Api(load_client(str(cluster.kubeconfig))).list_node()
        assert nodes.items
        with pytest.raises(urllib3.exceptions.MaxRetryError) as refused:
            client.CoreV1Api(load_client(str(wrong_ca_kubeconfig))).list_node(_request_timeout=10)
    assert isinstance(refused.value.reason, urllib3.exceptions.SSLError), refused.value.reason
    assert "certificate verify failed" in str(refused.value.reason)
    insecure = [w for w in caught if issubclass(w.category, urllib3.exceptions.InsecureRequestWarning)]
    assert not insecure, [str(w.message) for w in insecure]


def test_the_extender_watch_client_verifies_the_server(cluster: Cluster, wrong_ca_kubeconfig: Path) -> None:
    async def readyz(kubeconfig: Path) -> str:
        endpoint = load_endpoint(str(kubeconfig))
        assert isinstance(endpoint.ssl, ssl.SSLContext)
        headers = {"Authorization": endpoint.authorization() or ""}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{endpoint.host}/readyz", ssl=endpoint.ssl, headers=headers) as response,
        ):
            return await response.text()

    assert asyncio.run(readyz(cluster.kubeconfig)) == "ok"
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        asyncio.run(readyz(wrong_ca_kubeconfig))


def test_the_benches_lean_client_verifies_the_server(cluster: Cluster, wrong_ca_kubeconfig: Path) -> None:
    assert Api(cluster.kubeconfig).text("/readyz") == "ok"
    with pytest.raises(urllib3.exceptions.SSLError, match="certificate verify failed"):
        Api(wrong_ca_kubeconfig).text("/readyz")


def test_edpilot_report_warns_about_nothing(crds_installed: Cluster) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edpilot.cli", "report", "--kubeconfig", str(crds_installed.kubeconfig)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "default"},
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
