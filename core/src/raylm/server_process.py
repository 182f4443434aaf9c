"""Engines that run their own HTTP server as a child process of the replica.

`ServerEngine` is the base class of such engines (vLLM, SGLang). `ServerProcess`
starts the server under `raylm.supervise`, which ends it and every process it started
together, whatever ends first: a stop, the server's own crash, or the replica's death
(Linux's `PR_SET_PDEATHSIG`). It gives the server a temporary folder of its own that goes
with it (torch's compile cache in it is shared), finds the first exception in its output
(or its last lines) for error messages, and waits until its health URL answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from raylm.engine import Engine, ModelDeployment, ReplicaResources
from raylm.engine_check import ERROR_PREFIX
from raylm.errors import ClusterError, ConfigError, DeploymentError
from raylm.processes import KILL_WAIT_S, SUPERVISOR_OUTPUT, supervised

# Engine server output, one file per start (kept after the server stops, for post-mortems).
LOG_FOLDER = Path(tempfile.gettempdir()) / "raylm-engine-logs"
# The last line of a Python traceback, at the start of a line: "ValueError: ...", "torch.OutOfMemoryError: ...";
# or as vLLM logs it from one of its processes: "(VllmWorker-0 pid=7) ERROR 11-23 07:45:05 [x.py:953] ValueError: ...".
EXCEPTION_LINE = re.compile(
    r"(?:\([\w.:-]+ pid=\d+\) )?(?:(?:ERROR|CRITICAL) [\d-]+ [\d:.]+ \[[^\]]*\] )?"
    r"(?P<exception>[A-Za-z_][\w.]*(?:Error|Exception): \S.*)"
)


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def free_ports_in(ports: range, count: int = 1, host: str = "127.0.0.1") -> list[int]:
    """`count` different ports of `ports` nothing listens on now, tried in random order.

    For ports bound some time after they are picked: a range below the kernel's ephemeral one
    (32768-60999 on Linux) cannot be taken meanwhile by an outgoing connection. Ports for one
    program are picked in one call: picked one by one, two could be the same.
    """
    found: list[int] = []
    for port in random.sample(ports, min(50 + count, len(ports))):
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise ClusterError(f"fewer than {count} free ports between {ports.start} and {ports.stop - 1} on {host}")


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


def address_answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections at HOST:PORT (False for a malformed address)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return False
    with socket.socket() as probe:
        probe.settimeout(timeout_s)
        return probe.connect_ex((host, int(port))) == 0


def http_ok(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


START_TIMEOUT_S = float(os.environ.get("RAYLM_ENGINE_START_TIMEOUT", "1800"))
CHECK_TIMEOUT_S = 300


class ServerEngine(Engine):
    """An engine whose replicas run the engine's own OpenAI server as a child process.

    Subclasses name the engine, its server module and model option, and the module
    that checks arguments with the engine's own parser (run in the engine's Python,
    so it works for engines in other venvs); `raylm.engine_check` describes what the check
    module prints and holds the helpers it uses.
    """

    display_name: ClassVar[str]
    check_module: ClassVar[str]
    server_module: ClassVar[str]
    model_option: ClassVar[str]
    # Options raylm sets itself, and what the user should use instead.
    reserved_options: ClassVar[Mapping[str, str]] = {}
    health_path: ClassVar[str] = "/health"

    checked: dict[str, Any] | None = None
    server: ServerProcess | None = None
    url: str | None = None

    def __init__(self, deployment: ModelDeployment):
        super().__init__(deployment)
        for token in deployment.engine_args:
            option = token.split("=", 1)[0]
            if option in self.reserved_options:
                raise ConfigError(
                    f"model {deployment.name!r}: raylm sets {option} itself; "
                    f"use {self.reserved_options[option]} instead"
                )

    @property
    def python(self) -> str:
        """The interpreter of the engine's environment (the replica runs in it too)."""
        return self.deployment.python or sys.executable

    def server_command(self, host: str, port: int) -> list[str]:
        """The command that serves the model on host:port."""
        model = self.deployment
        return [
            self.python,
            "-m",
            self.server_module,
            self.model_option,
            model.model,
            "--served-model-name",
            model.name,
            "--host",
            host,
            "--port",
            str(port),
            *model.engine_args,
        ]

    def resources(self) -> ReplicaResources:
        """One CPU, and the GPUs the engine's own check counted (none on a CPU device)."""
        if self.checked is None:
            self.validate()
        gpus = 0 if self.checked["device"] == "cpu" else self.checked["gpus"]
        return ReplicaResources(num_cpus=1, num_gpus=gpus)

    def validate(self) -> None:
        command = [self.python, "-m", self.check_module, self.deployment.model, *self.deployment.engine_args]
        env = {**os.environ, **self.deployment.env}
        try:
            # Supervised, so that the check (and what it starts) ends if raylm does.
            result = subprocess.run(
                supervised(self.python, command, grace_s=5),
                capture_output=True,
                text=True,
                timeout=CHECK_TIMEOUT_S,
                env=env,
            )
        except FileNotFoundError:
            raise ConfigError(f"model {self.deployment.name!r}: Python interpreter {self.python} not found") from None
        if result.returncode != 0:
            raise ConfigError(f"model {self.deployment.name!r}: {self._complaint(result.stderr)}")
        self.checked = json.loads(result.stdout.strip().splitlines()[-1])

    def _complaint(self, stderr: str) -> str:
        """What the check said: raylm's line about the environment, the engine's parser's error line,
        else its last line of output."""
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        ours = next((line for line in lines if line.startswith(ERROR_PREFIX)), None)
        if ours:
            return ours.removeprefix(ERROR_PREFIX)
        missing = next((line for line in lines if line.startswith("ModuleNotFoundError: ")), None)
        if missing:
            return f"{self.python} cannot import what {self.display_name} needs ({missing}): install it there"
        for line in reversed(lines):
            if ": error: " in line:
                return f"{self.display_name} rejected the arguments: " + line.split(": error: ", 1)[1]
        return lines[-1] if lines else f"{self.display_name}'s argument check failed without a message"

    async def start(self, host: str) -> str:
        port = free_port(host)
        name = f"{self.display_name.lower()}:{self.deployment.name}"
        self.server = ServerProcess(name, self.server_command(host, port), env=self.deployment.env)
        self.server.start()
        self.url = f"http://{host}:{port}"
        await self.server.wait_healthy(self.url + self.health_path, START_TIMEOUT_S)
        return self.url

    async def check_health(self) -> None:
        if self.server is None:
            raise RuntimeError(f"{self.display_name} was not started")
        code = self.server.exit_code()
        if code is not None:
            raise self.server.failure(f"{self.display_name} exited with code {code}")
        if not await asyncio.to_thread(http_ok, self.url + self.health_path, 10.0):
            raise RuntimeError(f"{self.display_name}'s {self.health_path} does not answer")

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
