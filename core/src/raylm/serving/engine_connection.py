"""Keep-alive connections to engine servers: one response at a time, piped to a client as it arrives.

A response's head is held until it is whole (the router adds its request id); then, below status
400, every byte goes to the client as the engine writes it, never re-encoded, so a streamed token
leaves as soon as it arrives. An error response (small, never streamed) is held whole, so that the
exchange can put its body in OpenAI's shape. What a connection is in the middle of is its
exchange's business (`raylm.serving.exchange`); this module only frames bytes and keeps the pool.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Protocol

import httptools

from raylm.serving.http import with_header
from raylm.serving.routes import Upstream

# An engine server closes keep-alive connections idle for a while (uvicorn, under vLLM and SGLang:
# 5 s). Reusing one just as it closes loses the request, so idle connections are reused only while
# well inside that time; an older one is closed and a new one opened.
IDLE_REUSE_S = 2.0
CONNECT_TIMEOUT_S = 5.0
# TCP keepalive towards engines: a node that vanished without a reset is noticed within about a minute.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 30, 10, 3


class ResponseSink(Protocol):
    """What a connection tells the exchange it serves (`raylm.serving.exchange.Exchange`)."""

    def response_head(self, status: int, head: bytes) -> None: ...

    def response_complete(self, status: int, held: bytes | None, keep_alive: bool) -> None: ...

    def engine_lost(self, connection: EngineConnection) -> None: ...


class EngineConnection(asyncio.Protocol):
    """One connection to an engine server; relays one response at a time to `out`, a client's transport."""

    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.out: asyncio.Transport | None = None  # where the response's bytes go once the head is passed on
        self.parser = httptools.HttpResponseParser(self)
        self.piping = False  # the head is passed on and the status < 400: bytes go straight out
        self.holding = True  # bytes are held: until the head is whole, or all of an error response
        self.held = bytearray()
        # For an HTTP/1.0 client, which cannot read chunked bodies: the body goes out decoded, its end
        # said by closing the connection.
        self.unchunk = False
        self.received = 0  # bytes of the response so far (the exchange's progress and its size)
        self.paused = False  # reading paused: the client reads slower than the engine writes
        self.idle_since = 0.0

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)

    def data_received(self, data: bytes) -> None:
        if self.sink is None:  # bytes nobody asked for: the connection is no longer usable
            self.transport.close()
            return
        self.received += len(data)
        if self.piping:
            self.out.write(data)
        elif self.holding:
            self.held += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # connection_lost tells the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.engine_lost(self)

    # httptools callbacks (no `on_body`: httptools would make a bytes object of every chunk piped through)
    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 400:
            self.piping, self.holding = not self.unchunk, False
            head, self.held = bytes(self.held), bytearray()
            self.sink.response_head(status, head)

    def on_message_complete(self) -> None:
        sink, self.sink = self.sink, None
        held = bytes(self.held) if self.holding else None
        sink.response_complete(self.parser.get_status_code(), held, self.parser.should_keep_alive())

    # what the exchange does with it
    def send(self, sink: ResponseSink, out: asyncio.Transport, wire: bytes, out_paused: bool, unchunk: bool) -> None:
        """Send a request; its response goes to `sink` and `out` (paused at once if `out` is)."""
        self.sink, self.out, self.unchunk = sink, out, unchunk
        self.parser = httptools.HttpResponseParser(_Unchunking(self) if unchunk else self)
        self.piping, self.holding = False, True
        self.held.clear()
        self.received = 0
        self.pause(out_paused)
        self.transport.write(wire)

    def pass_head(self, head: bytes, request_id: bytes) -> None:
        """Pass the held head on to the client, with the request's id."""
        if self.unchunk:
            head = unchunked_head(head)
        self.out.write(with_header(head, b"x-request-id", request_id))

    def pause(self, paused: bool) -> None:
        if paused != self.paused and self.transport is not None:
            self.paused = paused
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def close(self) -> None:
        self.sink = self.out = None
        if self.transport is not None:
            self.transport.close()


class _Unchunking:
    """The parser's callbacks for an HTTP/1.0 client's response: the body is passed on decoded."""

    def __init__(self, connection: EngineConnection):
        self.connection = connection
        self.on_headers_complete = connection.on_headers_complete
        self.on_message_complete = connection.on_message_complete

    def on_body(self, body: bytes) -> None:
        if not self.connection.holding:
            self.connection.out.write(body)


def unchunked_head(head: bytes) -> bytes:
    """A response head without chunked framing, and closing the connection at its end."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    kept = [line for line in lines if not line.lower().startswith((b"transfer-encoding:", b"connection:"))]
    return b"\r\n".join([*kept, b"connection: close"]) + b"\r\n\r\n"


class EnginePool:
    """The idle keep-alive connections to each replica's engine server."""

    def __init__(self, loop: Callable[[], asyncio.AbstractEventLoop]):
        self.loop = loop
        self.idle: dict[Upstream, list[EngineConnection]] = {}

    async def connect(self, upstream: Upstream) -> EngineConnection:
        """A new connection; raises OSError (TimeoutError past CONNECT_TIMEOUT_S) when there is none."""
        connecting = self.loop().create_connection(lambda: EngineConnection(upstream), upstream.host, upstream.port)
        _, connection = await asyncio.wait_for(connecting, CONNECT_TIMEOUT_S)
        return connection

    def take(self, upstream: Upstream) -> EngineConnection | None:
        """The most recently used idle connection, unless the engine may be about to time it out."""
        idle = self.idle.get(upstream)
        while idle:
            connection = idle.pop()  # the newest: if it is too old, so are the rest
            if connection.transport is not None and time.monotonic() - connection.idle_since < IDLE_REUSE_S:
                return connection
            connection.close()
        return None

    def park(self, connection: EngineConnection) -> None:
        """Keep a connection whose response ended whole for the next request to its replica."""
        if connection.transport is None:
            return
        connection.sink = connection.out = None
        connection.pause(False)  # it may have been paused for a slow client as the response ended
        connection.idle_since = time.monotonic()
        self.idle.setdefault(connection.upstream, []).append(connection)

    def close(self, upstream: Upstream) -> None:
        """Close the idle connections to a replica (it went away, or one of them was found closed)."""
        for connection in self.idle.pop(upstream, ()):
            connection.close()

    def close_all(self) -> None:
        for upstream in list(self.idle):
            self.close(upstream)
