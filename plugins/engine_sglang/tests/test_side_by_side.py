"""One endpoint, two engines, two environments: vLLM from .venv and SGLang from .venv-sglang.

`raylm serve -f` starts both on one local Ray head; each model's replicas run in
its engine's own Python (Ray's py_executable). Talked to with the OpenAI client.
"""

import json
import os
import sys
import time

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sglang_setup import CPU_ARGS, CPU_ENV

from raylm.testing.cli import run_raylm
from raylm.testing.models import TINY_LLAMA_VLLM_ARGS
from raylm.testing.processes import processes_matching
from raylm.toolkit import free_port
from raylm_local.backend import ray_temp_dir

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, tiny_llama, sglang_python):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "RAYLM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    port = free_port("127.0.0.1")
    plan = home / "deploy.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "name": "pair",
                "server": {"port": port},
                "models": [
                    {
                        "model": str(tiny_llama),
                        "name": "tiny-vllm",
                        "engine": "vllm",
                        "engine_args": TINY_LLAMA_VLLM_ARGS,
                    },
                    {
                        "model": str(tiny_llama),
                        "name": "tiny-sglang",
                        "engine": "sglang",
                        "python": sglang_python,
                        "env": CPU_ENV,
                        "engine_args": list(CPU_ARGS),
                    },
                ],
            }
        )
    )
    run = run_raylm("serve", "-f", str(plan), "--detach", env=env)
    assert run.returncode == 0, run.stderr
    yield f"http://127.0.0.1:{port}"
    stopped = run_raylm("stop", "pair", env=env, timeout=300)
    assert stopped.returncode == 0, stopped.stderr
    assert processes_matching(str(ray_temp_dir(home, "pair"))) == []
    assert processes_matching("sglang.launch_server", "--served-model-name tiny-sglang ") == []


@pytest.fixture(scope="module")
def client(endpoint):
    return openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0)


def test_both_engines_answer_behind_one_endpoint(client):
    assert sorted(m.id for m in client.models.list()) == ["tiny-sglang", "tiny-vllm"]
    for model in ("tiny-vllm", "tiny-sglang"):
        response = client.completions.create(model=model, prompt="Hello world", max_tokens=6, temperature=0)
        assert response.model == model and response.usage.completion_tokens == 6


def engine_server(*needles):
    """The command line of the one engine server matching `needles` (not of the supervisor that runs it)."""
    (server,) = [line for line in processes_matching(*needles) if "raylm.supervise" not in line]
    return server


def test_the_replicas_run_in_their_engines_environments(sglang_python):
    assert sglang_python in engine_server("sglang.launch_server", "--served-model-name tiny-sglang ")
    assert sys.executable in engine_server("vllm.entrypoints", "--served-model-name tiny-vllm ")


def test_sglang_streams_deltas_and_counts_usage(client, endpoint):
    whole = client.completions.create(model="tiny-sglang", prompt="Hello world", max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny-sglang",
            prompt="Hello world",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].text, "stream chunks must be deltas that add up to the text"
    assert chunks[-1].usage.completion_tokens == 12
    with httpx.stream(
        "POST",
        f"{endpoint}/v1/completions",
        timeout=60,
        json={"model": "tiny-sglang", "prompt": "Hi", "max_tokens": 4, "stream": True},
    ) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all(json.loads(e)["model"] == "tiny-sglang" for e in events[:-1])


def test_sglang_chat_plain_and_streamed(client):
    messages = [{"role": "user", "content": "Hello there"}]
    reply = client.chat.completions.create(model="tiny-sglang", messages=messages, max_tokens=6, temperature=0)
    chunks = list(
        client.chat.completions.create(model="tiny-sglang", messages=messages, max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content


def test_sglang_errors_are_openai_shaped(client, endpoint):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-sglang", prompt="x", max_tokens=100000)
    response = httpx.post(
        f"{endpoint}/v1/completions", json={"model": "tiny-sglang", "prompt": "x", "max_tokens": "many"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"] and "type" in error and "code" in error


def routing_blocks(endpoint, model):
    text = httpx.get(f"{endpoint}/metrics").text
    return {
        name: sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                  if s.name == f"raylm_routing_{name}_blocks_total" and s.labels["model"] == model)
        for name in ("prompt", "held")
    }  # fmt: skip


@pytest.mark.parametrize("model", ["tiny-sglang", "tiny-vllm"])
def test_each_engines_kv_cache_events_tell_the_router_what_its_replica_holds(client, endpoint, model):
    # Both engines route precisely by default: the router follows each one's events (one stream format).
    assert httpx.get(f"{endpoint}/v1/models/{model}").json()["routing"] == "precise"
    prompt = " ".join(f"rule {n}: answer briefly." for n in range(20))  # 290 tokens
    client.completions.create(model=model, prompt=prompt, max_tokens=2)
    before = routing_blocks(endpoint, model)
    time.sleep(0.5)  # the engine's events reach the router (ZeroMQ: milliseconds)
    client.completions.create(model=model, prompt=prompt + " Again?", max_tokens=2)
    after = routing_blocks(endpoint, model)
    routed, held = after["prompt"] - before["prompt"], after["held"] - before["held"]
    assert routed > 0 and held >= 0.9 * routed, (routed, held)  # all the prompt but the new question
