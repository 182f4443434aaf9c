"""Run a command so that it and every process it starts end together.

    python -m raylm.supervise [--grace SECONDS] [--parent PID] -- COMMAND [ARGS...]

The supervisor is a child subreaper (Linux's `PR_SET_CHILD_SUBREAPER`): a process the command
starts that outlives its own parent (vLLM's engine core and workers when its API server is
killed) becomes the supervisor's child instead of init's. So all of them are always its
descendants, and it ends them all:
- when the command exits, crashes or is killed: it ends what is left, then exits with the
  command's exit code (128 + N for a signal N);
- when it is told to stop (SIGTERM, SIGINT, SIGHUP): SIGTERM to the command, which stops what it
  started itself, and SIGKILL if it still runs after the grace time; then the same to what is
  left, with a short grace time;
- when its parent dies, even by SIGKILL (the Ray Serve replica that started it, or the whole Ray
  node): Linux sends it SIGTERM (`PR_SET_PDEATHSIG`), which is a stop. `--parent PID` names that
  parent, so that a supervisor whose parent died before it started ends at once.

Engine servers (`raylm.server_process.ServerProcess`) run under it, so one mechanism covers a
stop, a replaced replica, a crashed engine, a killed replica and a Ray node going away.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import psutil

from raylm.processes import (
    PR_SET_CHILD_SUBREAPER,
    PR_SET_PDEATHSIG,
    SUPERVISOR_OUTPUT,
    die_with_parent,
    end_processes,
    prctl,
)
from raylm.ray_nodes import leave_batch_scheduling

# What is left after the command exited on its own is ended without waiting long: it lost its parent.
LEFTOVER_GRACE_S = 3.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopRequested(Exception):
    pass


def _request_stop(signum: int, frame: object) -> None:
    raise StopRequested


def _end(processes: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM them, SIGKILL what is left after `grace_s`; say which, for post-mortems."""
    if not processes:
        return
    names = _names(processes)
    _say(f"ending {len(processes)} process(es): {', '.join(names.values())}")
    killed = end_processes(processes, grace_s)
    if killed:
        _say(f"killed {', '.join(names[p.pid] for p in killed)}: still running {grace_s:g}s after SIGTERM")


def _descendants() -> list[psutil.Process]:
    # Orphans of the command were re-parented to us: they are among our descendants too.
    return psutil.Process().children(recursive=True)


def _names(processes: list[psutil.Process]) -> dict[int, str]:
    names = {}
    for process in processes:
        try:
            names[process.pid] = f"{process.pid} {process.name()}"
        except psutil.Error:
            names[process.pid] = str(process.pid)
    return names


def _say(message: str) -> None:
    """A line in the command's output, for post-mortems (`ServerProcess.last_lines` leaves it out)."""
    print(SUPERVISOR_OUTPUT + message, file=sys.stderr, flush=True)


def supervise(command: list[str], grace_s: float, parent: int | None) -> int:
    # Set here, not by the parent: a Ray worker has threads, and code run between fork and exec is unsafe there.
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:  # the parent died before that
        return 128 + signal.SIGTERM
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    leave_batch_scheduling()  # the engine is the data path; Ray's processes around it are batch (raylm.ray_nodes)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _request_stop)
    try:
        server = subprocess.Popen(command, preexec_fn=die_with_parent)
        while True:
            pid, status = os.waitpid(-1, 0)  # reaps adopted orphans as well as the command
            if pid == server.pid:
                server.returncode = code = os.waitstatus_to_exitcode(status)
                break
    except StopRequested:
        _ignore_stops()  # a second stop must not cut the grace time short
        # The command alone first: an engine server stops its own processes in order. Ended together, SGLang
        # takes its scheduler's SIGTERM for a crash and waits 5 s for crash diagnostics before it exits.
        _end([psutil.Process(server.pid)], grace_s)
        _end(_descendants(), LEFTOVER_GRACE_S)
        return 128 + signal.SIGTERM
    _ignore_stops()
    _end(_descendants(), LEFTOVER_GRACE_S)
    return code if code >= 0 else 128 - code


def _ignore_stops() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raylm.supervise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grace", type=float, default=20.0, help="seconds to wait after SIGTERM (default 20)")
    parser.add_argument("--parent", type=int, help="pid of the process whose death stops everything (its starter)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    return supervise(command, args.grace, args.parent)


if __name__ == "__main__":
    sys.exit(main())
