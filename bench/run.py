"""raylm against each engine's own server, layer by layer, side by side in one run.

    .venv/bin/python bench/run.py [--engines vllm,sglang] [--rounds 3] [--repeats 2] [--concurrency 1,16,64]
                                  [--model tiny-llama|smollm2-135m-instruct] [--scale 1.0] [--engine-cpus 0]

Layers:
- `engine`: the engine's own OpenAI server, started as a user starts it from a shell;
- `router+engine`: raylm's router (`python -m raylm.serving.router`) in front of that same server;
- `engine-in-ray`: the engine server a raylm deployment started in a Ray Serve replica, hit on its
  own port;
- `raylm`: that deployment through its endpoint, end to end.
Each round cold-starts the engine alone (with the router in front), then raylm (the order of the
two alternates by round); only one of them runs at a time. The two layers of each are loaded in
turn, who goes first alternating. Every layer is loaded by two load generators, `loadgen`
(bench/loadgen.py, raw asyncio) and `aiohttp` (an ordinary client), with streaming completions of
32 tokens at each concurrency (`--scale` shrinks the requests per load run, for a slower model).
The tables give medians with [min-max] over every load run, the ratio raylm/engine, and the
targets: raylm >= 0.97x req/s at c=16 and c=64 and c=1 TTFT p50 within +2 ms, for both load
generators; cold start within +15 s. With `--engine-cpus`, every layer's engine runs on those CPUs and
the router, Ray and the load generator on the others (bench/split_cores.py), as on a node whose
engine works on a GPU: what raylm costs then is the hop, not its CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_shares import GROUPS  # noqa: E402
from loadgen import LOAD_GENERATORS, median  # noqa: E402
from servers import (  # noqa: E402
    ENGINES,
    MAX_TOKENS,
    MODEL_NAME,
    REPO,
    SGLANG_PYTHON,
    load,
    machine,
    serving,
    warm_up,
)
from split_cores import cores_split, engine_cpus_option  # noqa: E402

from raylm.testing.models import build_smollm2, build_tiny_llama  # noqa: E402
from raylm.testing.processes import engine_behind  # noqa: E402

LAYERS = ("engine", "router+engine", "engine-in-ray", "raylm")
MODELS = {"tiny-llama": build_tiny_llama, "smollm2-135m-instruct": build_smollm2}


def router_in_front(engine_url: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "raylm.serving.router",
        "--port",
        str(port),
        "--upstream",
        f"{MODEL_NAME}={engine_url}",
    ]


@dataclass
class Run:
    """What one run measures, and what it has collected so far."""

    model: Path
    concurrencies: list[int]
    repeats: int
    scale: float
    engine_cpus: set[int] | None  # the engine's own CPUs (bench/split_cores.py), or None: every process floats
    home: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="raylm-bench-"))
    results: dict = field(default_factory=dict)
    cold_starts: dict = field(default_factory=dict)


async def alternately(layers: list[tuple[tuple[str, str], str, str | None]], run: Run) -> None:
    """Load two layers (name, URL, API key) of one server in turn, swapping who goes first each time: an
    engine's own speed drifts over its life, and measuring one layer after the other would put that
    drift between them."""
    with cores_split(run.engine_cpus):
        for _, url, api_key in layers:
            await warm_up(url, api_key)
        for repeat in range(run.repeats):
            for name, url, api_key in layers if repeat % 2 == 0 else reversed(layers):
                await load(
                    name, url, run.concurrencies, 1, run.results, scale=run.scale, api_key=api_key, cpu_shares=True
                )


async def engine_layers(engine: str, run: Run) -> None:
    setup = ENGINES[engine]
    command = partial(setup.own_server, run.model)
    async with serving(engine, command, setup.env, signal.SIGTERM) as (url, cold_start):
        run.cold_starts.setdefault((engine, "engine"), []).append(cold_start)
        async with serving("router", partial(router_in_front, url), {}, signal.SIGTERM) as (router_url, _):
            layers = [((engine, "engine"), url, None), ((engine, "router+engine"), router_url, None)]
            await alternately(layers, run)


async def raylm_layers(engine: str, run: Run) -> None:
    setup = ENGINES[engine]
    command = partial(setup.through_raylm, engine, run.model)
    async with serving(f"raylm+{engine}", command, {"RAYLM_HOME": run.home}, signal.SIGINT) as (url, cold_start):
        run.cold_starts.setdefault((engine, "raylm"), []).append(cold_start)
        # the engine a replica started takes only requests with the replica's key, as the router sends them
        layers = [((engine, "engine-in-ray"), *engine_behind(MODEL_NAME)), ((engine, "raylm"), url, None)]
        await alternately(layers, run)


def cell(values: list[float]) -> str:
    return f"{median(values):.1f} [{min(values):.0f}-{max(values):.0f}]"


def report(engine: str, results: dict, cold_starts: dict, concurrencies: list[int]) -> None:
    checks = []
    for generator in LOAD_GENERATORS:
        print(f"\n{engine}, load generator {generator}")
        print(f"{'metric':20}" + "".join(f"{layer:>22}" for layer in LAYERS) + "  raylm/engine")
        for concurrency in concurrencies:
            for metric in ("req/s", "TTFT p50 (ms)", "TTFT p99 (ms)"):
                values = {layer: results[(generator, (engine, layer), concurrency, metric)] for layer in LAYERS}
                ours, own = median(values["raylm"]), median(values["engine"])
                row = "".join(f"{cell(values[layer]):>22}" for layer in LAYERS)
                print(f"{f'c={concurrency} {metric}':20}{row}  {ours / own:12.2f}")
                if metric == "req/s" and concurrency > 1:
                    checks.append((f"{generator} c={concurrency} req/s >= 0.97x", ours >= 0.97 * own))
                if metric == "TTFT p50 (ms)" and concurrency == 1:
                    checks.append((f"{generator} c=1 TTFT p50 <= +2 ms", ours <= own + 2))
    for concurrency in (c for c in concurrencies if c > 1):
        cpu_report(engine, results, concurrency)
    own, ours = cold_starts[(engine, "engine")], cold_starts[(engine, "raylm")]
    print(f"\ncold start (s): engine {cell(own)}, raylm {cell(ours)} (+{median(ours) - median(own):.1f})")
    checks.append(("cold start <= +15 s", median(ours) <= median(own) + 15))
    print(f"targets against {engine}: " + ", ".join(f"{label} {'met' if ok else 'MISSED'}" for label, ok in checks))


def cpu_report(engine: str, results: dict, concurrency: int) -> None:
    """Each process group's CPU per request under load (bench/cpu_shares.py), both generators' runs
    together, and raylm's own share of the CPU (its router's and Ray's processes): with the cores busy,
    as they are here, that share is taken from the engine and the load generator."""
    print(f"\n{engine}, c={concurrency}: CPU per request (ms) by process group, medians")
    print(f"{'group':20}" + "".join(f"{layer:>16}" for layer in LAYERS))
    used = {}
    for group in (*GROUPS, "idle", "stolen"):
        metric = f"CPU ms/request {group}"
        used[group] = {
            layer: median([v for g in LOAD_GENERATORS for v in results[(g, (engine, layer), concurrency, metric)]])
            for layer in LAYERS
        }
        print(f"{group:20}" + "".join(f"{used[group][layer]:16.2f}" for layer in LAYERS))
    share = {
        layer: (used["router"][layer] + used["Ray"][layer]) / sum(used[g][layer] for g in GROUPS) for layer in LAYERS
    }
    print(f"{'router+Ray share':20}" + "".join(f"{100 * share[layer]:15.1f}%" for layer in LAYERS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="vllm,sglang", help="comma-separated: vllm, sglang")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="load runs per layer, generator and concurrency")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--model", default="tiny-llama", choices=sorted(MODELS), help="the model served")
    parser.add_argument("--scale", type=float, default=1.0, help="requests per load run, as a share of the default")
    parser.add_argument(
        "--engine-cpus",
        type=engine_cpus_option,
        help="comma-separated CPUs for the engine's processes alone, the router, Ray and the load generator on the "
        "others (bench/split_cores.py); default: every process on every CPU",
    )
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    if "sglang" in engines and not SGLANG_PYTHON.exists():
        sys.exit("no SGLang environment: run scripts/sglang-env, or pass --engines vllm")
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = MODELS[args.model](REPO / ".cache" / "models" / args.model)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    run = Run(model, concurrencies, args.repeats, args.scale, args.engine_cpus)
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
        for engine in engines:
            groups = [partial(engine_layers, engine, run), partial(raylm_layers, engine, run)]
            # Alternate who goes first: the first server of a round starts with colder caches.
            for group in groups if round_index % 2 == 0 else reversed(groups):
                asyncio.run(group())
    print(f"\nmachine: {machine()}")
    cores = f"; the engine on CPUs {sorted(args.engine_cpus)}, the rest on the others" if args.engine_cpus else ""
    print(
        f"model: {args.model}, streaming completions of {MAX_TOKENS} tokens; {args.rounds} rounds x {args.repeats} "
        f"load runs per layer, generator and concurrency, layers alternated; medians [min-max]{cores}"
    )
    for engine in engines:
        report(engine, run.results, run.cold_starts, concurrencies)
    if args.json:
        flat = {" ".join(map(str, key)): values for key, values in {**run.results, **run.cold_starts}.items()}
        args.json.write_text(json.dumps(flat, indent=2))


if __name__ == "__main__":
    main()
