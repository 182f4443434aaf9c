"""How raylm starts Ray nodes for serving: the settings every backend that starts Ray nodes uses.

Engines share their nodes with Ray's own processes, and what Ray does in the background comes out
of the engines' CPU time. A backend that starts a node runs `ray start` with
`ray_start_command()` (Ray's own CLI, run by this module, with `serving_node_options()`) and an
environment from `serving_node_environment()`; a third-party backend does the same through this
module.

- Ray's workers (the router, the model replicas and the engine servers they start) run at the
  node's niceness, not Ray's default 15, at which the engine lost the CPU to anything else.
- Serve's control loop runs at 2 Hz (default 10), its metrics are flushed every 5 s (default
  0.1 s, which woke every replica 10 times a second), the dashboard agent reports node stats every
  60 s (default 5 s); Ray's metrics and task events are off, and so is the log monitor (it streams
  workers' output to drivers; raylm's drivers ask for none, and the logs stay in Ray's session
  folder). On 2 vCPUs this took Ray's idle CPU from ~14% to ~7% of a core (bench/ray_overhead.py).
- A head stops without Ray's node drain (up to 30 s on SIGTERM): raylm deletes its applications
  before it stops a head, and a stopping head ends the cluster anyway.

Where the processes go matters as much. Linux's autogroup scheduling (on by default on desktops
and most servers: /proc/sys/kernel/sched_autogroup_enabled) makes each session one scheduling
group, and CPU time is shared fairly between groups before it is shared between their threads.
Engines busy-wait between steps and call sched_yield() to let others run (vLLM's shared-memory
queues do so for 1 s after each read), but a yield only reaches threads of the same group. So
nothing here starts a session of its own: Ray's processes stay in the session of the command that
started the node, and engine servers in their replica's (`raylm.server_process`). The router and
everything else that must interleave with an engine's busy loops is then in the engine's group.
Measured on 2 vCPUs with vLLM's own server: with the load generator in the engine's session, c=1
TTFT p50 8-10 ms in every run; in a session of its own, 53-79 ms, the load generator waiting
2.2-3.0 s for the CPU in each 3 s run (bench/run.py starts every server as a shell would).

Every process of a serving node runs in Linux's SCHED_BATCH policy (`ray_start_command()` sets it
before Ray's CLI starts the node's daemons, whose workers inherit it), except the data path: the
engine servers (`raylm.supervise` puts them back) and the router's thread. Same CPU share, same
niceness; the difference is that a waking batch thread does not preempt the thread on the CPU.
Ray's threads wake ~800 times a second under load (each Serve actor's main thread every 10 ms to
check for signals, a constant in Ray's core worker; the raylet, the GCS), and their wake-ups preempted the
engine's busy scheduler thread. Measured with SGLang on 2 vCPUs (bench/engine_threads.py, c=16, 3
runs): its scheduler thread was switched out 32.7 times per request under Ray against 22.2 alone;
with Ray's processes in SCHED_BATCH, 24.9 against 24.0.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping

SERVING_NODE_ENVIRONMENT = {
    "RAY_worker_niceness": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_enable_metrics_collection": "0",
    "RAY_enable_task_events": "0",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "5000",
    "REPORTER_UPDATE_INTERVAL_MS": "60000",
}
HEAD_ENVIRONMENT = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def serving_node_environment(environ: Mapping[str, str], head: bool) -> dict[str, str]:
    """The environment for `ray start` of a serving node: raylm's settings, then `environ` (which wins)."""
    return {**SERVING_NODE_ENVIRONMENT, **(HEAD_ENVIRONMENT if head else {}), **environ}


def serving_node_options() -> list[str]:
    """`ray start` options of a serving node, beside the backend's own (address, resources, ports)."""
    return ["--disable-usage-stats", "--include-log-monitor=false"]


def ray_start_command(python: str = sys.executable) -> list[str]:
    """`ray start` with a serving node's options, to be followed by the backend's own: Ray's CLI, run by this
    module so that the node's processes are in SCHED_BATCH."""
    return [python, "-m", "raylm.ray_nodes", "start", *serving_node_options()]


def _set_policy(policy_name: str) -> None:
    """The calling thread's Linux scheduling policy (what it starts inherits it); nothing where there is none."""
    policy = getattr(os, policy_name, None)
    if policy is None:  # not Linux
        return
    with contextlib.suppress(OSError):  # a sandbox that forbids it: the node runs, only without this setting
        os.sched_setscheduler(0, policy, os.sched_param(0))


def leave_batch_scheduling() -> None:
    """Put the calling thread, and what it starts, in Linux's normal policy: for the data path (an engine
    server, the router), whose wake-ups must preempt Ray's."""
    _set_policy("SCHED_OTHER")


def _run_ray_cli(arguments: list[str]) -> None:
    _set_policy("SCHED_BATCH")
    from ray.scripts.scripts import main

    sys.argv = ["ray", *arguments]
    main()


if __name__ == "__main__":
    _run_ray_cli(sys.argv[1:])
