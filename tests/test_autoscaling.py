"""Replicas follow the load: real Ray Serve autoscaling, real vLLM, through raylm's router.

A tiny Llama served with `autoscaling: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 2}`:
six streams at a time bring a second replica, which takes traffic; with one stream left, the
second replica goes again, drained, so no stream is cut on the way up or down. Beside it in the
same deployment, the same model with `min_replicas: 0`: no replica until its first request, which
starts one and is answered; idle again, it goes back to none.
"""

import os
import re
import time

import httpx
import openai
import pytest
import yaml
from servetools import Streams, free_port, leftovers, run_cli

from raylm.testing.models import TINY_LLAMA_VLLM_ARGS
from raylm.testing.processes import processes_matching
from raylm.testing.replicas import replicas_registered, replicas_serving
from raylm.waiting import wait_until
from raylm_local.backend import ray_temp_dir

pytestmark = pytest.mark.engine

AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 0,
    "downscale_delay_s": 10,
}
SCALED_TO_ZERO = {"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 5, "scale_from_zero_timeout_s": 300}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_llama):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "RAYLM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    port = free_port()
    plan = home / "deploy.yaml"
    model = {"model": str(tiny_llama), "engine_args": TINY_LLAMA_VLLM_ARGS}
    models = [
        {**model, "name": "tiny", "autoscaling": AUTOSCALING},
        {**model, "name": "idle", "autoscaling": SCALED_TO_ZERO},
    ]
    plan.write_text(yaml.safe_dump({"name": "elastic", "server": {"port": port}, "models": models}))
    started = run_cli("serve", "-f", str(plan), "--detach", env=env)
    assert started.returncode == 0, started.stderr
    assert "tiny: 1-2 replicas, autoscaled (2 requests each)" in started.stderr
    assert "idle: 0-1 replicas, autoscaled" in started.stderr
    yield {"url": f"http://127.0.0.1:{port}", "env": env}
    stopped = run_cli("stop", "elastic", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert leftovers(ray_temp_dir(home, "elastic"), "elastic", "tiny", "idle") == []


def wait_for_replicas(endpoint, count, timeout_s, model="tiny"):
    wait_until(
        lambda: replicas_registered(endpoint, model) == count,
        timeout_s=timeout_s,
        poll_s=1.0,
        on_timeout=lambda: AssertionError(f"{model}: {replicas_registered(endpoint, model)} replicas, not {count}"),
    )


def test_the_load_brings_a_replica_and_takes_it_away_without_cutting_a_stream(deployment):
    endpoint = deployment["url"]
    assert replicas_registered(endpoint, "tiny") == 1
    busy = Streams(endpoint, "tiny", count=6)
    try:
        wait_for_replicas(endpoint, 2, timeout_s=300)
        wait_until(
            lambda: len(replicas_serving(endpoint, "tiny")) == 2,
            timeout_s=30,
            poll_s=0.2,
            on_timeout=lambda: AssertionError(f"only {replicas_serving(endpoint, 'tiny')} serve requests"),
        )
    finally:
        upscaled = busy.stop()
    light = Streams(endpoint, "tiny", count=1)  # one stream at a time: one replica is enough
    try:
        wait_for_replicas(endpoint, 1, timeout_s=180)
    finally:
        downscaled = light.stop()
    assert set(upscaled) == {"whole"} and len(upscaled) > 20, upscaled
    assert set(downscaled) == {"whole"} and len(downscaled) > 5, "a stream was cut while a replica went away"


def idle_engines():
    return processes_matching("vllm.entrypoints", "--served-model-name idle ")


def status_lines(deployment):
    return run_cli("status", "elastic", env=deployment["env"]).stdout.splitlines()[1:]


def test_a_model_scaled_to_zero_starts_for_its_first_request_and_goes_back_to_zero(deployment):
    endpoint = deployment["url"]
    tiny, idle = status_lines(deployment)  # tiny's second replica may still be stopping: "1 stopping, 1 running"
    shown = r"  tiny: (\d+ \w+, )*1 running(, \d+ \w+)* \(1-2 replicas, autoscaled; routing precise\)"
    assert re.fullmatch(shown, tiny), tiny
    assert idle == "  idle: no replica (0-1 replicas, autoscaled; routing precise)"
    ready = httpx.get(f"{endpoint}/ready")
    assert ready.status_code == 200 and ready.json()["scaled_to_zero"] == ["idle"]
    assert replicas_registered(endpoint, "idle") == 0 and idle_engines() == []
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0, timeout=300)
    started = time.monotonic()
    answer = client.completions.create(model="idle", prompt="Hello", max_tokens=8, temperature=0)
    print(f"scaled to zero: first answer after {time.monotonic() - started:.1f}s")
    assert answer.choices[0].text and answer.usage.completion_tokens == 8
    assert replicas_registered(endpoint, "idle") == 1
    assert "  idle: 1 running (0-1 replicas, autoscaled; routing precise)" in status_lines(deployment)
    wait_for_replicas(endpoint, 0, timeout_s=120, model="idle")
    wait_until(
        lambda: idle_engines() == [],
        timeout_s=60,
        poll_s=1.0,
        on_timeout=lambda: AssertionError("the idle model's engine is still running"),
    )
    assert httpx.get(f"{endpoint}/ready").json()["scaled_to_zero"] == ["idle"]
