"""One model request, from its arrival whole to the end of its answer: the object that owns it.

An exchange goes through `queued` (waiting for a replica with room), `connecting` (holding a
replica's lease, opening a connection to its engine), `sent` (the engine has the request, no answer
yet) and `streaming` (the answer passes through) to `done`. Whatever it holds on the way (its place
in a queue, its lease on a replica, its engine connection, its client's turn) it lets go of in one
place, `end`, which also records the answer (metrics, access log). Every way a request can end
(answered, refused, its client gone, its engine gone or stalled) goes through `end`, once.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import time
from collections.abc import Callable
from typing import Protocol

from raylm.serving.client_connection import ClientConnection, Incoming
from raylm.serving.engine_connection import EngineConnection, EnginePool
from raylm.serving.http import error_body, forwarded_request, json_body, openai_error, raw_response, response_body
from raylm.serving.routes import Lease, Upstream

# Statuses recorded for answers that were cut short (the client saw a status line of 200 already, or
# nothing): the client hung up (nginx's 499), the engine's connection broke, the engine stalled.
CLIENT_GONE, ENGINE_GONE, ENGINE_STALLED = 499, 502, 504
# Errors that say the router itself is short of something, not that the engine is gone.
ROUTERS_OWN = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}


class State(enum.Enum):
    QUEUED = "queued"
    CONNECTING = "connecting"
    SENT = "sent"
    STREAMING = "streaming"
    DONE = "done"


class Dispatcher(Protocol):
    """What an exchange needs of the router (`raylm.serving.router.Router`)."""

    loop: asyncio.AbstractEventLoop
    pool: EnginePool
    active: set[Exchange]

    def admit(self, exchange: Exchange, woken: bool) -> None:
        """Find the exchange a replica with room, or queue it (`woken`: at the front)."""

    def leave_queue(self, exchange: Exchange) -> None: ...

    def released(self, model: str) -> None:
        """A replica of `model` finished a request: the next waiting one may go."""

    def unreachable(self, upstream: Upstream, exc: OSError) -> None:
        """A replica's engine could not be reached: it leaves the route table."""

    def resent(self, upstream: Upstream) -> None: ...

    def record(self, exchange: Exchange, status: int) -> None: ...


class Exchange:
    """One model request and everything it holds until it is answered."""

    def __init__(
        self, dispatcher: Dispatcher, client: ClientConnection, request: Incoming, route: str, model: str,
        request_id: bytes, headers: list[tuple[bytes, bytes]], payload: dict, endpoint_key: bool,
    ):  # fmt: skip
        self.dispatcher = dispatcher
        self.client = client
        self.request = request
        self.route, self.model, self.request_id = route, model, request_id
        self.headers = headers  # as forwarded: the request id added
        self.payload = payload  # the parsed body (what the routing policy picks by)
        self.prefix: list[int] | None = None  # what the routing policy read of it
        self.endpoint_key = endpoint_key  # its key was the endpoint's: never passed on
        self.state = State.QUEUED
        self.queued: Callable[[], None] | None = None  # its place in the model's queue
        self.lease: Lease | None = None
        self.engine: EngineConnection | None = None
        self.replica = ""
        self.retries = 1  # another replica, once, when the first cannot be reached
        self.reused = False  # its engine connection had been idle (the engine may close it as we send)
        self.first_byte_at: float | None = None
        self.heard = 0  # response bytes seen at the last check for a stalled engine
        self.heard_at = 0.0  # ... and when they changed
        self.sent = 0  # bytes of its answer
        client.exchange = self

    # the router's side
    def forward(self, upstream: Upstream) -> None:
        """Send the request to `upstream`, which has room for it (its lease is taken now)."""
        self.lease = Lease(upstream, self.dispatcher.released)
        self.replica = upstream.replica_id
        self.dispatcher.active.add(self)
        connection = self.dispatcher.pool.take(upstream)
        if connection is not None:
            self.send(connection, reused=True)
        else:
            self.state = State.CONNECTING
            self.dispatcher.loop.create_task(self.connect(upstream))

    async def connect(self, upstream: Upstream) -> None:
        try:
            connection = await self.dispatcher.pool.connect(upstream)
        except OSError as exc:  # TimeoutError included
            if self.state is State.DONE:
                return
            self.lease.release()
            self.lease = None
            if exc.errno in ROUTERS_OWN:
                self.reply(503, error_body(503, f"the router cannot open a connection now ({exc}); retry shortly"))
                return
            self.dispatcher.unreachable(upstream, exc)
            if self.retries:
                self.retries -= 1
                self.state = State.QUEUED
                self.dispatcher.admit(self, woken=True)
            else:
                message = f"no replica of model {upstream.model!r} is reachable"
                self.reply(503, error_body(503, message, code="model_unavailable"))
            return
        if self.state is State.DONE:  # the client left while it connected
            self.dispatcher.pool.park(connection)
        else:
            self.send(connection, reused=False)

    def send(self, connection: EngineConnection, reused: bool) -> None:
        self.engine, self.reused = connection, reused
        self.state = State.SENT
        self.heard, self.heard_at = 0, time.monotonic()
        wire = forwarded_request(
            self.request.method, self.request.url, self.headers, self.request.body, connection.upstream.api_key,
            self.endpoint_key,
        )  # fmt: skip
        connection.send(self, self.client.transport, wire, self.client.writing_paused, unchunk=self.request.http10)

    def reply(self, status: int, payload: dict, retry_after_s: int | None = None) -> None:
        """Answer with the router's own payload (an error: no replica, at capacity, ...)."""
        body = json_body(payload)
        self.client.write_answer(self.request, status, "application/json", body, retry_after_s, self.id_header())
        self.sent = len(body)
        self.end(status)

    def id_header(self) -> list[tuple[str, str]]:
        return [("x-request-id", self.request_id.decode("latin-1"))]

    # the engine connection's side
    def response_head(self, status: int, head: bytes) -> None:
        self.state = State.STREAMING
        self.first_byte_at = time.monotonic()
        self.engine.pass_head(head, self.request_id)

    def response_complete(self, status: int, held: bytes | None, keep_alive: bool) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        if held is not None:  # an error, held whole: in OpenAI's shape if it is not
            body = response_body(held)
            payload = openai_error(status, body)
            if payload is None and not self.request.http10:
                self.engine.pass_head(held, self.request_id)
            else:  # reshaped, or re-framed for an HTTP/1.0 client
                body = body if payload is None else json_body(payload)
                response = raw_response(status, "application/json", body, self.request.keep_alive, self.id_header())
                self.client.transport.write(response)
        self.sent = self.engine.received
        self.end(status, engine_reusable=keep_alive, close_client=self.request.http10 and held is None)

    def engine_lost(self, connection: EngineConnection) -> None:
        self.engine = None
        self.sent = connection.received
        if connection.received:  # part of the answer is out: the only honest signal left is to close
            self.end(ENGINE_GONE, close_client=True)
        elif self.reused and self.retries:
            # The engine closed an idle connection as the request crossed it: it never saw the request.
            # Resent on a new connection (the lease is kept); its other idle connections are as old.
            self.retries = 0
            self.dispatcher.resent(connection.upstream)
            self.dispatcher.pool.close(connection.upstream)
            self.state = State.CONNECTING
            self.dispatcher.loop.create_task(self.connect(connection.upstream))
        else:
            message = f"the engine serving model {self.model!r} closed the connection"
            self.reply(ENGINE_GONE, error_body(ENGINE_GONE, message))

    def check_progress(self, now: float, read_timeout_s: float) -> None:
        """Called every second or so while the engine has the request: an engine silent for `read_timeout_s`
        has stalled (a 504, or the stream cut)."""
        engine = self.engine
        if engine is None:
            return
        if engine.received != self.heard:
            self.heard, self.heard_at = engine.received, now
        elif now - self.heard_at > read_timeout_s:
            if engine.received:
                self.sent = engine.received
                self.end(ENGINE_STALLED, close_client=True)
            else:
                message = f"the engine serving model {self.model!r} sent nothing for {read_timeout_s:g}s"
                self.reply(ENGINE_STALLED, error_body(ENGINE_STALLED, message, code="engine_timeout"))

    # the client's side
    def client_lost(self) -> None:
        self.end(CLIENT_GONE)

    def client_paused(self, paused: bool) -> None:
        if self.engine is not None:
            self.engine.pause(paused)

    # the one way out
    def end(self, status: int, engine_reusable: bool = False, close_client: bool = False) -> None:
        """The exchange is over: let go of everything it holds (an engine connection still busy is closed,
        which makes the engine abort the request), record the answer, and give the client its next turn."""
        if self.state is State.DONE:
            return
        self.state = State.DONE
        self.dispatcher.active.discard(self)
        if self.queued is not None:
            self.dispatcher.leave_queue(self)
        engine, self.engine = self.engine, None
        if engine is not None:
            if engine_reusable:
                self.dispatcher.pool.park(engine)
            else:
                engine.close()
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        self.dispatcher.record(self, status)
        if self.client.exchange is self:
            self.client.done(close=close_client or not self.request.keep_alive)
