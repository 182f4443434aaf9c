"""The one hop between clients and engines: routes OpenAI requests by their `model` to a replica.

The router answers `/health` (it runs), `/ready` (every expected model has a replica),
`/v1/models` and the errors that need no engine, in OpenAI's shape; it takes each model route's
`model` field from the JSON body, lets its routing policy pick a replica serving that model, and
hands the request to the byte relay (`raylm.serving.relay`). Everything an engine says, errors
included, passes through unchanged but for error bodies not in OpenAI's shape.

Runs without Ray: `python -m raylm.serving.router --port 8000 --upstream tiny=http://127.0.0.1:8001`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from raylm.serving.admission import DEFAULT_MAX_ONGOING_REQUESTS, DEFAULT_MAX_QUEUED_REQUESTS, Admission, Limits
from raylm.serving.answers import Answers
from raylm.serving.http import error_body, forwarded_request
from raylm.serving.keys import KeyFile
from raylm.serving.metrics import CONTENT_TYPE, RouterMetrics, engine_metrics
from raylm.serving.policy import LeastInFlight, RoutingPolicy
from raylm.serving.relay import ClientConnection, UpstreamConnection
from raylm.serving.routes import Lease, RouteTable, Upstream

logger = logging.getLogger("raylm.router")

MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
MAX_CONNECTIONS = 4096
# A client's own request id is kept when it is short and plain (it lands in logs and the engine's ids).
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# Made request ids: 128 random bits from a generator seeded once from the OS (uuid4 reads the OS's
# random source, a system call per request); unique enough for ids, and not secrets.
REQUEST_IDS = random.Random()
RETRY_AFTER_S = 1  # what a 429 (at capacity) or a 503 (model starting) tells clients to wait
UNAUTHORIZED = error_body(
    401, "Incorrect API key provided: send one of the endpoint's keys as `Authorization: Bearer KEY`.",
    code="invalid_api_key",
)  # fmt: skip
Handler = Callable[[ClientConnection, bytes, bytes, list, bytes], None]


class Router:
    """Routes OpenAI requests by model to registered engine servers."""

    def __init__(
        self,
        table: RouteTable,
        policy: RoutingPolicy | None = None,
        max_connections: int = MAX_CONNECTIONS,
        metrics: bool = True,
        keys: KeyFile | None = None,
        limits: Mapping[str, Limits] | None = None,
        access_log: bool = True,
        cold_starts: Mapping[str, float] | None = None,
        start_replica: Callable[[str], None] | None = None,
    ):
        self.table = table
        self.policy = policy or LeastInFlight()
        self.admission = Admission(limits)
        table.on_change = self.admission.replicas_changed
        # Models that may have no replica (scaled to zero), and how long a request waits for one to start;
        # `start_replica(model)` asks for one and blocks until it runs (it is called on a worker thread).
        self.cold_starts = dict(cold_starts or {})
        if self.cold_starts and start_replica is None:
            raise ValueError("models that scale to zero need `start_replica`")
        self.start_replica = start_replica
        self.starting: set[str] = set()
        self.draining = False  # stopping: requests already taken finish, new ones get 503
        self.metrics = RouterMetrics(table, self.admission) if metrics else None
        # Metrics and a line per model request in the `raylm.access` log, recorded in batches.
        self.answers = Answers(self.metrics, log=access_log) if metrics or access_log else None
        self.keys = keys  # with keys, every /v1 route and /metrics need one of them
        self.connections: set[ClientConnection] = set()
        self.max_connections = max_connections  # past it, a new connection gets 503 (file descriptors are finite)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: asyncio.AbstractServer | None = None
        # A route is one entry: (method, path) -> handler(client, method, url, headers, body).
        self.routes: dict[tuple[bytes, str], Handler] = {(b"POST", path): self.route_to_model for path in MODEL_ROUTES}
        for method in (b"GET", b"HEAD"):
            self.routes[(method, "/health")] = lambda client, *_: client.reply(200, {"status": "ok"})
            # `/` too: what a platform polls by default (Cloudera ML's applications do).
            self.routes[(method, "/")] = lambda client, *_: client.reply(200, {"status": "ok"})
            self.routes[(method, "/ready")] = self.ready
            self.routes[(method, "/v1/models")] = lambda client, *_: client.reply(200, self.table.models_payload())
            self.routes[(method, "/metrics")] = lambda client, *_: self.loop.create_task(self.serve_metrics(client))

    async def start(self, host: str, port: int) -> None:
        self.loop = asyncio.get_running_loop()
        if self.answers is not None:
            self.answers.loop = self.loop
        self.server = await self.loop.create_server(lambda: ClientConnection(self), host, port, reuse_address=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self.answers is not None:
            self.answers.flush()
        self.table.close()

    def dispatch(self, client: ClientConnection, method: bytes, url: bytes, headers: list, body: bytes) -> None:
        path = url.split(b"?", 1)[0].decode("latin-1").rstrip("/") or "/"
        if self.keys is not None and (path.startswith("/v1/") or path == "/metrics"):
            authorization = next((value for name, value in headers if name.lower() == b"authorization"), None)
            if not self.keys.allows(authorization):
                if self.metrics is not None:
                    self.metrics.unauthorized.inc()
                client.reply(401, UNAUTHORIZED)
                return
        handler = self.routes.get((method, path))
        if handler is not None:
            handler(client, method, url, headers, body)
        elif path in MODEL_ROUTES:
            client.reply(405, error_body(405, f"{path} takes POST"))
        elif method in (b"GET", b"HEAD") and path.startswith("/v1/models/"):
            self.model_card(client, path.removeprefix("/v1/models/"))
        else:
            client.reply(404, error_body(404, f"no route {method.decode()} {path}", code="unknown_route"))

    async def serve_metrics(self, client: ClientConnection) -> None:
        if self.metrics is None:
            client.reply(404, error_body(404, "metrics are off", code="unknown_route"))
            return
        upstreams = [u for model in self.table.model_names() for u in self.table.replicas(model)]
        self.answers.flush()  # every request answered before the scrape is counted in it
        client.reply_raw(200, CONTENT_TYPE, self.metrics.render(await engine_metrics(upstreams)))

    def ready(self, client: ClientConnection, *_) -> None:
        """Ready: every model has a replica, or may have none (scaled to zero: a request starts one)."""
        without_replica = self.table.pending_models()
        idle = [m for m in without_replica if m in self.cold_starts]
        pending = [m for m in without_replica if m not in self.cold_starts]
        if self.draining:
            client.reply(503, {"status": "draining"})
        elif pending:
            client.reply(503, {"status": "starting", "pending_models": pending})
        else:
            client.reply(200, {"status": "ready", "models": self.table.model_names(), "scaled_to_zero": idle})

    def model_card(self, client: ClientConnection, name: str) -> None:
        card = next((c for c in self.table.models_payload()["data"] if c["id"] == name), None)
        if card is None:
            client.reply(404, self.unknown_model(name))
        else:
            client.reply(200, card)

    def unknown_model(self, model: str) -> dict:
        served = ", ".join(self.table.model_names()) or "none"
        return error_body(
            404, f"The model {model!r} does not exist. Served models: {served}.", code="model_not_found", param="model"
        )

    def route_to_model(self, client: ClientConnection, method: bytes, url: bytes, headers: list, body: bytes) -> None:
        client.request_id, headers = request_id(headers)
        try:
            payload = json.loads(body)
        except ValueError as exc:
            client.reply(400, error_body(400, f"the request body is not valid JSON: {exc}"))
            return
        model = payload.get("model") if isinstance(payload, dict) else None
        # Metrics count by served model names only: a client cannot make up label values.
        known = isinstance(model, str) and (model in self.table.expected_models or bool(self.table.replicas(model)))
        client.route, client.model = url.split(b"?", 1)[0].decode("latin-1"), model if known else "(unknown)"
        if not isinstance(model, str) or not model:
            client.reply(400, error_body(400, "the request needs a `model` field naming a served model", param="model"))
            return
        if self.draining:
            message = "the endpoint is shutting down; retry on another endpoint or later"
            client.reply(503, error_body(503, message, code="shutting_down"), retry_after_s=RETRY_AFTER_S)
            return
        if not self.table.replicas(model) and model not in self.cold_starts:
            if model in self.table.expected_models:
                message = f"model {model!r} is starting; retry shortly"
                client.reply(503, error_body(503, message, code="model_starting"), retry_after_s=RETRY_AFTER_S)
            else:
                client.reply(404, self.unknown_model(model))
            return
        self.admit(client, Request(method, url, headers, body, payload, self.keys is not None), model, woken=False)

    def admit(self, client: ClientConnection, request: Request, model: str, woken: bool) -> None:
        """Forward `request` to a replica with room; else it waits its turn, or is refused when too many
        wait already. `woken`: it waited, and a replica finished a request since."""
        if client.transport is None:  # woken after its client hung up: the turn goes to the next one
            self.admission.released(model)
            return
        replicas = self.table.replicas(model)
        if not replicas and model not in self.cold_starts:  # every replica went away while it waited
            client.reply(503, error_body(503, f"no replica of model {model!r} is reachable", code="model_unavailable"))
            return
        room = self.admission.with_room(model, replicas) if woken or not self.admission.depth(model) else []
        client.waiting = None
        if room:
            self.forward(client, self.policy.choose(room, request.payload), request, retries=1)
            return
        client.waiting = (model, lambda: self.admit(client, request, model, woken=True))
        if not self.admission.wait(*client.waiting, first=woken):
            client.waiting = None
            if self.metrics is not None:
                self.metrics.rejected.labels(model).inc()
            limits = self.admission.limits_of(model)
            message = (
                f"model {model!r} is at capacity ({limits.max_ongoing_requests} requests per replica, "
                f"{limits.max_queued_requests} waiting); retry shortly"
            )
            client.reply(429, error_body(429, message, code="rate_limit_exceeded"), retry_after_s=RETRY_AFTER_S)
        elif not replicas:
            self.wait_for_cold_start(client, model, client.waiting)

    def wait_for_cold_start(self, client: ClientConnection, model: str, waiting: tuple) -> None:
        """`client` waits for a replica of a model that has none: one is asked for (once for all of them),
        and the request gets 503 if none runs in time."""

        def give_up() -> None:
            if client.waiting is waiting:  # still in the queue
                self.admission.leave(*waiting)
                client.waiting = None
                message = f"model {model!r} is scaled to zero and its first replica did not start in {timeout_s:g}s"
                client.reply(503, error_body(503, message, code="model_starting"), retry_after_s=RETRY_AFTER_S)

        timeout_s = self.cold_starts[model]
        self.loop.call_later(timeout_s, give_up)
        if model not in self.starting:
            self.starting.add(model)
            self.loop.create_task(self._start_replica(model))

    async def _start_replica(self, model: str) -> None:
        """Ask for a replica of `model` until it has one or nobody waits for it any more."""
        try:
            while self.admission.depth(model) and not self.table.replicas(model):
                logger.info("model %s: %d request(s) wait; starting a replica", model, self.admission.depth(model))
                try:
                    await self.loop.run_in_executor(None, self.start_replica, model)
                except Exception as exc:  # timed out, or Serve refused: the waiting requests get 503 in time
                    logger.warning("model %s: starting a replica failed: %s", model, exc)
                await asyncio.sleep(1.0)  # the replica registers with the router as it starts
        finally:
            self.starting.discard(model)

    def unfinished(self) -> int:
        """Requests taken and not yet answered: in flight on a replica, or waiting for one."""
        return self.table.in_flight() + sum(map(self.admission.depth, self.table.model_names()))

    def pick(self, model: str, request: dict) -> Upstream | None:
        replicas = self.table.replicas(model)
        return self.policy.choose(replicas, request) if replicas else None

    def forward(self, client: ClientConnection, upstream: Upstream, request: Request, retries: int) -> None:
        """Send `request` to `upstream`; with `retries` left, to another replica of the model if `upstream`
        cannot be reached."""
        client.replica = upstream.replica_id
        lease = Lease(upstream, self.admission.released)
        wire = request.to(upstream)
        connection = upstream.take_idle()
        if connection is not None:
            connection.send(client, wire, lease, reused=True, request=request)
        else:
            self.loop.create_task(self._connect_and_send(client, lease, request, retries))

    async def _connect_and_send(self, client: ClientConnection, lease: Lease, request: Request, retries: int) -> None:
        upstream = lease.upstream
        try:
            _, connection = await self.loop.create_connection(
                lambda: UpstreamConnection(upstream), upstream.host, upstream.port
            )
        except OSError as exc:
            lease.release()
            if self.metrics is not None:
                self.metrics.connect_failures.labels(upstream.model).inc()
            logger.warning("model %s: replica %s at %s unreachable (%s); removed", upstream.model, upstream.replica_id,
                           upstream.url, exc)  # fmt: skip
            self.table.deregister(upstream.replica_id)
            other = self.pick(upstream.model, request.payload)
            if other is not None and retries > 0:
                self.forward(client, other, request, retries - 1)
            else:
                client.reply(
                    503,
                    error_body(503, f"no replica of model {upstream.model!r} is reachable", code="model_unavailable"),
                )
            return
        if client.transport is None:  # the client left while we connected
            lease.release()
            connection.park()
            return
        connection.send(client, request.to(upstream), lease, reused=False, request=request)


@dataclass(frozen=True)
class Request:
    """A model request as it arrived, and its parsed body (what the routing policy picks by)."""

    method: bytes
    url: bytes
    headers: list
    body: bytes
    payload: dict
    endpoint_key: bool  # its `authorization` was the endpoint's key: never passed on

    def to(self, upstream: Upstream) -> bytes:
        """The bytes sent to this replica's engine (with its key)."""
        return forwarded_request(self.method, self.url, self.headers, self.body, upstream.api_key, self.endpoint_key)


def request_id(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The request's id, the client's `x-request-id` if it sent a usable one, and the headers that carry it
    to the engine (vLLM takes it as its own request id, so the engine's log lines carry it too)."""
    given = next((value for name, value in headers if name.lower() == b"x-request-id"), b"")
    if REQUEST_ID.fullmatch(given):
        return given, headers
    generated = b"%032x" % REQUEST_IDS.getrandbits(128)
    kept = [(name, value) for name, value in headers if name.lower() != b"x-request-id"]
    return generated, [*kept, (b"x-request-id", generated)]


def parse_upstream(text: str) -> tuple[str, str]:
    model, sep, url = text.partition("=")
    if not sep or not model or not url.startswith("http://"):
        raise argparse.ArgumentTypeError(f"expected MODEL=http://HOST:PORT, got {text!r}")
    return model, url


async def _serve_forever(args: argparse.Namespace) -> None:
    table = RouteTable(expected_models=[m for m, _ in args.upstream])
    for index, (model, url) in enumerate(args.upstream):
        table.register(model, url, replica_id=f"static-{index}")
    keys = KeyFile(args.api_key_file) if args.api_key_file else None
    limits = {model: Limits(args.max_ongoing_requests, args.max_queued_requests) for model, _ in args.upstream}
    router = Router(table, metrics=not args.no_metrics, keys=keys, limits=limits, access_log=not args.no_access_log)
    await router.start(args.host, args.port)
    logger.info("routing on http://%s:%d", args.host, args.port)
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        router.loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await router.stop()  # what is answered is recorded before the process ends


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="raylm's router, standalone, in front of fixed engine servers")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--upstream",
        type=parse_upstream,
        action="append",
        required=True,
        help="MODEL=http://HOST:PORT of an OpenAI-compatible engine server (repeatable)",
    )
    parser.add_argument("--api-key-file", help="the endpoint's API keys, one per line")
    parser.add_argument("--no-metrics", action="store_true", help="no /metrics")
    parser.add_argument("--no-access-log", action="store_true", help="no line per request")
    parser.add_argument("--max-ongoing-requests", type=int, default=DEFAULT_MAX_ONGOING_REQUESTS, help="per upstream")
    parser.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS, help="per model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(_serve_forever(args))


def run(coroutine) -> None:
    """asyncio.run on uvloop when it is installed: it roughly halves the router's CPU per chunk."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


if __name__ == "__main__":
    main()
