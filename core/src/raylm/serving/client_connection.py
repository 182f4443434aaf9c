"""A client's connection: HTTP/1.x requests in, answers out, one request at a time.

Requests are parsed whole (they are small) and handed to the router one after another: a client
that pipelines gets its answers in order, the next request taken once the one before is answered.
The connection keeps reading while a request is answered, so a client that hangs up is noticed at
once, whatever its request is doing (waiting in a queue, waiting for a whole answer, streaming).

What a client may cost is bounded: a request line and headers of at most `MAX_HEAD_BYTES` (431
past it), a body of at most `MAX_BODY_BYTES` (413, said as soon as the headers announce it), a
whole request within `REQUEST_TIMEOUT_S` of its first byte (408), `IDLE_TIMEOUT_S` without a request
on a kept-alive connection, and `MAX_PIPELINED` requests parsed ahead of their turn (past it, the
connection stops reading until it catches up). A request the router refuses from its headers alone
(no key) is answered before its body is read, and the body is never kept.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import httptools

from raylm.serving.http import MAX_BODY_BYTES, error_body, json_body, raw_response

MAX_HEAD_BYTES = 64 * 1024
MAX_PIPELINED = 8
REQUEST_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 60.0
# After a refusal that closes the connection, how long its body may still arrive (and be dropped)
# before the connection closes: closing with unread bytes would reset it, and the client might lose
# the answer.
LINGER_S = 2.0
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass
class Incoming:
    """A request as it arrives: method, URL, headers, body."""

    method: bytes
    url: bytes
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    http10: bool  # an HTTP/1.0 client: it cannot read a chunked answer
    keep_alive: bool
    arrived: float  # when it had arrived whole (time.monotonic)


class Front(Protocol):
    """What a client connection needs of the router (`raylm.serving.router.Router`)."""

    loop: asyncio.AbstractEventLoop
    connections: set[ClientConnection]
    max_connections: int

    def screen(self, method: bytes, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict] | None:
        """An answer for a request that its head alone rules out (a missing key), else None."""

    def dispatch(self, client: ClientConnection, request: Incoming) -> None:
        """Answer `request`; `client.done` is called once it is answered."""


class Exchanging(Protocol):
    """What a client connection tells the exchange under way (`raylm.serving.exchange.Exchange`)."""

    def client_lost(self) -> None: ...

    def client_paused(self, paused: bool) -> None: ...


def request_path(url: bytes) -> str:
    """The path of a request's URL without its query and trailing slashes (`/` for the root)."""
    return url.split(b"?", 1)[0].decode("latin-1").rstrip("/") or "/"


class ClientConnection(asyncio.Protocol):
    """One client connection; its requests are answered in turn."""

    def __init__(self, front: Front):
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.timer: asyncio.TimerHandle | None = None
        self.writing_paused = False
        self.reading_paused = False
        self.pipeline: deque[Incoming] = deque()  # requests parsed, waiting for their turn
        self.answering = False  # a request is being answered (its exchange, or the router's own answer)
        self.exchange: Exchanging | None = None  # what it is doing, while the router forwards it
        # the request being parsed
        self.receiving = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.body = bytearray()
        self.refused = False  # answered from its head: what is left of it is dropped, then the connection ends

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.front.connections.add(self)
        if len(self.front.connections) > self.front.max_connections:
            self.refuse(503, error_body(503, "the endpoint has too many connections; retry shortly"))
            return
        self.time_out_in(IDLE_TIMEOUT_S, None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.refuse(400, error_body(400, "protocol upgrades are not supported"))
        except httptools.HttpParserError:
            if not self.refused:
                self.refuse(400, error_body(400, "malformed HTTP request"))
            self.close()

    def eof_received(self) -> bool:
        return False  # a client that stops sending has hung up: close (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.front.connections.discard(self)
        self.time_out_in(None, None)
        self.pipeline.clear()
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.client_lost()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.exchange is not None:
            self.exchange.client_paused(True)

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.exchange is not None:
            self.exchange.client_paused(False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.receiving = True
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        self.body = bytearray()
        if not self.answering:
            self.expect_rest()

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
            self.refuse(431, error_body(431, message))
            raise httptools.HttpParserError(message)  # stop parsing what is left of it

    def on_headers_complete(self) -> None:
        if self.refused:
            return
        length = next((value for name, value in self.headers if name.lower() == b"content-length"), b"0")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            self.refuse(413, error_body(413, f"request body over {MAX_BODY_BYTES} bytes"))
            return
        refusal = self.front.screen(self.parser.get_method(), request_path(self.url), self.headers)
        if refusal is not None:
            self.refuse(*refusal)
        elif self.parser.should_upgrade():
            return  # refused as the parser stops at the upgrade
        elif not self.answering and any(
            name.lower() == b"expect" and value.lower() == b"100-continue" for name, value in self.headers
        ):
            self.transport.write(CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self.refused:
            return
        self.body += body
        if len(self.body) > MAX_BODY_BYTES:  # a chunked body, whose length no header announced
            self.body = bytearray()
            self.refuse(413, error_body(413, f"request body over {MAX_BODY_BYTES} bytes"))

    def on_message_complete(self) -> None:
        self.receiving = False
        if self.refused:
            self.close()
            return
        method = self.parser.get_method()
        http10 = self.parser.get_http_version() == "1.0"
        keep_alive = self.parser.should_keep_alive()
        self.pipeline.append(Incoming(method, self.url, request_path(self.url), self.headers, bytes(self.body),
                                      http10, keep_alive, time.monotonic()))  # fmt: skip
        self.body = bytearray()
        if len(self.pipeline) >= MAX_PIPELINED:
            self.pause_reading(True)
        if not self.answering:
            self.take_next()

    # the request cycle
    def take_next(self) -> None:
        """Answer the next parsed request, if any and if the connection is still open."""
        if self.transport is None or self.transport.is_closing() or not self.pipeline:
            return
        self.answering = True
        self.time_out_in(None, None)  # an answer may take as long as the engine needs
        request = self.pipeline.popleft()
        self.pause_reading(False)
        self.front.dispatch(self, request)

    def done(self, close: bool) -> None:
        """The request being answered is answered; `close`: the connection ends with it."""
        self.exchange = None
        self.answering = False
        if self.transport is None:
            return
        if close:
            self.close()
        elif self.pipeline:
            self.front.loop.call_soon(self.take_next)  # not within this answer's own call chain
        elif self.receiving:
            self.expect_rest()
        else:
            self.time_out_in(IDLE_TIMEOUT_S, None)

    def respond(
        self, request: Incoming, status: int, payload: dict, retry_after_s: int | None = None,
        headers: list[tuple[str, str]] = (),
    ) -> None:  # fmt: skip
        """Answer with a JSON payload of the router's own, and end the request."""
        self.respond_raw(request, status, "application/json", json_body(payload), retry_after_s, headers)

    def respond_raw(
        self, request: Incoming, status: int, content_type: str, body: bytes, retry_after_s: int | None = None,
        headers: list[tuple[str, str]] = (),
    ) -> None:  # fmt: skip
        self.write_answer(request, status, content_type, body, retry_after_s, headers)
        self.done(close=not request.keep_alive)

    def write_answer(
        self, request: Incoming, status: int, content_type: str, body: bytes, retry_after_s: int | None,
        headers: list[tuple[str, str]],
    ) -> None:  # fmt: skip
        """Write an answer of the router's own (a HEAD request's without its body)."""
        if self.transport is None:
            return
        headers = [*headers, ("retry-after", str(retry_after_s))] if retry_after_s else headers
        response = raw_response(status, content_type, body, request.keep_alive, headers)
        if request.method == b"HEAD":
            response = response[: len(response) - len(body)]
        self.transport.write(response)

    # the connection
    def refuse(self, status: int, payload: dict) -> None:
        """Answer at once and end the connection: the rest of the request (if it comes) is dropped, for at
        most LINGER_S. Behind a request still being answered (pipelined), the connection just ends: an
        answer cannot be written into the middle of another."""
        if self.refused or self.transport is None:
            return
        self.refused = True
        if self.answering:
            self.close()
            return
        self.transport.write(raw_response(status, "application/json", json_body(payload), False, ()))
        if self.receiving:
            self.time_out_in(LINGER_S, None)
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self, paused: bool) -> None:
        if paused != self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.reading_paused = paused
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def time_out_in(self, seconds: float | None, answer: tuple[int, str] | None) -> None:
        """(Re)arm the connection's one timer: after `seconds`, close it, answering `answer` first (None:
        just close); `seconds` None disarms it."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if seconds is not None and self.transport is not None:
            # The router's loop, not asyncio.get_running_loop(): that makes a getpid system call each time.
            self.timer = self.front.loop.call_later(seconds, self.timed_out, answer)

    def expect_rest(self) -> None:
        """A request has begun to arrive: all of it must, within REQUEST_TIMEOUT_S."""
        self.time_out_in(REQUEST_TIMEOUT_S, (408, f"the request did not arrive whole within {REQUEST_TIMEOUT_S:g}s"))

    def timed_out(self, answer: tuple[int, str] | None) -> None:
        self.timer = None
        if answer is None:
            self.close()
        else:
            status, message = answer
            self.refuse(status, error_body(status, message))
            self.close()
