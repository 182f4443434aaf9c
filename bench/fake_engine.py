"""An engine server that costs next to nothing and tells what it was asked: the router's benches stand it in
for vLLM where the router's own behaviour or CPU must stand out.

    python bench/fake_engine.py PORT [--chunks 34] [--interval 0.002]

`POST /v1/completions` (any path but `/stats`) answers a streamed request (`"stream": true`) with
`chunks` SSE events, one every `interval` seconds (the body's own `chunks` and `interval` win), and any
other request with one JSON object after `interval` x `chunks` seconds (a generation that takes time).
`GET /stats` says how many requests it began, finished, and saw the router abort (the connection closed
before the answer ended): a request the router should have dropped shows up as begun.
"""

from __future__ import annotations

import argparse
import asyncio
import json

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
        if path == b"/stats":
            self.transport.write(json_response(vars(self.stats)))
            return
        payload = json.loads(body or b"{}")
        chunks, interval = payload.get("chunks", self.chunks), payload.get("interval", self.interval)
        self.stats.begun += 1
        try:
            if payload.get("stream"):
                self.transport.write(STREAM_HEAD)
                for _ in range(chunks):
                    await asyncio.sleep(interval)
                    self.transport.write(chunk(EVENT))
                self.transport.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            else:
                await asyncio.sleep(interval * chunks)
                self.transport.write(json_response({"object": "text_completion", "model": payload.get("model")}))
            self.stats.finished += 1
        except asyncio.CancelledError:
            self.stats.aborted += 1


async def serve(port: int, chunks: int, interval: float) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeEngine(stats, chunks, interval), "127.0.0.1", port)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--chunks", type=int, default=34)
    parser.add_argument("--interval", type=float, default=0.002)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.chunks, args.interval))


if __name__ == "__main__":
    main()
