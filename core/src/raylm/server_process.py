"""An engine's own HTTP server, run as a child process of its replica.

`ServerProcess` starts the server under `raylm.supervise`, which ends it and every process it
started together, whatever ends first: a stop, the server's own crash, or the replica's death
(Linux's `PR_SET_PDEATHSIG`). It gives the server a temporary folder of its own that goes with it
(torch's compile cache in it is shared), finds the first exception in its output (or its last
lines) for error messages, and waits until its health URL answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from raylm.errors import DeploymentError
from raylm.net import http_ok
from raylm.processes import KILL_WAIT_S, SUPERVISOR_OUTPUT, supervised
from raylm.waiting import wait_until_async

# Engine server output, one file per start (kept after the server stops, for post-mortems).
LOG_FOLDER = Path(tempfile.gettempdir()) / "raylm-engine-logs"
# The last line of a Python traceback, at the start of a line: "ValueError: ...", "torch.OutOfMemoryError: ...";
# or as vLLM logs it from one of its processes: "(VllmWorker-0 pid=7) ERROR 11-23 07:45:05 [x.py:953] ValueError: ...".
EXCEPTION_LINE = re.compile(
    r"(?:\([\w.:-]+ pid=\d+\) )?(?:(?:ERROR|CRITICAL) [\d-]+ [\d:.]+ \[[^\]]*\] )?"
    r"(?P<exception>[A-Za-z_][\w.]*(?:Error|Exception): \S.*)"
)


# Ray sets these in every worker from its CPU reservation (OMP_NUM_THREADS=1 for a 1-CPU replica):
# right for Python tasks, wrong for an engine server that sizes its own threads. A deployment's
# `env` can still set them.
RAY_WORKER_DEFAULTS = ("OMP_NUM_THREADS",)


def server_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment an engine server gets: the replica's, less Ray's worker defaults, plus `extra`."""
    inherited = {key: value for key, value in os.environ.items() if key not in RAY_WORKER_DEFAULTS}
    return {**inherited, **extra}


def torch_compile_cache() -> Path:
    """Where torch keeps compiled code in the temporary folder: `torchinductor_USER`, as in torch's
    `default_cache_dir()`. Its precompiled C++ headers are always there, whatever the settings."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    return Path(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


class ServerProcess:
    """An engine's server running as a child process, its output going straight to a log file.

    No pipe: an engine must never wait on a reader to write its (per-request) log lines.
    """

    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str] | None = None, grace_s: float = 20.0):
        self.name = name
        self.command = list(command)
        self.grace_s = grace_s
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.temp_dir: Path | None = None

    def process_tree(self) -> set[int]:
        """The pids of the server's process and of everything below it (its supervisor's, here)."""
        import psutil

        try:
            top = psutil.Process(self.process.pid)
            return {top.pid, *(child.pid for child in top.children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    def start(self) -> None:
        LOG_FOLDER.mkdir(parents=True, exist_ok=True)
        safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)
        # Engines leave temporary files behind (vLLM its distributed-init file, one per start): they go
        # in a folder that is removed with the server. Short: engines put Unix sockets in it.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="raylm-engine-"))
        # ...but torch's compile cache stays shared: in an empty one, each vLLM start here spent 9 s
        # rebuilding torch's precompiled headers. (Removing the folder removes the link, not the cache.)
        # Only a saving: where the shared folder cannot be made, the engine builds its own.
        shared_cache = torch_compile_cache()
        with contextlib.suppress(OSError):
            shared_cache.mkdir(exist_ok=True)
            (self.temp_dir / shared_cache.name).symlink_to(shared_cache)
        env = server_environment({"TMPDIR": str(self.temp_dir), **self.extra_env})
        with tempfile.NamedTemporaryFile(dir=LOG_FOLDER, prefix=f"{safe_name}-", suffix=".log", delete=False) as log:
            self.log_path = Path(log.name)
            # No session of its own: the engine stays in its replica's scheduling group, with the
            # router and Ray's workers, which its busy-wait loops then yield to (see raylm.ray_nodes).
            self.process = subprocess.Popen(
                supervised(sys.executable, self.command, self.grace_s),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        print(f"raylm: {self.name} (pid {self.process.pid}) logs to {self.log_path}", file=sys.stderr, flush=True)

    def last_lines(self, count: int = 12) -> list[str]:
        if self.log_path is None:
            return []
        with open(self.log_path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 16384))
            lines = log.read().decode(errors="replace").splitlines()
        return [line for line in lines if line.strip() and not line.startswith(SUPERVISOR_OUTPUT)][-count:]

    def first_exception(self) -> str | None:
        """The first exception line of a Python traceback in the output (e.g. `ValueError: ...`).

        Engines print the root cause first: vLLM's server ends with "Engine core initialization
        failed. See root cause above." after the engine core's own error.
        """
        if self.log_path is None:
            return None
        with open(self.log_path, errors="replace") as log:
            found = next((match for match in map(EXCEPTION_LINE.match, log) if match), None)
        return found["exception"].strip() if found else None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def failure(self, what: str) -> DeploymentError:
        cause = self.first_exception()
        if cause:
            return DeploymentError(f"{what}: {cause} (its output: {self.log_path})")
        return DeploymentError(f"{what}; its last output ({self.log_path}):\n" + "\n".join(self.last_lines()))

    async def wait_healthy(self, health_url: str, timeout_s: float) -> None:
        """Return once `health_url` answers 200; raise with the server's last output if it exits first."""

        async def healthy() -> bool:
            code = self.exit_code()
            if code is not None:
                raise self.failure(f"{self.name} exited with code {code} while starting")
            return await asyncio.to_thread(http_ok, health_url, 2.0)

        try:
            await wait_until_async(
                healthy,
                timeout_s=timeout_s,
                poll_s=0.5,
                on_timeout=lambda: self.failure(f"{self.name} did not become healthy within {timeout_s:.0f}s"),
            )
        except DeploymentError:
            await self.stop()
            raise

    async def stop(self) -> None:
        """End the server and everything it started (its supervisor does), then remove its folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                await asyncio.to_thread(self.process.wait, self.grace_s + KILL_WAIT_S + 5)
            except subprocess.TimeoutExpired:  # the supervisor itself hangs: the server's parent-death signal remains
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
