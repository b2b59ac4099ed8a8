"""`edpilot extender`: the kube-scheduler extender HTTP server.

The scheduler POSTs `ExtenderArgs` to `<urlPrefix>/filter` and `<urlPrefix>/prioritize` and
expects an `ExtenderFilterResult` and a `HostPriorityList` back (k8s.io/kube-scheduler/extender/v1;
the Go types carry no JSON tags, so keys are the Go field names). With `nodeCacheCapable: true` the
scheduler sends node names only; otherwise whole Node objects, which come back unchanged.

Handlers translate between those bodies and `edpilot.placement`; the cluster state comes from
`ClusterView`, fed by watches (`extender_watch`), never from a GET per request.

Only the scheduler may call it (issue 14, finding 4; docs/security.md): the scheduler's port speaks
TLS and serves only clients with a certificate from `--client-ca-file` (kube-scheduler's extender
`tlsConfig`), bodies are limited to `MAX_BODY_BYTES` and `READ_TIMEOUT_S`, parsed in worker threads,
and answered 400 without echoing them when malformed. Metrics and health live on another port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edpilot import placement
from edpilot.dra import DEFAULT_CONFIG, DraConfig
from edpilot.dra import add_arguments as add_dra_arguments
from edpilot.dra import config_from as dra_config_from
from edpilot_operator.extender_view import ClusterView

log = logging.getLogger("edpilot.extender")

DEFAULT_PORT: Final = 8888
DEFAULT_METRICS_PORT: Final = 9466
NOT_READY: Final = "edpilot extender: still listing the cluster; no opinion yet"
# The largest request a nodeCacheCapable scheduler sends: a pod as large as etcd stores (1.5 MiB)
# and 5,000 node names of the longest kind (253 characters, 1.3 MiB). Whole Node objects (not
# nodeCacheCapable) fit only for small clusters; the chart always asks for node names.
MAX_BODY_BYTES: Final = 3 * 2**20
# The scheduler sends its body at once; anything slower is not the scheduler.
READ_TIMEOUT_S: Final = 2.0
HANDSHAKE_TIMEOUT_S: Final = 5.0
KEEPALIVE_S: Final = 30.0
# Bodies parsed at once: each holds several times its size in objects while it is parsed.
PARSERS: Final = 2


# ---------------------------------------------------------------- wire format


class _Wire(BaseModel):
    """What edpilot reads of a scheduler body is typed (a wrong type is a 400, not a crash);
    everything else is kept as sent."""

    model_config = ConfigDict(extra="allow")


class WireMeta(_Wire):
    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    deletionTimestamp: str | None = None


class WireResources(_Wire):
    limits: dict[str, str | int | float] | None = None
    requests: dict[str, str | int | float] | None = None


class WireContainer(_Wire):
    image: str | None = None
    resources: WireResources | None = None


class WirePodSpec(_Wire):
    nodeName: str | None = None
    containers: list[WireContainer] | None = None


class WireContainerStatus(_Wire):
    restartCount: int | None = None


class WirePodStatus(_Wire):
    phase: str | None = None
    containerStatuses: list[WireContainerStatus] | None = None


class WirePod(_Wire):
    metadata: WireMeta | None = None
    spec: WirePodSpec | None = None
    status: WirePodStatus | None = None


class WireNode(_Wire):
    metadata: WireMeta | None = None


class NodeList(_Wire):
    items: list[WireNode] = Field(default_factory=list)


class ExtenderArgs(_Wire):
    Pod: WirePod
    Nodes: NodeList | None = None  # when the extender is not nodeCacheCapable
    NodeNames: list[str] | None = None  # when it is

    def pod(self) -> dict[str, Any]:
        return self.Pod.model_dump(exclude_none=True)

    def node_names(self) -> list[str]:
        if self.NodeNames is not None:
            return self.NodeNames
        items = self.Nodes.items if self.Nodes is not None else []
        return [(n.metadata.name if n.metadata else None) or "" for n in items]


_FIELDS: Final = frozenset(
    name
    for model in (ExtenderArgs, NodeList, WireNode, WirePod, WirePodStatus, WireContainerStatus, WirePodSpec)
    for name in model.model_fields
) | frozenset(name for model in (WireContainer, WireResources, WireMeta) for name in model.model_fields)


class BadArgs(Exception):
    """A body the extender will not decide on; the message names no value the client sent."""


def parse_args(body: bytes) -> ExtenderArgs:
    try:
        return ExtenderArgs.model_validate_json(body)
    except ValidationError as exc:
        raise BadArgs(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """Where and what is wrong, never the value: locations keep edpilot's field names and list
    indexes only (keys the client chose, such as label names, show as *)."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    where = ".".join(str(p) if isinstance(p, int) or p in _FIELDS else "*" for p in first["loc"]) or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"bad ExtenderArgs: {where}: {first['msg']}{more}"


class ExtenderFilterResult(BaseModel):
    Nodes: NodeList | None = None
    NodeNames: list[str] | None = None
    FailedNodes: dict[str, str] = Field(default_factory=dict)
    # Preemption cannot help these (throttling GPUs); the scheduler then does not try it.
    FailedAndUnresolvableNodes: dict[str, str] = Field(default_factory=dict)
    Error: str = ""


class HostPriority(BaseModel):
    Host: str
    Score: int


def host_priority_list(scores: dict[str, int]) -> bytes:
    """The HostPriorityList body (`HostPriority` rows), written directly: a model or a dict per node
    costs 1-2 ms at 5,000 nodes, a quarter of the latency goal."""
    rows = ",".join(
        f'{{"Host":{encode_basestring_ascii(host)},"Score":{score:d}}}' for host, score in scores.items()
    )
    return f"[{rows}]".encode()


# ---------------------------------------------------------------- metrics

# The label values the handlers below use.
VERBS = ("filter", "prioritize")
OUTCOMES = ("ok", "not_ready", "bad_request")
FILTER_REASONS = ("throttled", "power_budget")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edpilot_extender_requests",
            "Extender requests by verb and outcome.",
            ["verb", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "edpilot_extender_request_duration_seconds",
            "Time to answer an extender request.",
            ["verb"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.filtered = Counter(
            "edpilot_extender_filtered_nodes",
            "Nodes the filter dropped, by why.",
            ["reason"],
            registry=self.registry,
        )
        self.objects = Gauge(
            "edpilot_extender_view_objects",
            "Objects in the extender's view, by kind.",
            ["kind"],
            registry=self.registry,
        )
        # Every series exists from the start, at 0: a counter born at 1 by its first request shows
        # no increase to rate() and increase(), so the first filter (often the only one for a
        # while) would never reach the dashboard, whose panels would say "No data" meanwhile.
        for verb in VERBS:
            self.duration.labels(verb)
            for outcome in OUTCOMES:
                self.requests.labels(verb, outcome)
        for reason in FILTER_REASONS:
            self.filtered.labels(reason)


# ---------------------------------------------------------------- handlers


class Extender:
    """The HTTP face of placement over a ClusterView."""

    def __init__(
        self, view: ClusterView, max_body_bytes: int = MAX_BODY_BYTES, read_timeout: float = READ_TIMEOUT_S
    ) -> None:
        self.view = view
        self.metrics = Metrics()
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout
        self._parsers = ThreadPoolExecutor(PARSERS, thread_name_prefix="extender-parse")
        self._parsing = asyncio.Semaphore(PARSERS)

    def filter(self, args: ExtenderArgs) -> ExtenderFilterResult:
        if not self.view.ready:
            return ExtenderFilterResult(Error=NOT_READY)
        names = args.node_names()
        pod = self.view.demand(args.pod())
        result = placement.filter_nodes(pod, self.view.nodes_named(names), self.view.budget_views)
        throttled = {n: r for n, r in result.failed.items() if r.startswith(placement.THROTTLED_PREFIX)}
        over_budget = {n: r for n, r in result.failed.items() if n not in throttled}
        if throttled:
            self.metrics.filtered.labels("throttled").inc(len(throttled))
        if over_budget:
            self.metrics.filtered.labels("power_budget").inc(len(over_budget))
            log.info(
                "pod %s: %d node(s) over budget, e.g. %s",
                pod.key,
                len(over_budget),
                next(iter(over_budget.values())),
            )
        if args.NodeNames is not None:
            return ExtenderFilterResult(
                NodeNames=result.passed, FailedNodes=over_budget, FailedAndUnresolvableNodes=throttled
            )
        keep = set(result.passed)
        items = args.Nodes.items if args.Nodes is not None else []
        kept = [n for n in items if n.metadata is not None and n.metadata.name in keep]
        return ExtenderFilterResult(
            Nodes=NodeList(items=kept), FailedNodes=over_budget, FailedAndUnresolvableNodes=throttled
        )

    def prioritize(self, args: ExtenderArgs) -> dict[str, int]:
        """Scores by node name; `host_priority_list` turns them into the HostPriorityList body."""
        pod = self.view.demand(args.pod())
        nodes = self.view.nodes_named(args.node_names())
        return placement.score_nodes(pod, nodes, self.view.budget_views, self.view.history())

    # ------------------------------------------------------------ aiohttp glue

    async def _args(self, request: web.Request) -> ExtenderArgs:
        """The request's body, read within the deadline and the size limit and parsed in a worker
        thread, so a large or slow body holds neither the event loop nor the connection for long."""
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise _refusal(413, f"body over {self.max_body_bytes} bytes")
        try:
            async with asyncio.timeout(self.read_timeout):
                body = await request.read()
                async with self._parsing:
                    return await asyncio.get_running_loop().run_in_executor(self._parsers, parse_args, body)
        except TimeoutError:
            raise _refusal(408, f"body not received within {self.read_timeout:g} s") from None
        except web.HTTPRequestEntityTooLarge:
            raise _refusal(413, f"body over {self.max_body_bytes} bytes") from None
        except BadArgs as exc:
            raise _refusal(400, str(exc)) from None

    async def handle_filter(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            args = await self._args(request)
        except web.HTTPException:
            self.metrics.requests.labels("filter", "bad_request").inc()
            raise
        body = self.filter(args).model_dump_json(exclude_none=True)
        self.metrics.requests.labels("filter", "ok" if self.view.ready else "not_ready").inc()
        self.metrics.duration.labels("filter").observe(time.perf_counter() - started)
        return _json(body)

    async def handle_prioritize(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            args = await self._args(request)
        except web.HTTPException:
            self.metrics.requests.labels("prioritize", "bad_request").inc()
            raise
        if not self.view.ready:
            self.metrics.requests.labels("prioritize", "not_ready").inc()
            # Prioritize errors are ignored by the scheduler: the other scores decide.
            return web.Response(status=503, text=NOT_READY)
        body = host_priority_list(self.prioritize(args))
        self.metrics.requests.labels("prioritize", "ok").inc()
        self.metrics.duration.labels("prioritize").observe(time.perf_counter() - started)
        return _json(body)

    async def handle_healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def handle_readyz(self, _: web.Request) -> web.Response:
        if self.view.ready:
            return web.Response(text="ok")
        missing = ", ".join(k for k in self.view.kinds if k not in self.view.synced)
        return web.Response(status=503, text=f"not listed yet: {missing}")

    async def handle_metrics(self, _: web.Request) -> web.Response:
        for kind, count in self.view.counts().items():
            self.metrics.objects.labels(kind).set(count)
        return web.Response(
            body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def app(self) -> web.Application:
        """What the scheduler calls: /filter and /prioritize, nothing else."""
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post("/filter", self.handle_filter)
        app.router.add_post("/prioritize", self.handle_prioritize)
        return app

    def ops_app(self) -> web.Application:
        """Metrics and probes, on a port of their own (plain HTTP, for Prometheus and the kubelet)."""
        app = web.Application(client_max_size=1024)
        app.router.add_get("/healthz", self.handle_healthz)
        app.router.add_get("/readyz", self.handle_readyz)
        app.router.add_get("/metrics", self.handle_metrics)
        return app

    def close(self) -> None:
        self._parsers.shutdown(wait=False, cancel_futures=True)


def _refusal(status: int, text: str) -> web.HTTPException:
    """An error answer that also closes the connection: what is left of the body is not read."""
    error: web.HTTPException
    if status == 413:
        error = web.HTTPRequestEntityTooLarge(max_size=0, text=text)
    elif status == 408:
        error = web.HTTPRequestTimeout(text=text)
    else:
        error = web.HTTPBadRequest(text=text)
    error.force_close()
    return error


def _json(body: str | bytes) -> web.Response:
    return web.Response(
        body=body.encode() if isinstance(body, str) else body, content_type="application/json"
    )


# ---------------------------------------------------------------- process


def server_tls(cert: Path | str, key: Path | str, client_ca: Path | str) -> ssl.SSLContext:
    """TLS for the scheduler's port: this server's certificate, and a client certificate signed by
    `client_ca` required from every caller (kube-scheduler's extender tlsConfig certFile/keyFile)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def listen(runner: web.AppRunner, host: str, port: int, tls: ssl.SSLContext | None) -> asyncio.Server:
    """Serve `runner` on host:port; with TLS, a handshake that does not finish in time is dropped
    (aiohttp's TCPSite would wait a minute)."""
    assert runner.server is not None, "runner.setup() first"
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        runner.server,
        host,
        port,
        ssl=tls,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if tls is not None else None,
        reuse_address=True,
    )


def runner(app: web.Application) -> web.AppRunner:
    # lingering_time 0: after an error answer the rest of a body is not waited for.
    return web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_S, lingering_time=0)


async def serve(
    *,
    host: str,
    port: int,
    metrics_port: int,
    tls: ssl.SSLContext | None,
    kubeconfig: str | None,
    stop: asyncio.Event,
    max_body_bytes: int = MAX_BODY_BYTES,
    dra: DraConfig | None = DEFAULT_CONFIG,
) -> None:
    import aiohttp

    from edpilot_operator.extender_watch import Watcher, load_endpoint

    endpoint = load_endpoint(kubeconfig)
    view = ClusterView(dra)
    extender = Extender(view, max_body_bytes=max_body_bytes)
    scheduler_side, ops_side = runner(extender.app()), runner(extender.ops_app())
    await scheduler_side.setup()
    await ops_side.setup()
    servers = [
        await listen(scheduler_side, host, port, tls),
        await listen(ops_side, host, metrics_port, None),
    ]
    log.info(
        "extender listening on %s:%d (%s), metrics and probes on %d, API server %s",
        host,
        port,
        "TLS, client certificates required" if tls is not None else "plain HTTP",
        metrics_port,
        endpoint.host,
    )
    async with aiohttp.ClientSession() as session:
        watchers = [asyncio.create_task(Watcher(kind, endpoint, session, view).run()) for kind in view.kinds]
        try:
            await stop.wait()
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            for server in servers:
                server.close()
            await scheduler_side.cleanup()
            await ops_side.cleanup()
            extender.close()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="edpilot extender", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"the scheduler's port (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"/metrics, /healthz and /readyz, plain HTTP (default {DEFAULT_METRICS_PORT})",
    )
    parser.add_argument("--tls-cert-file", help="this server's certificate (PEM) for the scheduler's port")
    parser.add_argument("--tls-private-key-file", help="its private key (PEM)")
    parser.add_argument(
        "--client-ca-file", help="CA (PEM) whose certificates callers must present: the scheduler's"
    )
    parser.add_argument(
        "--insecure-http",
        action="store_true",
        help="serve the scheduler's port without TLS or client authentication (local tests only)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=MAX_BODY_BYTES,
        help=f"largest request body accepted (default {MAX_BODY_BYTES}: nodeCacheCapable requests)",
    )
    parser.add_argument(
        "--kubeconfig", default=None, help="kubeconfig (default: in-cluster, else $KUBECONFIG)"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_dra_arguments(parser)
    args = parser.parse_args(list(argv))
    files = (args.tls_cert_file, args.tls_private_key_file, args.client_ca_file)
    if args.insecure_http == any(files) or (any(files) and not all(files)):
        parser.error(
            "give --tls-cert-file, --tls-private-key-file and --client-ca-file (kube-scheduler then "
            "authenticates with its extender tlsConfig), or --insecure-http for a local test"
        )
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    tls = None if args.insecure_http else server_tls(*files)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            tls=tls,
            kubeconfig=args.kubeconfig,
            stop=stop,
            max_body_bytes=args.max_body_bytes,
            dra=dra_config_from(args),
        )

    asyncio.run(run())
    return 0
