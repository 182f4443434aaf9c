"""The router's request path against hostile and unlucky clients, from raw sockets.

A fake engine (`raylm.testing.fake_engine`) stands in for vLLM: it says what it began, finished
and saw aborted, so a request the router should have dropped shows up at the engine. What a test
checks of the router it reads from the router's own `/metrics`, as an operator would.
"""

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httptools
import pytest
from prometheus_client.parser import text_string_to_metric_families
from routertools import Routing

from raylm.model_settings import Limits
from raylm.net import address_answers, free_port
from raylm.serving import client_connection
from raylm.serving.engine_connection import EngineConnection, EnginePool
from raylm.serving.keys import KeyFile
from raylm.serving.routes import Upstream
from raylm.testing.fake_engine import FakeEngineThread
from raylm.waiting import wait_until

LONG_STREAM = {"model": "m", "stream": True, "chunks": 200, "interval": 0.02}


def request(body=None, path="/v1/completions", method="POST", headers=(), version="1.1"):
    data = b"" if body is None else json.dumps(body).encode()
    head = [f"{method} {path} HTTP/{version}", "host: router", *(f"{name}: {value}" for name, value in headers)]
    if body is not None:
        head += ["content-type: application/json", f"content-length: {len(data)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


class Answer:
    def __init__(self, parser):
        self.parser = parser
        self.status = 0
        self.headers = {}
        self.body = b""
        self.complete = False

    def on_header(self, name, value):
        self.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self):
        self.status = self.parser.get_status_code()

    def on_body(self, body):
        self.body += body

    def on_message_complete(self):
        self.complete = True


class RawClient:
    """One connection to the router, driven byte by byte."""

    def __init__(self, router, receive_buffer=None):
        self.sock = socket.socket()
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect(("127.0.0.1", router.port))
        self.buffer = b""
        self.eof = False

    def send(self, data):
        self.sock.sendall(data)

    def read(self, timeout):
        """Bytes until the router closes or `timeout` passes."""
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.eof = True
                    break
                self.buffer += chunk
        except TimeoutError:
            pass
        return self.buffer

    def answers(self, count, timeout=5.0, head_only=False):
        """The next `count` whole answers (a HEAD request's have no body)."""
        deadline = time.monotonic() + timeout
        while True:
            parsed, rest = parse_answers(self.buffer, head_only)
            if len(parsed) >= count or self.eof or time.monotonic() > deadline:
                return parsed[:count]
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.eof = not chunk
            self.buffer += chunk

    def close(self):
        self.sock.close()


def parse_answers(data, head_only=False):
    answers = []
    while data:
        parser = httptools.HttpResponseParser(None)
        answer = Answer(parser)
        parser = httptools.HttpResponseParser(answer)
        answer.parser = parser
        if head_only:
            head, found, rest = data.partition(b"\r\n\r\n")
            if not found:
                break
            parser.feed_data(head + b"\r\n\r\n")
            answers.append(answer)
            data = rest
            continue
        for size in range(1, len(data) + 1):  # byte by byte: where the answer ends is where the next begins
            parser.feed_data(data[size - 1 : size])
            if answer.complete:
                answers.append(answer)
                data = data[size:]
                break
        else:
            break
    return answers, data


def metrics(router):
    """The router's own metrics as an operator scrapes them: {(name, labels...): value}."""
    with socket.create_connection(("127.0.0.1", router.port)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        sock.settimeout(10)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    text = data.partition(b"\r\n\r\n")[2].decode()
    return {
        (sample.name, *sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def in_flight_and_queued(router, model="m"):
    found = metrics(router)
    labels = ("model", model)
    return found[("raylm_requests_in_flight", labels)], found[("raylm_queued_requests", labels)]


def answered(router, status):
    found = metrics(router)
    return sum(v for k, v in found.items() if k[0] == "raylm_requests_total" and ("status", str(status)) in k)


def soon(condition, what, timeout_s=1.0):
    wait_until(
        condition,
        timeout_s=timeout_s,
        poll_s=0.05,
        on_timeout=lambda: AssertionError(f"not within {timeout_s}s: {what}"),
    )


@pytest.fixture(scope="module")
def engine():
    with FakeEngineThread(chunks=3, interval=0.01) as engine:
        yield engine


def routing(engine, **options):
    router = Routing(["m"], **options)
    router.start("127.0.0.1", router.port)
    router.call(router.table.register, "m", engine.url, "r1", None)
    return router


@pytest.fixture
def router(engine):
    router = routing(engine)
    yield router
    router.stop()


@pytest.fixture
def one_slot(engine):
    router = routing(engine, limits={"m": Limits(max_ongoing_requests=1, max_queued_requests=8)})
    yield router
    router.stop()


def idle(engine):
    soon(lambda: engine.stats.active == 0, "the engine is idle", timeout_s=10)


def test_pipelined_requests_are_answered_in_order_one_at_a_time(router, engine):
    idle(engine)
    engine.stats.peak = 0
    client = RawClient(router)
    client.send(
        b"".join(
            request({"model": "m", "chunks": 3 - index, "interval": 0.02}, headers=[("x-request-id", f"req-{index}")])
            for index in range(3)
        )
    )
    answers = client.answers(3)
    client.close()
    assert [(a.status, a.headers["x-request-id"]) for a in answers] == [(200, "req-0"), (200, "req-1"), (200, "req-2")]
    assert engine.stats.peak == 1  # one at a time: the next was sent once the one before was answered


def test_pipelined_streams_whose_client_hangs_up_release_their_places(router, engine):
    idle(engine)
    begun = engine.stats.begun
    clients = [RawClient(router) for _ in range(10)]
    for client in clients:
        client.send(request(LONG_STREAM) * 2)
    soon(lambda: engine.stats.begun == begun + 10, "the 10 first streams began")
    for client in clients:
        client.close()
    soon(lambda: in_flight_and_queued(router) == (0, 0), "nothing in flight or queued")
    soon(lambda: engine.stats.active == 0, "the engine stopped the streams")
    assert engine.stats.begun == begun + 10  # the pipelined second requests never reached the engine


@pytest.mark.parametrize("state", ["queued", "waiting for its answer", "streaming"])
def test_a_client_that_hangs_up_releases_everything_within_a_second(one_slot, engine, state):
    idle(engine)
    holder = None
    if state == "queued":  # the one slot is taken
        holder = RawClient(one_slot)
        holder.send(request(LONG_STREAM))
        soon(lambda: engine.stats.active == 1, "the slot is taken")
    begun, aborted = engine.stats.begun, engine.stats.aborted
    client = RawClient(one_slot)
    client.send(request({**LONG_STREAM, "stream": state == "streaming"}))
    if state == "queued":
        soon(lambda: in_flight_and_queued(one_slot) == (1, 1), "one in flight, one queued")
    else:
        soon(lambda: engine.stats.begun == begun + 1, "the engine has it")
    if state == "streaming":
        assert client.read(0.3).startswith(b"HTTP/1.1 200 ")
    client.close()
    soon(lambda: in_flight_and_queued(one_slot) == (1 if holder else 0, 0), "its place given back")
    if holder is None:
        soon(lambda: engine.stats.aborted == aborted + 1, "the engine stopped working on it")
    else:
        holder.close()
        soon(lambda: in_flight_and_queued(one_slot) == (0, 0), "the holder's place given back")
        time.sleep(0.3)
        assert engine.stats.begun == begun  # the queued request never reached the engine
    assert answered(one_slot, 499) == (2 if holder else 1)  # counted as hung up (the holder too)


@pytest.fixture
def locked(engine, tmp_path):
    path = tmp_path / "keys"
    path.write_text("sk-good\n")
    router = routing(engine, keys=KeyFile(path))
    yield router
    router.stop()


def test_without_a_key_the_answer_comes_before_the_body_is_read(locked):
    client = RawClient(locked)
    client.send(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 60000000\r\n\r\n")
    (answer,) = client.answers(1, timeout=1)
    assert answer.status == 401 and answer.headers["connection"] == "close"
    client.send(b"x" * 65536)  # what it still sends is dropped, and the connection ends
    client.read(client_connection.LINGER_S + 1)
    assert client.eof


def test_expect_100_continue_is_answered_once_the_head_passes(locked):
    body = json.dumps({"model": "m"}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: {len(body)}\r\n"
    client = RawClient(locked)
    client.send(head.encode() + b"authorization: Bearer sk-good\r\n\r\n")
    assert client.read(0.5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.buffer = b""
    client.send(body)
    (answer,) = client.answers(1)
    assert answer.status == 200
    refused = RawClient(locked)
    refused.send(head.encode() + b"\r\n")
    (answer,) = refused.answers(1)
    assert answer.status == 401  # no 100 Continue: the body is not wanted


def test_metrics_label_only_the_routers_own_routes(router):
    client = RawClient(router)
    for slashes in range(1, 6):
        client.send(request({"model": "m", "chunks": 1}, path="/v1/completions" + "/" * slashes))
        assert client.answers(1)[0].status == 200
        client.buffer = b""
    routes = {dict(key[1:])["route"] for key in metrics(router) if key[0] == "raylm_requests_total"}
    assert routes == {"/v1/completions"}


def test_an_engine_that_stalls_gets_a_504_and_its_stream_is_cut(engine):
    router = routing(engine, read_timeout_s=1.0)
    try:
        started = time.monotonic()
        client = RawClient(router)
        client.send(request({"model": "m", "chunks": 1, "interval": 30}))  # a whole answer after 30 s
        (answer,) = client.answers(1, timeout=5)
        assert answer.status == 504 and json.loads(answer.body)["error"]["code"] == "engine_timeout"
        assert time.monotonic() - started < 3
        streaming = RawClient(router)
        streaming.send(request({"model": "m", "stream": True, "chunks": 2, "interval": 30}))
        assert streaming.read(5).startswith(b"HTTP/1.1 200 ") and streaming.eof  # the head, then cut
        soon(lambda: in_flight_and_queued(router) == (0, 0), "nothing in flight")
        assert answered(router, 504) == 2
    finally:
        router.stop()


def test_a_client_that_does_not_read_holds_a_bounded_buffer(router, engine):
    """A client that reads nothing, asking for two large answers in a row: the router stops reading from
    the engine instead of buffering what the client does not take, for the second answer too."""
    client = RawClient(router, receive_buffer=4096)
    big = {"model": "m", "stream": True, "chunks": 400, "interval": 0, "pad": 50_000}  # 20 MB each
    client.send(request(big) * 2)
    time.sleep(1.5)

    def buffered():
        return max(c.transport.get_write_buffer_size() for c in router.router.connections if c.transport)

    assert router.call(buffered) < 2_000_000
    received = 0
    client.sock.settimeout(10)
    while received < 2 * 400 * 50_000:
        received += len(client.sock.recv(1 << 20))
    client.close()
    soon(lambda: in_flight_and_queued(router) == (0, 0), "nothing in flight")


def test_head_answers_carry_no_body(router):
    client = RawClient(router)
    client.send(request(method="HEAD", path="/health") + request(method="GET", path="/health"))
    head, _, rest = client.read(0.5).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 16" in head
    assert rest.startswith(b"HTTP/1.1 200 ")  # the GET's answer follows the HEAD's head at once
    assert rest.endswith(b'{"status": "ok"}')


def test_an_http_1_0_client_gets_its_stream_unchunked(router):
    client = RawClient(router)
    client.send(request({"model": "m", "stream": True, "chunks": 3}, version="1.0"))
    data = client.read(5)
    assert client.eof  # the answer's end is the connection's
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding" not in head.lower()
    assert body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") == 4


def test_the_routers_own_lack_of_file_descriptors_does_not_drop_a_replica(engine):
    """Out of file descriptors (its own EMFILE), the router answers 503 and keeps the replica."""
    port = free_port()
    limit = 64
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit}))\n"
        "from raylm.serving.router import main\n"
        f"main(['--port', '{port}', '--upstream', 'm={engine.url}', '--no-access-log'])\n"
    )
    router = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    try:
        listening = lambda: address_answers(f"127.0.0.1:{port}", 0.2)  # noqa: E731
        wait_until(listening, timeout_s=20, poll_s=0.1, on_timeout=lambda: AssertionError("no router"))
        target = type("Target", (), {"port": port})
        first = RawClient(target)
        holders = []
        while len(list(Path(f"/proc/{router.pid}/fd").iterdir())) < limit:
            holders.append(RawClient(target))
            time.sleep(0.01)
        first.send(request({"model": "m", "chunks": 1}))
        (answer,) = first.answers(1)
        assert answer.status == 503 and b"cannot open a connection" in answer.body
        for holder in holders[:10]:
            holder.close()
        time.sleep(0.3)
        first.buffer = b""
        first.send(request({"model": "m", "chunks": 1}))
        (answer,) = first.answers(1)
        assert answer.status == 200  # the replica is still routed to
    finally:
        router.terminate()
        router.wait(10)


def test_an_engine_connection_parked_while_paused_reads_again(engine):
    async def scenario():
        pool = EnginePool(asyncio.get_running_loop)
        upstream = Upstream("m", "127.0.0.1", engine.port, "r1")
        connection = await pool.connect(upstream)
        connection.pause(True)  # its client was slow as the answer ended
        pool.park(connection)
        reading = connection.transport.is_reading()
        taken = pool.take(upstream)
        pool.close_all()
        return reading, taken

    reading, taken = asyncio.run(scenario())
    assert reading and isinstance(taken, EngineConnection)


def test_a_stream_cut_by_the_client_is_counted_and_logged(router, engine, caplog):
    caplog.set_level("INFO", logger="raylm.access")
    client = RawClient(router)
    client.send(request(LONG_STREAM, headers=[("x-request-id", "cut-1")]))
    assert client.read(0.3).startswith(b"HTTP/1.1 200 ")
    client.close()
    soon(lambda: answered(router, 499) == 1, "the cut stream counted")
    assert any("cut-1" in r.getMessage() and "status=499" in r.getMessage() for r in caplog.records)


def test_a_thousand_hostile_requests_leave_nothing_behind():
    """bench/hostile.py: pipelined, half-sent, hung up in every state, oversized, keyless, malformed, HTTP/1.0
    and slow clients against the standalone router process leave nothing in flight or queued, and its memory
    where it was."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "hostile.py"
    done = subprocess.run([sys.executable, str(bench)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "in flight after: 0, queued after: 0" in done.stdout
