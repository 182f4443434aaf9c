"""The router's own CPU per streamed request, in front of a fake engine that costs next to nothing.

    .venv/bin/python bench/router_cpu.py [--rounds 4] [--before 2015c7f]

bench/endpoint.py measures routers in front of a real vLLM server, which takes most of the two
cores, so its CPU-per-chunk figures move by +-20% between runs. Here the engine is a few lines of
asyncio that stream 34 SSE events per request, one every 2 ms (a decode step), so the routers'
own costs stand out: `plain` (no key, no metrics, no access log), `full` (all three), `full` with
the access log or the metrics off (what each costs), and with `--before REV` that commit's router.
Each is loaded in turn, who goes first alternating, with 1600 streams at c=16 (bench/loadgen.py);
a router's CPU time is read from /proc. Medians [min-max] over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from endpoint import KEY, RouterProcess, cell, router_at  # noqa: E402
from loadgen import median, run_load  # noqa: E402
from servers import MAX_TOKENS, MODEL_NAME, machine, start, stop  # noqa: E402

from raylm.net import free_port  # noqa: E402

EVENTS = MAX_TOKENS + 2  # a token each, the last with usage, and [DONE]

FAKE_ENGINE = """
import asyncio, sys
import uvloop

EVENT = b'data: {"id":"cmpl-1","object":"text_completion","model":"tiny","choices":[{"index":0,"text":" hi"}]}\\n\\n'
HEAD = b"HTTP/1.1 200 OK\\r\\ncontent-type: text/event-stream\\r\\ntransfer-encoding: chunked\\r\\n\\r\\n"


def chunk(data):
    return b"%x\\r\\n%s\\r\\n" % (len(data), data)


class Engine(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        self.buffer += data
        head, found, rest = self.buffer.partition(b"\\r\\n\\r\\n")
        lines = head.lower().split(b"\\r\\n")
        length = next((int(line[15:]) for line in lines if line.startswith(b"content-length:")), 0)
        if found and len(rest) >= length:
            self.buffer = rest[length:]
            asyncio.get_running_loop().create_task(self.stream())

    async def stream(self):
        self.transport.write(HEAD)
        for _ in range(EVENTS - 1):
            await asyncio.sleep(0.002)
            self.transport.write(chunk(EVENT))
        self.transport.write(chunk(b"data: [DONE]\\n\\n") + b"0\\r\\n\\r\\n")


async def main(port):
    server = await asyncio.get_running_loop().create_server(Engine, "127.0.0.1", port)
    await server.serve_forever()


EVENTS = int(sys.argv[2])
uvloop.run(main(int(sys.argv[1])))
"""


async def per_request_us(router: RouterProcess, requests: int) -> float:
    before = router.cpu_s()
    result = await run_load(
        router.url, MODEL_NAME, concurrency=16, requests=requests, max_tokens=MAX_TOKENS, api_key=router.api_key
    )
    if result.errors:
        raise RuntimeError(f"{router.name}: {result.errors} failed requests")
    return (router.cpu_s() - before) / result.requests * 1e6


async def main_async(rounds: int, requests: int, before: str | None) -> dict[str, list[float]]:
    folder = Path(tempfile.mkdtemp())
    (folder / "engine.py").write_text(FAKE_ENGINE)
    (folder / "keys").write_text(KEY + "\n")
    port = free_port()
    with open(folder / "engine.log", "wb") as log:
        engine = start([sys.executable, str(folder / "engine.py"), str(port), str(EVENTS)], log, {})
    engine_url = f"http://127.0.0.1:{port}"
    keyed = ("--api-key-file", str(folder / "keys"))
    routers = [
        RouterProcess("plain", engine_url, "--no-metrics", "--no-access-log"),
        RouterProcess("full", engine_url, *keyed, api_key=KEY),
        RouterProcess("full, no access log", engine_url, *keyed, "--no-access-log", api_key=KEY),
        RouterProcess("full, no metrics", engine_url, *keyed, "--no-metrics", api_key=KEY),
    ] + ([router_at(before, engine_url)] if before else [])
    results: dict[str, list[float]] = {}
    try:
        for router in routers:
            await router.wait_ready()
            await per_request_us(router, 64)  # warm: connections made, code paths run once
        for round_ in range(rounds):
            for router in routers if round_ % 2 == 0 else routers[::-1]:
                results.setdefault(router.name, []).append(await per_request_us(router, requests))
    finally:
        for router in routers:
            router.close()
        stop(engine, signal.SIGTERM)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=1600, help="streams per router and round")
    parser.add_argument("--before", metavar="REV", help="also load the router of this commit")
    args = parser.parse_args()
    results = asyncio.run(main_async(args.rounds, args.requests, args.before))
    plain = median(results["plain"])
    print(f"\n{machine()}; {args.rounds} rounds of {args.requests} streams of {EVENTS} events at c=16")
    if args.before:
        print(f"before: raylm's router at {args.before}")
    print(f"{'router':24}{'CPU us/request':>24}{'us/chunk':>10}{'vs plain':>10}")
    for name, values in results.items():
        print(f"{name:24}{cell(values):>24}{median(values) / EVENTS:10.1f}{median(values) / plain:10.2f}")


if __name__ == "__main__":
    main()
