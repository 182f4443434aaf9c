"""What Ray's own processes cost the engine: Ray's defaults against raylm's embedded-head settings.

    .venv/bin/python bench/ray_overhead.py [--rounds 2] [--repeats 3]

Serves the tiny model through raylm (local backend, vLLM) alternately with
Ray's default background settings and with the settings raylm's embedded head
uses (`raylm.ray_nodes.SERVING_NODE_ENVIRONMENT`; the environment wins
over them, which is how the first configuration gets Ray's defaults; the log
monitor, a `ray start` option, is off in both). For each,
it samples the CPU that Ray's and Serve's processes take while the deployment
is idle, then measures cold start and streaming completions at concurrency 1
and 16 with bench/loadgen.py.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_shares import ms_per_request, snapshot  # noqa: E402
from loadgen import median  # noqa: E402
from servers import ENGINES, REPO, load, serving, warm_up  # noqa: E402

from raylm.testing.models import build_tiny_llama  # noqa: E402

RAY_DEFAULTS = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1",
    "RAY_enable_metrics_collection": "1",
    "RAY_enable_task_events": "1",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "100",
    "REPORTER_UPDATE_INTERVAL_MS": "5000",
}
# Labels name the servers' log files too (/tmp/raylm-bench-LABEL.log).
CONFIGURATIONS = {"ray-defaults": RAY_DEFAULTS, "embedded-head": {}}


def ray_cpu_percent(seconds: float) -> float:
    """CPU time of Ray's and Serve's processes (the router's replica included) over `seconds`, in percent of
    one core."""
    before = snapshot()
    time.sleep(seconds)
    used_ms = ms_per_request(before, snapshot(), requests=1)
    return (used_ms["Ray"] + used_ms["router"]) / seconds / 10


async def measure(label: str, command, env: dict, repeats: int, results: dict) -> None:
    async with serving(label, command, env, signal.SIGINT) as (url, cold_start):
        results.setdefault((label, "cold start (s)"), []).append(cold_start)
        await warm_up(url)
        time.sleep(5)  # let the warm-up's aftermath settle
        results.setdefault((label, "Ray's CPU, idle (% of a core)"), []).append(ray_cpu_percent(20))
        loads: dict = {}
        await load(label, url, [1, 16], repeats, loads, generators=("loadgen",))
        for (_, _, concurrency, metric), values in loads.items():
            results.setdefault((label, f"c={concurrency} {metric}"), []).extend(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="cold starts of each configuration")
    parser.add_argument("--repeats", type=int, default=3, help="load measurements per cold start")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="raylm-bench-")
    model = build_tiny_llama(REPO / ".cache" / "models" / "tiny-llama")
    command = partial(ENGINES["vllm"].through_raylm, "vllm", model)
    results: dict[tuple[str, str], list[float]] = {}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
        for label, overrides in CONFIGURATIONS.items():
            env = {"RAYLM_HOME": home, "HF_HUB_OFFLINE": "1", **overrides}
            asyncio.run(measure(label, command, env, args.repeats, results))
    labels = list(CONFIGURATIONS)
    print(f"\n{'metric (medians)':32}" + "".join(f"{label:>24}" for label in labels))
    for metric in dict.fromkeys(m for _, m in results):
        print(f"{metric:32}" + "".join(f"{median(results[(label, metric)]):24.1f}" for label in labels))


if __name__ == "__main__":
    main()
