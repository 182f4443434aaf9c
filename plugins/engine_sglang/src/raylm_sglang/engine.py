"""SGLang inside a Ray Serve replica: SGLang's own OpenAI server as the replica's child process.

SGLang's HTTP server streams deltas (its in-process Engine would give cumulative
text, and binds to one event loop), so raylm's router forwards to it unchanged.
"""

from __future__ import annotations

from raylm.engine import ReplicaResources
from raylm.server_process import ServerEngine


class SGLangEngine(ServerEngine):
    """Runs `python -m sglang.launch_server` in each replica."""

    display_name = "SGLang"
    check_module = "raylm_sglang.validate"
    reserved_options = {
        "--model-path": "the MODEL argument",
        "--model": "the MODEL argument",
        "--served-model-name": "--name",
        "--host": "--host",
        "--port": "--port",
    }

    def server_command(self, host: str, port: int) -> list[str]:
        model = self.deployment
        return [
            self.python,
            "-m",
            "sglang.launch_server",
            "--model-path",
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
        return ReplicaResources(num_cpus=1, num_gpus=self.checked["tp_size"] * self.checked["pp_size"])
