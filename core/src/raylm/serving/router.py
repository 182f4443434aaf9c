"""The one hop between clients and engines: an OpenAI-aware byte relay.

The router reads each request whole (they are small), takes the `model` field
from its JSON body, picks the least busy replica serving that model, and pipes
the engine server's response bytes back as they arrive. It never parses the
response beyond HTTP framing (to reuse upstream connections), so a streamed
token reaches the client as soon as the engine writes it.

It answers `/health` (the router runs), `/ready` (every expected model has a
replica), `/v1/models`, and the errors that need no engine, in OpenAI's shape.
Everything else an engine says, errors included, passes through unchanged.

Runs without Ray: `python -m raylm.serving.router --port 8000 --upstream tiny=http://127.0.0.1:8001`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import urlsplit

import httptools

logger = logging.getLogger("raylm.router")

MAX_BODY_BYTES = 64 * 1024 * 1024
# Headers that describe one connection, not the request; the router sets its own framing.
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"expect",
    b"content-length",
}
MODEL_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings"}
# An engine server closes keep-alive connections idle for a while (uvicorn, under vLLM and SGLang:
# 5 s). Reusing one just as it closes loses the request, so idle connections are reused only while
# well inside that time; an older one is closed and a new one opened.
IDLE_REUSE_S = 2.0


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "service_unavailable"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error(status: int, body: bytes) -> dict | None:
    """An engine's error body in OpenAI's shape, or None when it already is in it.

    Engines differ: vLLM answers `{"error": {...}}`, SGLang `{"object": "error", "message": ...}`,
    a crashed handler plain text.
    """
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return None
    if isinstance(payload, dict):
        message = payload.get("message") or payload.get("detail") or payload.get("error") or json.dumps(payload)
        shaped = error_body(status, str(message), param=payload.get("param"))
        shaped["error"]["code"] = payload.get("code", status)
        return shaped
    text = body.decode(errors="replace").strip()
    return error_body(status, text or reason(status), code=str(status))


def http_response(status: int, payload: dict, keep_alive: bool = True) -> bytes:
    body = json.dumps(payload).encode()
    head = (
        f"HTTP/1.1 {status} {reason(status)}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{'' if keep_alive else 'connection: close' + chr(13) + chr(10)}\r\n"
    )
    return head.encode() + body


@dataclass(eq=False)
class Upstream:
    """One replica's engine server."""

    model: str
    host: str
    port: int
    replica_id: str
    in_flight: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    idle: list[UpstreamConnection] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close_idle(self) -> None:
        for connection in list(self.idle):
            connection.transport.close()
        self.idle.clear()

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection, unless the engine may be about to time it out."""
        while self.idle:
            connection = self.idle.pop()  # the newest: if it is too old, so are the rest
            if time.monotonic() - connection.idle_since < IDLE_REUSE_S:
                return connection
            connection.transport.close()
        return None


class RouteTable:
    """Which replicas serve which model; touched only on the router's event loop."""

    def __init__(self, expected_models: Iterable[str] = ()):
        self.expected_models = list(expected_models)
        self.upstreams: dict[str, list[Upstream]] = {}
        self.cards: dict[str, dict] = {}

    def register(self, model: str, url: str, replica_id: str, card: dict | None = None) -> None:
        """Add a replica, or refresh it (replicas re-register as a heartbeat)."""
        parts = urlsplit(url)
        replicas = self.upstreams.setdefault(model, [])
        for upstream in replicas:
            if upstream.replica_id == replica_id:
                upstream.last_seen = time.monotonic()
                if (upstream.host, upstream.port) == (parts.hostname, parts.port):
                    break
                replicas.remove(upstream)
                upstream.close_idle()
        else:
            replicas.append(Upstream(model, parts.hostname or "127.0.0.1", parts.port or 80, replica_id))
            logger.info("model %s: replica %s at %s", model, replica_id, url)
        if card:
            self.cards[model] = card

    def deregister(self, replica_id: str) -> None:
        for replicas in self.upstreams.values():
            for upstream in [u for u in replicas if u.replica_id == replica_id]:
                replicas.remove(upstream)
                upstream.close_idle()

    def expire(self, older_than: float) -> None:
        """Forget replicas whose last heartbeat is older than `older_than` seconds."""
        cutoff = time.monotonic() - older_than
        for replicas in self.upstreams.values():
            for upstream in [u for u in replicas if u.last_seen < cutoff]:
                logger.warning("model %s: replica %s stopped answering; removed", upstream.model, upstream.replica_id)
                replicas.remove(upstream)
                upstream.close_idle()

    def pick(self, model: str) -> Upstream | None:
        replicas = self.upstreams.get(model)
        if not replicas:
            return None
        best = min(replicas, key=lambda u: u.in_flight)
        # Rotate so that equally busy replicas take turns.
        replicas.remove(best)
        replicas.append(best)
        return best

    def model_names(self) -> list[str]:
        return sorted(set(self.expected_models) | {m for m, r in self.upstreams.items() if r})

    def pending_models(self) -> list[str]:
        return [m for m in self.expected_models if not self.upstreams.get(m)]

    def models_payload(self) -> dict:
        data = []
        for name in self.model_names():
            card = dict(self.cards.get(name) or {"id": name, "object": "model", "created": 0})
            card["owned_by"] = "raylm"
            card["replicas"] = len(self.upstreams.get(name, ()))  # raylm's addition: replicas routed to now
            data.append(card)
        return {"object": "list", "data": data}


class UpstreamConnection(asyncio.Protocol):
    """A keep-alive connection to an engine server; relays one response at a time to a client.

    A successful response is piped through as it arrives. An error response (small,
    never streamed) is held until complete, so its body can be put in OpenAI's shape.
    """

    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response_started = False
        self.piping = False  # headers seen, status < 400: bytes go straight to the client
        self.held = bytearray()  # raw bytes held until the status is known, or of a whole error response
        self.error_body: bytearray | None = None
        self.request = b""  # the request in flight, kept to resend it if the engine closes before answering
        self.reused = False  # whether the request in flight went out on a connection that had been idle
        self.idle_since = 0.0

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # bytes nobody asked for: the connection is no longer usable
            self.transport.close()
            return
        self.response_started = True
        if self.piping:
            client.transport.write(data)
        else:
            self.held += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()
            client.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.upstream.idle:
            self.upstream.idle.remove(self)
        if self.client is not None:
            self.client.upstream_lost(self)

    def pause_writing(self) -> None:  # the engine is slow to read our request: nothing to do
        pass

    # httptools callbacks
    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 400:
            self.piping = True
            self.client.transport.write(bytes(self.held))
            self.held.clear()
        else:
            self.error_body = bytearray()

    def on_body(self, body: bytes) -> None:
        if self.error_body is not None:
            self.error_body += body

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        if self.error_body is not None:
            status = self.parser.get_status_code()
            payload = openai_error(status, bytes(self.error_body))
            client.transport.write(bytes(self.held) if payload is None else http_response(status, payload))
        keep_alive = self.parser.should_keep_alive()
        self.parser = httptools.HttpResponseParser(self)
        self.response_started = self.piping = False
        self.held.clear()
        self.error_body = None
        self.request = b""
        if keep_alive:
            self.park()
        else:
            self.transport.close()
        client.response_finished(self)

    def park(self) -> None:
        self.idle_since = time.monotonic()
        self.upstream.idle.append(self)

    def send(self, client: ClientConnection, request: bytes, reused: bool) -> None:
        self.client = client
        self.request = request
        self.reused = reused
        self.transport.write(request)


class ClientConnection(asyncio.Protocol):
    """One client connection; requests are handled one after another (no pipelining)."""

    def __init__(self, router: Router):
        self.router = router
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.upstream_connection: UpstreamConnection | None = None
        self.keep_alive = True

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.reply(400, error_body(400, "protocol upgrades are not supported"), close=True)
        except httptools.HttpParserError:
            self.reply(400, error_body(400, "malformed HTTP request"), close=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        connection, self.upstream_connection = self.upstream_connection, None
        if connection is not None:
            # The client went away mid-response: closing the upstream makes the engine abort the request.
            connection.client = None
            connection.transport.close()
            connection.upstream.in_flight -= 1

    def pause_writing(self) -> None:
        if self.upstream_connection is not None:
            self.upstream_connection.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream_connection is not None:
            self.upstream_connection.transport.resume_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > MAX_BODY_BYTES:
            self.reply(413, error_body(413, f"request body over {MAX_BODY_BYTES} bytes"), close=True)

    def on_message_complete(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.keep_alive = self.parser.should_keep_alive()
        self.transport.pause_reading()
        self.router.dispatch(self, self.parser.get_method(), self.url, self.headers, bytes(self.body))

    # outcomes
    def reply(self, status: int, payload: dict, close: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        keep_alive = self.keep_alive and not close
        self.transport.write(http_response(status, payload, keep_alive))
        self.finish(keep_alive)

    def finish(self, keep_alive: bool) -> None:
        if self.transport is None:
            return
        if keep_alive:
            self.transport.resume_reading()
        else:
            self.transport.close()

    def response_finished(self, connection: UpstreamConnection) -> None:
        self.upstream_connection = None
        connection.upstream.in_flight -= 1
        self.finish(self.keep_alive)

    def upstream_lost(self, connection: UpstreamConnection) -> None:
        if self.upstream_connection is not connection:
            return
        self.upstream_connection = None
        connection.upstream.in_flight -= 1
        if connection.response_started:
            # Part of the response is out; the only honest signal left is closing the connection.
            if self.transport is not None:
                self.transport.close()
        elif connection.reused and self.transport is not None:
            # The engine closed an idle connection as our request crossed it: it never saw the request.
            # Resent on a new connection; if that cannot connect, the engine is gone: another replica.
            self.router.forward(self, connection.upstream, connection.request, retries=1, reuse=False)
        else:
            self.reply(
                502, error_body(502, f"the engine serving model {connection.upstream.model!r} closed the connection")
            )


class Router:
    """Routes OpenAI requests by model to registered engine servers."""

    def __init__(self, table: RouteTable):
        self.table = table
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.server = await self.loop.create_server(lambda: ClientConnection(self), host, port, reuse_address=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for replicas in self.table.upstreams.values():
            for upstream in replicas:
                upstream.close_idle()

    def dispatch(self, client: ClientConnection, method: bytes, url: bytes, headers: list, body: bytes) -> None:
        path = url.split(b"?", 1)[0].decode("latin-1").rstrip("/") or "/"
        if path in MODEL_ROUTES:
            if method != b"POST":
                client.reply(405, error_body(405, f"{path} takes POST"))
                return
            self.route_to_model(client, method, url, headers, body)
        elif method not in (b"GET", b"HEAD"):
            client.reply(404, error_body(404, f"no route {method.decode()} {path}", code="unknown_route"))
        elif path == "/health":
            client.reply(200, {"status": "ok"})
        elif path == "/ready":
            pending = self.table.pending_models()
            if pending:
                client.reply(503, {"status": "starting", "pending_models": pending})
            else:
                client.reply(200, {"status": "ready", "models": self.table.model_names()})
        elif path == "/v1/models":
            client.reply(200, self.table.models_payload())
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/") :]
            card = next((c for c in self.table.models_payload()["data"] if c["id"] == name), None)
            if card is None:
                client.reply(404, self.unknown_model(name))
            else:
                client.reply(200, card)
        else:
            client.reply(404, error_body(404, f"no route GET {path}", code="unknown_route"))

    def unknown_model(self, model: str) -> dict:
        served = ", ".join(self.table.model_names()) or "none"
        return error_body(
            404, f"The model {model!r} does not exist. Served models: {served}.", code="model_not_found", param="model"
        )

    def route_to_model(self, client: ClientConnection, method: bytes, url: bytes, headers: list, body: bytes) -> None:
        try:
            payload = json.loads(body)
        except ValueError as exc:
            client.reply(400, error_body(400, f"the request body is not valid JSON: {exc}"))
            return
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str) or not model:
            client.reply(400, error_body(400, "the request needs a `model` field naming a served model", param="model"))
            return
        upstream = self.table.pick(model)
        if upstream is None:
            if model in self.table.expected_models:
                client.reply(503, error_body(503, f"model {model!r} is starting; retry shortly", code="model_starting"))
            else:
                client.reply(404, self.unknown_model(model))
            return
        head = [method + b" " + url + b" HTTP/1.1\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in headers if name.lower() not in HOP_BY_HOP]
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        self.forward(client, upstream, b"".join(head) + body, retries=1)

    def forward(
        self, client: ClientConnection, upstream: Upstream, request: bytes, retries: int, reuse: bool = True
    ) -> None:
        upstream.in_flight += 1
        connection = upstream.take_idle() if reuse else None
        if connection is not None:
            client.upstream_connection = connection
            connection.send(client, request, reused=True)
            return
        self.loop.create_task(self._connect_and_send(client, upstream, request, retries))

    async def _connect_and_send(self, client: ClientConnection, upstream: Upstream, request: bytes, retries: int):
        try:
            _, connection = await self.loop.create_connection(
                lambda: UpstreamConnection(upstream), upstream.host, upstream.port
            )
        except OSError as exc:
            upstream.in_flight -= 1
            logger.warning(
                "model %s: replica %s at %s unreachable (%s); removed",
                upstream.model,
                upstream.replica_id,
                upstream.url,
                exc,
            )
            self.table.deregister(upstream.replica_id)
            other = self.table.pick(upstream.model)
            if other is not None and retries > 0:
                self.forward(client, other, request, retries - 1)
            else:
                client.reply(
                    503,
                    error_body(503, f"no replica of model {upstream.model!r} is reachable", code="model_unavailable"),
                )
            return
        if client.transport is None:  # the client left while we connected
            upstream.in_flight -= 1
            connection.park()
            return
        client.upstream_connection = connection
        connection.send(client, request, reused=False)


def parse_upstream(text: str) -> tuple[str, str]:
    model, sep, url = text.partition("=")
    if not sep or not model or not url.startswith("http://"):
        raise argparse.ArgumentTypeError(f"expected MODEL=http://HOST:PORT, got {text!r}")
    return model, url


async def _serve_forever(host: str, port: int, upstreams: list[tuple[str, str]]) -> None:
    table = RouteTable(expected_models=[m for m, _ in upstreams])
    for index, (model, url) in enumerate(upstreams):
        table.register(model, url, replica_id=f"static-{index}")
    router = Router(table)
    await router.start(host, port)
    logger.info("routing on http://%s:%d", host, port)
    await asyncio.Event().wait()


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(_serve_forever(args.host, args.port, args.upstream))


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
