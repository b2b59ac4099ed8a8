"""The privileged half of the node agent (`edpilot agent-setter`), and the agent's client of it.

The agent reads tenants' HTTP, so it runs as an unprivileged user without capabilities. Setting a
power limit needs CAP_SYS_ADMIN (the NVIDIA driver's NV_IS_SUSER check) and reading the kubelet's
pod-resources socket needs root, so only this small process has both. It serves a unix socket in
a volume that only the agent pod's containers share, answers only the agent's uid (SO_PEERCRED),
and takes one request per connection, one line of ASCII:

    SET <gpu uuid> <milliwatts>   ->  OK <milliwatts>  |  ERR <reason>
    RESTORE <gpu uuid>            ->  OK <milliwatts>  |  ERR <reason>
    LOCK <gpu uuid> <MHz>         ->  OK <MHz>  |  ERR <reason>
    UNLOCK <gpu uuid>             ->  OK 0  |  ERR <reason>
    ALLOCATIONS                   ->  OK <JSON: what the kubelet gave each pod>  |  ERR <reason>

LOCK locks the GPU's SM clock to [its lowest supported clock, MHz] (the floor is this process's
own, never the caller's); UNLOCK resets locked clocks.

The answer to ALLOCATIONS is `holdings.encode`'s JSON: per pod, the device IDs of nvidia.com/gpu
and the DRA devices (driver, pool, device, share id) of its claims. The agent maps them to GPUs
(DRA devices through the node's ResourceSlices, which only it can read: this process holds no API
token) and parses the answer strictly.

Every limit is checked again against the GPU inventory this process read from NVML itself: a GPU
of this node, without MIG, within [min constraint, min(max constraint, default limit)]; every
clock ceiling within the supported SM clocks NVML listed (a GPU without that list is never
locked). Anything else is refused. Requests are handled one at a time, so on SIGTERM, once it
stops accepting caps and locks, the restore (default limit, unlocked clocks) of every GPU it
changed is the last thing that happens to them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import re
import signal
import socket
import struct
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Literal

from edpilot_agent.backend import GpuBackend, GpuBackendError, GpuInfo, GpuReading
from edpilot_agent.holdings import GpuAllocations, PodDevices, decode, encode
from edpilot_agent.pods import PodInfo

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 128
MAX_RESPONSE_BYTES = 1 << 20
_SET = re.compile(rb"SET ([A-Za-z0-9-]{1,96}) ([0-9]{1,8})\n")
_RESTORE = re.compile(rb"RESTORE ([A-Za-z0-9-]{1,96})\n")
_LOCK = re.compile(rb"LOCK ([A-Za-z0-9-]{1,96}) ([0-9]{1,5})\n")
_UNLOCK = re.compile(rb"UNLOCK ([A-Za-z0-9-]{1,96})\n")
_ALLOCATIONS = b"ALLOCATIONS\n"
_REASON = re.compile(r"[ -~]{0,200}")


class SetterServer:
    def __init__(
        self,
        backend: GpuBackend | None,
        socket_path: str,
        allowed_uid: int | None,
        allocations: GpuAllocations | None = None,
        read_only: bool = False,
    ) -> None:
        self.backend = backend
        self.socket_path = socket_path
        self.allowed_uid = allowed_uid
        self.allocations = allocations
        self.read_only = read_only
        # Without a backend (allocations only) there is no GPU to change: every change is refused.
        self.gpus = {g.uuid: g for g in backend.gpus()} if backend is not None else {}
        self.changed: set[str] = set()
        self.locked: set[str] = set()
        self.draining = threading.Event()
        self.requests = 0
        self.refused = 0
        self._sock: socket.socket | None = None

    # ------------------------------------------------------------ one request

    def handle(self, request: bytes) -> bytes:
        """The answer to one request line (the peer is already known to be the agent)."""
        self.requests += 1
        answer = self._answer(request)
        if answer.startswith(b"ERR"):
            self.refused += 1
            log.warning("refused a request: %s", answer[4:].decode().strip())
        return answer

    def _answer(self, request: bytes) -> bytes:
        if request == _ALLOCATIONS:
            if self.allocations is None:
                return _err("this setter has no source of GPU allocations")
            try:
                held = self.allocations.allocations([])
            except Exception as exc:  # the kubelet is away: say so, keep serving
                return _err(f"the kubelet's pod-resources API did not answer ({type(exc).__name__})")
            return b"OK " + encode(held).encode() + b"\n"
        if request.startswith((b"LOCK ", b"UNLOCK ")):
            return self._clock(request)
        restore = _RESTORE.fullmatch(request)
        match = restore or _SET.fullmatch(request)
        if match is None:
            return _err("not a request this setter knows")
        gpu = self.gpus.get(match.group(1).decode())
        if gpu is None:
            return _err("no such GPU on this node")
        watts = gpu.default_limit_watts if restore else int(match.group(2)) / 1000
        if self.read_only:
            return _err("this setter is read-only (dry run)")
        if gpu.mig_enabled:
            return _err("MIG is enabled on this GPU; edpilot never caps it")
        if not restore and self.draining.is_set() and watts != gpu.default_limit_watts:
            return _err("the setter is stopping; only restores are taken")
        if not gpu.min_limit_watts <= watts <= gpu.highest_cap_watts:
            return _err(f"{watts:g} W is outside [{gpu.min_limit_watts:g}, {gpu.highest_cap_watts:g}] W")
        try:
            assert self.backend is not None  # a GPU was found, so there is one
            self.backend.set_power_limit(gpu.uuid, watts)
        except GpuBackendError as exc:
            return _err(f"NVML refused: {exc}")
        if watts == gpu.default_limit_watts:
            self.changed.discard(gpu.uuid)
        else:
            self.changed.add(gpu.uuid)
        log.info("set GPU %s to %.0f W", gpu.uuid, watts)
        return f"OK {round(watts * 1000)}\n".encode()

    def _clock(self, request: bytes) -> bytes:
        unlock = _UNLOCK.fullmatch(request)
        match = unlock or _LOCK.fullmatch(request)
        if match is None:
            return _err("not a request this setter knows")
        gpu = self.gpus.get(match.group(1).decode())
        if gpu is None:
            return _err("no such GPU on this node")
        if self.read_only:
            return _err("this setter is read-only (dry run)")
        if gpu.mig_enabled:
            return _err("MIG is enabled on this GPU; edpilot never locks its clocks")
        mhz = None if unlock else float(match.group(2))
        if mhz is not None:
            if self.draining.is_set():
                return _err("the setter is stopping; only restores are taken")
            if not gpu.clock_range_known:
                return _err("NVML lists no supported SM clocks for this GPU; edpilot never locks them")
            if not gpu.min_sm_clock_mhz <= mhz <= gpu.max_sm_clock_mhz:
                return _err(
                    f"{mhz:g} MHz is outside the supported SM clocks "
                    f"[{gpu.min_sm_clock_mhz:g}, {gpu.max_sm_clock_mhz:g}] MHz"
                )
        try:
            assert self.backend is not None
            self.backend.set_locked_sm_clock(gpu.uuid, mhz)
        except GpuBackendError as exc:
            return _err(f"NVML refused: {exc}")
        if mhz is None:
            self.locked.discard(gpu.uuid)
            log.info("reset GPU %s's locked clocks", gpu.uuid)
        else:
            self.locked.add(gpu.uuid)
            log.info("locked GPU %s's SM clock at most %.0f MHz", gpu.uuid, mhz)
        return f"OK {round(mhz or 0)}\n".encode()

    def restore_changed(self) -> list[str]:
        """Every GPU this process changed back to its default limit and unlocked clocks."""
        requests = [f"RESTORE {uuid}\n" for uuid in sorted(self.changed)]
        requests += [f"UNLOCK {uuid}\n" for uuid in sorted(self.locked)]
        errors = []
        for request in requests:
            answer = self._answer(request.encode())
            if not answer.startswith(b"OK"):
                errors.append(f"{request.strip()}: {answer.decode().strip()}")
        return errors

    # ------------------------------------------------------------ the socket

    def bind(self) -> None:
        path = Path(self.socket_path)
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.socket_path)
        # Who may connect is decided by the peer's uid below; the file mode only lets it try.
        path.chmod(0o666)
        sock.listen(8)
        sock.settimeout(0.2)
        self._sock = sock

    def serve(self, stop: threading.Event) -> None:
        """Answer requests until `stop`; then take only restores, restore what was changed, exit."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        try:
            while not stop.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                with conn:
                    self._serve_one(conn)
        finally:
            self.draining.set()
            errors = self.restore_changed()
            for error in errors:
                log.error("restoring the default limit or clocks failed: %s", error)
            self._sock.close()
            Path(self.socket_path).unlink(missing_ok=True)

    def _serve_one(self, conn: socket.socket) -> None:
        conn.settimeout(2.0)
        try:
            uid = peer_uid(conn)
            if self.allowed_uid is not None and uid != self.allowed_uid:
                self.refused += 1
                log.warning("refused a connection from uid %d (only uid %d may ask)", uid, self.allowed_uid)
                conn.sendall(_err("this uid may not use the setter"))
                return
            request = b""
            while not request.endswith(b"\n") and len(request) <= MAX_REQUEST_BYTES:
                chunk = conn.recv(MAX_REQUEST_BYTES + 1 - len(request))
                if not chunk:
                    break
                request += chunk
            conn.sendall(
                self.handle(request) if len(request) <= MAX_REQUEST_BYTES else _err("request too long")
            )
        except OSError as exc:
            log.warning("a setter connection failed: %s", type(exc).__name__)


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return int(uid)


def _err(reason: str) -> bytes:
    safe = reason if _REASON.fullmatch(reason) else "refused"
    return f"ERR {safe}\n".encode()


# ---------------------------------------------------------------- the agent's side


class SetterError(GpuBackendError):
    pass


class SetterClient:
    """Talks to the setter over its socket: sets limits, and asks which pod holds which GPU."""

    def __init__(self, socket_path: str, timeout_seconds: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout_seconds = timeout_seconds

    def _ask(self, request: str) -> str:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout_seconds)
                sock.connect(self.socket_path)
                # A setter refusing the caller answers and closes without reading: its answer waits.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(request.encode("ascii"))
                answer = b""
                while not answer.endswith(b"\n") and len(answer) <= MAX_RESPONSE_BYTES:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
        except OSError as exc:
            raise SetterError(f"the setter at {self.socket_path} did not answer: {exc}") from exc
        text = answer.decode("utf-8", errors="replace").strip()
        if not text:
            raise SetterError(f"the setter at {self.socket_path} did not answer: it closed the connection")
        if not text.startswith("OK"):
            raise SetterError(f"the setter refused: {text.removeprefix('ERR ')[:300]}")
        return text[3:]

    def set_power_limit(self, uuid: str, watts: float) -> None:
        self._ask(f"SET {uuid} {round(watts * 1000)}\n")

    def set_locked_sm_clock(self, uuid: str, max_mhz: float | None) -> None:
        if max_mhz is None:
            self._ask(f"UNLOCK {uuid}\n")
        elif not math.isfinite(max_mhz) or max_mhz < 0:
            raise SetterError(f"{max_mhz} MHz is not an SM clock")
        else:
            # Whole MHz, never rounded up: the ceiling is a promise.
            self._ask(f"LOCK {uuid} {math.floor(max_mhz)}\n")

    def allocations(self, pods: Sequence[PodInfo]) -> Mapping[str, PodDevices]:
        try:
            return decode(self._ask("ALLOCATIONS\n"))
        except ValueError as exc:  # JSONDecodeError included
            raise SetterError(f"the setter's allocations are malformed: {str(exc)[:200]}") from exc


class SetterBackend:
    """A `GpuBackend` that reads through `reader` (NVML, read-only, unprivileged) and sets limits
    through the setter."""

    def __init__(self, reader: GpuBackend, setter: SetterClient) -> None:
        self.reader = reader
        self.setter = setter

    @property
    def name(self) -> Literal["nvml", "sim"]:
        return self.reader.name

    def gpus(self) -> list[GpuInfo]:
        return self.reader.gpus()

    def read(self, uuid: str, energy: bool = True) -> GpuReading:
        return self.reader.read(uuid, energy)

    def set_power_limit(self, uuid: str, watts: float) -> None:
        self.setter.set_power_limit(uuid, watts)

    def set_locked_sm_clock(self, uuid: str, max_mhz: float | None) -> None:
        self.setter.set_locked_sm_clock(uuid, max_mhz)

    def close(self) -> None:
        self.reader.close()


# ---------------------------------------------------------------- `edpilot agent-setter`


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="edpilot agent-setter",
        description=(
            "Set GPU power limits (within [min, default]) and locked SM clocks (within the supported "
            "clocks) for the node agent, and nothing else."
        ),
    )
    p.add_argument("--socket", default="/run/edpilot/setter.sock", help="unix socket to serve")
    p.add_argument("--allowed-uid", type=int, default=65532, help="the agent's uid; -1: any (tests only)")
    p.add_argument("--read-only", action="store_true", help="refuse every change (the agent's dry run)")
    p.add_argument(
        "--allocations-only",
        action="store_true",
        help="open no GPU, refuse every change, relay only the kubelet's allocations "
        "(for a simulated agent on a node with a real kubelet)",
    )
    p.add_argument("--pod-resources-socket", default="/var/lib/kubelet/pod-resources/kubelet.sock")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from edpilot_agent.podresources import PodResourcesClient

    backend: GpuBackend | None = None
    try:
        if not args.allocations_only:
            from edpilot_agent.nvml import NvmlBackend

            backend = NvmlBackend(read_only=args.read_only)
    except GpuBackendError as exc:
        log.error("%s", exc)
        return 1
    server = SetterServer(
        backend,
        args.socket,
        None if args.allowed_uid < 0 else args.allowed_uid,
        PodResourcesClient(args.pod_resources_socket),
        read_only=args.read_only,
    )
    stop = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    server.bind()
    log.info(
        "setter for %d GPUs on %s%s", len(server.gpus), args.socket, " (read-only)" if args.read_only else ""
    )
    try:
        server.serve(stop)
    finally:
        if backend is not None:
            backend.close()
    return 0
