"""What the production endpoint costs, and what it does under a burst.

    .venv/bin/python bench/endpoint.py [--repeats 6] [--burst 10]

One vLLM server (the tiny Llama) with two of raylm's routers in front of it, side by side:
`plain` (no keys, no metrics, no access log) and `full` (an API key, Prometheus metrics, the access
log written to a file). They are loaded in turn, who goes first alternating, with bench/loadgen.py
(streaming completions of 32 tokens at c=16 and c=1); each router's CPU time per streamed chunk is
read from /proc. Targets: `full` >= 0.98x the req/s of `plain` at c=16, c=1 TTFT p50 within +1 ms,
CPU per chunk within +10%.

Then the burst: a third router in front of the same server with a small limit (4 requests per
replica, 8 waiting), and `--burst` times that many requests at once. Every request must get its
answer or a 429 within 1 s of arriving, the router's memory must stay flat, and it must serve
normally afterwards.

With `--before REV` (e.g. 2015c7f, before the restructure) a third router, that commit's own
`raylm.serving.router` in front of the same server, is loaded in the same rotation: `plain`/`before`
is what the change between the two commits did to the data path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import median, run_load  # noqa: E402
from servers import ENGINES, MAX_TOKENS, MODEL_NAME, REPO, machine, serving, start, stop, warm_up  # noqa: E402

from raylm.net import free_port  # noqa: E402
from raylm.testing.models import build_tiny_llama  # noqa: E402
from raylm.waiting import wait_until_async  # noqa: E402

KEY = "sk-bench-endpoint"
LIMIT_ONGOING, LIMIT_QUEUED = 4, 8


class RouterProcess:
    """`python -m raylm.serving.router` in front of one engine server."""

    def __init__(self, name: str, engine_url: str, *options: str, api_key: str | None = None, env: dict | None = None):
        self.name, self.api_key = name, api_key
        self.port = free_port()
        self.log_path = Path(tempfile.gettempdir()) / f"raylm-bench-router-{name}.log"
        command = [sys.executable, "-m", "raylm.serving.router", "--port", str(self.port)]
        command += ["--upstream", f"{MODEL_NAME}={engine_url}", *options]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (the access log goes here, as a user's would to a file)
        self.process = start(command, self.log, env or {})
        self.ps = psutil.Process(self.process.pid)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    async def wait_ready(self) -> None:
        async def answers() -> bool:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            return True

        await wait_until_async(
            answers, timeout_s=30, poll_s=0.1, on_timeout=lambda: RuntimeError(f"router {self.name} did not start")
        )

    def close(self) -> None:
        stop(self.process, signal.SIGTERM)
        self.log.close()


async def measure(router: RouterProcess, concurrency: int, requests: int, results: dict) -> None:
    before = router.cpu_s()
    result = await run_load(
        router.url, MODEL_NAME, concurrency=concurrency, requests=requests, max_tokens=MAX_TOKENS,
        api_key=router.api_key,
    )  # fmt: skip
    cpu = router.cpu_s() - before
    if result.errors:
        raise RuntimeError(f"{router.name}: {result.errors} failed requests at c={concurrency}")
    chunks = result.requests * (MAX_TOKENS + 2)  # one event per token, the last with usage, and [DONE]
    results.setdefault((router.name, concurrency, "req/s"), []).append(result.requests_per_second)
    results.setdefault((router.name, concurrency, "TTFT p50 (ms)"), []).append(result.ttft_ms(0.5))
    results.setdefault((router.name, concurrency, "CPU us/chunk"), []).append(cpu / chunks * 1e6)


async def burst(router: RouterProcess, count: int) -> dict:
    """`count` streaming requests at once; each one's status and seconds until its answer began."""
    import aiohttp

    payload = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": MAX_TOKENS, "stream": True, "ignore_eos": True}

    async def one(session: aiohttp.ClientSession) -> tuple[int, float]:
        started = time.perf_counter()
        async with session.post(f"{router.url}/v1/completions", json=payload) as response:
            answered = time.perf_counter() - started
            body = await response.read()
            whole = response.status != 200 or body.rstrip().endswith(b"data: [DONE]")
            return (response.status if whole else -1), answered

    rss_before = router.rss_mb()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        outcomes = await asyncio.gather(*(one(session) for _ in range(count)))
        rss_after = router.rss_mb()
        after = await run_load(router.url, MODEL_NAME, concurrency=1, requests=5, max_tokens=MAX_TOKENS)
    refused = [seconds for status, seconds in outcomes if status == 429]
    served = [seconds for status, seconds in outcomes if status == 200]
    return {
        "requests": count,
        "served": len(served),
        "refused (429)": len(refused),
        "other": len(outcomes) - len(served) - len(refused),
        "slowest 429 (s)": round(max(refused, default=0.0), 3),
        "slowest first byte of a served one (s)": round(max(served, default=0.0), 3),
        "router RSS before/after (MB)": f"{rss_before:.1f}/{rss_after:.1f}",
        "serves afterwards": after.errors == 0,
    }


def router_at(revision: str, engine_url: str) -> RouterProcess:
    """The router of raylm's core as it was at `revision`, run from a copy of that tree."""
    tree = Path(tempfile.mkdtemp(prefix=f"raylm-{revision}-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "core/src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return RouterProcess("before", engine_url, env={"PYTHONPATH": str(tree / "core" / "src")})


def cell(values: list[float]) -> str:
    return f"{median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


async def main_async(repeats: int, burst_factor: int, before: str | None) -> None:
    model = build_tiny_llama(REPO / ".cache" / "models" / "tiny-llama")
    key_file = Path(tempfile.mkdtemp()) / "keys"
    key_file.write_text(KEY + "\n")
    setup = ENGINES["vllm"]
    own_server = lambda port: setup.own_server(model, port)  # noqa: E731
    async with serving("vllm", own_server, setup.env, signal.SIGTERM) as (engine_url, _):
        plain = RouterProcess("plain", engine_url, "--no-metrics", "--no-access-log")
        full = RouterProcess("full", engine_url, "--api-key-file", str(key_file), api_key=KEY)
        limited = RouterProcess(
            "limited",
            engine_url,
            f"--max-ongoing-requests={LIMIT_ONGOING}",
            f"--max-queued-requests={LIMIT_QUEUED}",
        )
        loaded = [plain, full] + ([router_at(before, engine_url)] if before else [])
        try:
            for router in (*loaded, limited):
                await router.wait_ready()
                await warm_up(router.url, router.api_key)
            results: dict = {}
            for repeat in range(repeats):
                for router in loaded if repeat % 2 == 0 else loaded[::-1]:
                    await measure(router, 16, 320, results)
                    await measure(router, 1, 40, results)
            burst_result = await burst(limited, burst_factor * (LIMIT_ONGOING + LIMIT_QUEUED))
        finally:
            for router in (*loaded, limited):
                router.close()
    report(results, burst_result, repeats, before)


def report(results: dict, burst_result: dict, repeats: int, before: str | None) -> None:
    names = ["plain", "full"] + (["before"] if before else [])
    print(f"\n{machine()}; {repeats} load runs per router and concurrency, medians [min-max]")
    if before:
        print(f"before: raylm's router at {before}")
    ratios = "  full/plain" + ("  plain/before" if before else "")
    print(f"{'metric':22}" + "".join(f"{name:>22}" for name in names) + ratios)
    checks = []
    for concurrency, metric in ((16, "req/s"), (1, "TTFT p50 (ms)"), (16, "CPU us/chunk"), (1, "CPU us/chunk")):
        column = {name: results[(name, concurrency, metric)] for name in names}
        line = f"{f'c={concurrency} {metric}':22}" + "".join(f"{cell(column[name]):>22}" for name in names)
        line += f"  {median(column['full']) / median(column['plain']):10.2f}"
        if before:
            line += f"  {median(column['plain']) / median(column['before']):13.2f}"
        print(line)
    req = median(results[("full", 16, "req/s")]) / median(results[("plain", 16, "req/s")])
    ttft = median(results[("full", 1, "TTFT p50 (ms)")]) - median(results[("plain", 1, "TTFT p50 (ms)")])
    cpu = median(results[("full", 16, "CPU us/chunk")]) / median(results[("plain", 16, "CPU us/chunk")])
    checks += [("c=16 req/s >= 0.98x", req >= 0.98), ("c=1 TTFT p50 <= +1 ms", ttft <= 1)]
    checks.append(("CPU/chunk <= +10%", cpu <= 1.10))
    print(f"\nburst against a limit of {LIMIT_ONGOING} in flight + {LIMIT_QUEUED} waiting:")
    print(json.dumps(burst_result, indent=2))
    in_time = burst_result["slowest 429 (s)"] <= 1.0 and burst_result["other"] == 0
    checks.append(("every 429 within 1 s, nothing else lost", in_time))
    checks.append(("serves afterwards", burst_result["serves afterwards"]))
    print("targets: " + ", ".join(f"{label} {'met' if ok else 'MISSED'}" for label, ok in checks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6, help="load runs per router and concurrency")
    parser.add_argument("--burst", type=int, default=10, help="the burst, in multiples of the limit")
    parser.add_argument("--before", metavar="REV", help="also load the router of this commit, side by side")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.run(main_async(args.repeats, args.burst, args.before))


if __name__ == "__main__":
    main()
