"""Autoscaled cai clusters: Ray's cluster config, and where worker nodes publish their IPs.

`raylm cluster up --backend cai --max-workers N` writes `autoscaler.yaml` (Ray's cluster config,
`autoscaler_config`) into the cluster's folder; the head starts Ray with `--autoscaling-config`, so
Ray's own monitor runs on the head and calls `raylm_cai.node_provider.CMLNodeProvider`: demand Ray
cannot place creates worker applications (never more than N), a worker idle past the idle timeout
is deleted, a worker whose application ended is deleted and, as min workers or demand need,
replaced.

Ray's node updaters are off (as for KubeRay): a worker application starts its Ray node by itself
(`raylm_cai.node`) and publishes its IP in `nodes/NAME.json` of the cluster's folder once it runs,
which is how the autoscaler matches the application to its Ray node (the API gives no IP).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raylm.toolkit import write_atomically
from raylm_cai.applications import NodeSize

CONFIG_FILE = "autoscaler.yaml"
# In the head application's environment: "MIN:MAX" workers of an autoscaled cluster.
BOUNDS_VARIABLE = "RAYLM_CAI_WORKER_BOUNDS"
HEAD_TYPE, WORKER_TYPE = "head", "worker"
PROVIDER_CLASS = "raylm_cai.node_provider.CMLNodeProvider"


def autoscaler_config(
    cluster: str,
    head: NodeSize,
    worker: NodeSize,
    min_workers: int,
    max_workers: int,
    idle_timeout_s: float,
    runtime_identifier: str | None,
    bypass_authentication: bool,
) -> dict[str, Any]:
    """Ray's cluster config for an autoscaled cai cluster."""

    def resources(size: NodeSize) -> dict[str, float]:
        return {"CPU": size.cpu, **({"GPU": size.gpu} if size.gpu else {})}

    return {
        "cluster_name": f"raylm-{cluster}",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {
            "type": "external",
            "module": PROVIDER_CLASS,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "cluster": cluster,
            "worker": {"cpu": worker.cpu, "memory": worker.memory, "gpu": worker.gpu},
            "max_workers": max_workers,
            "runtime_identifier": runtime_identifier,
            "bypass_authentication": bypass_authentication,
        },
        "auth": {},
        "available_node_types": {
            HEAD_TYPE: {"resources": resources(head), "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {
                "resources": resources(worker),
                "node_config": {},
                "min_workers": min_workers,
                "max_workers": max_workers,
            },
        },
        "head_node_type": HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def published_ip(folder: Path, name: str) -> str | None:
    """The IP a worker's node script published once its Ray node ran, or None."""
    try:
        return json.loads((folder / "nodes" / f"{name}.json").read_text())["ip"]
    except (OSError, ValueError, KeyError):
        return None


def publish_ip(folder: Path, name: str, ip: str) -> None:
    nodes = folder / "nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    write_atomically(nodes / f"{name}.json", json.dumps({"ip": ip}))


def unpublish_ip(folder: Path, name: str) -> None:
    (folder / "nodes" / f"{name}.json").unlink(missing_ok=True)
