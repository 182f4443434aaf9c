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
- worker: waits for `head.json` and for the head to answer, then
  `ray start --block --address`, and answers CML's polling on CDSW_APP_PORT once
  its node runs.

Ray's token authentication is on; the token is read from the file `token` in the
cluster's folder (`RAY_AUTH_TOKEN_PATH`), never passed on a command line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from raylm.net import address_answers
from raylm.ray_nodes import serving_node_environment, serving_node_options
from raylm.waiting import wait_until
from raylm_cai.front import DEFAULT_API_PORT, Front

GCS_PORT = 6379
DASHBOARD_PORT = 8265  # Ray's own default
HEAD_WAIT_S = 900
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
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *_node_options(ip)]
    # raylm's serving settings for Ray nodes (raylm.ray_nodes). A head stops without Ray's node drain
    # (it would only use up CML's grace time: the cluster ends with it); workers keep theirs, so Serve
    # can move their replicas.
    environment = {**serving_node_environment(os.environ, head=role == "head"), **ray_auth_environment(folder)}
    if role == "head":
        (folder / "head.json").unlink(missing_ok=True)
        command += ["--head", f"--port={GCS_PORT}", "--include-dashboard=true"]
        command += [f"--dashboard-host={ip}", f"--dashboard-port={DASHBOARD_PORT}"]
        api_port = int(os.environ.get("RAYLM_CAI_API_PORT") or DEFAULT_API_PORT)
        polling = Front(app_port, (ip, api_port), cluster)
    else:
        command.append(f"--address={_wait_for_head(folder)}")
        polling = _serve_polling(app_port)
    print(f"raylm: starting the Ray {role} of cluster {cluster!r} on {ip}", flush=True)
    ray = subprocess.Popen(
        command,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # CML stops an application with SIGTERM: `ray start --block` then stops every Ray process it started.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: ray.send_signal(signal.SIGTERM))
    for line in ray.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if STARTED_LINE in line:
            if role == "head":
                _publish_head(folder, f"{ip}:{GCS_PORT}")
            polling.ray_running = True
    sys.exit(ray.wait())


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
        *serving_node_options(),
    ]


def _wait_for_head(folder: Path) -> str:
    print(f"raylm: waiting for the head's address in {folder / 'head.json'}", flush=True)

    def answering() -> str | None:
        address = read_head_address(folder)
        return address if address and address_answers(address) else None

    return wait_until(
        answering,
        timeout_s=HEAD_WAIT_S,
        poll_s=2.0,
        on_timeout=lambda: SystemExit(
            f"raylm: no Ray head answered within {HEAD_WAIT_S}s; is the head application running?"
        ),
    )


def _publish_head(folder: Path, address: str) -> None:
    temporary = folder / "head.json.tmp"
    temporary.write_text(json.dumps({"address": address, "engine_id": os.environ.get("CDSW_ENGINE_ID")}))
    temporary.replace(folder / "head.json")
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
