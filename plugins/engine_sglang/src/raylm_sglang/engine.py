"""SGLang inside a Ray Serve replica: SGLang's own OpenAI server as the replica's child process.

SGLang's HTTP server streams deltas (its in-process Engine would give cumulative
text, and binds to one event loop), so raylm's router forwards to it unchanged.
"""

import json
import os
import tempfile
from pathlib import Path

from raylm import ServerEngine
from raylm.toolkit import KV_EVENTS_FOLLOWER


class SGLangEngine(ServerEngine):
    """Runs `python -m sglang.launch_server` in each replica."""

    display_name = "SGLang"
    check_module = "raylm_sglang.validate"
    server_module = "sglang.launch_server"
    check_depends_on = ("raylm-sglang", "sglang")
    model_option = "--model-path"
    reserved_options = {
        "--model-path": "the MODEL argument",
        "--model": "the MODEL argument",
        "--served-model-name": "--name",
        "--host": "--host",
        "--port": "--port",
        "--api-key": "the endpoint's keys (--api-key-file); each engine gets a key of its own",
        "--config": "engine_args in the deployment file (raylm gives SGLang its key in a config file)",
    }
    # With the precise routing policy, SGLang publishes its radix cache's events (the stream vLLM publishes).
    kv_events_follower = KV_EVENTS_FOLLOWER
    config_file: Path | None = None

    def key_settings(self) -> tuple[dict[str, str], list[str]]:
        """SGLang takes its key on the command line or in a config file only: a config file of the server's
        own (created mode 0600), so that process listings do not show the key."""
        if self.api_key is None:
            return {}, []
        handle, path = tempfile.mkstemp(prefix="raylm-sglang-", suffix=".yaml")
        with os.fdopen(handle, "w") as config:
            json.dump({"api-key": self.api_key}, config)  # JSON is YAML
        self.config_file = Path(path)
        return {}, ["--config", path]

    def extra_arguments(self, host: str) -> list[str]:
        """With the precise routing policy: SGLang publishes its KV-cache events on a port of this replica's,
        bound on the replica's own address only."""
        port = self.kv_events_port(host)
        if port is None:
            return []
        return [
            "--kv-events-config",
            json.dumps({"publisher": "zmq", "endpoint": f"tcp://{host}:{port}", "bind": True}),
        ]

    async def stop(self) -> None:
        await super().stop()
        if self.config_file is not None:
            self.config_file.unlink(missing_ok=True)
