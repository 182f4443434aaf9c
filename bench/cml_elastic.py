"""An autoscaled, self-healing cluster on FakeCML with real Ray and vLLM: how long each step takes.

    .venv/bin/python bench/cml_elastic.py

A FakeCML project; `raylm cluster up --backend cai --max-workers 2 --idle-timeout 20` (a head of
1 CPU, workers of 2); `raylm serve` of the tiny Llama with 2 replicas of 1 CPU, so the second one
needs a worker that Ray's autoscaler creates. Then:

1. Unmet demand to serving: from `raylm serve` starting to the worker application created, to it
   running, and to the deployment ready with both replicas (which includes the engine's own start).
2. A head restart (a new pod, a new IP): from the restart to the deployment answering again at the
   head application's URL, with nobody acting.
3. Idle to deleted: from `raylm stop` to the idle worker's application deleted.
4. Applications (and pod processes) left after `raylm cluster down`: must be 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import machine  # noqa: E402

from raylm.engine import args_to_argv  # noqa: E402
from raylm.testing.cli import run_raylm  # noqa: E402
from raylm.testing.models import TINY_LLAMA_VLLM_ARGS, build_tiny_llama  # noqa: E402
from raylm.waiting import wait_until  # noqa: E402
from raylm_cai.client import CMLClient  # noqa: E402
from raylm_cai.testing import DEFAULT_RUNTIME, FakeCML  # noqa: E402

KEY = "bench-cml-key"
SIZES = ["--head-cpu", "1", "--head-memory", "3", "--worker-cpu", "2", "--worker-memory", "3"]
CLUSTER = ["--backend", "cai", "--cluster", "elastic"]
IDLE_TIMEOUT_S = 20


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="raylm-bench-cml-"))
    model = build_tiny_llama(root / "tiny-llama")
    with FakeCML(root / "cml", api_keys=(KEY,)) as cml:
        project = cml.create_project("bench")
        env = cml.session_environment(project["id"])
        client = CMLClient(cml.url, KEY)

        def raylm(*args: str) -> str:
            done = run_raylm(*args, env=env, cwd=env["HOME"])
            if done.returncode != 0:
                sys.exit(f"`raylm {' '.join(args)}` failed:\n{done.stderr}")
            return done.stdout

        def names() -> list[str]:
            return sorted(app["name"] for app in cml.applications())

        def status(name: str) -> str | None:
            return next((app["status"] for app in cml.applications() if app["name"] == name), None)

        def moment(condition, timeout_s: float = 900) -> float:
            wait_until(condition, timeout_s=timeout_s, poll_s=0.2, on_timeout=lambda: SystemExit("timed out"))
            return time.monotonic()

        cluster = [*CLUSTER, *SIZES, "--runtime-identifier", DEFAULT_RUNTIME]
        raylm("cluster", "up", *cluster, "--max-workers", "2", "--idle-timeout", str(IDLE_TIMEOUT_S))
        worker = "raylm-elastic-worker-1"

        # 1. unmet demand -> a worker -> both replicas serving
        serve = [sys.executable, "-m", "raylm", "serve", str(model), "--name", "tiny", *CLUSTER, "--replicas", "2"]
        serve += ["--detach", *args_to_argv(TINY_LLAMA_VLLM_ARGS)]
        started = time.monotonic()
        serving = subprocess.Popen(serve, env=env, cwd=env["HOME"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        created = moment(lambda: status(worker) is not None)
        running = moment(lambda: status(worker) == "APPLICATION_RUNNING")
        out, err = serving.communicate(timeout=900)
        if serving.returncode != 0:
            sys.exit(f"serve failed:\n{err.decode()}")
        ready = time.monotonic()
        url = out.decode().strip().splitlines()[-1]

        # 2. head restart -> answering again at the head application's URL
        (head,) = [app for app in cml.applications() if app["name"] == "raylm-elastic-head"]
        restarted = time.monotonic()
        client.call("POST", f"projects/{project['id']}/applications/{head['id']}:restart")

        def answers() -> bool:
            try:
                front = cml.application_url("raylm-elastic-head")
                body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
                return httpx.post(f"{front}/v1/completions", json=body, timeout=30).status_code == 200
            except (httpx.HTTPError, KeyError, ValueError):
                return False

        healed = moment(answers)
        record = json.loads(raylm("status", "tiny", "--json"))[0]

        # 3. idle -> worker deleted
        stopped = time.monotonic()
        raylm("stop", "tiny")
        deleted = moment(lambda: worker not in names(), timeout_s=600)

        # 4. down -> nothing left
        raylm("cluster", "down", *CLUSTER)
        left, processes = len(cml.applications()), len(cml.pod_processes())

    print(machine())
    print(f"served at {url} then, after the head restart, at {record['url']}/v1")
    print("| step | seconds |")
    print("|---|---|")
    print(f"| `raylm serve` to the worker application created (deciding) | {created - started:.1f} |")
    print(f"| ... to the worker application running (placing) | {running - created:.1f} |")
    print(f"| ... to both replicas serving (the engine's start included) | {ready - running:.1f} |")
    print(f"| head restart to the deployment answering again | {healed - restarted:.1f} |")
    print(f"| `raylm stop` to the idle worker deleted (idle timeout {IDLE_TIMEOUT_S} s) | {deleted - stopped:.1f} |")
    print(f"| applications / pod processes left after `cluster down` | {left} / {processes} |")


if __name__ == "__main__":
    main()
