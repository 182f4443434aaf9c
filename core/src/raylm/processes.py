"""Ending processes: the one way raylm stops a set of processes, and finding what a deployment left.

Linux only where noted; psutil does the portable part.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# Set in the environment of everything a deployment's replicas start, engines' children included
# (an environment is inherited whatever a process does with its session or process group).
DEPLOYMENT_MARKER = "RAYLM_DEPLOYMENT"
KILL_WAIT_S = 30.0
# How `raylm.supervise` starts the lines it adds to a server's output.
SUPERVISOR_OUTPUT = "raylm.supervise: "


def prctl(option: int, value: int) -> bool:
    """Linux's prctl(2); False where there is none (then the caller's fallback applies)."""
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value) == 0
    return False


def die_with_parent() -> None:
    """For `preexec_fn` of a single-threaded parent (between fork and exec, code is unsafe in a process with
    threads): SIGTERM this child when the thread that started it exits (its process dies)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def supervised(python: str, command: list[str], grace_s: float) -> list[str]:
    """`command` run under `raylm.supervise` with `python` (an interpreter with raylm): it and everything it
    starts end together, and when this process dies."""
    return [python, "-m", "raylm.supervise", "--grace", str(grace_s), "--parent", str(os.getpid()), "--", *command]


def end_processes(
    processes: Iterable[psutil.Process],
    grace_s: float,
    leader: psutil.Process | None = None,
    find: Callable[[], list[psutil.Process]] | None = None,
) -> list[psutil.Process]:
    """SIGTERM every process (only `leader`, when given: it stops the others itself), wait up to
    `grace_s` for all, SIGKILL the rest. With `find` (what finds the set again), SIGKILL whatever it still
    finds until it finds nothing new, as a cgroup kill would: processes started while the others stopped
    (a raylet starting workers, which exit by themselves soon after). Return the ones that outlived the
    grace time. Children of this process are reaped."""
    import psutil  # here, not at import: `raylm plugins` loads this module and needs no psutil

    processes = list(processes)
    for process in [leader] if leader else processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    kill_processes(alive)
    ended = list(alive)
    while find is not None and (stragglers := [process for process in find() if process not in ended]):
        kill_processes(stragglers)
        ended += stragglers
    return alive


def kill_processes(processes: Iterable[psutil.Process]) -> None:
    """SIGKILL every process at once (one already gone is fine) and wait, briefly, for them to be gone."""
    import psutil

    processes = list(processes)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    # SIGKILL is final, but a process of many threads on a busy machine takes a while to finish dying.
    psutil.wait_procs(processes, timeout=KILL_WAIT_S)


def marked_processes(key: str, value: str) -> list[psutil.Process]:
    """Live processes (readable by this user) whose environment sets `key` to `value`, this one excluded."""
    import psutil

    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE and process.environ().get(key) == value:
                found.append(process)
    return found
