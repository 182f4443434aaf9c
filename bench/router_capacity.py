"""What a router costs per streamed chunk, side by side with HAProxy, in front of a fake engine.

    .venv/bin/python bench/router_capacity.py [--streams 200,600] [--seconds 8] [--rounds 3]
        [--before REV] [--vllm-router PATH] [--json FILE]

One fake engine (`raylm.testing.fake_engine`) streams SSE events at 50 per second per stream; each
front is loaded in turn (who goes first alternating per round) with N streams held open for the
measured window, and its CPU time (from /proc, all its threads) is divided by the events the
clients received in that window. The fronts: raylm's router with its defaults (metrics, access log
to a file) and bare (`--no-metrics --no-access-log`), both with the model's in-flight limit raised so
that admission does not cap the streams, and with its default limits (256 in flight, 1024 queued:
what one replica is given); HAProxy 2.6 from Debian's packages (`apt-get install haproxy`, one
thread) when installed; PyPI's `vllm-router` (Rust) when its binary is given; and with `--before REV`
raylm's router of that commit. On 2 cores the engine, the clients and the front share the CPU: read
the CPU per chunk, not the throughput, and compare fronts within one run. Medians [min-max].
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from endpoint import REPO, cell  # noqa: E402
from servers import machine, start, stop  # noqa: E402

from raylm.net import address_answers, free_port  # noqa: E402
from raylm.waiting import wait_until  # noqa: E402

INTERVAL_S = 0.02  # 50 chunks/s per stream
EVENT_MARK = b"data: "
HAPROXY_CONFIG = """
global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
frontend front
    bind 127.0.0.1:{port}
    default_backend engine
backend engine
    server engine 127.0.0.1:{engine_port} maxconn 4000
"""


class Front:
    """A proxy process in front of the engine, whose CPU time we read."""

    def __init__(self, name: str, command: list[str], port: int, env: dict | None = None):
        self.name, self.port = name, port
        self.log = open(Path(tempfile.gettempdir()) / f"raylm-capacity-{name.replace(' ', '-')}.log", "wb")  # noqa: SIM115
        self.process = start(command, self.log, env or {})
        self.ps = psutil.Process(self.process.pid)

    def cpu_s(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def wait_ready(self) -> None:
        wait_until(
            lambda: address_answers(f"127.0.0.1:{self.port}", 0.5),
            timeout_s=30, poll_s=0.2, on_timeout=lambda: RuntimeError(f"{self.name} did not start"),
        )  # fmt: skip

    def close(self) -> None:
        stop(self.process, signal.SIGTERM)
        self.log.close()


def raylm_front(name: str, engine_port: int, *options: str, pythonpath: str | None = None) -> Front:
    port = free_port()
    command = [sys.executable, "-m", "raylm.serving.router", "--port", str(port)]
    command += ["--upstream", f"m=http://127.0.0.1:{engine_port}", *options]
    return Front(name, command, port, {"PYTHONPATH": pythonpath} if pythonpath else None)


def raylm_at(revision: str, engine_port: int, *options: str) -> Front:
    tree = Path(tempfile.mkdtemp(prefix=f"raylm-{revision}-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "core/src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return raylm_front(f"raylm {revision}", engine_port, *options, pythonpath=str(tree / "core" / "src"))


def haproxy_front(engine_port: int) -> Front | None:
    binary = shutil.which("haproxy")
    if binary is None:
        print("HAProxy is not installed (apt-get install haproxy): left out", file=sys.stderr)
        return None
    port = free_port()
    config = Path(tempfile.mkdtemp()) / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, engine_port=engine_port))
    version = subprocess.run([binary, "-v"], capture_output=True, text=True).stdout.split()[2]
    return Front(f"HAProxy {version}", [binary, "-f", str(config), "-db"], port)


def vllm_router_front(binary: str, engine_port: int) -> Front:
    port = free_port()
    command = [binary, "--worker-urls", f"http://127.0.0.1:{engine_port}", "--port", str(port), "--host", "127.0.0.1"]
    return Front("vllm-router", [*command, "--policy", "round_robin"], port)


class Stream(asyncio.Protocol):
    """One client stream: sends its request, counts the events it receives."""

    def __init__(self, counter: list[int], request: bytes):
        self.counter, self.request = counter, request
        self.tail = b""
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        joined = self.tail + data  # an event mark split between two reads still counts once
        self.counter[0] += joined.count(EVENT_MARK)
        self.tail = data[-(len(EVENT_MARK) - 1) :]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def load(front: Front, streams: int, seconds: float) -> tuple[float, float]:
    """Hold `streams` streams through `front`; (CPU us per event, events/s) over the measured window."""
    chunks = int((seconds + 10) / INTERVAL_S)
    body = json.dumps({"model": "m", "stream": True, "chunks": chunks, "interval": INTERVAL_S}).encode()
    request = b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
    request += b"content-length: %d\r\n\r\n" % len(body) + body
    counter = [0]
    loop = asyncio.get_running_loop()
    transports = []
    for _ in range(streams):
        transport, _ = await loop.create_connection(lambda: Stream(counter, request), "127.0.0.1", front.port)
        transports.append(transport)
    await asyncio.sleep(2.0)  # every stream under way
    events, cpu, started = counter[0], front.cpu_s(), time.monotonic()
    await asyncio.sleep(seconds)
    events, cpu, took = counter[0] - events, front.cpu_s() - cpu, time.monotonic() - started
    for transport in transports:
        transport.close()
    await asyncio.sleep(1.0)  # the streams end at the engine before the next front
    if events == 0:
        raise RuntimeError(f"{front.name}: no event received")
    return cpu / events * 1e6, events / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="200,600", help="streams held open, comma-separated")
    parser.add_argument("--seconds", type=float, default=8.0, help="the measured window per load")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", metavar="REV", help="also raylm's router of this commit")
    parser.add_argument("--vllm-router", metavar="PATH", help="the vllm-router binary (pip install vllm-router)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    engine_port = free_port()
    engine = start([sys.executable, "-m", "raylm.testing.fake_engine", str(engine_port)], subprocess.DEVNULL, {})
    raised = ("--max-ongoing-requests", "100000", "--max-queued-requests", "100000")
    fronts = [
        raylm_front("raylm", engine_port, *raised),
        raylm_front("raylm bare", engine_port, *raised, "--no-metrics", "--no-access-log"),
        raylm_front("raylm default limits", engine_port),
    ]
    if args.before:
        fronts.append(raylm_at(args.before, engine_port, *raised))
    fronts.append(haproxy_front(engine_port))
    if args.vllm_router:
        fronts.append(vllm_router_front(args.vllm_router, engine_port))
    fronts = [front for front in fronts if front is not None]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        for front in fronts:
            front.wait_ready()
        for round_ in range(args.rounds):
            for front in fronts if round_ % 2 == 0 else fronts[::-1]:
                for streams in counts:
                    results.setdefault((front.name, streams), []).append(
                        asyncio.run(load(front, streams, args.seconds))
                    )
    finally:
        for front in fronts:
            front.close()
        stop(engine, signal.SIGTERM)
    print(f"\n{machine()}; {args.rounds} rounds, {args.seconds:g} s windows, streams at {1 / INTERVAL_S:g} chunks/s")
    print(f"{'front':26}{'streams':>8}{'CPU us/chunk':>22}{'chunks/s':>26}")
    table = []
    for (name, streams), values in results.items():
        per_chunk, rate = [v[0] for v in values], [v[1] for v in values]
        print(f"{name:26}{streams:>8}{cell(per_chunk):>22}{cell(rate):>26}")
        table.append({"front": name, "streams": streams, "cpu_us_per_chunk": per_chunk, "chunks_per_s": rate})
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": table}, indent=2))


if __name__ == "__main__":
    main()
