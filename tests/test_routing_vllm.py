"""Precise prefix routing in front of two real vLLM servers: their own KV-cache events (ZeroMQ) tell the
router what each holds, and the engines' own prefix-cache counters show the requests landed where their
prefix was."""

import json
import os
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from routertools import Routing as RouterThread

from raylm.model_settings import Routing
from raylm.net import ENGINE_SERVER_PORTS, KV_EVENTS_PORTS, free_ports_in, http_ok
from raylm.serving.kv_events import FOLLOWER
from raylm.serving.policy import make_policy
from raylm.waiting import wait_until

pytestmark = pytest.mark.engine

BLOCK = 32
ARGS = ["--max-model-len", "512", "--dtype", "float32", "--kv-cache-memory-bytes", str(32 * 2**20)]
ARGS += ["--optimization-level", "0", "--block-size", str(BLOCK)]


@pytest.fixture(scope="module")
def engines(tiny_llama):
    started = []
    for _ in range(2):
        (port,) = free_ports_in(ENGINE_SERVER_PORTS)
        (events_port,) = free_ports_in(KV_EVENTS_PORTS)
        config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}"}
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(tiny_llama),
            "--served-model-name",
            "tiny",
            "--port",
            str(port),
            *ARGS,
            "--kv-events-config",
            json.dumps(config),
        ]
        # one core each, as the routing benchmark runs them
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(len(started) % (os.cpu_count() or 1))}
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append((server, f"http://127.0.0.1:{port}", f"tcp://127.0.0.1:{events_port}"))
    try:
        for server, url, _ in started:
            wait_until(
                lambda url=url, server=server: server.poll() is not None or http_ok(f"{url}/health", 1.0),
                timeout_s=600, poll_s=1.0, on_timeout=lambda: AssertionError("vLLM did not start"),
            )  # fmt: skip
            assert server.poll() is None, "vLLM exited while starting"
        yield [(url, events) for _, url, events in started]
    finally:
        for server, _, _ in started:
            server.terminate()
        for server, _, _ in started:
            server.wait(60)


def counters(url):
    """(requests finished, prefix-cache hit tokens) of one engine, from its own metrics."""
    found = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            found[sample.name] = found.get(sample.name, 0) + sample.value
    return found.get("vllm:request_success_total", 0), found.get("vllm:prefix_cache_hits_total", 0)


def test_each_tenant_lands_where_its_prefix_is_and_the_engines_hit_their_cache(engines, tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    policy = make_policy(Routing("precise"), str(tiny_llama))
    router = RouterThread(["tiny"], policies={"tiny": policy})
    with router:
        for number, (url, events) in enumerate(engines):
            router.call(router.table.register, "tiny", url, f"e{number}", None, None,
                        (events, FOLLOWER))  # fmt: skip
        for name in ("alpha", "beta", "gamma", "delta"):
            system = f"You are the assistant of the team {name}, and you answer briefly. " * 8
            before = [counters(url) for url, _ in engines]
            for question in range(3):
                body = {"model": "tiny", "prompt": system + f"Question {question}?", "max_tokens": 2}
                assert httpx.post(f"{router.url}/v1/completions", json=body, timeout=60).status_code == 200
                if question == 0:  # the events of the first reach the router before the next is routed
                    wait_until(lambda: policy.index.blocks() > 0, timeout_s=10, poll_s=0.05,
                               on_timeout=lambda: AssertionError("no KV-cache event reached the router"))  # fmt: skip
            after = [counters(url) for url, _ in engines]
            served = [a[0] - b[0] for a, b in zip(after, before)]
            hits = sum(a[1] - b[1] for a, b in zip(after, before))
            assert sorted(served) == [0, 3], f"tenant {name}'s requests went to both engines: {served}"
            shared_blocks = len(tokenizer(system).input_ids) // BLOCK - 1  # whole blocks of the system prompt
            assert shared_blocks >= 2
            assert hits >= 2 * shared_blocks * BLOCK, f"tenant {name}: {hits} tokens from the engines' caches"
        assert policy.index.block_size == BLOCK
        holders = set(policy.index.engine_keys)
        assert holders == {"e0", "e1"}  # both engines hold some tenants
        router.call(router.table.deregister, "e1")  # the replica leaves (its engine restarts, say)
        assert set(policy.index.engine_keys) == {"e0"}
