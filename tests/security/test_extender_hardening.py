"""Finding 4 (HIGH) of issue 14, in process: the extender's scheduler-facing server refuses bodies
over a small limit before reading them, cuts off slow bodies, answers malformed pods with a 400 that
echoes nothing of them, parses off the event loop, keeps metrics and health off the scheduler's
port, and (with TLS) serves only clients holding a certificate from its client CA.
tests/security/test_extender_tls.py does the same with the real kube-scheduler."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientError, ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from edpilot_operator import extender as ext
from edpilot_operator.extender import Extender
from edpilot_operator.extender_view import KINDS, ClusterView
from pki import Pki, make_pki

Body = Callable[[TestClient[Any, Any], Extender], Awaitable[None]]


def synced() -> ClusterView:
    view = ClusterView()
    for kind in KINDS:
        view.replace_all(kind, [])
    return view


def run(body: Body) -> None:
    async def main() -> None:
        extender = Extender(synced())
        async with TestClient(TestServer(extender.app())) as client:
            await body(client, extender)

    asyncio.run(main())


def pod(**parts: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "ml"}, "spec": {"containers": []}, **parts}


def test_a_realistic_largest_request_fits_and_a_huge_one_is_refused_unread() -> None:
    """The limit is sized from the largest request a nodeCacheCapable scheduler sends: a pod of the
    1.5 MiB etcd stores at most, and 5,000 node names of the longest kind (253 characters)."""
    annotations = {f"example.com/a{i}": "x" * 1000 for i in range(1400)}  # about 1.4 MiB
    largest = json.dumps(
        {
            "Pod": pod(metadata={"name": "p", "namespace": "ml", "annotations": annotations}),
            "NodeNames": ["n" * 253] * 5000,
        }
    ).encode()

    async def body(client: TestClient[Any, Any], extender: Extender) -> None:
        assert len(largest) < ext.MAX_BODY_BYTES < 8 * 2**20
        ok = await client.post("/filter", data=largest)
        assert ok.status == 200, await ok.text()
        huge = await client.post("/filter", data=b" " * (60 * 2**20))
        assert huge.status == 413
        chunked = await client.post("/filter", data=_chunks(b" " * 2**20, 8))
        assert chunked.status == 413

    run(body)


async def _chunks(piece: bytes, count: int) -> Any:
    for _ in range(count):
        yield piece


def test_a_slow_body_is_cut_off() -> None:
    """One byte at a time, slower than the read deadline allows: the connection is answered with
    408 or closed, and the server keeps serving."""

    async def body(client: TestClient[Any, Any], extender: Extender) -> None:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(
            b"POST /filter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        started = time.monotonic()
        answered = b""
        try:
            while time.monotonic() - started < ext.READ_TIMEOUT_S + 6:
                writer.write(b" ")
                await writer.drain()
                try:
                    answered = await asyncio.wait_for(reader.read(1024), 0.5)
                except TimeoutError:
                    continue
                break
        except ConnectionError:
            answered = b"(closed)"
        finally:
            writer.close()
        assert answered, "the slow body was still being read"
        assert answered == b"(closed)" or answered.startswith(b"HTTP/1.1 408"), answered[:80]
        assert time.monotonic() - started < ext.READ_TIMEOUT_S + 3
        healthy = await client.post("/filter", data=json.dumps({"Pod": pod(), "NodeNames": []}))
        assert healthy.status == 200

    run(body)


MALFORMED = [
    {"Pod": {"metadata": "SECRET-1", "spec": {}}, "NodeNames": []},
    {"Pod": {"metadata": {"name": "p"}, "spec": "SECRET-2"}, "NodeNames": []},
    {"Pod": pod(metadata={"name": "p", "labels": {"SECRET-3": 5}}), "NodeNames": []},
    {"Pod": pod(status={"containerStatuses": [{"restartCount": "SECRET-4"}]}), "NodeNames": []},
    {"Pod": pod(spec={"containers": [{"resources": {"limits": "SECRET-5"}}]}), "NodeNames": []},
    {"Pod": pod(), "NodeNames": ["SECRET-6", 6]},
    {"Pod": pod(), "Nodes": {"items": [{"metadata": "SECRET-7"}]}},
    {"Pod": pod(), "Nodes": {"items": ["SECRET-8"]}},
    "SECRET-9",
    ["SECRET-10"],
]


@pytest.mark.parametrize("verb", ["filter", "prioritize"])
@pytest.mark.parametrize("args", MALFORMED, ids=lambda a: json.dumps(a)[:40])
def test_a_malformed_request_is_a_400_that_echoes_nothing(verb: str, args: Any) -> None:
    async def body(client: TestClient[Any, Any], extender: Extender) -> None:
        resp = await client.post(f"/{verb}", data=json.dumps(args))
        text = await resp.text()
        assert resp.status == 400, (resp.status, text)
        assert "SECRET" not in text, text
        assert "bad ExtenderArgs" in text
        bad_json = await client.post(f"/{verb}", data=b'{"Pod": {"SECRET-11"')
        assert bad_json.status == 400 and "SECRET" not in await bad_json.text()

    run(body)


def test_metrics_and_health_are_not_served_on_the_schedulers_port() -> None:
    async def body(client: TestClient[Any, Any], extender: Extender) -> None:
        for path in ("/metrics", "/healthz", "/readyz"):
            assert (await client.get(path)).status in (404, 405), path
        async with TestClient(TestServer(extender.ops_app())) as ops:
            assert (await ops.get("/metrics")).status == 200
            assert (await ops.get("/healthz")).status == 200
            assert (await ops.get("/readyz")).status == 200
            assert (await ops.post("/filter", data=b"{}")).status in (404, 405)

    run(body)


@pytest.fixture
def parse_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    threads: list[int] = []
    original = ext.ExtenderArgs.model_validate_json

    def recorded(data: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return original(data, **kwargs)

    monkeypatch.setattr(ext.ExtenderArgs, "model_validate_json", recorded)
    yield threads


def test_bodies_are_parsed_off_the_event_loop(parse_threads: list[int]) -> None:
    async def body(client: TestClient[Any, Any], extender: Extender) -> None:
        loop_thread = threading.get_ident()
        resp = await client.post("/filter", data=json.dumps({"Pod": pod(), "NodeNames": ["n"]}))
        assert resp.status == 200
        assert parse_threads and loop_thread not in parse_threads

    run(body)


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_context(pki: Pki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def test_only_clients_with_a_certificate_from_the_client_ca_are_served(pki: Pki) -> None:
    async def main() -> None:
        extender = Extender(synced())
        tls = ext.server_tls(pki.server.cert, pki.server.key, pki.ca)
        runner = web.AppRunner(extender.app())
        await runner.setup()
        server = await ext.listen(runner, "127.0.0.1", 0, tls)
        port = server.sockets[0].getsockname()[1]
        url = f"https://127.0.0.1:{port}/filter"
        args = json.dumps({"Pod": pod(), "NodeNames": ["n"]})
        try:
            async with ClientSession() as session:
                scheduler = client_context(pki, pki.client.cert, pki.client.key)
                async with session.post(url, data=args, ssl=scheduler) as resp:
                    assert resp.status == 200
                for name, ctx in (
                    ("no certificate", client_context(pki, None, None)),
                    ("another CA's certificate", client_context(pki, pki.stranger.cert, pki.stranger.key)),
                ):
                    with pytest.raises((OSError, ClientError)):  # the handshake fails; nothing is parsed
                        async with session.post(url, data=args, ssl=ctx) as resp:
                            pytest.fail(f"{name}: answered {resp.status}")
                with pytest.raises((OSError, ClientError)):
                    async with session.post(url.replace("https", "http"), data=args) as resp:
                        pytest.fail(f"plain HTTP: answered {resp.status}")
        finally:
            server.close()
            await server.wait_closed()
            await runner.cleanup()

    asyncio.run(main())


def test_without_tls_the_extender_refuses_to_start_unless_told_plain_http_is_meant() -> None:
    with pytest.raises(SystemExit):
        ext.main(["--port", "0"])
