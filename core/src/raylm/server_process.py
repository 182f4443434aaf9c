"""Helpers for engines that run their own HTTP server as a child process of the replica.

`ServerProcess` starts the server in a session of its own (so stopping it stops
every process it spawned), asks Linux to stop it if the replica dies
(`PR_SET_PDEATHSIG`), keeps the last lines of its output for error messages,
and waits until its health URL answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

from raylm.errors import DeploymentError

PR_SET_PDEATHSIG = 1


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    # Outside Linux there is no prctl; the replica's __del__ still stops the server.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ServerProcess:
    """An engine's server running as a child process."""

    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str] | None = None, tail_lines: int = 40):
        self.name = name
        self.command = list(command)
        self.env = {**os.environ, **(env or {})}
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        threading.Thread(target=self._pump_output, name=f"{self.name}-output", daemon=True).start()

    def _pump_output(self) -> None:
        # Copy the server's output to the replica's (Ray keeps it in the worker logs) and keep a tail.
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            print(f"[{self.name}] {line}", file=sys.stderr, flush=True)

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def failure(self, what: str) -> DeploymentError:
        lines = [line for line in self.tail if line.strip()][-12:]
        return DeploymentError(f"{what}; its last output:\n" + "\n".join(lines))

    async def wait_healthy(self, health_url: str, timeout_s: float) -> None:
        """Return once `health_url` answers 200; raise with the server's last output if it exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.exit_code()
            if code is not None:
                raise self.failure(f"{self.name} exited with code {code} while starting")
            if await asyncio.to_thread(http_ok, health_url, 2.0):
                return
            if time.monotonic() > deadline:
                await self.stop()
                raise self.failure(f"{self.name} did not become healthy within {timeout_s:.0f}s")
            await asyncio.sleep(0.5)

    async def stop(self, grace_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)  # the whole session: the server and every process it spawned
            except ProcessLookupError:
                return
            try:
                await asyncio.to_thread(self.process.wait, wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        _kill_session_leftovers(self.process.pid)


def _kill_session_leftovers(session_id: int) -> None:
    """Kill processes left in the server's session after its leader exited (e.g. engine workers)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == session_id:
                os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue


def http_ok(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False
