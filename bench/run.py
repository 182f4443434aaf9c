"""raylm against the engine's own OpenAI server, on the same model, in one run.

    .venv/bin/python bench/run.py [--rounds 2] [--repeats 3]

For each round, each server in turn is cold-started (command start to first
streamed token), then measured with streaming completions at concurrency 1
and 16 (`--repeats` times each); only one server runs at a time, and which goes
first alternates by round. The table shows medians over all measurements with
their range, and the ratios the targets are set in.
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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import Connection, median, run_load  # noqa: E402

from raylm.testing.models import build_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "tiny"
MAX_TOKENS = 32
LOADS = {1: 40, 16: 320}  # concurrency: requests
SGLANG_PYTHON = REPO / ".venv-sglang" / "bin" / "python"
# SGLang on a CPU-only machine needs its CPU paths and the test-only stand-ins (see that folder's README).
SGLANG_CPU_ENV = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "PYTHONPATH": str(REPO / "plugins" / "engine_sglang" / "tests" / "support"),
}


@dataclass(frozen=True)
class EngineSetup:
    """How to run one engine's own server, and the same model through raylm."""

    python: str
    server_module: str
    model_option: str
    args: tuple[str, ...]
    env: dict = field(default_factory=dict)

    def own_server(self, model: Path, port: int) -> list[str]:
        return [
            self.python,
            "-m",
            self.server_module,
            self.model_option,
            str(model),
            "--served-model-name",
            MODEL_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *self.args,
        ]

    def through_raylm(self, engine: str, model: Path, port: int) -> list[str]:
        command = [
            str(Path(sys.executable).parent / "raylm"),
            "serve",
            str(model),
            "--name",
            MODEL_NAME,
            "--port",
            str(port),
            "--engine",
            engine,
            "--python",
            self.python,
        ]
        command += [f"--env={key}={value}" for key, value in self.env.items()]
        return [*command, *self.args]


ENGINES = {
    "vllm": EngineSetup(
        sys.executable,
        "vllm.entrypoints.openai.api_server",
        "--model",
        ("--max-model-len", "512", "--dtype", "float32", "--kv-cache-memory-bytes", str(256 * 2**20)),
    ),
    "sglang": EngineSetup(
        str(SGLANG_PYTHON),
        "sglang.launch_server",
        "--model-path",
        ("--device", "cpu", "--max-total-tokens", "4096", "--dtype", "float32"),
        SGLANG_CPU_ENV,
    ),
}


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


def start(command: list[str], log, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env}
    )


def stop(process: subprocess.Popen, graceful: signal.Signals) -> None:
    process.send_signal(graceful)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # anything left in its session


async def measure(
    name: str, command, env: dict, graceful: signal.Signals, repeats: int, results: dict, while_idle=None
) -> None:
    """Cold-start one server, then load it; `while_idle()`, if given, runs between warm-up and load
    and returns more metrics."""
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"raylm-bench-{name}.log"
    with open(log_path, "wb") as log:
        started = time.monotonic()
        process = start(command(port), log, env)
        try:
            await first_token(port)
            results.setdefault((name, "cold start (s)"), []).append(time.monotonic() - started)
            await run_load(f"http://127.0.0.1:{port}", MODEL_NAME, concurrency=4, requests=20, max_tokens=MAX_TOKENS)
            if while_idle is not None:
                for metric, value in (await asyncio.to_thread(while_idle)).items():
                    results.setdefault((name, metric), []).append(value)
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


def report(engine: str, results: dict, medians: dict) -> None:
    own, ours = engine, f"raylm+{engine}"

    def cell(name: str, metric: str) -> str:
        values = results[(name, metric)]
        return f"{medians[(name, metric)]:.1f} [{min(values):.0f}-{max(values):.0f}]"

    print(f"\n{'metric':20} {own:>20} {ours:>20} {'ratio':>6}")
    for metric in dict.fromkeys(m for n, m in medians if n == own):
        print(
            f"{metric:20} {cell(own, metric):>20} {cell(ours, metric):>20} "
            f"{medians[(ours, metric)] / medians[(own, metric)]:6.2f}"
        )
    checks = [
        ("req/s at c=16 >= 0.9x", medians[(ours, "c=16 req/s")] >= 0.9 * medians[(own, "c=16 req/s")]),
        ("TTFT p50 at c=1 <= +10 ms", medians[(ours, "c=1 TTFT p50 (ms)")] <= medians[(own, "c=1 TTFT p50 (ms)")] + 10),
        ("cold start <= +30 s", medians[(ours, "cold start (s)")] <= medians[(own, "cold start (s)")] + 30),
    ]
    print(
        "targets against " + engine + ": " + ", ".join(f"{label} {'met' if ok else 'MISSED'}" for label, ok in checks)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="vllm,sglang", help="comma-separated: vllm, sglang")
    parser.add_argument("--rounds", type=int, default=2, help="cold starts of each server")
    parser.add_argument("--repeats", type=int, default=3, help="load measurements per cold start")
    parser.add_argument("--json", type=Path, help="also write the medians here")
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    if "sglang" in engines and not SGLANG_PYTHON.exists():
        sys.exit("no SGLang environment: run scripts/sglang-env, or pass --engines vllm")
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = build_tiny_llama(REPO / ".cache" / "models" / "tiny-llama")
    home = tempfile.mkdtemp(prefix="raylm-bench-")
    results: dict[tuple[str, str], list[float]] = {}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
        for engine in engines:
            setup = ENGINES[engine]
            runs = [
                (engine, partial(setup.own_server, model), setup.env, signal.SIGTERM),
                (f"raylm+{engine}", partial(setup.through_raylm, engine, model), {"RAYLM_HOME": home}, signal.SIGINT),
            ]
            # Alternate who goes first: the first server of a run starts with colder caches.
            for name, command, env, graceful in runs if round_index % 2 == 0 else reversed(runs):
                asyncio.run(measure(name, command, env, graceful, args.repeats, results))

    print(f"\nmachine: {machine()}")
    print(
        f"model: tiny Llama (2 layers, hidden 128), streaming completions of {MAX_TOKENS} tokens; "
        f"{args.rounds} cold starts x {args.repeats} load runs per server; medians, and [min-max] over the runs"
    )
    medians = {key: median(values) for key, values in results.items()}
    for engine in engines:
        report(engine, results, medians)
    if args.json:
        args.json.write_text(json.dumps({f"{n} {m}": v for (n, m), v in medians.items()}, indent=2))


if __name__ == "__main__":
    main()
