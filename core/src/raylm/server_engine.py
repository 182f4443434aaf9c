"""The base class of engines whose replicas run the engine's own OpenAI server: vLLM, SGLang, yours.

class MyEngine(raylm.ServerEngine):
    display_name = "Mine"
    check_module = "raylm_mine.validate"     # python -m raylm_mine.validate MODEL ARGS... (raylm.engine_check)
    server_module = "mine.openai_server"     # python -m mine.openai_server --model MODEL --port ...
    model_option = "--model"
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any, ClassVar

from raylm.engine import Engine, ModelDeployment, ReplicaResources
from raylm.engine_check import ERROR_PREFIX
from raylm.errors import ConfigError
from raylm.net import ENGINE_SERVER_PORTS, KV_EVENTS_PORTS, free_ports_in, http_ok, other_listeners
from raylm.processes import supervised
from raylm.server_process import ServerProcess
from raylm.state import Records

START_TIMEOUT_S = float(os.environ.get("RAYLM_ENGINE_START_TIMEOUT", "1800"))
CHECK_TIMEOUT_S = 300
CHECKS = Records("checks")  # checks that passed, by what their answer depends on
# Prints what a check's answer depends on in an environment, in ~0.1 s: the versions of the named
# distributions, and when the check module was last changed (editable installs keep their version).
CHECK_PROBE = """
import importlib.metadata as metadata, importlib.util, json, os, sys
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
spec = importlib.util.find_spec(sys.argv[1])
changed = os.stat(spec.origin).st_mtime if spec and spec.origin else None
print(json.dumps({"versions": {name: version(name) for name in sys.argv[2:]}, "check_module_changed": changed}))
"""


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
    # Distributions whose versions the check's answer depends on (the plugin's and the engine's).
    check_depends_on: ClassVar[tuple[str, ...]] = ()
    # The environment variable the engine's server reads the key it requires from (vLLM's VLLM_API_KEY);
    # an engine that takes its key otherwise overrides `key_settings`.
    api_key_env: ClassVar[str | None] = None
    takes_api_key = True
    health_path: ClassVar[str] = "/health"

    checked: dict[str, Any] | None = None
    server: ServerProcess | None = None
    url: str | None = None

    def __init__(self, deployment: ModelDeployment):
        super().__init__(deployment)
        for token in deployment.engine_args:
            reserved = self.reserved_option(token)
            if reserved is not None:
                raise ConfigError(
                    f"model {deployment.name!r}: raylm sets {reserved} itself; "
                    f"use {self.reserved_options[reserved]} instead"
                )

    def reserved_option(self, token: str) -> str | None:
        """The reserved option `token` names, however spelled: with underscores (`--api_key`, which
        vLLM's parser takes) or abbreviated (`--api-k`, which argparse's defaults take)."""
        if not token.startswith("--") or len(token) < 4:
            return None
        option = "--" + token.split("=", 1)[0][2:].replace("_", "-")
        return next((name for name in self.reserved_options if name.startswith(option)), None)

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
        """Check the arguments with the engine's own parser; a check that passed is remembered, so the same
        arguments on the same installation pass again at once (the check is mostly the engine's imports)."""
        key = self._check_key()
        self.checked = CHECKS.load(key) if key else None
        if self.checked is None:
            self.checked = self._run_check()
            if key:
                CHECKS.save(key, self.checked)

    def _check_key(self) -> str | None:
        """What the check's answer depends on: the interpreter, the versions of the distributions the check
        reads, the check module itself, the arguments; None where the interpreter does not answer."""
        probe = [self.python, "-c", CHECK_PROBE, self.check_module, "raylm", *self.check_depends_on]
        try:
            found = subprocess.run(
                probe, capture_output=True, text=True, timeout=60, env={**os.environ, **self.deployment.env}
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if found.returncode != 0:
            return None
        model = self.deployment
        facts = [
            self.python,
            self.check_module,
            found.stdout,
            model.model,
            model.engine_args,
            sorted(model.env.items()),
        ]
        return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:32]

    def _run_check(self) -> dict[str, Any]:
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
        return json.loads(result.stdout.strip().splitlines()[-1])

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

    def key_settings(self) -> tuple[dict[str, str], list[str]]:
        """The environment and the extra arguments that make the server require `self.api_key` (never the
        key itself as an argument: process listings show those)."""
        if self.api_key is None:
            return {}, []
        return {self.api_key_env: self.api_key}, []

    def extra_arguments(self, host: str) -> list[str]:
        """Arguments of the engine's server that raylm adds for this replica (called once, by `start`)."""
        return []

    def kv_events_port(self, host: str) -> int | None:
        """Where this replica's engine publishes its KV-cache events, when its routing policy follows them
        (a port of KV_EVENTS_PORTS on `host`; `kv_events_url` says it to the router): None when it does not."""
        if not self.deployment.routing.needs_engine_events:
            return None
        (port,) = free_ports_in(KV_EVENTS_PORTS, host=host)
        self.kv_events_url = f"tcp://{host}:{port}"
        return port

    async def start(self, host: str) -> str:
        (port,) = free_ports_in(ENGINE_SERVER_PORTS, host=host)
        name = f"{self.display_name.lower()}:{self.deployment.name}"
        env, arguments = self.key_settings()
        command = [*self.server_command(host, port), *arguments, *self.extra_arguments(host)]
        self.server = ServerProcess(name, command, env={**self.deployment.env, **env})
        self.server.start()
        self.url = f"http://{host}:{port}"
        await self.server.wait_healthy(self.url + self.health_path, START_TIMEOUT_S)
        others = other_listeners(host, port, self.server.process_tree())
        if others:  # another server took the same port at the same time: neither can be trusted with it
            await self.server.stop()
            raise RuntimeError(f"port {port} is shared with process(es) {sorted(others)}; the replica restarts")
        return self.url

    async def check_health(self) -> None:
        if self.server is None:
            raise RuntimeError(f"{self.display_name} was not started")
        code = self.server.exit_code()
        if code is not None:
            raise self.server.failure(f"{self.display_name} exited with code {code}")
        if not await asyncio.to_thread(http_ok, self.url + self.health_path, 10.0):
            raise RuntimeError(f"{self.display_name}'s {self.health_path} does not answer")

    def running(self) -> bool:
        return self.server is not None and self.server.exit_code() is None

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
