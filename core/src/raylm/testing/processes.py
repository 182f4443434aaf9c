"""Find processes a test or a stop left behind."""

from __future__ import annotations

import psutil

from raylm.processes import DEPLOYMENT_MARKER, marked_processes


def processes_matching(*needles: str) -> list[str]:
    """Command lines of live processes that contain every one of `needles`."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            command = " ".join(process.info["cmdline"] or ())
        except psutil.Error:
            continue
        if command and all(needle in command for needle in needles):
            found.append(f"{process.pid}: {command[:200]}")
    return found


def deployment_processes(name: str) -> list[str]:
    """Live processes started for the deployment `name`: its replicas' engine servers and everything
    they started, whatever those renamed themselves to (vLLM's `VLLM::EngineCore`), by the marker in
    their environment."""
    found = []
    for process in marked_processes(DEPLOYMENT_MARKER, name):
        try:
            found.append(f"{process.pid}: {' '.join(process.cmdline())[:200]}")
        except psutil.Error:
            continue
    return found
