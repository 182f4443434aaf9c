"""Routing by prefix, measured: a multi-tenant workload against two vLLM servers whose KV caches each hold
about half of the tenants' system prompts (both together: all of them, if each tenant keeps to one), through
each front in turn.

    .venv/bin/python bench/routing.py [--tenants 16] [--requests 320] [--concurrency 4] [--system-words 450]
        [--vllm-router PATH] [--workload shared|chat|random|hot] [--json FILE]

Two vLLM servers of SmolLM2-135M-Instruct, each bound to a core of its own, prefix caching on, their
KV-cache events published (ZeroMQ) and their caches reset between fronts (`/reset_prefix_cache`,
vLLM's dev mode). The workloads:
- `shared`: T tenants, each a system prompt of its own (`--system-words`, about a token a word) and
  short questions, the tenant of each request drawn at random (seeded);
- `chat`: each request the next turn of its tenant's conversation (the history grows by each
  question and an answer);
- `random`: prompts of the same length that share nothing (what a policy costs where it cannot help);
- `hot`: one tenant's prompt only (run it at a concurrency one replica cannot carry alone, 16).

The fronts: raylm's router (`least-in-flight`, `approximate`, `precise`) and, with `--vllm-router
PATH` (PyPI's `vllm-router`, installed in a venv of its own), its `round_robin`, `cache_aware` and
`kv_aware` (the same events). For each: TTFT p50 and p90, requests/s, the engines' own prefix-cache
hit rate (`vllm:prefix_cache_hits` over `vllm:prefix_cache_queries`), requests per engine, the
front's CPU per request (tokenizing included), and the hit rate an ideal front would reach
(each prompt finding all it shares with its tenant's earlier ones cached, in whole blocks).
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

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import Connection  # noqa: E402
from servers import machine, start, stop  # noqa: E402

from raylm.net import ENGINE_SERVER_PORTS, KV_EVENTS_PORTS, free_port, free_ports_in, http_ok  # noqa: E402
from raylm.serving.kv_events import FOLLOWER  # noqa: E402
from raylm.testing.models import build_smollm2  # noqa: E402
from raylm.waiting import wait_until  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "smol"
WORDS = ("alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "market", "garden", "silver", "orbit", "lantern",
         "meadow", "signal", "harbor")  # fmt: skip


def workload(kind: str, tenants: int, requests: int, words: int, seed: int) -> list[tuple[int, str]]:
    """(tenant, prompt) of each request, in order; system prompts of `words` words (about a token each)."""
    rng = random.Random(seed)
    systems = [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(tenants)]
    histories = list(systems)  # chat: each tenant's conversation so far
    prompts = []
    for number in range(requests):
        question = f" Question {number}: what is {rng.choice(WORDS)} to {rng.choice(WORDS)}?"
        tenant = 0 if kind == "hot" else rng.randrange(tenants)
        if kind == "random":
            prompts.append((number, " ".join(rng.choice(WORDS) for _ in range(words)) + question))
        elif kind == "chat":  # the conversation grows by each question and a (made-up) answer
            prompts.append((tenant, histories[tenant] + question))
            histories[tenant] += f"{question} Answer: {rng.choice(WORDS)} and {rng.choice(WORDS)}."
        else:
            prompts.append((tenant, systems[tenant] + question))
    return prompts


def ideal_hit_rate(tokens: list[tuple[int, list[int]]], block_size: int) -> float:
    """The engines' hit rate if each tenant's earlier prompts were all still cached where its next one goes:
    per prompt, the longest prefix it shares with an earlier prompt of its tenant, in whole blocks."""
    seen: dict[int, list[list[int]]] = {}
    hits = total = 0
    for tenant, ids in tokens:
        shared = 0
        for earlier in seen.get(tenant, []):
            common = next((i for i, (a, b) in enumerate(zip(ids, earlier)) if a != b), min(len(ids), len(earlier)))
            shared = max(shared, common)
        hits += min(shared, len(ids) - 1) // block_size * block_size  # the last token is always computed
        total += len(ids)
        seen.setdefault(tenant, []).append(ids)
    return hits / total


class Engines:
    """Two vLLM servers, one core each, events published."""

    def __init__(self, model: Path, kv_cache_bytes: int, block_size: int, max_model_len: int):
        self.servers = []
        env = {"VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": "1"}
        for core in range(2):
            (port,) = free_ports_in(ENGINE_SERVER_PORTS)
            (events_port,) = free_ports_in(KV_EVENTS_PORTS)
            config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}"}
            command = [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--served-model-name", MODEL, "--port", str(port), "--max-model-len", str(max_model_len),
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
        command += ["--tokenizer", str(model), "--kv-events-follower", FOLLOWER]
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


def settle(process: psutil.Process) -> None:
    """Until `process` uses less than 5% of a core over a second."""
    busy: list[float] = []

    def idle() -> bool:
        busy.append(sum(process.cpu_times()[:2]))
        return len(busy) > 1 and busy[-1] - busy[-2] < 0.05

    wait_until(idle, timeout_s=120, poll_s=1.0, on_timeout=lambda: RuntimeError("the front stays busy"))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=16)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workload", choices=("shared", "chat", "random", "hot"), default="shared")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--system-words", type=int, default=450, help="each tenant's system prompt, in words")
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
    requests = workload(args.workload, args.tenants, args.requests, args.system_words, args.seed)
    prompts = [prompt for _, prompt in requests]
    tokens = [(tenant, tokenizer(prompt).input_ids) for tenant, prompt in requests]
    system_tokens = len(tokens[0][1])
    # each cache holds about half of the tenants' prompts, and room for the requests it runs
    cache_prompts = max(args.tenants // 2, 1) + args.concurrency // 2
    cache_bytes = cache_prompts * system_tokens * bytes_per_token
    longest = max(len(ids) for _, ids in tokens) + 64  # and the answer
    engines = Engines(model, cache_bytes, args.block_size, max_model_len=-(-longest // 512) * 512)
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
            log = open(Path(tempfile.gettempdir()) / f"raylm-routing-{name.replace(' ', '-')}.log", "wb")  # noqa: SIM115
            front = start(command, log, {})
            front_process = psutil.Process(front.pid)
            try:
                wait_until(lambda url=url: http_ok(f"{url}/v1/models", 1.0), timeout_s=60, poll_s=0.3,
                           on_timeout=lambda name=name: RuntimeError(f"{name} did not start"))  # fmt: skip
                settle(front_process)  # its start-up work done (raylm precise: its tokenizer loaded)
                asyncio.run(run(url, ["warm-up " * 50], 1))  # connections made
                engines.reset()
                time.sleep(1.0)  # the engines' events of the reset reached the front
                before, cpu_before = engines.counters(), sum(front_process.cpu_times()[:2])
                ttfts, errors, seconds = asyncio.run(run(url, prompts, args.concurrency))
                after, cpu_after = engines.counters(), sum(front_process.cpu_times()[:2])
            finally:
                stop(front, signal.SIGTERM)
            queries = sum(a["queries"] - b["queries"] for a, b in zip(after, before))
            hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before))
            results.append({
                "front": name, "ttft_p50_ms": quantile(ttfts, 0.5), "ttft_p90_ms": quantile(ttfts, 0.9),
                "requests_per_s": len(ttfts) / seconds, "errors": errors, "hit_rate": hits / queries if queries else 0,
                "per_engine": [int(a["requests"] - b["requests"]) for a, b in zip(after, before)],
                "front_cpu_ms_per_request": 1000 * (cpu_after - cpu_before) / len(prompts),
            })  # fmt: skip
            print(results[-1], flush=True)
    finally:
        engines.close()
    ideal = ideal_hit_rate(tokens, args.block_size)
    print(
        f"\n{machine()}; SmolLM2-135M-Instruct x2 (one core each), {args.workload} workload: {args.tenants} "
        f"tenants, {len(prompts)} requests at c={args.concurrency}, prompts of ~{system_tokens} tokens, KV cache "
        f"{cache_bytes / 2**20:.0f} MiB each (~{cache_prompts} prompts); ideal hit rate {ideal:.2f}"
    )
    print(f"{'front':26}{'TTFT p50 ms':>12}{'p90 ms':>10}{'req/s':>8}{'hit rate':>10}{'per engine':>14}"
          f"{'CPU ms/req':>12}")  # fmt: skip
    for r in results:
        print(f"{r['front']:26}{r['ttft_p50_ms']:12.0f}{r['ttft_p90_ms']:10.0f}{r['requests_per_s']:8.2f}"
              f"{r['hit_rate']:10.2f}{str(r['per_engine']):>14}{r['front_cpu_ms_per_request']:12.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "ideal_hit_rate": ideal, "results": results}))


if __name__ == "__main__":
    main()
