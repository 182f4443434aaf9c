"""Helpers for the tests that serve real models: run the CLI, find free ports and leftover processes, load
an endpoint with streams."""

import socket

from raylm import net
from raylm.testing.cli import run_raylm
from raylm.testing.processes import deployment_processes, processes_matching
from raylm.testing.streams import Streams  # noqa: F401 (the tests' import)


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
