"""Routing by prefix, measured: a multi-tenant workload against two vLLM servers whose KV caches hold about
half of the tenants' system prompts, through each front in turn.

    .venv/bin/python bench/routing.py [--tenants 16] [--requests 160] [--concurrency 4]
        [--vllm-router PATH] [--workload shared|random] [--json FILE]

Two vLLM servers of SmolLM2-135M-Instruct, each bound to a core of its own, prefix caching on, their
KV-cache events published (ZeroMQ) and their caches reset between fronts (`/reset_prefix_cache`,
vLLM's dev mode). The shared workload: T tenants, each a system prompt of its own (~600 tokens)
and short questions, the tenant of each request drawn at random (seeded); `--workload random` sends
prompts of the same length that share nothing. The fronts: raylm's router (`least-in-flight`,
`approximate`, `precise`) and, with `--vllm-router PATH` (PyPI's `vllm-router`, installed in a venv
of its own), its `round_robin`, `cache_aware` and `kv_aware` (the same events). For each: TTFT p50
and p90, requests/s, the engines' own prefix-cache hit rate (`vllm:prefix_cache_hits` over
`vllm:prefix_cache_queries`), requests per engine, and the hit rate an ideal front would reach
(each tenant's system prompt prefilled once in all).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import Connection  # noqa: E402
from servers import machine, start, stop  # noqa: E402

from raylm.net import ENGINE_SERVER_PORTS, KV_EVENTS_PORTS, free_port, free_ports_in, http_ok  # noqa: E402
from raylm.testing.models import build_smollm2  # noqa: E402
from raylm.waiting import wait_until  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "smol"
WORDS = ("alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "market", "garden", "silver", "orbit", "lantern",
         "meadow", "signal", "harbor")  # fmt: skip


def workload(kind: str, tenants: int, requests: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    systems = [" ".join(rng.choice(WORDS) for _ in range(450)) for _ in range(tenants)]
    prompts = []
    for number in range(requests):
        question = f" Question {number}: what is {rng.choice(WORDS)} to {rng.choice(WORDS)}?"
        if kind == "shared":
            prompts.append(systems[rng.randrange(tenants)] + question)
        else:
            prompts.append(" ".join(rng.choice(WORDS) for _ in range(450)) + question)
    return prompts


class Engines:
    """Two vLLM servers, one core each, events published."""

    def __init__(self, model: Path, kv_cache_bytes: int, block_size: int):
        self.servers = []
        env = {"VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": "1"}
        for core in range(2):
            (port,) = free_ports_in(ENGINE_SERVER_PORTS)
            (events_port,) = free_ports_in(KV_EVENTS_PORTS)
            config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}"}
            command = [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--served-model-name", MODEL, "--port", str(port), "--max-model-len", "1024",
                "--kv-cache-memory-bytes", str(kv_cache_bytes), "--block-size", str(block_size),
                "--enable-prefix-caching", "--kv-events-config", json.dumps(config),
            ]  # fmt: skip
            log = open(Path(tempfile.gettempdir()) / f"raylm-routing-engine-{core}.log", "wb")  # noqa: SIM115
            process = start(command, log, {**env, "VLLM_CPU_OMP_THREADS_BIND": str(core)})
            self.servers.append((process, f"http://127.0.0.1:{port}", f"tcp://127.0.0.1:{events_port}"))
        for process, url, _ in self.servers:
            wait_until(
                lambda url=url, process=process: process.poll() is not None or http_ok(f"{url}/health", 1.0),
                timeout_s=900, poll_s=1.0, on_timeout=lambda: RuntimeError("vLLM did not start"),
            )  # fmt: skip
            if process.poll() is not None:
                raise RuntimeError("vLLM exited while starting: see raylm-routing-engine-*.log")

    @property
    def urls(self) -> list[str]:
        return [url for _, url, _ in self.servers]

    @property
    def events(self) -> list[str]:
        return [events for _, _, events in self.servers]

    def reset(self) -> None:
        for url in self.urls:
            urllib.request.urlopen(urllib.request.Request(f"{url}/reset_prefix_cache", method="POST"), timeout=60)

    def counters(self) -> list[dict[str, float]]:
        """Each engine's requests, prefix-cache queries and hits (tokens)."""
        from prometheus_client.parser import text_string_to_metric_families

        found = []
        for url in self.urls:
            text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
            totals: dict[str, float] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    totals[sample.name] = totals.get(sample.name, 0) + sample.value
            found.append({
                "requests": totals.get("vllm:request_success_total", 0),
                "queries": totals.get("vllm:prefix_cache_queries_total", 0),
                "hits": totals.get("vllm:prefix_cache_hits_total", 0),
            })  # fmt: skip
        return found

    def close(self) -> None:
        for process, _, _ in self.servers:
            stop(process, signal.SIGTERM)


def raylm_front(engines: Engines, model: Path, policy: str) -> tuple[list[str], str]:
    port = free_port()
    command = [sys.executable, "-m", "raylm.serving.router", "--port", str(port), "--no-access-log"]
    command += ["--max-ongoing-requests", "1000", "--routing", policy]
    for url in engines.urls:
        command += ["--upstream", f"{MODEL}={url}"]
    if policy == "precise":
        command += ["--tokenizer", str(model), "--kv-events-follower", "raylm_vllm.events:follow"]
        for events in engines.events:
            command += ["--kv-events", events]
    return command, f"http://127.0.0.1:{port}"


def vllm_router_front(binary: str, engines: Engines, policy: str, block_size: int) -> tuple[list[str], str]:
    port = free_port()
    command = [binary, "--host", "127.0.0.1", "--port", str(port), "--policy", policy, "--worker-urls", *engines.urls]
    if policy == "kv_aware":
        command += ["--kv-event-block-size", str(block_size), "--kv-event-model", MODEL]
        for url, events in zip(engines.urls, engines.events):
            command += ["--kv-event-source", f"{url}={events}"]
    return command, f"http://127.0.0.1:{port}"


async def run(url: str, prompts: list[str], concurrency: int) -> tuple[list[float], int, float]:
    """Every prompt streamed through `url`, `concurrency` at once: (TTFTs, errors, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    queue = list(enumerate(prompts))
    ttfts: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        connection = Connection(host, int(port))
        while queue:
            _, prompt = queue.pop(0)
            payload = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": True, "temperature": 0}
            ttft = await connection.stream_completion("/v1/completions", payload)
            if ttft is None:
                errors += 1
                connection = Connection(host, int(port))
            else:
                ttfts.append(ttft)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfts, errors, time.perf_counter() - started


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workload", choices=("shared", "random"), default="shared")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--vllm-router", metavar="PATH", help="PyPI's vllm-router binary, to compare")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    model = build_smollm2(REPO / ".cache" / "models" / "smollm2-135m-instruct")
    config = json.loads((model / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    bytes_per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2  # bf16
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    prompts = workload(args.workload, args.tenants, args.requests, args.seed)
    system_tokens = len(tokenizer(prompts[0]).input_ids)
    # each cache holds about a quarter of the tenants' prompts: both together, about half
    cache_bytes = max(args.tenants // 4, 1) * system_tokens * bytes_per_token
    engines = Engines(model, cache_bytes, args.block_size)
    fronts = [("raylm least-in-flight", *raylm_front(engines, model, "least-in-flight"))]
    fronts += [(f"raylm {p}", *raylm_front(engines, model, p)) for p in ("approximate", "precise")]
    if args.vllm_router:
        fronts += [
            (f"vllm-router {p}", *vllm_router_front(args.vllm_router, engines, p, args.block_size))
            for p in ("round_robin", "cache_aware", "kv_aware")
        ]
    results = []
    try:
        for name, command, url in fronts:
            engines.reset()
            log = open(Path(tempfile.gettempdir()) / f"raylm-routing-{name.replace(' ', '-')}.log", "wb")  # noqa: SIM115
            front = start(command, log, {})
            try:
                wait_until(lambda url=url: http_ok(f"{url}/v1/models", 1.0), timeout_s=60, poll_s=0.3,
                           on_timeout=lambda name=name: RuntimeError(f"{name} did not start"))  # fmt: skip
                time.sleep(1.0)  # event subscriptions made
                before = engines.counters()
                ttfts, errors, seconds = asyncio.run(run(url, prompts, args.concurrency))
                after = engines.counters()
            finally:
                stop(front, signal.SIGTERM)
            queries = sum(a["queries"] - b["queries"] for a, b in zip(after, before))
            hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before))
            results.append({
                "front": name, "ttft_p50_ms": quantile(ttfts, 0.5), "ttft_p90_ms": quantile(ttfts, 0.9),
                "requests_per_s": len(ttfts) / seconds, "errors": errors, "hit_rate": hits / queries if queries else 0,
                "per_engine": [int(a["requests"] - b["requests"]) for a, b in zip(after, before)],
            })  # fmt: skip
            print(results[-1], flush=True)
    finally:
        engines.close()
    ideal = 0.0
    if args.workload == "shared":  # each tenant's system prompt prefilled once; the questions never hit
        repeats = len(prompts) - len({p[:200] for p in prompts})
        ideal = repeats * (system_tokens - 20) / (len(prompts) * system_tokens)
    print(
        f"\n{machine()}; SmolLM2-135M-Instruct x2 (one core each), {args.workload} workload: {args.tenants} "
        f"tenants, {len(prompts)} requests at c={args.concurrency}, prompts of ~{system_tokens} tokens, KV cache "
        f"{cache_bytes / 2**20:.0f} MiB each (~{args.tenants // 4} prompts); ideal hit rate {ideal:.2f}"
    )
    print(f"{'front':26}{'TTFT p50 ms':>12}{'p90 ms':>10}{'req/s':>8}{'hit rate':>10}{'per engine':>14}")
    for r in results:
        print(f"{r['front']:26}{r['ttft_p50_ms']:12.0f}{r['ttft_p90_ms']:10.0f}{r['requests_per_s']:8.2f}"
              f"{r['hit_rate']:10.2f}{str(r['per_engine']):>14}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "ideal_hit_rate": ideal, "results": results}))


if __name__ == "__main__":
    main()
