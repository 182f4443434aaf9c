"""Replicas follow the load: real Ray Serve autoscaling, real vLLM, through raylm's router.

A tiny Llama served with `autoscaling: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 2}`:
six streams at a time bring a second replica, which takes traffic; with one stream left, the
second replica goes again, drained, so no stream is cut on the way up or down.
"""

import os

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from servetools import Streams, free_port, leftovers, run_cli

from raylm.testing.models import TINY_LLAMA_VLLM_ARGS
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


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, tiny_llama):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "RAYLM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    port = free_port()
    plan = home / "deploy.yaml"
    model = {"model": str(tiny_llama), "name": "tiny", "autoscaling": AUTOSCALING, "engine_args": TINY_LLAMA_VLLM_ARGS}
    plan.write_text(yaml.safe_dump({"name": "elastic", "server": {"port": port}, "models": [model]}))
    started = run_cli("serve", "-f", str(plan), "--detach", env=env)
    assert started.returncode == 0, started.stderr
    assert "tiny: 1-2 replicas, autoscaled (2 requests each)" in started.stderr
    yield f"http://127.0.0.1:{port}"
    stopped = run_cli("stop", "elastic", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert leftovers(ray_temp_dir(home, "elastic"), "elastic", "tiny") == []


def replicas(endpoint):
    return httpx.get(f"{endpoint}/v1/models").json()["data"][0]["replicas"]


def replicas_serving(endpoint):
    """The replicas with requests in flight now, as the router's metrics say."""
    scraped = httpx.get(f"{endpoint}/metrics").text
    return {
        sample.labels["replica"]
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
        if sample.name == "raylm_replica_requests_in_flight" and sample.value > 0
    }


def wait_for_replicas(endpoint, count, timeout_s):
    wait_until(
        lambda: replicas(endpoint) == count,
        timeout_s=timeout_s,
        poll_s=1.0,
        on_timeout=lambda: AssertionError(f"{replicas(endpoint)} replicas after {timeout_s}s, not {count}"),
    )


def test_the_load_brings_a_replica_and_takes_it_away_without_cutting_a_stream(endpoint):
    assert replicas(endpoint) == 1
    busy = Streams(endpoint, "tiny", count=6)
    try:
        wait_for_replicas(endpoint, 2, timeout_s=300)
        wait_until(
            lambda: len(replicas_serving(endpoint)) == 2,
            timeout_s=30,
            poll_s=0.2,
            on_timeout=lambda: AssertionError(f"only {replicas_serving(endpoint)} serve requests"),
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
