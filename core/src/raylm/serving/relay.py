"""The byte relay: a client's connection, and the keep-alive connections to engine servers.

A request is parsed whole (requests are small) and handed to the router; the engine's response is
piped back as it arrives, never re-encoded, so a streamed token leaves as soon as the engine
writes it. Only an error response (small, never streamed) is held until complete, so that its
body can be put in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import httptools

from raylm.serving.http import (
    MAX_BODY_BYTES,
    error_body,
    http_response,
    openai_error,
    raw_response,
    response_body,
    with_header,
)

if TYPE_CHECKING:
    from raylm.serving.router import Request, Router
    from raylm.serving.routes import Lease, Upstream

MAX_HEAD_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 60.0


class UpstreamConnection(asyncio.Protocol):
    """A keep-alive connection to an engine server; relays one response at a time to a client."""

    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.lease: Lease | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response_started = False
        self.piping = False  # headers seen, status < 400: bytes go straight to the client
        self.held = bytearray()  # raw bytes held until the status is known, or of a whole error response
        self.error = False  # the response is an error: held whole, then reshaped
        self.request: Request | None = None  # the request in flight, kept to resend it if the engine closes early
        self.reused = False  # whether the request in flight went out on a connection that had been idle
        self.idle_since = 0.0
        self.first_byte_at: float | None = None

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # bytes nobody asked for: the connection is no longer usable
            self.transport.close()
            return
        if not self.response_started:
            self.response_started = True
            self.first_byte_at = time.monotonic()
        if self.piping:
            client.transport.write(data)
            client.sent += len(data)
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
            self.client.send_raw(with_header(bytes(self.held), b"x-request-id", self.client.request_id))
            self.held.clear()
        else:
            self.error = True

    # No `on_body`: httptools would call it with a new bytes object for every chunk streamed through.
    # An error's body is read from the held response when it is complete.
    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        status = self.parser.get_status_code()
        if self.error:
            payload = openai_error(status, response_body(bytes(self.held)))
            if payload is None:
                client.send_raw(with_header(bytes(self.held), b"x-request-id", client.request_id))
            else:
                client.send_raw(http_response(status, payload, headers=client.response_headers()))
        client.answered(status, self.first_byte_at)
        self.first_byte_at = None
        keep_alive = self.parser.should_keep_alive()
        self.parser = httptools.HttpResponseParser(self)
        self.response_started = self.piping = False
        self.held.clear()
        self.error = False
        self.request = None
        self.finish_lease()
        if keep_alive:
            self.park()
        else:
            self.transport.close()
        client.response_finished(self)

    def finish_lease(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def park(self) -> None:
        self.idle_since = time.monotonic()
        self.upstream.idle.append(self)

    def send(self, client: ClientConnection, wire: bytes, lease: Lease, reused: bool, request: Request) -> None:
        self.client = client
        self.lease = lease
        self.request = request
        self.reused = reused
        client.upstream_connection = self
        self.transport.write(wire)


class ClientConnection(asyncio.Protocol):
    """One client connection; requests are handled one after another (no pipelining).

    What a client may cost is bounded: a request line and headers of at most `MAX_HEAD_BYTES`
    (431 past it), a whole request within `REQUEST_TIMEOUT_S` of its first byte (408 after it:
    a client that sends half a request does not hold the connection), and `IDLE_TIMEOUT_S` without
    a request on a kept-alive connection before it is closed.
    """

    def __init__(self, router: Router):
        self.router = router
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.body = bytearray()
        self.upstream_connection: UpstreamConnection | None = None
        self.keep_alive = True
        self.timer: asyncio.TimerHandle | None = None
        # The request being answered: its id, model, route and replica (for metrics and the access log),
        # and when it had arrived whole.
        self.request_id = b""
        self.model = ""
        self.route = ""
        self.replica = ""
        self.arrived = 0.0
        self.sent = 0  # bytes of the answer
        self.waiting: tuple[str, Callable[[], None]] | None = None  # (model, resume) while in its queue

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.router.connections.add(self)
        if len(self.router.connections) > self.router.max_connections:
            self.reply(503, error_body(503, "the endpoint has too many connections; retry shortly"), close=True)
            return
        self.time_out_in(IDLE_TIMEOUT_S, None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.reply(400, error_body(400, "protocol upgrades are not supported"), close=True)
        except httptools.HttpParserError:
            if self.transport is not None and not self.transport.is_closing():
                self.reply(400, error_body(400, "malformed HTTP request"), close=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.router.connections.discard(self)
        self.time_out_in(None, None)
        if self.waiting is not None:  # it waited for a replica: it leaves the queue
            self.router.admission.leave(*self.waiting)
            self.waiting = None
        connection, self.upstream_connection = self.upstream_connection, None
        if connection is not None:
            # The client went away mid-response: closing the upstream makes the engine abort the request.
            connection.client = None
            connection.finish_lease()
            connection.transport.close()

    def pause_writing(self) -> None:
        if self.upstream_connection is not None:
            self.upstream_connection.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream_connection is not None:
            self.upstream_connection.transport.resume_reading()

    def time_out_in(self, seconds: float | None, answer: tuple[int, str] | None) -> None:
        """(Re)arm the connection's one timer: after `seconds`, close it, answering `answer` first (None:
        just close); `seconds` None disarms it."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if seconds is not None and self.transport is not None:
            # The router's loop, not asyncio.get_running_loop(): that makes a getpid system call each time.
            self.timer = self.router.loop.call_later(seconds, self.timed_out, answer)

    def timed_out(self, answer: tuple[int, str] | None) -> None:
        self.timer = None
        if answer is None:
            if self.transport is not None:
                self.transport.close()
        else:
            status, message = answer
            self.reply(status, error_body(status, message), close=True)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        self.body = bytearray()
        self.time_out_in(REQUEST_TIMEOUT_S, (408, f"the request did not arrive whole within {REQUEST_TIMEOUT_S:g}s"))

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.count_head(len(name) + len(value) + 4)

    def count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD_BYTES:
            message = f"the request line and headers are over {MAX_HEAD_BYTES} bytes"
            self.reply(431, error_body(431, message), close=True)
            raise httptools.HttpParserError(message)  # stop parsing what is left of it

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > MAX_BODY_BYTES:
            self.reply(413, error_body(413, f"request body over {MAX_BODY_BYTES} bytes"), close=True)

    def on_message_complete(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.time_out_in(None, None)  # the response may take as long as the engine needs
        self.keep_alive = self.parser.should_keep_alive()
        self.arrived = time.monotonic()
        self.model = self.route = self.replica = ""
        self.request_id = b""
        self.sent = 0
        self.transport.pause_reading()
        self.router.dispatch(self, self.parser.get_method(), self.url, self.headers, bytes(self.body))

    # outcomes
    def reply(self, status: int, payload: dict, close: bool = False, retry_after_s: int | None = None) -> None:
        self.reply_raw(status, "application/json", json.dumps(payload).encode(), close, retry_after_s)

    def reply_raw(
        self, status: int, content_type: str, body: bytes, close: bool = False, retry_after_s: int | None = None
    ) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        keep_alive = self.keep_alive and not close
        headers = self.response_headers() + ([("retry-after", str(retry_after_s))] if retry_after_s else [])
        self.send_raw(raw_response(status, content_type, body, keep_alive, headers))
        if self.route:
            self.answered(status, None)
        self.finish(keep_alive)

    def send_raw(self, data: bytes) -> None:
        self.transport.write(data)
        self.sent += len(data)

    def response_headers(self) -> list[tuple[str, str]]:
        return [("x-request-id", self.request_id.decode("latin-1"))] if self.request_id else []

    def answered(self, status: int, first_byte_at: float | None) -> None:
        """Count and log the answer to a model request (once: the request's route is forgotten)."""
        answers, route = self.router.answers, self.route
        self.route = ""
        if not route or answers is None:
            return
        first_byte = None if first_byte_at is None else first_byte_at - self.arrived
        answers.add(
            self.request_id.decode("latin-1"), route, self.model, status, first_byte, time.monotonic() - self.arrived,
            self.sent, self.replica,
        )  # fmt: skip

    def finish(self, keep_alive: bool) -> None:
        if self.transport is None:
            return
        if keep_alive:
            self.transport.resume_reading()
            self.time_out_in(IDLE_TIMEOUT_S, None)
        else:
            self.transport.close()

    def response_finished(self, connection: UpstreamConnection) -> None:
        self.upstream_connection = None
        self.finish(self.keep_alive)

    def upstream_lost(self, connection: UpstreamConnection) -> None:
        if self.upstream_connection is not connection:
            return
        self.upstream_connection = None
        connection.finish_lease()
        if connection.response_started:
            # Part of the response is out; the only honest signal left is closing the connection.
            if self.transport is not None:
                self.transport.close()
        elif connection.reused and self.transport is not None:
            # The engine closed an idle connection as our request crossed it: it never saw the request.
            # Resent on a new connection; if that cannot connect, the engine is gone: another replica.
            if self.router.metrics is not None:
                self.router.metrics.resends.labels(connection.upstream.model).inc()
            connection.upstream.close_idle()  # its other idle connections are as old: none is reused for this
            self.router.forward(self, connection.upstream, connection.request, retries=1)
        else:
            self.reply(
                502, error_body(502, f"the engine serving model {connection.upstream.model!r} closed the connection")
            )
