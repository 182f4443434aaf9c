"""The router on its own, in front of small real HTTP servers that behave like engine servers.

(The end-to-end tests put it in front of real vLLM; here each behaviour is
pinned down where it is cheap to provoke: slow streams, dead replicas,
clients that hang up.)
"""

import asyncio
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from routertools import Routing
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from raylm.errors import ConfigError
from raylm.model_settings import Limits
from raylm.net import free_port
from raylm.serving import answers, client_connection, engine_connection, keys
from raylm.waiting import wait_until


class FakeEngine:
    """An OpenAI-shaped server that stamps its name on every answer and records what it saw."""

    def __init__(self, name):
        self.name = name
        self.port = free_port()
        self.requests = []
        self.active = self.peak = 0  # streams being answered now, and the most at once
        self.disconnected = threading.Event()
        app = Starlette(
            routes=[Route("/v1/completions", self.completions, methods=["POST"]), Route("/metrics", self.metrics)]
        )
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    async def metrics(self, request: Request):
        lines = [
            "# HELP vllm:num_requests_running Requests running.",
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{model_name="{self.name}"}} {len(self.requests)}',
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def completions(self, request: Request):
        body = await request.json()
        self.requests.append({"body": body, "headers": dict(request.headers), "client_port": request.client.port})
        if body.get("max_tokens") == -1:
            return JSONResponse({"error": {"message": "max_tokens must be positive", "code": 400}}, status_code=400)
        if body.get("max_tokens") == -2:  # SGLang's (and old vLLM's) error shape
            error = {"object": "error", "message": "bad max_tokens", "type": "BadRequestError", "param": None}
            return JSONResponse({**error, "code": 400}, status_code=400)
        if body.get("max_tokens") == -3:
            return PlainTextResponse("Internal Server Error", status_code=500)
        if body.get("max_tokens") == -4:  # an error body sent in chunks
            return StreamingResponse(iter([b'{"message": "engine ', b'overloaded"}']), status_code=503)
        if not body.get("stream"):
            return JSONResponse({"served_by": self.name, "model": body["model"]})

        async def events():
            self.active += 1
            self.peak = max(self.peak, self.active)
            try:
                for index in range(body.get("chunks", 3)):
                    yield f"data: {json.dumps({'index': index, 'served_by': self.name})}\n\n"
                    await asyncio.sleep(body.get("delay", 0))
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:
                self.disconnected.set()
                raise
            finally:
                self.active -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture
def engines():
    with FakeEngine("a1") as a1, FakeEngine("a2") as a2, FakeEngine("b1") as b1:
        yield {"a1": a1, "a2": a2, "b1": b1}


@pytest.fixture
def router(engines):
    with Routing(["alpha", "beta"]) as router:
        router.call(router.table.register, "alpha", engines["a1"].url, "a1", {"id": "alpha", "max_model_len": 64})
        router.call(router.table.register, "alpha", engines["a2"].url, "a2", None)
        router.call(router.table.register, "beta", engines["b1"].url, "b1", None)
        yield router


def post(router, payload, **kwargs):
    return httpx.post(f"{router.url}/v1/completions", json=payload, timeout=10, **kwargs)


def test_requests_reach_a_replica_of_the_model_they_name(router):
    assert post(router, {"model": "beta"}).json() == {"served_by": "b1", "model": "beta"}
    served = {post(router, {"model": "alpha"}).json()["served_by"] for _ in range(6)}
    assert served == {"a1", "a2"}, "requests to one model are spread over its replicas"


def test_the_request_reaches_the_engine_unchanged(router, engines):
    payload = {"model": "beta", "prompt": "héllo", "max_tokens": 3, "extra": {"nested": [1, 2]}}
    post(router, payload, headers={"authorization": "Bearer secret", "x-request-id": "r1"})
    seen = engines["b1"].requests[-1]
    assert seen["body"] == payload
    assert seen["headers"]["authorization"] == "Bearer secret" and seen["headers"]["x-request-id"] == "r1"


def test_engine_errors_pass_through_unchanged(router):
    response = post(router, {"model": "beta", "max_tokens": -1})
    assert response.status_code == 400
    assert response.json() == {"error": {"message": "max_tokens must be positive", "code": 400}}


def test_other_engine_error_shapes_are_put_in_openais(router):
    response = post(router, {"model": "beta", "max_tokens": -2})
    assert response.status_code == 400
    assert response.json() == {
        "error": {"message": "bad max_tokens", "type": "invalid_request_error", "param": None, "code": 400}
    }
    response = post(router, {"model": "beta", "max_tokens": -3})
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "Internal Server Error"
    response = post(router, {"model": "beta", "max_tokens": -4})
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "engine overloaded"
    assert post(router, {"model": "beta"}).status_code == 200, "the connection stays usable after an error"


def test_streamed_chunks_arrive_as_the_engine_writes_them(router):
    started = time.monotonic()
    arrivals, events = [], []
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST", f"{router.url}/v1/completions", json={"model": "beta", "stream": True, "chunks": 3, "delay": 0.4}
        ) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - started)
                events.append(line[6:])
    assert events[-1] == "[DONE]" and [json.loads(e)["index"] for e in events[:-1]] == [0, 1, 2]
    assert arrivals[0] < 0.3, f"the first chunk waited {arrivals[0]:.2f}s"
    assert arrivals[1] - arrivals[0] > 0.3, "chunks must not be held back and sent together"


def test_one_connection_carries_many_requests(router):
    with httpx.Client(timeout=10) as client:
        for _ in range(20):
            assert client.post(f"{router.url}/v1/completions", json={"model": "beta"}).status_code == 200
            with client.stream(
                "POST", f"{router.url}/v1/completions", json={"model": "alpha", "stream": True}
            ) as response:
                assert list(response.iter_lines())[-2] == "data: [DONE]"


def test_a_client_that_hangs_up_cancels_the_engine_request(router, engines):
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST", f"{router.url}/v1/completions", json={"model": "beta", "stream": True, "chunks": 50, "delay": 0.1}
        ) as response,
    ):
        next(response.iter_lines())
    assert engines["b1"].disconnected.wait(5), "the engine kept generating for a client that left"


@pytest.mark.parametrize(
    "content, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"prompt": "no model"}', 400, "needs a `model` field"),
        (b'["a list"]', 400, "needs a `model` field"),
        (b'{"model": "gamma"}', 404, "The model 'gamma' does not exist. Served models: alpha, beta."),
    ],
)
def test_bad_requests_get_openai_shaped_errors(router, content, status, message):
    response = httpx.post(f"{router.url}/v1/completions", content=content, timeout=10)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_unknown_model_has_openais_code(router):
    assert post(router, {"model": "gamma"}).json()["error"]["code"] == "model_not_found"


def test_routes_and_methods(router):
    assert httpx.get(f"{router.url}/v1/completions").status_code == 405
    assert httpx.get(f"{router.url}/nope").json()["error"]["code"] == "unknown_route"
    assert httpx.get(f"{router.url}/health").json() == {"status": "ok"}
    models = httpx.get(f"{router.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["alpha", "beta"]
    assert models["data"][0]["max_model_len"] == 64 and models["data"][0]["owned_by"] == "raylm"
    assert [m["replicas"] for m in models["data"]] == [2, 1]
    assert httpx.get(f"{router.url}/v1/models/beta").json()["id"] == "beta"
    assert httpx.get(f"{router.url}/v1/models/gamma").status_code == 404


def test_readiness_waits_for_every_expected_model(engines):
    with Routing(["alpha", "beta"]) as router:
        response = httpx.get(f"{router.url}/ready")
        assert response.status_code == 503 and response.json()["pending_models"] == ["alpha", "beta"]
        assert post(router, {"model": "alpha"}).json()["error"]["code"] == "model_starting"
        router.call(router.table.register, "alpha", engines["a1"].url, "a1", None)
        assert httpx.get(f"{router.url}/ready").json()["pending_models"] == ["beta"]
        router.call(router.table.register, "beta", engines["b1"].url, "b1", None)
        assert httpx.get(f"{router.url}/ready").status_code == 200


def test_an_unreachable_replica_is_dropped_and_another_serves(router, engines):
    router.call(router.table.register, "beta", f"http://127.0.0.1:{free_port()}", "dead", None)
    served = [post(router, {"model": "beta"}).json()["served_by"] for _ in range(4)]
    assert served == ["b1"] * 4
    assert [u.replica_id for u in router.table.upstreams["beta"]] == ["b1"]


def test_no_reachable_replica_is_a_503(router):
    router.call(router.table.deregister, "b1")
    router.call(router.table.register, "beta", f"http://127.0.0.1:{free_port()}", "dead", None)
    response = post(router, {"model": "beta"})
    assert (
        response.status_code == 503 and "no replica of model 'beta' is reachable" in response.json()["error"]["message"]
    )


def test_silent_replicas_expire(router):
    router.call(router.table.expire, -1.0)
    assert post(router, {"model": "beta"}).json()["error"]["code"] == "model_starting"


class ClosingEngine:
    """Answers the first request on each connection, then closes the connection on the next one without
    answering: what an engine's keep-alive timeout does when its close crosses a request in flight."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.answer_once, args=(connection,), daemon=True).start()

    def answer_once(self, connection):
        with connection, connection.makefile("rb") as reader:
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            body = json.dumps({"served_by": f"connection {self.connections}"}).encode()
            connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            reader.read(1)  # the next request arrives: close without answering

    def close(self):
        self.listener.close()


def test_a_request_crossing_the_close_of_an_idle_engine_connection_is_resent():
    engine = ClosingEngine()
    with Routing(["gamma"]) as router, httpx.Client(timeout=10) as client:
        router.call(router.table.register, "gamma", engine.url, "g1", None)
        answers = [client.post(f"{router.url}/v1/completions", json={"model": "gamma"}) for _ in range(3)]
    engine.close()
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["served_by"] for a in answers] == ["connection 1", "connection 2", "connection 3"]


def test_connections_idle_too_long_are_not_reused(router, engines, monkeypatch):
    monkeypatch.setattr(engine_connection, "IDLE_REUSE_S", 0.2)
    with httpx.Client(timeout=10) as client:
        for pause in (0, 0, 0.4):
            time.sleep(pause)
            assert client.post(f"{router.url}/v1/completions", json={"model": "beta"}).status_code == 200
    ports = [request["client_port"] for request in engines["b1"].requests]
    assert ports[0] == ports[1] != ports[2], "reused while fresh, replaced once idle too long"


# What one client may cost the router is bounded.


def raw_exchange(router, data, wait_s=5.0):
    """Send raw bytes (if any) on one connection; what the router sends back until it closes (or `wait_s`)."""
    with socket.create_connection(("127.0.0.1", router.port)) as connection:
        connection.settimeout(wait_s)
        if data:
            connection.sendall(data)
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except TimeoutError:
            return received, False
        return received, True


def test_headers_over_the_limit_get_a_431_and_the_connection_closes(router):
    huge = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-padding: " + b"a" * (200 * 1024) + b"\r\n\r\n"
    received, closed = raw_exchange(router, huge)
    assert received.startswith(b"HTTP/1.1 431 ") and closed
    assert b"over 65536 bytes" in received


def test_half_a_request_is_timed_out_with_a_408(router, monkeypatch):
    monkeypatch.setattr(client_connection, "REQUEST_TIMEOUT_S", 0.5)
    received, closed = raw_exchange(router, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
    assert received.startswith(b"HTTP/1.1 408 ") and closed


def test_an_idle_kept_alive_connection_is_closed(router, monkeypatch):
    monkeypatch.setattr(client_connection, "IDLE_TIMEOUT_S", 0.5)
    received, closed = raw_exchange(router, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200 ") and closed, "answered, then closed once idle"


def test_connections_past_the_cap_get_a_503(engines):
    with Routing(["alpha"], max_connections=2) as router:
        held = [socket.create_connection(("127.0.0.1", router.port)) for _ in range(2)]
        try:
            received, closed = raw_exchange(router, None)  # answered at once, before any request
        finally:
            for connection in held:
                connection.close()
        assert received.startswith(b"HTTP/1.1 503 ") and closed
        assert httpx.get(f"{router.url}/health").status_code == 200, "a connection is accepted again once one closes"


def test_metrics_count_the_traffic_and_carry_the_engines_own(router, engines):
    from prometheus_client.parser import text_string_to_metric_families

    with httpx.Client(timeout=10) as client:
        for _ in range(3):
            assert client.post(f"{router.url}/v1/completions", json={"model": "alpha"}).status_code == 200
        with client.stream("POST", f"{router.url}/v1/completions", json={"model": "beta", "stream": True}) as stream:
            assert sum(1 for _ in stream.iter_lines()) > 0
        assert client.post(f"{router.url}/v1/completions", json={"model": "alpha", "max_tokens": -1}).status_code == 400
        assert client.post(f"{router.url}/v1/completions", json={"model": "nope"}).status_code == 404
        scraped = client.get(f"{router.url}/metrics")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(scraped.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))))

    route = "/v1/completions"
    assert value("raylm_requests_total", model="alpha", route=route, status="200") == 3
    assert value("raylm_requests_total", model="beta", route=route, status="200") == 1
    assert value("raylm_requests_total", model="alpha", route=route, status="400") == 1
    assert value("raylm_requests_total", model="(unknown)", route=route, status="404") == 1
    assert value("raylm_time_to_first_byte_seconds_count", model="alpha", route=route) == 3
    assert value("raylm_request_duration_seconds_count", model="beta", route=route) == 1
    assert value("raylm_requests_in_flight", model="alpha") == 0
    assert value("raylm_replicas", model="alpha") == 2
    assert value("raylm_replica_requests_in_flight", model="alpha", replica="a1") == 0
    # The engines' own metrics, one series per replica.
    running = {labels: v for (name, labels), v in samples.items() if name == "vllm:num_requests_running"}
    replicas = sorted(dict(labels)["replica"] for labels in running)
    assert replicas == ["a1", "a2", "b1"]
    assert all(dict(labels)["model"] in ("alpha", "beta") for labels in running)


# Keys: the endpoint's, and each engine's own.


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("first-key\n")
    return path


@pytest.fixture
def locked(engines, key_file, monkeypatch):
    monkeypatch.setattr(keys, "RELOAD_CHECK_S", 0.0)
    with Routing(["alpha", "beta"], keys=keys.KeyFile(key_file)) as router:
        router.call(router.table.register, "alpha", engines["a1"].url, "a1", None, "a1-engine-key")
        router.call(router.table.register, "beta", engines["b1"].url, "b1", None, None)
        yield router


def test_with_keys_every_model_route_needs_one(locked):
    bearer = {"authorization": "Bearer first-key"}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "first-key"}):
        refused = httpx.post(f"{locked.url}/v1/completions", json={"model": "alpha"}, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{locked.url}/v1/models").status_code == 401
    assert httpx.get(f"{locked.url}/metrics").status_code == 401
    assert httpx.post(f"{locked.url}/v1/completions", json={"model": "alpha"}, headers=bearer).status_code == 200
    assert httpx.get(f"{locked.url}/metrics", headers=bearer).status_code == 200
    assert httpx.get(f"{locked.url}/health").status_code == 200, "probes need no key"
    assert httpx.get(f"{locked.url}/ready").status_code == 200


def test_keys_rotate_by_editing_the_file(locked, key_file):
    def status(key):
        return httpx.get(f"{locked.url}/v1/models", headers={"authorization": f"Bearer {key}"}).status_code

    key_file.write_text("first-key\nsecond-key\n")
    assert (status("first-key"), status("second-key")) == (200, 200), "both valid while rotating"
    time.sleep(0.01)
    key_file.write_text("second-key\n")
    os.utime(key_file, (time.time() + 1, time.time() + 1))  # a new modification time even within one tick
    assert (status("first-key"), status("second-key")) == (401, 200)
    key_file.write_text("second-key\n  # third-key, indented: a comment\n")
    os.utime(key_file, (time.time() + 2, time.time() + 2))
    assert (status("second-key"), status("# third-key, indented: a comment")) == (200, 401)
    key_file.unlink()  # no file, no key: the endpoint is closed, not left open to the old keys
    assert status("second-key") == 401
    key_file.write_text("second-key\n")
    assert status("second-key") == 200


def test_the_endpoints_key_file_is_the_one_given_or_written_from_the_environment(key_file, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLM_HOME", str(tmp_path / "home"))
    assert keys.endpoint_key_file("d", str(key_file), {"RAYLM_API_KEY": "other"}) == str(key_file)
    assert keys.endpoint_key_file("d", None, {}) is None, "no key: an open endpoint"
    written = Path(keys.endpoint_key_file("d", None, {"RAYLM_API_KEY": "from-env"}))
    assert written == tmp_path / "home" / "keys" / "d.keys"
    assert written.read_text() == "from-env\n" and written.stat().st_mode & 0o777 == 0o600
    empty = tmp_path / "empty"
    empty.write_text("# keys go here\n\n")
    for path, message in ((empty, "holds no key: write one key per line"), (tmp_path / "no", "cannot read")):
        with pytest.raises(ConfigError, match=message):
            keys.endpoint_key_file("d", str(path), {})


def test_an_engine_gets_its_own_key_never_the_clients(locked, engines):
    bearer = {"authorization": "Bearer first-key"}
    assert httpx.post(f"{locked.url}/v1/completions", json={"model": "alpha"}, headers=bearer).status_code == 200
    assert httpx.post(f"{locked.url}/v1/completions", json={"model": "beta"}, headers=bearer).status_code == 200
    assert engines["a1"].requests[-1]["headers"]["authorization"] == "Bearer a1-engine-key"
    assert "authorization" not in engines["b1"].requests[-1]["headers"], "the endpoint's key is never passed on"


def test_a_model_at_capacity_queues_then_refuses_with_retry_after(engines):
    limits = {"beta": Limits(max_ongoing_requests=2, max_queued_requests=2)}
    with Routing(["beta"], limits=limits) as router:
        router.call(router.table.register, "beta", engines["b1"].url, "b1", None)
        slow = {"model": "beta", "stream": True, "chunks": 4, "delay": 0.25}

        def one(_):
            with httpx.stream("POST", f"{router.url}/v1/completions", json=slow, timeout=30) as response:
                return response.status_code, response.headers.get("retry-after"), response.read()

        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(one, range(6)))
        scraped = httpx.get(f"{router.url}/metrics").text
    served = [body for status, _, body in outcomes if status == 200]
    refused = [(retry, json.loads(body)) for status, retry, body in outcomes if status == 429]
    assert len(served) == 4 and all(body.endswith(b"data: [DONE]\n\n") for body in served), "2 ran, 2 waited"
    assert len(refused) == 2 and all(r == "1" and e["error"]["code"] == "rate_limit_exceeded" for r, e in refused)
    assert engines["b1"].peak == 2, "the engine never had more than max_ongoing_requests"
    assert 'raylm_rejected_requests_total{model="beta"} 2.0' in scraped
    assert 'raylm_queued_requests{model="beta"} 0.0' in scraped


def test_a_waiting_request_takes_a_new_replica_at_once(engines):
    with Routing(["beta"], limits={"beta": Limits(max_ongoing_requests=1, max_queued_requests=4)}) as router:
        router.call(router.table.register, "beta", engines["b1"].url, "b1", None)
        with ThreadPoolExecutor(2) as pool:
            busy = pool.submit(post, router, {"model": "beta", "stream": True, "chunks": 8, "delay": 0.5})
            time.sleep(0.5)
            waiting = pool.submit(post, router, {"model": "beta"})
            time.sleep(0.5)
            assert not waiting.done(), "b1 is busy: the request waits"
            router.call(router.table.register, "beta", engines["a1"].url, "a1", None)
            assert waiting.result(timeout=2).json()["served_by"] == "a1"
            assert not busy.done(), "long before b1 is free"


def test_every_request_has_an_id_the_engine_and_the_access_log_see(router, engines, caplog):
    caplog.set_level("INFO", logger="raylm.access")
    mine = post(router, {"model": "beta"}, headers={"x-request-id": "client-7"})
    assert mine.headers["x-request-id"] == "client-7" == engines["b1"].requests[-1]["headers"]["x-request-id"]
    streamed = post(router, {"model": "beta", "stream": True})
    made = streamed.headers["x-request-id"]
    assert len(made) == 32 and engines["b1"].requests[-1]["headers"]["x-request-id"] == made
    odd = post(router, {"model": "beta"}, headers={"x-request-id": "has spaces; and is long " * 8 + "end"})
    assert len(odd.headers["x-request-id"]) == 32, "an id unfit for logs is replaced"
    refused = post(router, {"model": "nope"}, headers={"x-request-id": "client-8"})
    assert refused.status_code == 404 and refused.headers["x-request-id"] == "client-8"

    def access_lines():
        return [record.getMessage() for record in caplog.records if record.name == "raylm.access"]

    soon(lambda: len(access_lines()) == 4, "a line per request, written within a moment")
    lines = access_lines()
    assert lines[0].startswith("client-7 /v1/completions model=beta status=200 first_byte_ms=")
    assert lines[0].endswith(" replica=b1") and int(lines[0].split(" bytes=")[1].split()[0]) > len(mine.content)
    assert lines[1].startswith(f"{made} /v1/completions model=beta status=200")
    assert lines[3].startswith("client-8 /v1/completions model=(unknown) status=404 first_byte_ms=- ")


def soon(condition, what):
    wait_until(condition, timeout_s=5, poll_s=0.05, on_timeout=lambda: AssertionError(what))


def stream_taken(pool, router, model, chunks):
    """A slow stream sent from `pool`, returned once the router has taken it."""
    future = pool.submit(post, router, {"model": model, "stream": True, "chunks": chunks, "delay": 0.2})
    soon(lambda: router.unfinished() == 1, "the stream is taken")
    return future


def test_a_draining_router_finishes_what_it_took_and_refuses_the_rest(router):
    with ThreadPoolExecutor(1) as pool:
        taken = stream_taken(pool, router, "alpha", chunks=10)

        def drain():
            router.router.draining = True

        router.call(drain)
        refused = post(router, {"model": "alpha"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["retry-after"] == "1"
        assert httpx.get(f"{router.url}/ready").json() == {"status": "draining"}
        assert taken.result(timeout=10).text.endswith("data: [DONE]\n\n"), "the stream taken before ends whole"
    assert router.unfinished() == 0


def test_a_retiring_replica_finishes_its_requests_and_gets_no_new_ones(router):
    with ThreadPoolExecutor(1) as pool:
        stream = stream_taken(pool, router, "alpha", chunks=8)
        (busy,) = [u.replica_id for u in router.table.replicas("alpha") if u.in_flight]
        assert router.call(router.table.retire, busy) == 1
        others = {post(router, {"model": "alpha"}).json()["served_by"] for _ in range(4)}
        assert others == {"a1", "a2"} - {busy}, "no new request for a retiring replica"
        assert stream.result(timeout=10).text.endswith("data: [DONE]\n\n")
    assert router.call(router.table.retire, busy) == 0


def test_a_waiting_request_whose_client_hangs_up_leaves_the_queue(engines):
    def depth():
        return router.call(router.router.admission.depth, "beta")

    with Routing(["beta"], limits={"beta": Limits(max_ongoing_requests=1, max_queued_requests=1)}) as router:
        router.call(router.table.register, "beta", engines["b1"].url, "b1", None)
        with ThreadPoolExecutor(2) as pool:
            busy = stream_taken(pool, router, "beta", chunks=12)
            body = json.dumps({"model": "beta"}).encode()
            with socket.create_connection(("127.0.0.1", router.port)) as leaving:
                leaving.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body))
                leaving.sendall(body)
                soon(lambda: depth() == 1, "the request waits")
            soon(lambda: depth() == 0, "a request whose client hung up leaves the queue")
            waiting = pool.submit(post, router, {"model": "beta"})
            assert waiting.result(timeout=10).status_code == 200, "its place in the queue was free: no 429"
            assert busy.result(timeout=10).status_code == 200


def test_what_a_stopping_router_has_answered_is_all_logged_and_counted(engines, caplog, monkeypatch):
    monkeypatch.setattr(answers, "FLUSH_S", 60.0)  # no timed write comes before the scrape or the stop
    caplog.set_level("INFO", logger="raylm.access")
    with Routing(["beta"]) as router:
        router.call(router.table.register, "beta", engines["b1"].url, "b1", None)
        for _ in range(3):
            assert post(router, {"model": "beta"}).status_code == 200
        scraped = httpx.get(f"{router.url}/metrics").text
        counted = [line for line in scraped.splitlines() if line.startswith('raylm_requests_total{model="beta"')]
        assert counted == ['raylm_requests_total{model="beta",route="/v1/completions",status="200"} 3.0']
        assert post(router, {"model": "beta", "stream": True}).status_code == 200
    assert len([record for record in caplog.records if record.name == "raylm.access"]) == 4


def test_the_access_log_can_be_off(engines, caplog):
    caplog.set_level("INFO", logger="raylm.access")
    with Routing(["beta"], access_log=False) as router:
        router.call(router.table.register, "beta", engines["b1"].url, "b1", None)
        assert post(router, {"model": "beta"}).status_code == 200
    # stopped: whatever the router had to write is written
    assert not [record for record in caplog.records if record.name == "raylm.access"]


def test_a_model_scaled_to_zero_starts_a_replica_for_the_first_request(engines):
    asked = []

    def start_replica(model):  # as Serve would: a replica starts, registers, then the call returns
        asked.append(model)
        time.sleep(0.5)
        router.call(router.table.register, model, engines["b1"].url, "b1", None)

    with Routing(["beta"], cold_starts={"beta": 10.0}, start_replica=start_replica) as router:
        ready = httpx.get(f"{router.url}/ready")
        assert ready.status_code == 200 and ready.json()["scaled_to_zero"] == ["beta"]
        assert [m["id"] for m in httpx.get(f"{router.url}/v1/models").json()["data"]] == ["beta"]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: post(router, {"model": "beta"}), range(3)))
        assert [a.json()["served_by"] for a in answers] == ["b1"] * 3
        assert asked == ["beta"], "one replica asked for, for all the waiting requests"
        assert httpx.get(f"{router.url}/ready").json()["scaled_to_zero"] == []


def test_a_model_whose_first_replica_does_not_start_in_time_gets_503_with_retry_after(engines):
    with Routing(["beta"], cold_starts={"beta": 1.0}, start_replica=lambda model: time.sleep(3)) as router:
        started = time.monotonic()
        refused = post(router, {"model": "beta"})
        assert 1.0 <= time.monotonic() - started < 2.5
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "model_starting"
        assert "did not start in 1s" in refused.json()["error"]["message"]
        assert router.unfinished() == 0, "nothing left waiting"
