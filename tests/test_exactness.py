"""raylm returns exactly what the engine returns.

One deployment serves the demo's models (`examples/demo.yaml`: SmolLM2-135M-Instruct and MiniLM on
vLLM) and SmolLM2 on SGLang from its own environment. Every request below is sent through raylm
and, unchanged, to the very engine server behind it on its own port; the answers must be equal,
field for field (each response's id and timestamp aside), streamed (chunks joined) and not. The
same comparison through a relay that flips one byte of the response fails, so the check can fail.
"""

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest
import yaml
from servetools import free_port, leftovers, run_cli

from raylm.testing.processes import engine_behind
from raylm_local.backend import ray_temp_dir

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "plugins" / "engine_sglang" / "tests"))  # SGLang's test environment
from sglang_setup import CPU_ARGS, CPU_ENV, SGLANG_PYTHON  # noqa: E402

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
COMPLETIONS = {
    "greedy": {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0},
    "stop strings": {"prompt": "Three fruits: apples,", "max_tokens": 24, "temperature": 0, "stop": [".", "\n"]},
    "n=2 with a seed": {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.8, "seed": 1234, "n": 2},
    "logprobs": {"prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0, "logprobs": 3},
    "echo": {"prompt": "Paris is", "max_tokens": 8, "temperature": 0, "echo": True},
}
CHATS = {
    "greedy": {"messages": CAPITAL, "max_tokens": 24, "temperature": 0},
    "top logprobs": {"messages": CAPITAL, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 3},
    "n=2 with a seed": {"messages": CAPITAL, "max_tokens": 12, "temperature": 0.7, "seed": 7, "n": 2},
    "json schema": {
        "messages": [{"role": "user", "content": "Describe a person as JSON with a name and an age."}],
        "max_tokens": 40,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}},
    },
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, smollm2, minilm_model):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "RAYLM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    demo = yaml.safe_load((REPO / "examples/demo.yaml").read_text())
    for model in demo["models"]:  # the demo's models, where scripts/demo puts them
        model["model"] = {"smollm2": str(smollm2), "minilm": str(minilm_model)}[model["name"]]
    demo["models"].append(
        {
            "model": str(smollm2),
            "name": "smollm2-sglang",
            "engine": "sglang",
            "python": str(SGLANG_PYTHON),
            "env": CPU_ENV,
            "engine_args": list(CPU_ARGS),
        }
    )
    port = free_port()
    demo.update(name="exact", server={"host": "127.0.0.1", "port": port})
    plan = home / "exact.yaml"
    plan.write_text(yaml.safe_dump(demo))
    started = run_cli("serve", "-f", str(plan), "--detach", env=env)
    assert started.returncode == 0, started.stderr
    yield f"http://127.0.0.1:{port}"
    stopped = run_cli("stop", "exact", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert leftovers(ray_temp_dir(home, "exact"), "exact", "smollm2", "minilm") == []


def client(url, api_key="unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=300)


def answer(server, kind, model, request, stream):
    """The response from `server` (a URL, or a URL and a key), as comparable data: every field but the
    response's id and creation time; a stream as its chunks joined per choice (text, finish reason,
    logprobs token by token: SGLang groups a stream's tokens into chunks as its timing falls) and its
    usage."""
    talk = client(server) if isinstance(server, str) else client(*server)
    api = talk.completions if kind == "completions" else talk.chat.completions
    if not stream:
        return api.create(model=model, **request).model_dump(exclude={"id", "created"})
    choices, usage = {}, None
    for chunk in api.create(model=model, stream=True, stream_options={"include_usage": True}, **request):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            joined = choices.setdefault(choice.index, {"text": "", "finish_reason": None, "logprobs": {}})
            piece = choice.text if kind == "completions" else (choice.delta.content or "")
            joined["text"] += piece
            joined["finish_reason"] = choice.finish_reason or joined["finish_reason"]
            if choice.logprobs is not None:  # per token, however the engine grouped tokens into chunks
                for key, value in choice.logprobs.model_dump().items():
                    joined["logprobs"].setdefault(key, []).extend(value if isinstance(value, list) else [value])
    return {"choices": choices, "usage": usage.model_dump() if usage else None}


END_TOKEN = "<|im_end|>"  # SmolLM2's chat template ends a turn with it
CASES = [("completions", name) for name in COMPLETIONS] + [("chat", name) for name in CHATS]
ENGINE_MODELS = {"vllm": "smollm2", "sglang": "smollm2-sglang"}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("kind, case", CASES, ids=[f"{kind}: {case}" for kind, case in CASES])
@pytest.mark.parametrize("engine", ENGINE_MODELS)
def test_raylm_answers_exactly_what_the_engine_answers(deployment, engine, kind, case, stream):
    model = ENGINE_MODELS[engine]
    request = (COMPLETIONS if kind == "completions" else CHATS)[case]
    ours = answer(deployment, kind, model, request, stream)
    theirs = answer(engine_behind(model), kind, model, request, stream)
    if "seed" in request and answer(engine_behind(model), kind, model, request, stream) != theirs:
        # SGLang on CPU samples n > 1 choices differently each time, seed or not: nothing to compare with.
        pytest.skip(f"{engine}'s own server answers this seeded request differently each time")
    if engine == "sglang" and "logprobs" in case:
        # SGLang's logprobs differ (by more than 1e-4 at times) between two identical requests to its server
        # (its CPU kernels are not bit-reproducible): its text and tokens must still be exact. And its own
        # server streams the logprobs of the chat's end token in some answers and not in others (4 of 15
        # identical requests, 2026-12-04): that one entry is not compared.
        assert same_but_floats(without_end_token(ours), without_end_token(theirs), tolerance=1e-3)
    else:
        assert ours == theirs


def without_end_token(answer):
    """`answer` without the logprobs entry of SmolLM2's end-of-turn token at the end of a choice's."""
    for choice in answer["choices"].values() if isinstance(answer["choices"], dict) else answer["choices"]:
        content = (choice.get("logprobs") or {}).get("content") or []
        if content and content[-1]["token"] == END_TOKEN:
            content.pop()
    return answer


def same_but_floats(a, b, tolerance):
    """Equal, floats within `tolerance` of each other (relative, or absolute near 0)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_but_floats(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_but_floats(x, y, tolerance) for x, y in zip(a, b))
    return a == b


def test_the_chat_model_knows_the_capital_of_france(deployment):
    reply = client(deployment).chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=24, temperature=0)
    assert "Paris" in reply.choices[0].message.content


def test_the_demo_client_prints_real_answers(deployment):
    shown = subprocess.run(
        [sys.executable, str(REPO / "examples/client.py"), f"{deployment}/v1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    answer_line = lines[lines.index("Q: What is the capital of France?") + 1]
    assert "Paris" in answer_line, shown.stdout
    similarity = {line.split("  ")[2]: float(line.split()[0]) for line in lines if line.startswith("  0.")}
    assert similarity["'a kitten rests on a rug'"] > similarity["'the stock market fell sharply'"] + 0.3


class ByteFlippingRelay:
    """A TCP relay that flips the case of one letter of the first generated text it passes on."""

    MARKERS = (b'"text":"', b'"content":"')

    def __init__(self, upstream):
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()

    async def _relay(self, client_reader, client_writer):
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)

        async def pipe(reader, writer, flip):
            flipped = not flip
            while data := await reader.read(65536):
                if not flipped:
                    data, flipped = self._flip(data)
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(
            pipe(client_reader, upstream_writer, flip=False),
            pipe(upstream_reader, client_writer, flip=True),
            return_exceptions=True,
        )

    def _flip(self, data):
        for marker in self.MARKERS:
            start = data.find(marker)
            while start >= 0:
                index = start + len(marker)
                if index < len(data) and chr(data[index]).isalpha():
                    return data[:index] + bytes([data[index] ^ 0x20]) + data[index + 1 :], True
                start = data.find(marker, index)
        return data, False

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_relay_that_changes_one_byte_is_caught(deployment, stream):
    relay = ByteFlippingRelay(deployment)
    try:
        request = CHATS["greedy"]
        corrupted = answer(f"http://127.0.0.1:{relay.port}", "chat", "smollm2", request, stream)
    finally:
        relay.close()
    assert corrupted != answer(engine_behind("smollm2"), "chat", "smollm2", request, stream)
    assert json.dumps(corrupted) != json.dumps(answer(deployment, "chat", "smollm2", request, stream))
