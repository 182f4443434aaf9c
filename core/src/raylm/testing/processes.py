"""Find processes a test or a stop left behind."""

from __future__ import annotations

import psutil

from raylm.processes import DEPLOYMENT_MARKER, marked_processes


def processes_matching(*needles: str) -> list[str]:
    """Command lines of live processes that contain every one of `needles`."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            command = " ".join(process.info["cmdline"] or ())
        except psutil.Error:
            continue
        if command and all(needle in command for needle in needles):
            found.append(f"{process.pid}: {command[:200]}")
    return found


def deployment_processes(name: str) -> list[str]:
    """Live processes started for the deployment `name`: its replicas' engine servers and everything
    they started, whatever those renamed themselves to (vLLM's `VLLM::EngineCore`), by the marker in
    their environment."""
    found = []
    for process in marked_processes(DEPLOYMENT_MARKER, name):
        try:
            found.append(f"{process.pid}: {' '.join(process.cmdline())[:200]}")
        except psutil.Error:
            continue
    return found


def engine_behind(served_name: str) -> tuple[str, str | None]:
    """The URL of the engine server a raylm replica started for `served_name`, and the key it requires (a
    test's way past the router): read from the server's command line, its environment (vLLM's
    VLLM_API_KEY) or the config file raylm gave it (SGLang's)."""
    import yaml

    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if "raylm.supervise" in command or "--served-model-name" not in command or "--port" not in command:
            continue
        if command[command.index("--served-model-name") + 1] != served_name:
            continue
        url = f"http://{command[command.index('--host') + 1]}:{command[command.index('--port') + 1]}"
        if "--config" in command:
            with open(command[command.index("--config") + 1]) as config:
                return url, yaml.safe_load(config).get("api-key")
        try:
            return url, process.environ().get("VLLM_API_KEY")
        except psutil.Error:
            return url, None
    raise AssertionError(f"no engine server serves {served_name!r}")
