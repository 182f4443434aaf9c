"""raylm against the engine's own OpenAI server, on the same model, in one run.

    .venv/bin/python bench/run.py [--rounds 2] [--repeats 3]

For each round, each server in turn is cold-started (command start to first
streamed token), then measured with streaming completions at concurrency 1
and 16 (`--repeats` times each); only one server runs at a time. The table
shows medians over all measurements, and the ratios the targets are set in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import Connection, median, run_load  # noqa: E402
from raylm.testing.models import build_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ENGINE_ARGS = ["--max-model-len", "512", "--dtype", "float32", "--kv-cache-memory-bytes", str(256 * 2**20)]
MODEL_NAME = "tiny"
MAX_TOKENS = 32
LOADS = {1: 40, 16: 320}  # concurrency: requests


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def first_token(port: int, timeout_s: float = 1200) -> None:
    """Poll with a streaming request until one returns text."""
    deadline = time.monotonic() + timeout_s
    payload = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2, "stream": True}
    while time.monotonic() < deadline:
        connection = Connection("127.0.0.1", port)
        try:
            if await asyncio.wait_for(connection.stream_completion("/v1/completions", payload), 10) is not None:
                return
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
            pass
        finally:
            connection.close()
        await asyncio.sleep(0.25)
    raise TimeoutError("no first token")


def start_vllm(model: Path, port: int, log) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *ENGINE_ARGS,
    ]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_raylm(model: Path, port: int, log, home: str) -> subprocess.Popen:
    command = [
        str(Path(sys.executable).parent / "raylm"),
        "serve",
        str(model),
        "--name",
        MODEL_NAME,
        "--port",
        str(port),
        *ENGINE_ARGS,
    ]
    env = {**os.environ, "RAYLM_HOME": home}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def stop(process: subprocess.Popen, graceful: signal.Signals) -> None:
    process.send_signal(graceful)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # anything left in its session


async def measure(name: str, start, graceful: signal.Signals, repeats: int, results: dict) -> None:
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"raylm-bench-{name}.log"
    with open(log_path, "wb") as log:
        started = time.monotonic()
        process = start(port, log)
        try:
            await first_token(port)
            results.setdefault((name, "cold start (s)"), []).append(time.monotonic() - started)
            await run_load(f"http://127.0.0.1:{port}", MODEL_NAME, concurrency=4, requests=20, max_tokens=MAX_TOKENS)
            for _ in range(repeats):
                for concurrency, requests in LOADS.items():
                    result = await run_load(
                        f"http://127.0.0.1:{port}",
                        MODEL_NAME,
                        concurrency=concurrency,
                        requests=requests,
                        max_tokens=MAX_TOKENS,
                    )
                    if result.errors:
                        raise RuntimeError(f"{name}: {result.errors} failed requests (log: {log_path})")
                    results.setdefault((name, f"c={concurrency} req/s"), []).append(result.requests_per_second)
                    results.setdefault((name, f"c={concurrency} TTFT p50 (ms)"), []).append(result.ttft_ms(0.5))
                    results.setdefault((name, f"c={concurrency} TTFT p99 (ms)"), []).append(result.ttft_ms(0.99))
        finally:
            stop(process, graceful)
    print(f"  {name}: done (log {log_path})", file=sys.stderr)


def machine() -> str:
    import ray
    import vllm

    return (
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {platform.system()}, "
        f"Python {platform.python_version()}, vLLM {vllm.__version__}, Ray {ray.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="cold starts of each server")
    parser.add_argument("--repeats", type=int, default=3, help="load measurements per cold start")
    parser.add_argument("--json", type=Path, help="also write the medians here")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = build_tiny_llama(REPO / ".cache" / "models" / "tiny-llama")
    home = tempfile.mkdtemp(prefix="raylm-bench-")
    servers = {
        "vllm": (lambda port, log: start_vllm(model, port, log), signal.SIGTERM),
        "raylm": (lambda port, log: start_raylm(model, port, log, home), signal.SIGINT),
    }
    results: dict[tuple[str, str], list[float]] = {}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
        for name, (start, graceful) in servers.items():
            asyncio.run(measure(name, start, graceful, args.repeats, results))

    metrics = list(dict.fromkeys(metric for _, metric in results))
    medians = {(name, metric): median(values) for (name, metric), values in results.items()}
    print(f"\nmachine: {machine()}")
    print(
        f"model: tiny Llama (2 layers, hidden 128), streaming completions of {MAX_TOKENS} tokens; "
        f"{args.rounds} cold starts x {args.repeats} load runs per server; medians\n"
    )
    print(f"{'metric':24} {'vllm':>10} {'raylm':>10} {'raylm/vllm':>11}")
    for metric in metrics:
        ours, theirs = medians[("raylm", metric)], medians[("vllm", metric)]
        print(f"{metric:24} {theirs:10.1f} {ours:10.1f} {ours / theirs:11.2f}")
    checks = [
        ("req/s at c=16 >= 0.9x vLLM", medians[("raylm", "c=16 req/s")] >= 0.9 * medians[("vllm", "c=16 req/s")]),
        (
            "TTFT p50 at c=1 <= vLLM + 10 ms",
            medians[("raylm", "c=1 TTFT p50 (ms)")] <= medians[("vllm", "c=1 TTFT p50 (ms)")] + 10,
        ),
        ("cold start <= vLLM + 30 s", medians[("raylm", "cold start (s)")] <= medians[("vllm", "cold start (s)")] + 30),
    ]
    print()
    for label, ok in checks:
        print(f"{'met ' if ok else 'MISSED'} {label}")
    if args.json:
        args.json.write_text(json.dumps({f"{n} {m}": v for (n, m), v in medians.items()}, indent=2))


if __name__ == "__main__":
    main()
