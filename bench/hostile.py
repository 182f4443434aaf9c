"""Hostile and unlucky clients against the standalone router: does it give back everything they took?

    .venv/bin/python bench/hostile.py [--requests 1000] [--concurrency 64] [--seed 1]

Starts `python -m raylm.serving.router` (with a key file, 8 requests in flight and 48 queued per
replica, so that requests queue) in front of `raylm.testing.fake_engine`, and sends a seeded mix of
requests that pipeline, stop halfway, hang up in every state (queued, waiting for a whole answer,
streaming), are oversized, keyless, malformed, HTTP/1.0 or read slowly, among ordinary ones. Then
it reads the router's own /metrics and memory: requests in flight and queued must be back at 0
and the router's RSS within 20 MB of where it started, and an ordinary request must still be
answered. Prints what each kind of client got, and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from raylm.net import free_port, http_ok
from raylm.waiting import wait_until

KEY = "sk-hostile-bench"
RSS_TOLERANCE_MB = 20.0


def request(body: dict | None, key: str | None = KEY, version: str = "1.1", extra: str = "") -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"POST /v1/completions HTTP/{version}\r\nhost: router\r\ncontent-length: {len(data)}\r\n{extra}"
    if key:
        head += f"authorization: Bearer {key}\r\n"
    return (head + "\r\n").encode() + data


STREAM = {"model": "m", "stream": True, "chunks": 30, "interval": 0.01}
WHOLE = {"model": "m", "chunks": 30, "interval": 0.02}  # a whole answer after 0.6 s


async def status_of(reader: asyncio.StreamReader, timeout: float = 5.0) -> str:
    line = await asyncio.wait_for(reader.readline(), timeout)
    return line.split(b" ")[1].decode() if line.startswith(b"HTTP/") else "closed"


async def read_all(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


# Each kind of client: what it sends, and what it does then. Returns what it saw (a status, "closed", ...).
async def ordinary(reader, writer):
    writer.write(request(STREAM, extra="connection: close\r\n"))
    answer = await read_all(reader)
    return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"


async def pipelined_then_gone(reader, writer):
    writer.write(request(STREAM) * 2)
    status = await status_of(reader)
    await asyncio.sleep(0.05)
    return status


async def half_a_head(reader, writer):
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: router\r\ncontent-le")
    await asyncio.sleep(0.1)
    return "gone"


async def half_a_body(reader, writer):
    writer.write(request(None, extra="content-type: application/json\r\n").replace(b"length: 0", b"length: 900"))
    writer.write(b'{"model": "m", ')
    await asyncio.sleep(0.1)
    return "gone"


async def gone_while_waiting(reader, writer):  # queued, or at the engine for a whole answer
    writer.write(request(WHOLE))
    await asyncio.sleep(random.uniform(0.05, 0.4))
    return "gone"


async def gone_while_streaming(reader, writer):
    writer.write(request(STREAM))
    status = await status_of(reader)
    await reader.read(200)
    return status


async def oversized_body(reader, writer):
    writer.write(request(None).replace(b"length: 0", b"length: 100000000"))
    return await status_of(reader)


async def oversized_head(reader, writer):
    writer.write(b"POST /v1/completions HTTP/1.1\r\nx-pad: " + b"a" * 70_000 + b"\r\n\r\n")
    return await status_of(reader)


async def keyless_flood(reader, writer):
    writer.write(request(None, key=None).replace(b"length: 0", b"length: 5000000"))
    writer.write(b"x" * 65536)
    return await status_of(reader)


async def wrong_key(reader, writer):
    writer.write(request(STREAM, key="sk-wrong"))
    return await status_of(reader)


async def malformed(reader, writer):
    writer.write(b"\x16\x03\x01\x02\x00GARBAGE / HTTP/9\r\n\r\n")
    return await status_of(reader)


async def http10(reader, writer):
    writer.write(request(STREAM, version="1.0"))
    answer = await read_all(reader)
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"
    return "cut" if status == "200" and not answer.endswith(b"data: [DONE]\n\n") else status


async def slow_reader(reader, writer):
    writer.write(request({**STREAM, "pad": 20_000}))
    status = await status_of(reader)
    for _ in range(5 if status == "200" else 0):
        await asyncio.sleep(0.05)
        await reader.read(1000)
    return status


KINDS = [
    ordinary, pipelined_then_gone, half_a_head, half_a_body, gone_while_waiting, gone_while_streaming,
    oversized_body, oversized_head, keyless_flood, wrong_key, malformed, http10, slow_reader,
]  # fmt: skip


async def one(port: int, kind) -> str:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect failed: {exc.strerror}"
    try:
        return await kind(reader, writer)
    except (TimeoutError, ConnectionError) as exc:
        return type(exc).__name__
    finally:
        writer.close()


async def attack(port: int, requests: int, concurrency: int, seed: int) -> dict[str, Counter]:
    rng = random.Random(seed)
    kinds = [rng.choice(KINDS) for _ in range(requests)]
    seen: dict[str, Counter] = defaultdict(Counter)
    gate = asyncio.Semaphore(concurrency)

    async def run(kind) -> None:
        async with gate:
            seen[kind.__name__][await one(port, kind)] += 1

    await asyncio.gather(*(run(kind) for kind in kinds))
    return seen


def router_metrics(port: int) -> dict[str, float]:
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"authorization": f"Bearer {KEY}"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in ("raylm_requests_in_flight", "raylm_queued_requests")
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    engine_port, router_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as folder:
        key_file = Path(folder) / "keys"
        key_file.write_text(KEY + "\n")
        engine = subprocess.Popen([sys.executable, "-m", "raylm.testing.fake_engine", str(engine_port)])
        router = subprocess.Popen(
            [sys.executable, "-m", "raylm.serving.router", "--port", str(router_port), "--upstream",
             f"m=http://127.0.0.1:{engine_port}", "--api-key-file", str(key_file), "--no-access-log",
             "--max-ongoing-requests", "8", "--max-queued-requests", "48"],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_until(
                lambda: http_ok(f"http://127.0.0.1:{router_port}/ready", 1.0), timeout_s=30, poll_s=0.2,
                on_timeout=lambda: RuntimeError("the router did not start"),
            )  # fmt: skip
            asyncio.run(attack(router_port, 50, 8, seed=0))  # warm up: the router's memory at rest, with use
            time.sleep(1.0)
            before = rss_mb(router.pid)
            started = time.monotonic()
            seen = asyncio.run(attack(router_port, args.requests, args.concurrency, args.seed))
            took = time.monotonic() - started
            time.sleep(1.0)  # every hang-up has reached the router
            left = router_metrics(router_port)
            after = rss_mb(router.pid)
            still_serves = asyncio.run(one(router_port, ordinary))
        finally:
            for process in (router, engine):
                process.terminate()
                process.wait(10)
    print(f"{args.requests} requests, concurrency {args.concurrency}, seed {args.seed}, {took:.1f} s")
    print(f"{'client':24} what it got")
    for name, outcomes in sorted(seen.items()):
        print(f"{name:24} " + ", ".join(f"{outcome} x{count}" for outcome, count in outcomes.most_common()))
    print(f"in flight after: {left['raylm_requests_in_flight']:g}, queued after: {left['raylm_queued_requests']:g}")
    print(f"router RSS: {before:.1f} MB before, {after:.1f} MB after ({after - before:+.1f} MB)")
    print(f"an ordinary request afterwards: {still_serves}")
    ok = (
        left["raylm_requests_in_flight"] == 0
        and left["raylm_queued_requests"] == 0
        and after - before <= RSS_TOLERANCE_MB
        and still_serves == "200"
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
