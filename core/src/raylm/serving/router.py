"""The one hop between clients and engines: routes OpenAI requests by their `model` to a replica.

The router answers `/health` (it runs), `/ready` (every expected model has a replica),
`/v1/models` and the errors that need no engine, in OpenAI's shape; it takes each model route's
`model` field from the JSON body, lets its routing policy pick a replica serving that model, and
hands the request to an exchange (`raylm.serving.exchange`), which owns it until it is answered.
Everything an engine says, errors included, passes through unchanged but for error bodies not in
OpenAI's shape.

The request path runs one way: HTTP framing (`http`), the connections to clients and to engines
(`client_connection`, `engine_connection`), the exchange, and this dispatch on top; routing policy,
admission, metrics and answers depend only on the route table (`routes`).

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
import time
from collections.abc import Callable, Mapping

from raylm.model_settings import (
    DEFAULT_MAX_ONGOING_REQUESTS,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_READ_TIMEOUT_S,
    ROUTING_POLICIES,
    Limits,
    Routing,
)
from raylm.serving.admission import Admission
from raylm.serving.answers import Answers
from raylm.serving.client_connection import ClientConnection, Incoming
from raylm.serving.engine_connection import EnginePool
from raylm.serving.exchange import Exchange, State
from raylm.serving.http import error_body
from raylm.serving.keys import KeyFile
from raylm.serving.kv_events import EventFeeds
from raylm.serving.metrics import CONTENT_TYPE, RouterMetrics, engine_metrics
from raylm.serving.policy import LeastInFlight, RoutingPolicy, make_policy
from raylm.serving.routes import RouteTable, Upstream

logger = logging.getLogger("raylm.router")

MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
MAX_CONNECTIONS = 4096
WATCH_S = 1.0  # how often requests at engines are checked for stalls
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
Handler = Callable[[ClientConnection, Incoming], None]


class Router:
    """Routes OpenAI requests by model to registered engine servers."""

    def __init__(
        self,
        table: RouteTable,
        policies: Mapping[str, RoutingPolicy] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        metrics: bool = True,
        keys: KeyFile | None = None,
        limits: Mapping[str, Limits] | None = None,
        access_log: bool = True,
        cold_starts: Mapping[str, float] | None = None,
        start_replica: Callable[[str], None] | None = None,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ):
        self.table = table
        self.policies = dict(policies or {})  # by model; least-in-flight for a model without one
        self.admission = Admission(limits)
        table.on_change = self.admission.replicas_changed
        self.pool = EnginePool(lambda: self.loop)
        self.feeds = EventFeeds(lambda: self.loop)
        table.on_added, table.on_removed = self.replica_added, self.replica_removed
        self.active: set[Exchange] = set()  # exchanges holding a lease on a replica
        self.read_timeout_s = read_timeout_s
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
        self.watcher: asyncio.Task | None = None
        # A route is one entry: (method, path) -> handler(client, request).
        self.routes: dict[tuple[bytes, str], Handler] = {(b"POST", path): self.route_to_model for path in MODEL_ROUTES}
        for method in (b"GET", b"HEAD"):
            self.routes[(method, "/health")] = lambda client, request: client.respond(request, 200, {"status": "ok"})
            # `/` too: what a platform polls by default (Cloudera ML's applications do).
            self.routes[(method, "/")] = lambda client, request: client.respond(request, 200, {"status": "ok"})
            self.routes[(method, "/ready")] = self.ready
            self.routes[(method, "/v1/models")] = lambda client, request: client.respond(
                request, 200, self.models_payload()
            )
            self.routes[(method, "/metrics")] = lambda client, request: self.loop.create_task(
                self.serve_metrics(client, request)
            )

    async def start(self, host: str, port: int) -> None:
        self.loop = asyncio.get_running_loop()
        if self.answers is not None:
            self.answers.loop = self.loop
        self.server = await self.loop.create_server(lambda: ClientConnection(self), host, port, reuse_address=True)
        self.watcher = self.loop.create_task(self.watch_engines())

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self.watcher is not None:
            self.watcher.cancel()
        if self.answers is not None:
            self.answers.flush()
        self.pool.close_all()
        self.feeds.stop_all()

    async def watch_engines(self) -> None:
        """Give up requests whose engine has sent nothing for the read timeout (one check for all of them,
        not a timer per request or per chunk)."""
        while True:
            await asyncio.sleep(WATCH_S)
            now = time.monotonic()
            for exchange in list(self.active):
                exchange.check_progress(now, self.read_timeout_s)

    # what a client connection asks
    def screen(self, method: bytes, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict] | None:
        """Refuse a request from its head alone: without one of the endpoint's keys, its body is not read."""
        if self.keys is not None and (path.startswith("/v1/") or path == "/metrics"):
            authorization = next((value for name, value in headers if name.lower() == b"authorization"), None)
            if not self.keys.allows(authorization):
                if self.metrics is not None:
                    self.metrics.unauthorized.inc()
                return 401, UNAUTHORIZED
        return None

    def dispatch(self, client: ClientConnection, request: Incoming) -> None:
        path, method = request.path, request.method
        handler = self.routes.get((method, path))
        if handler is not None:
            handler(client, request)
        elif path in MODEL_ROUTES:
            client.respond(request, 405, error_body(405, f"{path} takes POST"))
        elif method in (b"GET", b"HEAD") and path.startswith("/v1/models/"):
            self.model_card(client, request, path.removeprefix("/v1/models/"))
        else:
            client.respond(request, 404, error_body(404, f"no route {method.decode()} {path}", code="unknown_route"))

    async def serve_metrics(self, client: ClientConnection, request: Incoming) -> None:
        if self.metrics is None:
            client.respond(request, 404, error_body(404, "metrics are off", code="unknown_route"))
            return
        upstreams = [u for model in self.table.model_names() for u in self.table.replicas(model)]
        self.answers.flush()  # every request answered before the scrape is counted in it
        client.respond_raw(request, 200, CONTENT_TYPE, self.metrics.render(await engine_metrics(upstreams)))

    def ready(self, client: ClientConnection, request: Incoming) -> None:
        """Ready: every model has a replica, or may have none (scaled to zero: a request starts one)."""
        without_replica = self.table.pending_models()
        idle = [m for m in without_replica if m in self.cold_starts]
        pending = [m for m in without_replica if m not in self.cold_starts]
        if self.draining:
            client.respond(request, 503, {"status": "draining"})
        elif pending:
            client.respond(request, 503, {"status": "starting", "pending_models": pending})
        else:
            payload = {"status": "ready", "models": self.table.model_names(), "scaled_to_zero": idle}
            client.respond(request, 200, payload)

    def model_card(self, client: ClientConnection, request: Incoming, name: str) -> None:
        card = next((c for c in self.models_payload()["data"] if c["id"] == name), None)
        if card is None:
            client.respond(request, 404, self.unknown_model(name))
        else:
            client.respond(request, 200, card)

    def models_payload(self) -> dict:
        """`/v1/models`: the route table's cards, each with its routing policy (raylm's addition)."""
        payload = self.table.models_payload()
        for card in payload["data"]:
            card["routing"] = self.policy_of(card["id"]).name
        return payload

    def unknown_model(self, model: str) -> dict:
        served = ", ".join(self.table.model_names()) or "none"
        return error_body(
            404, f"The model {model!r} does not exist. Served models: {served}.", code="model_not_found", param="model"
        )

    def route_to_model(self, client: ClientConnection, request: Incoming) -> None:
        given_id, headers = request_id(request.headers)
        # Metrics count by the router's own routes and served model names only: a client cannot make up
        # label values.
        exchange = Exchange(self, client, request, request.path, "(unknown)", given_id, headers, {},
                            self.keys is not None)  # fmt: skip
        try:
            payload = json.loads(request.body)
        except ValueError as exc:
            exchange.reply(400, error_body(400, f"the request body is not valid JSON: {exc}"))
            return
        model = payload.get("model") if isinstance(payload, dict) else None
        if isinstance(model, str) and (model in self.table.expected_models or self.table.replicas(model)):
            exchange.model = model
        exchange.payload = payload
        if not isinstance(model, str) or not model:
            message = "the request needs a `model` field naming a served model"
            exchange.reply(400, error_body(400, message, param="model"))
            return
        if self.draining:
            self.refuse_while_draining(exchange)
            return
        if not self.table.replicas(model) and model not in self.cold_starts:
            if model in self.table.expected_models:
                message = f"model {model!r} is starting; retry shortly"
                exchange.reply(503, error_body(503, message, code="model_starting"), retry_after_s=RETRY_AFTER_S)
            else:
                exchange.reply(404, self.unknown_model(model))
            return
        exchange.model = model
        policy = self.policy_of(model)
        if not policy.tokenizes:
            exchange.prefix = policy.prefix(payload)
            self.admit(exchange, woken=False)
            return
        # Tokenizing a long prompt takes milliseconds: not on the loop that relays every stream's chunks.
        reading = self.loop.run_in_executor(None, policy.prefix, payload)
        reading.add_done_callback(lambda done: self.prefix_read(exchange, done))

    def prefix_read(self, exchange: Exchange, reading: asyncio.Future) -> None:
        if exchange.state is State.DONE:  # its client left while its prompt was read
            return
        if self.draining:  # it began while its prompt was read
            self.refuse_while_draining(exchange)
            return
        if reading.exception() is not None:  # a fault of the policy's: route the request by load alone
            logger.error("reading a prompt's prefix failed", exc_info=reading.exception())
        exchange.prefix = [] if reading.exception() is not None else reading.result()
        self.admit(exchange, woken=False)

    def refuse_while_draining(self, exchange: Exchange) -> None:
        message = "the endpoint is shutting down; retry on another endpoint or later"
        exchange.reply(503, error_body(503, message, code="shutting_down"), retry_after_s=RETRY_AFTER_S)

    # what an exchange asks
    def admit(self, exchange: Exchange, woken: bool) -> None:
        """Forward the exchange to a replica with room; else it waits its turn, or is refused when too many
        wait already. `woken`: it waited (or its replica failed), and goes before those that did not. The one
        way a replica is chosen, first tries and retries alike."""
        model = exchange.model
        exchange.queued = None
        if exchange.state is State.DONE:  # its client left as it was woken: the turn goes to the next one
            self.admission.released(model)
            return
        replicas = self.table.replicas(model)
        if not replicas and model not in self.cold_starts:  # every replica went away while it waited
            message = f"no replica of model {model!r} is reachable"
            exchange.reply(503, error_body(503, message, code="model_unavailable"))
            return
        room = self.admission.with_room(model, replicas) if woken or not self.admission.depth(model) else []
        if room:
            policy = self.policy_of(model)
            choice = policy.choose(room, exchange.payload, exchange.prefix)
            if self.metrics is not None:
                self.metrics.routed(model, policy.name, choice)
            exchange.forward(choice.upstream)
            return
        resume = lambda: self.admit(exchange, woken=True)  # noqa: E731
        if not self.admission.wait(model, resume, first=woken):
            if self.metrics is not None:
                self.metrics.rejected.labels(model).inc()
            limits = self.admission.limits_of(model)
            message = (
                f"model {model!r} is at capacity ({limits.max_ongoing_requests} requests per replica, "
                f"{limits.max_queued_requests} waiting); retry shortly"
            )
            exchange.reply(429, error_body(429, message, code="rate_limit_exceeded"), retry_after_s=RETRY_AFTER_S)
            return
        exchange.queued = resume
        if not replicas:
            self.wait_for_cold_start(exchange)

    def replica_added(self, upstream: Upstream) -> None:
        """A replica whose engine publishes its KV-cache events: followed, when its model routes precisely."""
        policy = self.policy_of(upstream.model)
        if upstream.kv_events is not None and policy.follows_events:
            self.feeds.follow(upstream.replica_id, *upstream.kv_events, policy.index)

    def replica_removed(self, upstream: Upstream) -> None:
        self.pool.close(upstream)
        self.feeds.stop(upstream.replica_id)
        self.policy_of(upstream.model).forget(upstream.replica_id)

    def policy_of(self, model: str) -> RoutingPolicy:
        policy = self.policies.get(model)
        if policy is None:
            policy = self.policies[model] = LeastInFlight()
        return policy

    def leave_queue(self, exchange: Exchange) -> None:
        self.admission.leave(exchange.model, exchange.queued)
        exchange.queued = None

    def released(self, model: str) -> None:
        self.admission.released(model)

    def unreachable(self, upstream: Upstream, exc: OSError) -> None:
        if self.metrics is not None:
            self.metrics.connect_failures.labels(upstream.model).inc()
        logger.warning("model %s: replica %s at %s unreachable (%s); removed", upstream.model, upstream.replica_id,
                       upstream.url, exc or type(exc).__name__)  # fmt: skip
        self.table.deregister(upstream.replica_id)

    def resent(self, upstream: Upstream) -> None:
        if self.metrics is not None:
            self.metrics.resends.labels(upstream.model).inc()

    def record(self, exchange: Exchange, status: int) -> None:
        if self.answers is not None:
            now = time.monotonic()
            arrived = exchange.request.arrived
            first_byte = None if exchange.first_byte_at is None else exchange.first_byte_at - arrived
            self.answers.add(
                exchange.request_id.decode("latin-1"), exchange.route, exchange.model, status, first_byte,
                now - arrived, exchange.sent, exchange.replica,
            )  # fmt: skip

    def wait_for_cold_start(self, exchange: Exchange) -> None:
        """The exchange waits for a replica of a model that has none: one is asked for (once for all of them),
        and the request gets 503 if none runs in time."""
        model = exchange.model

        def give_up() -> None:
            if exchange.queued is not None:  # still in the queue
                message = f"model {model!r} is scaled to zero and its first replica did not start in {timeout_s:g}s"
                exchange.reply(503, error_body(503, message, code="model_starting"), retry_after_s=RETRY_AFTER_S)

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

    # what the replicas ask (through `raylm.serving.router_thread.RouterThread`)
    def load(self, model: str, replica_id: str) -> float:
        """What one replica carries, for autoscaling: its requests in flight and its share of the queue."""
        replicas = self.table.replicas(model)
        own = sum(u.in_flight for u in replicas if u.replica_id == replica_id)
        return own + self.admission.depth(model) / max(1, len(replicas))

    def retire(self, replica_id: str) -> int:
        """Give a replica no new requests (it is going away); how many it still has in flight."""
        return self.table.retire(replica_id)

    def start_draining(self) -> int:
        """Take no new requests; how many taken are unfinished."""
        self.draining = True
        return self.unfinished()

    def unfinished(self) -> int:
        """Requests taken and not yet answered: in flight on a replica, or waiting for one."""
        return self.table.in_flight() + sum(map(self.admission.depth, self.table.model_names()))


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
    models = sorted({model for model, _ in args.upstream})
    table = RouteTable(expected_models=models)
    keys = KeyFile(args.api_key_file) if args.api_key_file else None
    limits = {model: Limits(args.max_ongoing_requests, args.max_queued_requests) for model in models}
    routing = Routing(args.routing)
    policies = {model: make_policy(routing, args.tokenizer) for model in models}
    router = Router(
        table, metrics=not args.no_metrics, keys=keys, limits=limits, access_log=not args.no_access_log,
        read_timeout_s=args.read_timeout, policies=policies,
    )  # fmt: skip
    await router.start(args.host, args.port)
    events = args.kv_events or [None] * len(args.upstream)
    for index, ((model, url), kv_events) in enumerate(zip(args.upstream, events)):
        table.register(
            model, url, f"static-{index}", kv_events=(kv_events, args.kv_events_follower) if kv_events else None
        )
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
    parser.add_argument(
        "--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S,
        help="seconds an engine may send nothing while it has a request (then 504)",
    )  # fmt: skip
    parser.add_argument("--routing", choices=ROUTING_POLICIES, default="least-in-flight", help="the routing policy")
    parser.add_argument("--tokenizer", help="precise routing: the model's folder (its tokenizer and chat template)")
    parser.add_argument(
        "--kv-events", action="append", metavar="URL",
        help="precise routing: where each upstream's engine publishes its KV-cache events (repeatable, in order)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-events-follower", metavar="MODULE:FUNCTION", help="precise routing: the engine's events follower"
    )
    args = parser.parse_args(argv)
    if args.routing == "precise" and not (args.tokenizer and args.kv_events and args.kv_events_follower):
        parser.error("--routing precise needs --tokenizer, --kv-events for each upstream and --kv-events-follower")
    if args.kv_events and len(args.kv_events) != len(args.upstream):
        parser.error("give one --kv-events per --upstream, in the same order")
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
