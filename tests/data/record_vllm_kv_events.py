"""How tests/data/vllm-0.32-kv-events.msgpack was made: a real vLLM server (the tiny Llama, blocks of 32
tokens, a small KV cache) publishing its KV-cache events while it answers prompts with a shared prefix,
then a prefix-cache reset, then enough other prompts to evict blocks. The prefix index's tests replay it.
Run again with `.venv/bin/python tests/data/record_vllm_kv_events.py` (a minute or two)."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import zmq
from transformers import AutoTokenizer

from raylm.testing.models import build_tiny_llama
from raylm.toolkit import free_port, wait_until

BLOCK_SIZE = 32
SYSTEM = "You are a helpful assistant for the tenant alpha. " * 12
PROMPTS = [SYSTEM + "What is the capital of France?", SYSTEM + "Name three colours.", "the cat sat on the mat " * 8]


def main() -> None:
    model = build_tiny_llama(Path(".cache/models/tiny-llama"))
    port, events_port = free_port(), free_port()
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}"}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
        "tiny", "--port", str(port), "--max-model-len", "512", "--dtype", "float32", "--kv-cache-memory-bytes",
        str(16 * 2**20), "--optimization-level", "0", "--block-size", str(BLOCK_SIZE), "--kv-events-config",
        json.dumps(config),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": "1"}  # dev mode: /reset_prefix_cache
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    messages: list[list[bytes]] = []
    subscriber = zmq.Context.instance().socket(zmq.SUB)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.connect(f"tcp://127.0.0.1:{events_port}")
    stopping = threading.Event()

    def listen() -> None:
        while not stopping.is_set():
            if subscriber.poll(100):
                messages.append(subscriber.recv_multipart())

    def post(path: str, body: dict | None = None) -> None:
        data = json.dumps(body).encode() if body else b""
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST")
        request.add_header("content-type", "application/json")
        urllib.request.urlopen(request, timeout=120).read()

    def healthy() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
        except OSError:
            return False
        return True

    threading.Thread(target=listen, daemon=True).start()
    try:
        wait_until(healthy, timeout_s=600, poll_s=0.5, on_timeout=lambda: RuntimeError("vLLM did not start"))
        for prompt in PROMPTS:
            post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0})
        time.sleep(1)
        before_reset = len(messages)
        post("/reset_prefix_cache")
        time.sleep(1)
        post("/v1/completions", {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
        for index in range(40):  # fill the small cache: blocks are evicted (BlockRemoved)
            post("/v1/completions", {"model": "tiny", "prompt": f"filler {index} " * 60, "max_tokens": 2})
        time.sleep(1)
    finally:
        stopping.set()
        server.terminate()
        server.wait(60)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    recording = {
        "block_size": BLOCK_SIZE,
        "prompts": PROMPTS,
        "prompt_tokens": [tokenizer(prompt).input_ids for prompt in PROMPTS],
        "messages_before_reset": before_reset,
        "messages": messages,
    }
    Path(__file__).with_name("vllm-0.32-kv-events.msgpack").write_bytes(msgpack.packb(recording, use_bin_type=True))
    print(f"{len(messages)} messages recorded, {before_reset} before the reset")


if __name__ == "__main__":
    main()
