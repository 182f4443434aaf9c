"""What Ray's own processes cost the engine: Ray's defaults against raylm's embedded-head settings.

    .venv/bin/python bench/ray_overhead.py [--rounds 2] [--repeats 3]

Serves the tiny model through raylm (local backend, vLLM) alternately with
Ray's default background settings and with the settings raylm's embedded head
uses (`raylm_local.backend.EMBEDDED_HEAD_ENVIRONMENT`; the environment wins
over them, which is how the first configuration gets Ray's defaults). For each,
it samples the CPU that Ray's and Serve's processes take while the deployment
is idle, then measures streaming completions at concurrency 1 and 16.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import median, run_load  # noqa: E402
from run import ENGINES, LOADS, MAX_TOKENS, MODEL_NAME, REPO, first_token, free_port, start, stop  # noqa: E402

from raylm.testing.models import build_tiny_llama  # noqa: E402

RAY_DEFAULTS = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1",
    "RAY_enable_metrics_collection": "1",
    "RAY_enable_task_events": "1",
}
CONFIGURATIONS = {"Ray's defaults": RAY_DEFAULTS, "raylm's embedded head": {}}


def is_ray_process(process: psutil.Process) -> bool:
    """Ray's daemons (GCS, raylet, dashboard, agents, log monitor) and its workers (Serve actors)."""
    command = " ".join(process.cmdline())
    return command.startswith("ray::") or "/site-packages/ray/" in command


def ray_cpu_percent(seconds: float) -> float:
    """CPU time of Ray's processes over `seconds`, in percent of one core."""
    before = {}
    for process in psutil.process_iter():
        try:
            if is_ray_process(process):
                before[process] = sum(process.cpu_times()[:2])
        except psutil.Error:
            continue
    time.sleep(seconds)
    used = 0.0
    for process, cpu in before.items():
        try:
            used += sum(process.cpu_times()[:2]) - cpu
        except psutil.Error:
            continue
    return 100 * used / seconds


async def measure(label: str, env: dict, repeats: int, results: dict) -> None:
    setup = ENGINES["vllm"]
    model = build_tiny_llama(REPO / ".cache" / "models" / "tiny-llama")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.gettempdir()) / "raylm-bench-overhead.log"
    with open(log_path, "wb") as log:
        process = start(setup.through_raylm("vllm", model, port), log, env)
        try:
            await first_token(port)
            await run_load(url, MODEL_NAME, concurrency=4, requests=20, max_tokens=MAX_TOKENS)
            await asyncio.sleep(5)  # let the load's aftermath settle
            results.setdefault((label, "Ray's CPU, idle (% of a core)"), []).append(ray_cpu_percent(20))
            for _ in range(repeats):
                for concurrency, requests in LOADS.items():
                    result = await run_load(
                        url, MODEL_NAME, concurrency=concurrency, requests=requests, max_tokens=MAX_TOKENS
                    )
                    if result.errors:
                        raise RuntimeError(f"{label}: {result.errors} failed requests (log: {log_path})")
                    results.setdefault((label, f"c={concurrency} req/s"), []).append(result.requests_per_second)
                    results.setdefault((label, f"c={concurrency} TTFT p50 (ms)"), []).append(result.ttft_ms(0.5))
        finally:
            stop(process, signal.SIGINT)
    print(f"  {label}: done (log {log_path})", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="cold starts of each configuration")
    parser.add_argument("--repeats", type=int, default=3, help="load measurements per cold start")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="raylm-bench-")
    results: dict[tuple[str, str], list[float]] = {}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
        for label, overrides in CONFIGURATIONS.items():
            env = {"RAYLM_HOME": home, "HF_HUB_OFFLINE": "1", **overrides}
            asyncio.run(measure(label, env, args.repeats, results))
    labels = list(CONFIGURATIONS)
    print(f"\n{'metric (medians)':32}" + "".join(f"{label:>24}" for label in labels))
    for metric in dict.fromkeys(m for _, m in results):
        print(f"{metric:32}" + "".join(f"{median(results[(label, metric)]):24.1f}" for label in labels))


if __name__ == "__main__":
    main()
