"""An engine server that costs next to nothing and tells what it was asked: router tests and benches stand
it in for vLLM where the router's own behaviour or CPU must stand out.

    python -m raylm.testing.fake_engine PORT [--chunks 34] [--interval 0.002]
    with FakeEngineThread() as engine: ...   # in a test: engine.url, engine.stats

`POST /v1/completions` (any path but `/stats`) answers a streamed request (`"stream": true`) with
`chunks` SSE events, one every `interval` seconds, and any other request with one JSON object after
`interval` x `chunks` seconds (a generation that takes time); the body's own `chunks`, `interval` and
`pad` (bytes added to each event) win. `GET /stats` (and `/metrics`, in Prometheus' text) says how
many requests it began, finished, and saw the router abort (the connection closed before the answer
ended), and the most it served at once: a request the router should have dropped shows up as begun.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading

from raylm.net import free_port

EVENT = b'data: {"id":"cmpl-1","object":"text_completion","model":"m","choices":[{"index":0,"text":" hi"}]}\n\n'
STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def json_response(payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body


class Stats:
    def __init__(self) -> None:
        self.begun = self.finished = self.aborted = 0
        self.active = self.peak = 0


class FakeEngine(asyncio.Protocol):
    def __init__(self, stats: Stats, chunks: int, interval: float):
        self.stats, self.chunks, self.interval = stats, chunks, interval
        self.buffer = b""
        self.task: asyncio.Task | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            lines = head.split(b"\r\n")
            length = next((int(line[15:]) for line in lines if line.lower().startswith(b"content-length:")), 0)
            if len(rest) < length:
                return
            body, self.buffer = rest[:length], rest[length:]
            self.task = asyncio.get_running_loop().create_task(self.answer(lines[0].split(b" ")[1], body))

    async def answer(self, path: bytes, body: bytes) -> None:
        if path in (b"/stats", b"/metrics"):  # answered, then the connection closes (HTTP/1.0 clients wait for it)
            if path == b"/stats":
                self.transport.write(json_response(vars(self.stats)))
            else:  # the router scrapes its engines' metrics with its own
                text = b"".join(b"fake_engine_%s %d\n" % (k.encode(), v) for k, v in vars(self.stats).items())
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(text) + text)
            self.transport.close()
            return
        payload = json.loads(body or b"{}")
        chunks, interval = payload.get("chunks", self.chunks), payload.get("interval", self.interval)
        event = EVENT + b" " * payload.get("pad", 0)
        self.stats.begun += 1
        self.stats.active += 1
        self.stats.peak = max(self.stats.peak, self.stats.active)
        try:
            if payload.get("stream"):
                self.transport.write(STREAM_HEAD)
                for _ in range(chunks):
                    if interval:
                        await asyncio.sleep(interval)
                    self.transport.write(chunk(event))
                self.transport.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            else:
                await asyncio.sleep(interval * chunks)
                self.transport.write(json_response({"object": "text_completion", "model": payload.get("model")}))
            self.stats.finished += 1
        except asyncio.CancelledError:
            self.stats.aborted += 1
        finally:
            self.stats.active -= 1


async def serve(port: int, chunks: int, interval: float, stats: Stats | None = None) -> None:
    stats = stats or Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeEngine(stats, chunks, interval), "127.0.0.1", port)
    await server.serve_forever()


class FakeEngineThread:
    """The fake engine on a thread of its own, for a test: `url`, and `stats` to read directly."""

    def __init__(self, chunks: int = 3, interval: float = 0.01):
        self.port = free_port()
        self.stats = Stats()
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task | None = None
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.task = self.loop.create_task(serve(self.port, chunks, interval, self.stats))
            self.loop.call_soon(started.set)
            with contextlib.suppress(asyncio.CancelledError):
                self.loop.run_until_complete(self.task)

        self.thread = threading.Thread(target=run, name="fake-engine", daemon=True)
        self.thread.start()
        started.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeEngineThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--chunks", type=int, default=34)
    parser.add_argument("--interval", type=float, default=0.002)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.chunks, args.interval))


if __name__ == "__main__":
    main()
