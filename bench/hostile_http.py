"""A tenant's /metrics endpoint that misbehaves on purpose, on loopback, for the hostile-endpoint
benchmark and the agent's security tests (tests/security). Each connection gets `behaviour(sock)`
after its request was read."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

Behaviour = Callable[[socket.socket], None]

OK_HEADER = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\r\n"


@dataclass
class HostileServer:
    port: int
    requests: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"


@contextmanager
def hostile_server(behaviour: Behaviour) -> Iterator[HostileServer]:
    record = HostileServer(0)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.settimeout(30)
            head = b""
            try:
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                record.requests.append(head.split(b"\r\n", 1)[0])
                behaviour(sock)
            except OSError:
                pass  # the agent hung up on us: that is the point

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    record.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        server.shutdown()
        server.server_close()


def body(text: str | bytes, status: str = "200 OK", headers: str = "") -> Behaviour:
    data = text.encode() if isinstance(text, str) else text

    def send(sock: socket.socket) -> None:
        head = (
            f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n{headers}\r\n"
        )
        sock.sendall(head.encode() + data)

    return send


def redirect(location: str) -> Behaviour:
    return body("", status="302 Found", headers=f"Location: {location}\r\n")


def drip(period_seconds: float = 0.5, for_seconds: float = 10.0, start: bytes = OK_HEADER) -> Behaviour:
    """A valid start, then one byte every `period_seconds`: each read succeeds, the scrape never ends."""

    def send(sock: socket.socket) -> None:
        sock.sendall(start)
        end = time.monotonic() + for_seconds
        while time.monotonic() < end:
            sock.sendall(b"a")
            time.sleep(period_seconds)

    return send


def huge(megabytes: int = 8, line: bytes = b"a 1\n") -> Behaviour:
    """`megabytes` MiB of valid Prometheus lines of a series nobody asked for, without a length."""

    def send(sock: socket.socket) -> None:
        sock.sendall(OK_HEADER)
        block = line * (65536 // len(line))
        for _ in range(megabytes * 1024 * 1024 // len(block)):
            sock.sendall(block)

    return send


def hang() -> Behaviour:
    def send(sock: socket.socket) -> None:
        time.sleep(30)

    return send
