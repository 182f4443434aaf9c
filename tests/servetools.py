"""Helpers for the tests that serve real models: run the CLI, find free ports and leftover processes, load
an endpoint with streams."""

import json
import socket
import threading
import time

import httpx

from raylm import net
from raylm.testing.cli import run_raylm
from raylm.testing.processes import deployment_processes, processes_matching


def free_port():
    return net.free_port("127.0.0.1")


def run_cli(*args, env, timeout=900):
    return run_raylm(*args, env=env, timeout=timeout)


def assert_port_free(port):
    """A new server can listen on the port (connections in TIME_WAIT do not stop that)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()


def leftovers(ray_temp_dir, deployment, *served_names):
    """Processes of this deployment still alive: Ray's (by its temp dir), the engines' and their children
    (by the deployment's marker) and engine servers by served name."""
    found = processes_matching(str(ray_temp_dir)) + deployment_processes(deployment)
    for name in served_names:
        found += processes_matching("vllm.entrypoints", f"--served-model-name {name} ")
    return found


class Streams:
    """Streamed completions one after another from each of `count` threads; each outcome is `whole` (ended
    with [DONE]), `cut` (began, did not end), the error code of a refusal, or `unreachable`."""

    def __init__(self, url, model, count, headers=None):
        self.url, self.model, self.headers = url, model, headers or {}
        self.outcomes, self.stopped = [], threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self):
        request = {"model": self.model, "prompt": "Hi", "max_tokens": 64, "ignore_eos": True, "stream": True}
        while not self.stopped.is_set():
            began = False
            try:
                with httpx.stream(
                    "POST", f"{self.url}/v1/completions", json=request, headers=self.headers, timeout=60
                ) as response:
                    if response.status_code != 200:
                        self.outcomes.append(json.loads(response.read())["error"]["code"])
                        time.sleep(0.1)
                        continue
                    began = True
                    body = "".join(response.iter_text())
                self.outcomes.append("whole" if body.rstrip().endswith("data: [DONE]") else "cut")
            except httpx.HTTPError:
                self.outcomes.append("cut" if began else "unreachable")
                time.sleep(0.1)

    def stop(self):
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=90)
        return self.outcomes
