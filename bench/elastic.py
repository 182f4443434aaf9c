"""How fast replicas follow the load, and what a model scaled to zero costs its first request.

    .venv/bin/python bench/elastic.py

`raylm serve` (local backend) of two tiny-Llama models: `tiny` autoscaled 1-2 replicas at 2
requests each (upscale delay 0, downscale delay 10 s) and `idle` with `min_replicas: 0`. Then:

1. The load step: one stream at a time on `tiny` for 10 s, then 16. Times from the step to Serve
   deciding on a second replica (it appears in Serve's replica states), to that replica registering
   with the router, to the router sending it requests; the engine's own start (its replica's log)
   splits the second part into the engine and what the replica adds. Then back to one stream until
   `tiny` has one replica again. Every stream's outcome is counted: a failed or cut one is a failure.
2. Scale from zero: the time from the first request for `idle` to its first streamed token, and
   from idle to no replica again.

Targets (issue 18): decided within the upscale delay + 5 s; the replica adds at most 5 s to the
engine's own start; 0 failed requests.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

HOME = Path(tempfile.mkdtemp(prefix="raylm-bench-elastic-"))
os.environ.update(RAYLM_HOME=str(HOME), HF_HUB_OFFLINE="1")  # before raylm reads its home

import httpx  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import REPO, machine  # noqa: E402

from raylm.api import make_backend  # noqa: E402
from raylm.deployments import DEPLOYMENTS  # noqa: E402
from raylm.net import free_port  # noqa: E402
from raylm.plugins import get_registry  # noqa: E402
from raylm.serving.apps import RayServeApps, app_name  # noqa: E402
from raylm.testing.cli import run_raylm  # noqa: E402
from raylm.testing.models import TINY_LLAMA_VLLM_ARGS, build_tiny_llama  # noqa: E402
from raylm.testing.replicas import replicas_registered, replicas_serving  # noqa: E402
from raylm.testing.streams import Streams  # noqa: E402
from raylm.waiting import wait_until  # noqa: E402
from raylm_local.backend import ray_temp_dir  # noqa: E402

NAME = "bench-elastic"
UPSCALE_DELAY_S = 0.0
TINY = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": UPSCALE_DELAY_S,
        "downscale_delay_s": 10}  # fmt: skip
IDLE = {"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 10}
ENGINE_READY = re.compile(r"model (\S+): engine ready at \S+ after ([0-9.]+)s")


def engine_starts(model: str) -> list[float]:
    """Each replica's engine start of `model`, in seconds, from the replicas' Serve logs (oldest first)."""
    logs = sorted(ray_temp_dir(HOME, NAME).glob("session_*/logs/serve/replica_*.log"), key=lambda p: p.stat().st_mtime)
    found = [ENGINE_READY.search(line) for log in logs for line in log.read_text(errors="replace").splitlines()]
    return [float(match[2]) for match in found if match and match[1] == model]


def first_time(condition, timeout_s: float) -> float:
    wait_until(condition, timeout_s=timeout_s, poll_s=0.2, on_timeout=lambda: RuntimeError("timed out"))
    return time.monotonic()


def load_step(url: str, apps: RayServeApps) -> dict:
    tiny_app = app_name(NAME, "tiny")
    light = Streams(url, "tiny", count=1)
    time.sleep(10)
    step = time.monotonic()
    busy = Streams(url, "tiny", count=15)  # 16 streams in all
    decided = first_time(lambda: sum(apps.replica_states([tiny_app])[tiny_app].values()) >= 2, 120)
    registered = first_time(lambda: replicas_registered(url, "tiny") == 2, 600)
    serving = first_time(lambda: len(replicas_serving(url, "tiny")) == 2, 60)
    outcomes = busy.stop()
    down_started = time.monotonic()
    first_time(lambda: replicas_registered(url, "tiny") == 1, 300)
    down = time.monotonic() - down_started
    outcomes += light.stop()
    engine = engine_starts("tiny")[-1]
    return {
        "deciding (s)": decided - step,
        "placing + replica + engine start (s)": registered - decided,
        "  of which tiny's engine start (s)": engine,
        "  of which the replica adds (s)": registered - decided - engine,
        "registered -> taking requests (s)": serving - registered,
        "load step -> second replica serving (s)": serving - step,
        "load gone -> back to 1 replica (s)": down,
        "streams": len(outcomes),
        "failed streams": sum(outcome != "whole" for outcome in outcomes),
    }


def scale_from_zero(url: str) -> dict:
    assert replicas_registered(url, "idle") == 0
    request = {"model": "idle", "prompt": "Hello", "max_tokens": 8, "stream": True}
    started = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/completions", json=request, timeout=600) as response:
        response.raise_for_status()
        lines = response.iter_lines()
        first_token = next(line for line in lines if line.startswith("data: {"))
        first = time.monotonic() - started
        body = first_token + "".join(lines)
    idle_since = time.monotonic()
    first_time(lambda: replicas_registered(url, "idle") == 0, 300)
    return {
        "first request -> first token (s)": first,
        "  of which idle's engine start (s)": engine_starts("idle")[-1],
        "answered whole": body.rstrip().endswith("data: [DONE]"),
        "idle -> no replica (s)": time.monotonic() - idle_since,
    }


def main() -> None:
    model = build_tiny_llama(REPO / ".cache" / "models" / "tiny-llama")
    port = free_port()
    common = {"model": str(model), "engine_args": TINY_LLAMA_VLLM_ARGS}
    models = [{**common, "name": "tiny", "autoscaling": TINY}, {**common, "name": "idle", "autoscaling": IDLE}]
    plan = HOME / "deploy.yaml"
    plan.write_text(yaml.safe_dump({"name": NAME, "server": {"port": port}, "models": models}))
    started = run_raylm("serve", "-f", str(plan), "--detach", env=os.environ)
    if started.returncode != 0:
        raise SystemExit(started.stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        record = DEPLOYMENTS.load(NAME)
        backend = make_backend(record.backend, record.backend_options, get_registry())
        apps = RayServeApps(record.address, backend.client_environment())
        step = load_step(url, apps)
        apps.close()
        zero = scale_from_zero(url)
    finally:
        stopped = run_raylm("stop", NAME, env=os.environ)
    print(f"\n{machine()}; upscale delay {UPSCALE_DELAY_S:g} s")
    for name, value in {**step, **zero}.items():
        print(f"{name:44}{value:10.1f}" if isinstance(value, float) else f"{name:44}{value!s:>10}")
    print(f"stopped cleanly: {stopped.returncode == 0}")
    checks = {
        "decided within the upscale delay + 5 s": step["deciding (s)"] <= UPSCALE_DELAY_S + 5,
        "the replica adds <= 5 s to the engine's start": step["  of which the replica adds (s)"] <= 5,
        "0 failed streams": step["failed streams"] == 0,
    }
    print("targets: " + ", ".join(f"{label} {'met' if ok else 'MISSED'}" for label, ok in checks.items()))


if __name__ == "__main__":
    main()
