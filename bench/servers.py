"""What the benchmarks run and how: each engine's own server, the same model through raylm, and the
load they put on them.

Every server is started as a user starts it from a shell: in the benchmark's session, with a
process group of its own. (The session matters on Linux with autogroup scheduling: each session is
one scheduling group, and the engines' busy-wait loops yield the CPU only within their own group;
see the README's Performance section.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from cpu_shares import ms_per_request, snapshot
from loadgen import LOAD_GENERATORS, Connection

REPO = Path(__file__).resolve().parent.parent
# SGLang on a CPU-only machine: where the tests keep its environment and what it needs to run here.
sys.path.insert(0, str(REPO / "plugins" / "engine_sglang" / "tests"))
from sglang_setup import CPU_ARGS as SGLANG_CPU_ARGS  # noqa: E402
from sglang_setup import CPU_ENV as SGLANG_CPU_ENV  # noqa: E402
from sglang_setup import SGLANG_PYTHON  # noqa: E402

MODEL_NAME = "tiny"
MAX_TOKENS = 32
REQUESTS = {1: 40, 16: 320, 64: 640}  # requests per load run, by concurrency


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
        SGLANG_CPU_ARGS,
        SGLANG_CPU_ENV,
    ),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def first_token(port: int, timeout_s: float = 1200) -> None:
    """Poll with a streaming request until one returns a token."""
    deadline = time.monotonic() + timeout_s
    payload = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2, "stream": True}
    while time.monotonic() < deadline:
        connection = Connection("127.0.0.1", port)
        try:
            if await asyncio.wait_for(connection.stream_completion("/v1/completions", payload), 10) is not None:
                return
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            pass
        finally:
            connection.close()
        await asyncio.sleep(0.25)
    raise TimeoutError("no first token")


def start(command: list[str], log, env: dict) -> subprocess.Popen:
    """As a shell starts a command: in this session, a process group of its own."""
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, process_group=0, env={**os.environ, **env})


def stop(process: subprocess.Popen, graceful: signal.Signals) -> None:
    process.send_signal(graceful)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # anything left in its process group


@contextlib.asynccontextmanager
async def serving(
    name: str, command: Callable[[int], list[str]], env: dict, graceful: signal.Signals
) -> AsyncIterator[tuple[str, float]]:
    """Start a server cold; yield its URL and its cold start (command start to first streamed token)."""
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"raylm-bench-{name}.log"
    with open(log_path, "wb") as log:
        started = time.monotonic()
        process = start(command(port), log, env)
        try:
            await first_token(port)
            yield f"http://127.0.0.1:{port}", time.monotonic() - started
        except Exception as exc:
            raise RuntimeError(f"{name}: {exc} (log: {log_path})") from exc
        finally:
            stop(process, graceful)


async def warm_up(url: str, api_key: str | None = None) -> None:
    result = await LOAD_GENERATORS["loadgen"](
        url, MODEL_NAME, concurrency=4, requests=20, max_tokens=MAX_TOKENS, api_key=api_key
    )
    if result.errors:
        raise RuntimeError(f"{result.errors} of 20 warm-up requests to {url} failed")


async def load(
    name,
    url: str,
    concurrencies: list[int],
    repeats: int,
    results: dict,
    generators=tuple(LOAD_GENERATORS),
    scale=1.0,
    api_key: str | None = None,
    cpu_shares: bool = False,
) -> None:
    """Load `url` `repeats` times at each concurrency with each generator; results[(generator, name,
    concurrency, metric)] collects req/s and TTFT p50/p99 (ms), and with `cpu_shares` each process group's
    CPU per request (`CPU ms/request GROUP`, bench/cpu_shares.py)."""
    for _ in range(repeats):
        for generator in generators:
            for concurrency in concurrencies:
                before = snapshot()
                result = await LOAD_GENERATORS[generator](
                    url,
                    MODEL_NAME,
                    concurrency=concurrency,
                    requests=max(concurrency, int(REQUESTS[concurrency] * scale)),
                    max_tokens=MAX_TOKENS,
                    api_key=api_key,
                )
                if result.errors:
                    raise RuntimeError(f"{name}: {result.errors} failed requests ({generator}, c={concurrency})")
                key = (generator, name, concurrency)
                results.setdefault((*key, "req/s"), []).append(result.requests_per_second)
                results.setdefault((*key, "TTFT p50 (ms)"), []).append(result.ttft_ms(0.5))
                results.setdefault((*key, "TTFT p99 (ms)"), []).append(result.ttft_ms(0.99))
                if cpu_shares:
                    for group, ms in ms_per_request(before, snapshot(), result.requests).items():
                        results.setdefault((*key, f"CPU ms/request {group}"), []).append(ms)


def machine() -> str:
    import ray
    import vllm

    return (
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {platform.system()}, "
        f"Python {platform.python_version()}, vLLM {vllm.__version__}, Ray {ray.__version__}"
    )
