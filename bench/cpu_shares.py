"""Where a load run's CPU went: the CPU time each group of processes took per request, and the time
the machine's cores were idle.

On a machine whose cores the engine and the load generator already keep busy, whatever else runs
(the router, Ray's daemons and actors) takes its CPU from them: a layer's throughput relative to the
engine alone is bounded by the ratio of their CPU per request. These shares show which group a
layer's extra CPU comes from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

GROUPS = ("engine", "router", "Ray", "load generator", "other")


def is_ray_process(command: str) -> bool:
    """Ray's daemons (GCS, raylet, dashboard, agents, log monitor) and its workers (Serve actors)."""
    return command.startswith("ray::") or "/site-packages/ray/" in command


def group_of(process: psutil.Process) -> str:
    if process.pid == os.getpid():
        return "load generator"
    command = " ".join(process.cmdline())
    if "raylm.serving.router" in command or "RouterReplica" in command:
        return "router"
    if "vllm" in command or "sglang" in command or process.name().startswith(("VLLM::", "sglang")):
        return "engine"
    if is_ray_process(command) or "raylm.supervise" in command:
        return "Ray"  # with raylm's own part of a replica (its actor, the engine's supervisor)
    return "other"


@dataclass
class Snapshot:
    cpu_s: dict[int, tuple[str, float]]  # pid -> (group, user + system CPU seconds)
    idle_s: float  # the machine's idle time, all cores
    stolen_s: float  # time the hypervisor gave this machine's vCPUs to others, all cores


def snapshot() -> Snapshot:
    cpu_s = {}
    for process in psutil.process_iter():
        try:
            times = process.cpu_times()
            cpu_s[process.pid] = (group_of(process), times.user + times.system)
        except psutil.Error:
            continue
    times = psutil.cpu_times()
    return Snapshot(cpu_s, times.idle + times.iowait, times.steal)


def ms_per_request(before: Snapshot, after: Snapshot, requests: int) -> dict[str, float]:
    """Each group's CPU per request between the snapshots, and the cores' idle and stolen time per request."""
    used = dict.fromkeys(GROUPS, 0.0)
    for pid, (group, cpu) in after.cpu_s.items():
        start = before.cpu_s.get(pid)
        used[group] += cpu - (start[1] if start is not None and start[0] == group else 0.0)
    used["idle"] = after.idle_s - before.idle_s
    used["stolen"] = after.stolen_s - before.stolen_s
    return {group: 1000 * seconds / requests for group, seconds in used.items()}
