"""The engine's threads alone and in a Ray Serve replica: CPU time, run delay and switches per request.

    .venv/bin/python bench/engine_threads.py [--engine sglang|vllm] [--rounds 2] [--concurrency 16]

Starts the engine's own server from a shell, loads it, then a raylm deployment of the same model and
loads the engine server its replica started on its own port (the `engine-in-ray` layer of
bench/run.py); who goes first alternates by round. Around each load run it reads every thread's
scheduler statistics (`/proc/PID/task/TID/schedstat`: time on a CPU, time waiting for one, time
slices; `status`: voluntary and involuntary switches) and prints them per request, the engine's
threads by process and name, everything else by group (bench/cpu_shares.py). A thread that waits
longer for the CPU in one layer than in the other shows where that layer's time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from functools import partial
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_shares import group_of  # noqa: E402
from loadgen import run_load  # noqa: E402
from servers import ENGINES, MAX_TOKENS, MODEL_NAME, REPO, REQUESTS, SGLANG_PYTHON, serving, warm_up  # noqa: E402

from raylm.testing.models import build_tiny_llama  # noqa: E402
from raylm.testing.processes import engine_behind  # noqa: E402

COLUMNS = ("run", "delay", "slices", "voluntary", "involuntary")


def thread_stats() -> dict[tuple[int, int], tuple[str, str, list[int]]]:
    """(pid, tid) -> (row label, group, [run ns, run delay ns, slices, voluntary, involuntary switches])."""
    stats = {}
    for process in psutil.process_iter():
        try:
            group, name = group_of(process), process.name()
            for tid in os.listdir(f"/proc/{process.pid}/task"):
                task = f"/proc/{process.pid}/task/{tid}"
                run, delay, slices = map(int, Path(f"{task}/schedstat").read_text().split())
                status = dict(line.split(":", 1) for line in Path(f"{task}/status").read_text().splitlines())
                switches = [int(status["voluntary_ctxt_switches"]), int(status["nonvoluntary_ctxt_switches"])]
                thread = Path(f"{task}/comm").read_text().strip()
                label = f"{name[:20]} / {thread[:16]}" if group == "engine" else ""
                stats[(process.pid, int(tid))] = (label, group, [run, delay, slices, *switches])
        except (psutil.Error, OSError, KeyError, ValueError):
            continue  # a thread that ended meanwhile
    return stats


def per_request(before: dict, after: dict, requests: int) -> dict[tuple[str, str], list[float]]:
    rows: dict[tuple[str, str], list[float]] = {}
    for key, (label, group, values) in after.items():
        start = before.get(key, (label, group, [0] * len(COLUMNS)))[2]
        row = rows.setdefault((group, label), [0.0] * len(COLUMNS))
        for i, (end, begin) in enumerate(zip(values, start)):
            row[i] += (end - begin) / requests
    return rows


async def measure(layer: str, url: str, api_key: str | None, concurrency: int, results: dict) -> None:
    await warm_up(url, api_key)
    before, stolen = thread_stats(), psutil.cpu_times().steal
    result = await run_load(
        url, MODEL_NAME, concurrency=concurrency, requests=REQUESTS[concurrency], max_tokens=MAX_TOKENS, api_key=api_key
    )
    after, stolen = thread_stats(), psutil.cpu_times().steal - stolen
    run = (result.requests_per_second, 1000 * stolen / result.requests, per_request(before, after, result.requests))
    results.setdefault(layer, []).append(run)


async def alone(engine: str, model: Path, concurrency: int, results: dict) -> None:
    setup = ENGINES[engine]
    async with serving(engine, partial(setup.own_server, model), setup.env, signal.SIGTERM) as (url, _):
        await measure("engine", url, None, concurrency, results)


async def in_ray(engine: str, model: Path, concurrency: int, results: dict, home: str) -> None:
    command = partial(ENGINES[engine].through_raylm, engine, model)
    async with serving(f"raylm+{engine}", command, {"RAYLM_HOME": home}, signal.SIGINT):
        await measure("engine-in-ray", *engine_behind(MODEL_NAME), concurrency, results)


def report(results: dict) -> None:
    for layer, runs in results.items():
        rates = ", ".join(f"{rate:.1f}" for rate, _, _ in runs)
        stolen = ", ".join(f"{ms:.2f}" for _, ms, _ in runs)
        print(f"\n{layer}: req/s {rates}; CPU stolen by the hypervisor, ms per request: {stolen}")
        print(f"per request, averaged over {len(runs)} run(s)")
        print(f"{'group':16}{'process / thread':40}{'run ms':>8}{'delay ms':>10}{'slices':>8}{'vol':>7}{'invol':>7}")
        rows: dict[tuple[str, str], list[float]] = {}
        for _, _, run_rows in runs:
            for key, values in run_rows.items():
                total = rows.setdefault(key, [0.0] * len(COLUMNS))
                for i, value in enumerate(values):
                    total[i] += value / len(runs)
        for (group, label), values in sorted(rows.items(), key=lambda row: -row[1][0]):
            run, delay, slices, voluntary, involuntary = values
            if run >= 50_000:  # 0.05 ms per request
                times = f"{run / 1e6:8.2f}{delay / 1e6:10.2f}"
                print(f"{group:16}{label:40}{times}{slices:8.1f}{voluntary:7.1f}{involuntary:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="sglang", choices=sorted(ENGINES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16, choices=sorted(REQUESTS))
    args = parser.parse_args()
    if args.engine == "sglang" and not SGLANG_PYTHON.exists():
        sys.exit("no SGLang environment: run scripts/sglang-env, or pass --engine vllm")
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = build_tiny_llama(REPO / ".cache" / "models" / "tiny-llama")
    home = tempfile.mkdtemp(prefix="raylm-bench-")
    results: dict = {}
    for round_index in range(args.rounds):
        layers = [
            partial(alone, args.engine, model, args.concurrency, results),
            partial(in_ray, args.engine, model, args.concurrency, results, home),
        ]
        for layer in layers if round_index % 2 == 0 else reversed(layers):
            asyncio.run(layer())
    print(f"{args.engine}, c={args.concurrency}, streaming completions of {MAX_TOKENS} tokens, {args.rounds} rounds")
    report(results)


if __name__ == "__main__":
    main()
