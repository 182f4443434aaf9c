"""The CML applications of a raylm cluster: their names, what they are created with, and listing them.

Cluster NAME is `raylm-NAME-head` and `raylm-NAME-worker-1..N`, each running the node script
(`raylm_cai.node`). Used by the backend (`raylm cluster up/scale/down`) and by the node provider
Ray's autoscaler runs on an autoscaled cluster's head (`raylm_cai.autoscaler`).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from raylm_cai.client import CMLClient, CMLError

NODE_SCRIPT = ".raylm/cai/ray_node.py"
RUNNING = "APPLICATION_RUNNING"
# An application in one of these states runs no Ray node, and will not by itself.
ENDED_STATES = ("APPLICATION_FAILED", "APPLICATION_STOPPED", "APPLICATION_STOPPING")


@dataclass(frozen=True)
class NodeSize:
    """What one Ray node's application asks CML for."""

    cpu: float
    memory: float  # GB
    gpu: int = 0


def head_name(cluster: str) -> str:
    return f"raylm-{cluster}-head"


def worker_name(cluster: str, index: int) -> str:
    return f"raylm-{cluster}-worker-{index}"


def is_worker(name: str) -> bool:
    return re.search(r"-worker-\d+$", name) is not None


def free_worker_names(cluster: str, taken: set[str], count: int) -> list[str]:
    """`count` worker names not in `taken`, the lowest numbers first."""
    names, index = [], 1
    while len(names) < count:
        if worker_name(cluster, index) not in taken:
            names.append(worker_name(cluster, index))
        index += 1
    return names


def cluster_applications(client: CMLClient, project_id: str, cluster: str) -> dict[str, dict[str, Any]]:
    """The cluster's applications by name (the API's name filter matches substrings: keep exact names)."""
    prefix = f"raylm-{cluster}-"
    pattern = re.compile(re.escape(prefix) + r"(head|worker-\d+)")
    return {app["name"]: app for app in client.applications(project_id, prefix) if pattern.fullmatch(app["name"])}


def create_node_application(
    client: CMLClient,
    project_id: str,
    cluster: str,
    name: str,
    size: NodeSize,
    runtime_identifier: str | None = None,
    bypass_authentication: bool = False,
    environment: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    role = "worker" if is_worker(name) else "head"
    subdomain = re.sub(r"[^a-z0-9-]+", "-", name.lower())[:56].strip("-") + "-" + secrets.token_hex(3)
    body = {
        "project_id": project_id,
        "name": name,
        "subdomain": subdomain,
        "description": f"raylm: Ray {role} of cluster {cluster}",
        "script": NODE_SCRIPT,
        "cpu": size.cpu,
        "memory": size.memory,
        "nvidia_gpu": size.gpu,
        "bypass_authentication": bypass_authentication,
        "environment": {
            "RAYLM_CAI_CLUSTER": cluster,
            "RAYLM_CAI_ROLE": role,
            "RAYLM_CAI_NODE": name,
            "RAYLM_CAI_CPU": str(size.cpu),
            "RAYLM_CAI_MEMORY_GB": str(size.memory),
            "RAYLM_CAI_GPU": str(size.gpu),
            **(environment or {}),
        },
    }
    if runtime_identifier:
        body["runtime_identifier"] = runtime_identifier
    return client.call("POST", f"projects/{project_id}/applications", body)


def delete_application(client: CMLClient, project_id: str, app: dict[str, Any]) -> None:
    """Delete `app`; one already gone is fine."""
    try:
        client.call("DELETE", f"projects/{project_id}/applications/{app['id']}")
    except CMLError as exc:
        if exc.status != 404:
            raise
