"""What raylm offers plugin authors besides the contract, in one module.

A plugin imports `raylm` (the contract: `Engine`, `ServerEngine`, `Backend`, `ClusterStatus`,
`ModelDeployment`, `ServePlan`, the specs, `hookimpl`), `raylm.toolkit` (the helpers below) and, in
its tests, `raylm.testing`. Nothing else of raylm is a plugin's to import: core changes the rest
freely (`tests/test_imports.py` holds our own plugins to it).

- errors: `ConfigError` (bad input, said before anything starts), `ClusterError`, `DeploymentError`;
- waiting: `wait_until` (the one way raylm polls), `StateChanges` (progress lines as states change),
  `Progress` (the callable progress lines go to);
- files: `write_atomically`, `Records` (JSON records under `raylm_home()`), `DEPLOYMENTS`;
- processes: `end_processes` / `kill_processes` (a process tree, gently then not), `marked_processes`
  (those carrying a deployment's marker);
- network: `free_ports_in` (ports picked from a range, not by the kernel: for servers started later),
  `free_port` (the kernel's pick, for a server bound at once), `address_answers`;
- Ray: `connect_ray`, and how raylm starts Ray nodes for serving: `ray_start_command`,
  `serving_node_environment`, `SERVING_NODE_ENVIRONMENT`, `HEAD_ENVIRONMENT`, and
  `leave_batch_scheduling` (for threads that serve inside a replica's process);
- engine arguments: `args_to_argv` (a deployment file's mapping as command-line options);
- CLI: `click_option` (a backend option as a click option), `echo_progress`;
- HTTP: `error_body` (OpenAI's error shape), `raw_response`;
- KV-cache events, for an engine whose router follows them (`Engine.kv_events_follower`):
  `KV_EVENTS_FOLLOWER` (the follower of the ZeroMQ stream vLLM and SGLang publish), `Stored`, `Removed`,
  `Cleared` (what a follower delivers), `KV_EVENTS_PORTS` (where engines publish them;
  `ServerEngine.kv_events_port` picks one);
- engine checks (a plugin's check module, run in the engine's environment): `check_engine_version`,
  `check_server_module`, `explained_import_failures`, `report`, `refuse`;
- deployment files: `plan_document`.
"""

from raylm.backend import Progress, connect_ray
from raylm.cli import click_option, echo_progress
from raylm.config import plan_document
from raylm.deployments import DEPLOYMENTS
from raylm.engine import args_to_argv
from raylm.engine_check import check_engine_version, check_server_module, explained_import_failures, refuse, report
from raylm.errors import ClusterError, ConfigError, DeploymentError
from raylm.net import KV_EVENTS_PORTS, address_answers, free_port, free_ports_in
from raylm.processes import end_processes, kill_processes, marked_processes
from raylm.ray_nodes import (
    HEAD_ENVIRONMENT,
    SERVING_NODE_ENVIRONMENT,
    leave_batch_scheduling,
    ray_start_command,
    serving_node_environment,
)
from raylm.serving.http import error_body, raw_response
from raylm.serving.kv_events import FOLLOWER as KV_EVENTS_FOLLOWER
from raylm.serving.prefix_index import Cleared, Removed, Stored
from raylm.state import Records, raylm_home, write_atomically
from raylm.waiting import StateChanges, wait_until

__all__ = [
    "DEPLOYMENTS",
    "KV_EVENTS_FOLLOWER",
    "KV_EVENTS_PORTS",
    "Cleared",
    "Removed",
    "Stored",
    "HEAD_ENVIRONMENT",
    "SERVING_NODE_ENVIRONMENT",
    "ClusterError",
    "ConfigError",
    "DeploymentError",
    "Progress",
    "Records",
    "StateChanges",
    "address_answers",
    "args_to_argv",
    "check_engine_version",
    "check_server_module",
    "click_option",
    "connect_ray",
    "echo_progress",
    "end_processes",
    "error_body",
    "explained_import_failures",
    "free_port",
    "free_ports_in",
    "kill_processes",
    "leave_batch_scheduling",
    "marked_processes",
    "plan_document",
    "ray_start_command",
    "raw_response",
    "raylm_home",
    "refuse",
    "report",
    "serving_node_environment",
    "wait_until",
    "write_atomically",
]
