"""A lean load generator for OpenAI streaming completions.

It speaks HTTP/1.1 over keep-alive asyncio connections itself (no client
library), so on a 2-core machine it takes as little CPU as possible from the
servers being compared. TTFT is the time from sending a request to the first
SSE event that carries a token.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    ttfts: list[float]

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def ttft_ms(self, quantile: float) -> float:
        if not self.ttfts:
            return float("nan")
        ordered = sorted(self.ttfts)
        return 1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]


def carries_token(chunk: bytes) -> bool:
    """Whether an SSE chunk holds a generated token: a completion choice, even one whose text is empty.

    A token can decode to "" (a byte-fallback token that does not finish a UTF-8 character): the tiny
    random model emits ~20 of those before its first printable text, so "first text" would measure
    the 20th token, not the first.
    """
    return b'"text":' in chunk


class Connection:
    def __init__(self, host: str, port: int, api_key: str | None = None):
        self.host, self.port = host, port
        self.authorization = f"authorization: Bearer {api_key}\r\n" if api_key else ""
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def stream_completion(self, path: str, payload: dict) -> float | None:
        """Send one streaming request; return seconds to the first token event, None on error."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        start = time.perf_counter()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
            f"accept: text/event-stream\r\n{self.authorization}content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status_line = await self.reader.readline()
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        ok = status_line.split()[1:2] == [b"200"]
        first_token = None
        done = False
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                chunk = await self.reader.readexactly(size + 2)
                if first_token is None and carries_token(chunk):
                    first_token = time.perf_counter() - start
                done = done or b"data: [DONE]" in chunk
        else:
            await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection") == "close":
            self.writer.close()
            self.writer = None
        return first_token if ok and done else None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def completion_request(model: str, max_tokens: int, prompt: str) -> dict:
    """The benchmark's request: a streamed completion of exactly `max_tokens` tokens."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.0,
        "ignore_eos": True,
    }


async def run_load(
    url: str,
    model: str,
    *,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompt: str = "Hello world, this is",
    api_key: str | None = None,
) -> LoadResult:
    """`requests` streaming completions from `concurrency` workers, each on its own keep-alive connection."""
    parts = urlsplit(url)
    payload = completion_request(model, max_tokens, prompt)
    remaining = requests
    ttfts: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal remaining, errors
        connection = Connection(parts.hostname, parts.port, api_key)
        try:
            while remaining > 0:
                remaining -= 1
                try:
                    ttft = await connection.stream_completion("/v1/completions", payload)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    ttft = None
                    connection.close()
                    connection = Connection(parts.hostname, parts.port, api_key)
                if ttft is None:
                    errors += 1
                else:
                    ttfts.append(ttft)
        finally:
            connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(requests=len(ttfts), errors=errors, seconds=time.perf_counter() - start, ttfts=ttfts)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def run_load_aiohttp(
    url: str,
    model: str,
    *,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompt: str = "Hello world, this is",
    api_key: str | None = None,
) -> LoadResult:
    """The same load from an ordinary client: aiohttp, one session with keep-alive connections, reading
    the stream line by line as SSE clients do. A second opinion on `run_load`'s timing."""
    import aiohttp

    payload = completion_request(model, max_tokens, prompt)
    remaining = requests
    ttfts: list[float] = []
    errors = 0

    async def one(session: aiohttp.ClientSession) -> float | None:
        start = time.perf_counter()
        first_token = None
        async with session.post(f"{url}/v1/completions", json=payload) as response:
            if response.status != 200:
                await response.read()
                return None
            done = False
            async for line in response.content:
                if first_token is None and carries_token(line):
                    first_token = time.perf_counter() - start
                done = done or line.startswith(b"data: [DONE]")
        return first_token if done else None

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            try:
                ttft = await one(session)
            except (TimeoutError, aiohttp.ClientError):
                ttft = None
            if ttft is None:
                errors += 1
            else:
                ttfts.append(ttft)

    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return LoadResult(requests=len(ttfts), errors=errors, seconds=seconds, ttfts=ttfts)


LOAD_GENERATORS = {"loadgen": run_load, "aiohttp": run_load_aiohttp}
