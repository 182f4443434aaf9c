"""FakeCML's "pods": each application or job run is a real local process tree, with an IP of its own
(a loopback address) and a private temporary folder that every process of the pod carries as TMPDIR."""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from raylm.toolkit import end_processes, free_ports_in, kill_processes

STOP_GRACE_S = 10.0
# Loopback addresses handed to workloads, one per "pod", unique within this Python process.
_pod_addresses = (f"127.0.{high}.{low}" for high in itertools.count() for low in range(2, 255))
_pod_addresses_lock = threading.Lock()


def next_pod_ip() -> str:
    with _pod_addresses_lock:
        return next(_pod_addresses)


# Ports for CDSW_APP_PORT and the like: below the kernel's ephemeral range (32768+), where an outgoing
# connection could take one before the workload binds it, and apart from what a Ray node on the same
# host uses (10001, worker ports 10002-19999), from raylm-local's heads (20000-24999) and engine servers
# (25000-29999).
POD_PORTS = range(30000, 32768)


def free_pod_port() -> int:
    return free_ports_in(POD_PORTS)[0]


@dataclass
class Workload:
    """A "pod": the process of an application or a job run, and what CML gave it."""

    engine_id: str
    ip: str
    process: subprocess.Popen | None = None
    app_port: int = 0
    started: float = field(default_factory=time.monotonic)
    log: Path | None = None

    def folder(self, pods_root: Path) -> Path:
        """The pod's temporary folder (short: Unix socket paths must stay under 108 bytes)."""
        return pods_root / self.engine_id[:8]


def members(folder: Path) -> list[psutil.Process]:
    """The live processes of the pod(s) under `folder`: everything started in it carries a TMPDIR there
    (an engine server gets a temporary folder of its own inside)."""
    found = []
    for process in psutil.process_iter():
        try:
            tmpdir = process.environ().get("TMPDIR", "")
            if (tmpdir == str(folder) or tmpdir.startswith(f"{folder}/")) and process.status() != "zombie":
                found.append(process)
        except psutil.Error:
            continue
    return found


def kill(folder: Path) -> None:
    """SIGKILL every process of the pod(s) under `folder` at once, as a lost node would end them."""
    kill_processes(members(folder))


def start(workload: Workload, command: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
    """Start the pod's first process, its output in `log`."""
    workload.log = log
    with open(log, "wb") as output:
        workload.process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    workload.started = time.monotonic()


def end(workload: Workload, pods_root: Path) -> bool:
    """End a pod like a container runtime: SIGTERM to its first process, SIGKILL to all of it after the
    grace time. True when something had to be killed."""
    folder = workload.folder(pods_root)
    first = psutil.Process(workload.process.pid) if workload.process.poll() is None else None
    # Like a container runtime's cgroup kill: what the pod starts while it stops goes too.
    killed = end_processes(members(folder), STOP_GRACE_S, leader=first, find=lambda: members(folder))
    workload.process.wait()
    return bool(killed)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status < 400
    except OSError:
        return False
