"""raylm end to end: real Ray, real vLLM on CPU, the official OpenAI client.

One deployment is shared by the module (engine starts take minutes here):
`raylm serve -f --detach` with a tiny Llama (2 replicas) and MiniLM behind one
endpoint that wants an API key; the module ends with `raylm stop`, which must
leave nothing running.
"""

import json
import math
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from servetools import Streams, assert_port_free, free_port, leftovers, run_cli

from raylm.testing.models import TINY_LLAMA_VLLM_ARGS
from raylm.testing.processes import engine_behind
from raylm_local.backend import ray_temp_dir as local_ray_temp_dir

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_llama, minilm_model):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "RAYLM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    port = free_port()
    key = secrets.token_urlsafe(24)
    key_file = home / "endpoint.keys"
    key_file.write_text(f"# the e2e endpoint's keys\n{key}\n")
    plan = home / "deploy.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "name": "e2e",
                "server": {"port": port, "api_key_file": "endpoint.keys"},  # relative to the file
                "models": [
                    {
                        "model": str(tiny_llama),
                        "name": "tiny-e2e",
                        "replicas": 2,
                        "engine_args": TINY_LLAMA_VLLM_ARGS,
                        "routing": {"policy": "precise"},
                    },  # fmt: skip
                    {
                        "model": str(minilm_model),
                        "name": "minilm-e2e",
                        "engine_args": {"kv_cache_memory_bytes": 64 * 2**20, "optimization_level": 0},
                    },
                ],
            }
        )
    )
    started = run_cli("serve", "-f", str(plan), "--detach", env=env)
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == f"http://127.0.0.1:{port}/v1"
    ray_temp_dir = local_ray_temp_dir(home, "e2e")
    yield {
        "url": f"http://127.0.0.1:{port}",
        "port": port,
        "env": env,
        "ray_temp_dir": ray_temp_dir,
        "progress": started.stderr,
        "home": home,
        "key": key,
        "headers": bearer(key),
    }

    streams = Streams(f"http://127.0.0.1:{port}", "tiny-e2e", count=8, headers=bearer(key))  # all along the stop
    stopped = run_cli("stop", "e2e", env=env)
    outcomes = streams.stop()
    assert stopped.returncode == 0, stopped.stderr
    assert "draining: new requests get 503, those taken finish" in stopped.stderr
    assert "cut" not in outcomes, f"a stream was cut by the stop: {outcomes}"
    assert outcomes.count("whole") >= 8 and "shutting_down" in outcomes, outcomes
    assert "did not stop" not in stopped.stderr, "Ray's processes had to be killed"
    assert leftovers(ray_temp_dir, "e2e", "tiny-e2e", "minilm-e2e") == []
    assert_port_free(port)
    assert run_cli("status", env=env).stdout.strip() == "no deployments running"


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def client(deployment):
    return openai.OpenAI(base_url=f"{deployment['url']}/v1", api_key=deployment["key"], max_retries=0)


def test_progress_was_shown_while_starting(deployment):
    lines = deployment["progress"].splitlines()
    assert any("starting a local Ray head" in line for line in lines)
    assert any(line.startswith("raylm: tiny-e2e: running") for line in lines)
    assert not any("INFO" in line or "Traceback" in line for line in lines)


def test_models_are_listed(client):
    models = {m.id: m for m in client.models.list()}
    assert sorted(models) == ["minilm-e2e", "tiny-e2e"]
    assert models["tiny-e2e"].owned_by == "raylm"
    assert models["tiny-e2e"].model_extra["max_model_len"] == 512
    assert models["tiny-e2e"].model_extra["replicas"] == 2


def test_completion(client):
    response = client.completions.create(model="tiny-e2e", prompt="Hello world", max_tokens=8, temperature=0)
    assert response.model == "tiny-e2e"
    assert response.usage.completion_tokens == 8 and response.usage.prompt_tokens > 0
    # (Random weights: 8 tokens may not even decode to one whole character, so the text may be empty.)
    assert response.choices[0].finish_reason == "length"


def test_streamed_completion_delivers_every_chunk_and_done(deployment, client):
    streamed = list(
        client.completions.create(
            model="tiny-e2e",
            prompt="Hello world",
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(chunk.choices[0].text for chunk in streamed if chunk.choices)
    assert streamed[-1].usage.completion_tokens == 16
    whole = client.completions.create(model="tiny-e2e", prompt="Hello world", max_tokens=16, temperature=0)
    assert text == whole.choices[0].text, "the stream must carry exactly the tokens a plain request returns"
    with httpx.stream(
        "POST",
        f"{deployment['url']}/v1/completions",
        timeout=60,
        json={"model": "tiny-e2e", "prompt": "Hi", "max_tokens": 5, "temperature": 0, "stream": True},
        headers=deployment["headers"],
    ) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert sum(1 for event in events[:-1] if json.loads(event)["choices"][0]["text"]) >= 1


def test_chat_completion_plain_and_streamed(client):
    messages = [{"role": "user", "content": "Hello there"}]
    reply = client.chat.completions.create(model="tiny-e2e", messages=messages, max_tokens=6, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens == 6
    chunks = list(
        client.chat.completions.create(model="tiny-e2e", messages=messages, max_tokens=6, temperature=0, stream=True)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content


def test_embeddings_are_meaningful(client):
    sentences = ["a cat sits on the mat", "a kitten rests on a rug", "the stock market fell sharply"]
    vectors = [d.embedding for d in client.embeddings.create(model="minilm-e2e", input=sentences).data]

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    assert len(vectors[0]) == 384
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3


def test_concurrent_streams_all_complete(client):
    def stream(index):
        chunks = client.completions.create(
            model="tiny-e2e",
            prompt=f"Request {index}",
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        return list(chunks)[-1].usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(stream, range(32))) == [12] * 32


@pytest.mark.parametrize(
    "request_kwargs, status, fragment",
    [
        ({"model": "no-such-model", "prompt": "x"}, 404, "does not exist"),
        ({"model": "tiny-e2e", "prompt": "x", "max_tokens": 100000}, 400, "max_model_len"),
        ({"model": "tiny-e2e", "prompt": "hello " * 600, "max_tokens": 4}, 400, "maximum context length"),
        ({"model": "tiny-e2e", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ],
)
def test_errors_are_openai_shaped(client, request_kwargs, status, fragment):
    with pytest.raises(openai.APIStatusError) as raised:
        client.completions.create(**request_kwargs)
    assert raised.value.status_code == status
    assert fragment in raised.value.body["message"]


def test_malformed_json_is_a_400(deployment):
    response = httpx.post(
        f"{deployment['url']}/v1/chat/completions",
        content=b'{"model": "tiny-e2e",',
        headers={"content-type": "application/json", **deployment["headers"]},
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_health_readiness_and_status(deployment):
    assert httpx.get(f"{deployment['url']}/health").status_code == 200
    ready = httpx.get(f"{deployment['url']}/ready")
    assert ready.status_code == 200 and sorted(ready.json()["models"]) == ["minilm-e2e", "tiny-e2e"]
    status = run_cli("status", "--json", env=deployment["env"])
    (record,) = json.loads(status.stdout)
    assert record["name"] == "e2e" and record["ready"] and record["models"] == ["tiny-e2e", "minilm-e2e"]
    shown = run_cli("status", env=deployment["env"]).stdout
    assert "tiny-e2e: 2 running (2 replica(s); routing precise)" in shown, shown


def test_without_one_of_its_keys_the_endpoint_refuses(deployment):
    wrong = openai.OpenAI(base_url=f"{deployment['url']}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.completions.create(model="tiny-e2e", prompt="Hi", max_tokens=2)
    assert raised.value.code == "invalid_api_key"
    bare = httpx.post(f"{deployment['url']}/v1/completions", json={"model": "tiny-e2e", "prompt": "Hi"})
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{deployment['url']}/metrics").status_code == 401  # metrics want a key too


def test_the_engines_answer_the_router_only(deployment):
    url, engine_key = engine_behind("tiny-e2e")
    request = {"model": "tiny-e2e", "prompt": "Hi", "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json=request).status_code == 401
    refused = httpx.post(f"{url}/v1/completions", json=request, headers=deployment["headers"])
    assert refused.status_code == 401, "the endpoint's key must not open an engine"
    assert httpx.post(f"{url}/v1/completions", json=request, headers=bearer(engine_key)).status_code == 200
    # Not only /v1: every route of the engine's port but /health wants the replica's key (vLLM's own guard
    # leaves /invocations, which generates, /tokenize, /metrics, ... open).
    for method, path in [("POST", "/invocations"), ("POST", "/tokenize"), ("POST", "/detokenize"),
                         ("GET", "/metrics"), ("GET", "/version"), ("POST", "/abort_requests")]:  # fmt: skip
        answer = httpx.request(method, f"{url}{path}", json={"model": "tiny-e2e", "prompt": "Hi", "tokens": [1]})
        assert answer.status_code == 401, (path, answer.status_code, answer.text[:200])
    assert httpx.get(f"{url}/health").status_code == 200
    tokenized = httpx.post(f"{url}/tokenize", json={"model": "tiny-e2e", "prompt": "Hi"}, headers=bearer(engine_key))
    assert tokenized.status_code == 200 and tokenized.json()["tokens"]


def test_metrics_cover_the_router_and_every_engine(deployment, client):
    client.completions.create(model="tiny-e2e", prompt="Hi", max_tokens=2)
    scraped = httpx.get(f"{deployment['url']}/metrics", headers=deployment["headers"]).text
    families = {family.name: family for family in text_string_to_metric_families(scraped)}
    answered = {
        (s.labels["model"], s.labels["route"], s.labels["status"]): s.value
        for s in families["raylm_requests"].samples
        if s.name == "raylm_requests_total"
    }
    assert answered[("tiny-e2e", "/v1/completions", "200")] >= 1
    running = families["vllm:num_requests_running"].samples
    assert {s.labels["model"] for s in running} == {"tiny-e2e", "minilm-e2e"}
    assert len({s.labels["replica"] for s in running if s.labels["model"] == "tiny-e2e"}) == 2


def scraped(deployment, name, model, by):
    """The endpoint's /metrics: `name`'s samples for `model`, summed by the label `by`."""
    text = httpx.get(f"{deployment['url']}/metrics", headers=deployment["headers"]).text
    sums = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("model") == model:
                sums[s.labels[by]] = sums.get(s.labels[by], 0) + s.value
    return sums


def test_a_tenants_requests_go_to_the_replica_whose_engine_holds_its_prefix(deployment, client):
    # tiny-e2e routes precisely, vLLM's default: its engines publish their KV-cache events, the router follows them
    card = httpx.get(f"{deployment['url']}/v1/models/tiny-e2e", headers=deployment["headers"]).json()
    assert card["routing"] == "precise"
    system = " ".join(f"rule {n}: answer briefly." for n in range(20))  # 290 tokens: two of the engine's blocks
    hits = ("vllm:prefix_cache_hits_total", "tiny-e2e", "replica")
    before = scraped(deployment, *hits)
    for question in range(4):
        client.completions.create(model="tiny-e2e", prompt=f"{system} Question {question}?", max_tokens=2)
        time.sleep(0.5)  # the engine's events reach the router (ZeroMQ: milliseconds)
    grew = sorted(value - before.get(replica, 0) for replica, value in scraped(deployment, *hits).items())
    assert grew[0] == 0 and grew[1] >= 3 * 256, grew  # one engine served the prefix 3 times from its cache
    decisions = scraped(deployment, "raylm_routing_decisions_total", "tiny-e2e", "reason")
    assert decisions.get("prefix", 0) >= 3, decisions


def test_every_request_has_an_id_and_a_line_in_the_access_log(deployment, client):
    answer = client.completions.with_raw_response.create(
        model="tiny-e2e", prompt="Hi", max_tokens=2, extra_headers={"x-request-id": "e2e-access-1"}
    )
    assert answer.headers["x-request-id"] == "e2e-access-1"

    def logged():
        return [
            line
            for path in deployment["ray_temp_dir"].rglob("logs/serve/*.log")
            for line in path.read_text(errors="replace").splitlines()
            if "e2e-access-1 /v1/completions model=tiny-e2e status=200" in line
        ]

    wait_until(logged, 10, "the access log line is written")


def test_no_key_shows_in_listings_records_status_or_logs(deployment):
    _, engine_key = engine_behind("tiny-e2e")
    listings = "\n".join(" ".join(p.info["cmdline"] or ()) for p in psutil.process_iter(["cmdline"]))
    status = run_cli("status", "--json", env=deployment["env"]).stdout
    records = "\n".join(f.read_text() for f in (deployment["home"] / "deployments").iterdir())
    logs = "\n".join(f.read_text(errors="replace") for f in deployment["ray_temp_dir"].rglob("logs/*") if f.is_file())
    for secret in (deployment["key"], engine_key):
        for where, text in {"ps": listings, "status": status, "records": records, "Ray's logs": logs}.items():
            assert secret not in text, f"a key shows in {where}"


def test_serving_the_same_name_again_is_refused(deployment, tiny_llama):
    again = run_cli("serve", str(tiny_llama), "--name", "e2e", "--port", str(free_port()), env=deployment["env"])
    assert again.returncode == 1
    assert "a deployment named 'e2e' already runs" in again.stderr.strip().splitlines()[-1]


# Crashes, last in this module: they cost the deployment a replica each (Serve replaces it), and the
# module's `raylm stop` then checks that nothing of the crashed engines is left either.


def engine_servers(model):
    """vLLM's API server processes serving `model` (each runs under its supervisor)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and f"--served-model-name {model} " in (
            " ".join(command) + " "
        ):
            found.append(process)
    return found


def wait_until(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what() if callable(what) else what} within {timeout_s}s"
        time.sleep(0.5)


def living(processes):
    found = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{process.pid} {process.name()} (parent {process.ppid()})")
        except psutil.NoSuchProcess:
            continue
    return found


class Traffic:
    """Requests one after another from a thread while a test breaks things; keeps every outcome."""

    def __init__(self, client):
        self.client, self.outcomes, self.stopped = client, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopped.is_set():
            try:
                self.client.completions.create(model="tiny-e2e", prompt="Hello", max_tokens=4, timeout=60)
                self.outcomes.append("ok")
            except openai.APIError as exc:
                self.outcomes.append(repr(exc))

    def stop(self):
        self.stopped.set()
        self.thread.join(timeout=90)
        return self.outcomes


def test_a_killed_engine_server_leaves_nothing_and_the_deployment_keeps_answering(deployment, client):
    servers = engine_servers("tiny-e2e")
    assert len(servers) == 2
    victim = servers[0]
    family = [victim, *victim.children(recursive=True)]  # its engine core and worker
    assert len(family) >= 3, [p.name() for p in family]
    traffic = Traffic(client)
    time.sleep(2)
    victim.kill()  # what the OOM killer does
    wait_until(lambda: not living(family), 60, lambda: f"the killed server's processes end: {living(family)} left")

    def routed_replicas():
        routed = httpx.get(f"{deployment['url']}/v1/models", headers=deployment["headers"]).json()["data"]
        return next(m["replicas"] for m in routed if m["id"] == "tiny-e2e")

    # The replica whose engine died leaves the router, and its heartbeats do not bring it back (its
    # replacement needs far longer than a heartbeat to start its engine).
    wait_until(lambda: routed_replicas() == 1, 15, "the dead engine's replica leaves the router")
    for _ in range(16):
        assert routed_replicas() == 1, "a replica whose engine died was registered again"
        time.sleep(0.5)

    def replaced():
        current = engine_servers("tiny-e2e")
        return len(current) == 2 and victim.pid not in [p.pid for p in current] and routed_replicas() == 2

    wait_until(replaced, 300, "Serve replaces the replica and it takes traffic")
    outcomes = traffic.stop()
    failed = [o for o in outcomes if o != "ok"]
    assert len(outcomes) > 20 and len(failed) <= 1, failed  # at most the one in flight on the dead replica


def test_a_killed_replica_takes_its_engine_and_the_engines_processes_with_it(deployment):
    server = engine_servers("tiny-e2e")[0]
    supervisor = server.parent()
    replica = supervisor.parent()
    assert "ServeReplica" in " ".join(replica.cmdline()) or "ray::" in replica.name(), replica.cmdline()
    # The engine stays in its replica's session, the scheduling group of the router and Ray's workers.
    assert os.getsid(server.pid) == os.getsid(replica.pid) == os.getsid(0)
    # Ray's processes are batch, so their wake-ups do not preempt the engine's; the engine is not.
    assert os.sched_getscheduler(replica.pid) == os.SCHED_BATCH
    assert os.sched_getscheduler(server.pid) == os.SCHED_OTHER
    family = [supervisor, server, *server.children(recursive=True)]
    replica.kill()
    wait_until(
        lambda: not living(family), 20, lambda: f"the replica's engine and its processes end: {living(family)} left"
    )
