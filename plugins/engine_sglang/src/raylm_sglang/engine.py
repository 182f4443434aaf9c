"""SGLang inside a Ray Serve replica: SGLang's own OpenAI server as the replica's child process.

SGLang's HTTP server streams deltas (its in-process Engine would give cumulative
text, and binds to one event loop), so raylm's router forwards to it unchanged.
"""

from raylm import ServerEngine


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
    }
