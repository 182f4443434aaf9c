"""Find processes a test or a stop left behind."""

from __future__ import annotations

import psutil


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
