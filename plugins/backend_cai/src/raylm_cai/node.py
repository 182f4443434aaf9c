"""What runs inside each CML application of a raylm cluster: one Ray node, kept in the foreground.

The applications' script (`.raylm/cai/ray_node.py` in the project, written by
`raylm cluster up`) calls `main()`. It reads the application's environment:
`RAYLM_CAI_CLUSTER`, `RAYLM_CAI_ROLE` (head or worker), `RAYLM_CAI_CPU`,
`RAYLM_CAI_MEMORY_GB`, `RAYLM_CAI_GPU`, and what CML gives every workload:
`CDSW_IP_ADDRESS` (this pod's IP, reachable from the project's other pods) and
`CDSW_APP_PORT` (the port CML polls and proxies).

- head: `ray start --head --block` on CDSW_IP_ADDRESS:6379, with Ray's dashboard on
  CDSW_IP_ADDRESS:8265 (reachable from the project's sessions). CDSW_APP_PORT is the
  front (`raylm_cai.front`): the application's URL is the OpenAI endpoint of the
  deployment served on the head, and CML marks the application running once Ray runs.
  Once started it writes its address to `head.json` in the cluster's folder of the
  project filesystem (the API gives no IP for an application).
  It then serves again the deployments kept in the cluster's folder (`raylm_cai.plans`):
  after a restart (a new pod, a new IP, an empty Ray) they come back by themselves.
- worker: waits for `head.json` and for the head to answer, then
  `ray start --block --address`, and answers CML's polling on CDSW_APP_PORT once
  its node runs. When the head is gone or a new one publishes its address, the
  node leaves and joins the new head.

Ray's token authentication is on; the token is read from the file `token` in the
cluster's folder (`RAY_AUTH_TOKEN_PATH`), never passed on a command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil

from raylm.toolkit import (
    address_answers,
    end_processes,
    ray_start_command,
    serving_node_environment,
    wait_until,
    write_atomically,
)
from raylm_cai import plans
from raylm_cai.autoscaling import BOUNDS_VARIABLE, CONFIG_FILE, publish_ip
from raylm_cai.front import DEFAULT_API_PORT, Front

GCS_PORT = 6379
DASHBOARD_PORT = 8265  # Ray's own default
HEAD_WAIT_S = 900
HEAD_POLL_S = 2.0
# A stopping pod's processes are killed after a grace time (Kubernetes' default is 30 s, FakeCML's 10 s).
# A Ray node stops within NODE_STOP_S, a worker's drain (Serve moving its replicas away) included.
NODE_STOP_S = 8.0
WORKER_DRAIN_S = 5.0
REJOIN_PAUSE_S = 2.0
STARTED_LINE = "Ray runtime started"
# Ray's default share of a node's memory for the object store.
OBJECT_STORE_SHARE = 0.3


def cluster_folder(cluster: str, project_dir: Path | None = None) -> Path:
    """The cluster's folder on the project filesystem (`/home/cdsw` on CML), shared by all its pods."""
    return (project_dir or Path.home()) / ".raylm" / "cai" / cluster


def ray_auth_environment(folder: Path) -> dict[str, str]:
    """What a Ray process (node, driver) needs to talk to the cluster: the token by file."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(folder / "token")}


def read_head_address(folder: Path) -> str | None:
    try:
        return json.loads((folder / "head.json").read_text())["address"]
    except (OSError, ValueError, KeyError):
        return None


def main() -> None:
    cluster = os.environ["RAYLM_CAI_CLUSTER"]
    role = os.environ["RAYLM_CAI_ROLE"]
    ip = os.environ["CDSW_IP_ADDRESS"]
    app_port = int(os.environ["CDSW_APP_PORT"])
    folder = cluster_folder(cluster)
    if not (folder / "token").is_file():
        sys.exit(f"raylm: no Ray token at {folder / 'token'}; start the cluster with `raylm cluster up --backend cai`")
    command = [*ray_start_command(), "--block", *_node_options(ip)]
    # raylm's serving settings for Ray nodes (raylm.ray_nodes). A head stops without Ray's node drain
    # (it would only use up CML's grace time: the cluster ends with it); workers keep theirs, so Serve
    # can move their replicas, for WORKER_DRAIN_S of the node's NODE_STOP_S.
    drain = {} if role == "head" else {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": f"{WORKER_DRAIN_S:g}"}
    environment = {**drain, **serving_node_environment(os.environ, head=role == "head"), **ray_auth_environment(folder)}
    print(f"raylm: starting the Ray {role} of cluster {cluster!r} on {ip}", flush=True)
    if role == "head":
        sys.exit(_run_head(folder, command, environment, ip, app_port))
    sys.exit(_run_worker(folder, command, environment, app_port))


def _run_head(folder: Path, command: list[str], environment: dict[str, str], ip: str, app_port: int) -> int:
    """The head's Ray node; once it runs, its address is published and the cluster's kept plans served again."""
    (folder / "head.json").unlink(missing_ok=True)
    command = [*command, "--head", f"--port={GCS_PORT}", "--include-dashboard=true"]
    command += [f"--dashboard-host={ip}", f"--dashboard-port={DASHBOARD_PORT}"]
    if os.environ.get(BOUNDS_VARIABLE):  # an autoscaled cluster: Ray's monitor runs here, over our node provider
        command.append(f"--autoscaling-config={folder / CONFIG_FILE}")
    api_port = int(os.environ.get("RAYLM_CAI_API_PORT") or DEFAULT_API_PORT)
    front = Front(app_port, (ip, api_port), os.environ["RAYLM_CAI_CLUSTER"])
    ray = _start_ray(command, environment)
    for line in _echo(ray):
        if STARTED_LINE in line:
            _publish_head(folder, f"{ip}:{GCS_PORT}")
            front.ray_running = True
            plans.serve_again(folder, f"{ip}:{GCS_PORT}")
    return ray.wait()


def _run_worker(folder: Path, command: list[str], environment: dict[str, str], app_port: int) -> int:
    """A worker's Ray node, joined to the head the cluster's folder names; when that head is gone or another
    one publishes its address (the head application restarted in a new pod), the node rejoins the new head."""
    polling = _serve_polling(app_port)
    while True:
        address = _wait_for_head(folder)
        ray = _start_ray([*command, f"--address={address}"], environment)
        threading.Thread(target=_leave_when_the_head_moves, args=(folder, address, ray), daemon=True).start()
        for line in _echo(ray):
            if STARTED_LINE in line:
                polling.ray_running = True
                if os.environ.get("RAYLM_CAI_NODE"):  # for the autoscaler, which matches nodes by IP
                    publish_ip(folder, os.environ["RAYLM_CAI_NODE"], os.environ["CDSW_IP_ADDRESS"])
        code = ray.wait()
        polling.ray_running = False
        if _stopping.is_set():
            return code
        print(f"raylm: the Ray node left the head at {address} (exit code {code}); rejoining", flush=True)
        time.sleep(REJOIN_PAUSE_S)


_stopping = threading.Event()


def _start_ray(command: list[str], environment: dict[str, str]) -> subprocess.Popen:
    ray = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # CML stops an application with SIGTERM. The node stops in a thread of its own while its output is still
    # echoed; the interpreter waits for that thread before it exits.
    def stop(*_: object) -> None:
        if _stopping.is_set():
            return
        _stopping.set()
        if ray.poll() is None:
            threading.Thread(target=_stop_node, args=(ray,)).start()
        else:
            sys.exit(0)  # a worker between two heads: no node to stop

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    return ray


def _echo(ray: subprocess.Popen) -> Iterator[str]:
    """Ray's output lines, copied to the application's log as they come."""
    for line in ray.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        yield line


def _leave_when_the_head_moves(folder: Path, address: str, ray: subprocess.Popen) -> None:
    """Stop the worker's Ray node once a head at another address is published: it would wait for the old
    head's return (Ray's GCS reconnect timeout) before giving up by itself."""
    while ray.poll() is None:
        published = read_head_address(folder)
        if published not in (None, address):
            print(f"raylm: a new Ray head runs at {published}; leaving the one at {address}", flush=True)
            _stop_node(ray)
            return
        time.sleep(HEAD_POLL_S)


def _stop_node(ray: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block`, which drains a worker and stops Ray's processes one by one, and SIGKILL to
    what is left of the node after NODE_STOP_S. Ray's own stop has no bound: it gives each of its daemons a
    second, and the dashboard's module processes, orphaned when the dashboard ends, take seconds more to go
    on a busy node."""
    with contextlib.suppress(psutil.Error):  # the node is gone already
        node = psutil.Process(ray.pid)
        end_processes([node, *node.children(recursive=True)], grace_s=NODE_STOP_S, leader=node)


def _node_options(ip: str) -> list[str]:
    # Explicit resources: Ray would otherwise count the host's CPUs and memory, not the application's.
    memory = int(float(os.environ.get("RAYLM_CAI_MEMORY_GB", "1")) * 2**30)
    return [
        f"--node-ip-address={ip}",
        f"--num-cpus={float(os.environ.get('RAYLM_CAI_CPU', '1')):g}",
        f"--num-gpus={int(os.environ.get('RAYLM_CAI_GPU', '0'))}",
        f"--memory={int(memory * (1 - OBJECT_STORE_SHARE))}",
        f"--object-store-memory={int(memory * OBJECT_STORE_SHARE)}",
        # Short and private to the pod: Unix socket paths must stay under 108 bytes.
        f"--temp-dir={Path(tempfile.gettempdir()) / 'raylm-ray'}",
    ]


def _wait_for_head(folder: Path) -> str:
    print(f"raylm: waiting for the head's address in {folder / 'head.json'}", flush=True)

    def answering() -> str | None:
        address = read_head_address(folder)
        return address if address and address_answers(address) else None

    return wait_until(
        answering,
        timeout_s=HEAD_WAIT_S,
        poll_s=HEAD_POLL_S,
        on_timeout=lambda: SystemExit(
            f"raylm: no Ray head answered within {HEAD_WAIT_S}s; is the head application running?"
        ),
    )


def _publish_head(folder: Path, address: str) -> None:
    write_atomically(
        folder / "head.json", json.dumps({"address": address, "engine_id": os.environ.get("CDSW_ENGINE_ID")})
    )
    print(f"raylm: Ray head running at {address}", flush=True)


class _PollingServer(ThreadingHTTPServer):
    daemon_threads = True
    ray_running = False


def _serve_polling(port: int) -> _PollingServer:
    """Answer CML's polling on a worker's application port: 503 while the node starts, 200 once it runs."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ready = self.server.ray_running  # type: ignore[attr-defined]
            body = b"ray node running\n" if ready else b"ray node starting\n"
            self.send_response(200 if ready else 503)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = _PollingServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
