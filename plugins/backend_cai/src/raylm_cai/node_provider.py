"""Ray's autoscaler on Cloudera ML: a node provider whose nodes are a cai cluster's applications.

Ray's monitor loads it on the head of an autoscaled cluster (see `raylm_cai.autoscaling`).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    NODE_KIND_WORKER,
    STATUS_UNINITIALIZED,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from raylm_cai.applications import (
    ENDED_STATES,
    RUNNING,
    NodeSize,
    cluster_applications,
    create_node_application,
    delete_application,
    free_worker_names,
    is_worker,
)
from raylm_cai.autoscaling import HEAD_TYPE, WORKER_TYPE, published_ip, unpublish_ip
from raylm_cai.client import CMLClient, CMLSettings
from raylm_cai.node import cluster_folder, read_head_address

logger = logging.getLogger(__name__)


class CMLNodeProvider(NodeProvider):
    """Nodes are the cluster's applications (node id: the application's id). Runs in Ray's monitor on the
    head, which has the project's files and the CML API key CML gives every workload."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str):
        super().__init__(provider_config, cluster_name)
        self.cluster = provider_config["cluster"]
        self.worker_size = NodeSize(**provider_config["worker"])
        self.max_workers = int(provider_config["max_workers"])
        self.runtime_identifier = provider_config.get("runtime_identifier")
        self.bypass_authentication = bool(provider_config.get("bypass_authentication"))
        settings = CMLSettings.resolve({}, os.environ)
        self.client = CMLClient(settings.url, settings.api_key)
        self.project_id = self.client.find_project(settings.project)["id"]
        self.folder = cluster_folder(self.cluster)
        self._lock = threading.RLock()
        self._known: dict[str, dict[str, Any]] = {}  # every application seen, by id (ids are never reused)
        self._live: set[str] = set()  # those listed last time and not ended
        self._tags: dict[str, dict[str, str]] = {}  # what the autoscaler set, by id

    def _list(self) -> set[str]:
        """List the cluster's applications. A worker whose application ended is deleted: the autoscaler
        replaces it if min workers or demand need one."""
        live = set()
        for name, app in cluster_applications(self.client, self.project_id, self.cluster).items():
            with self._lock:
                self._known[app["id"]] = app
            if is_worker(name) and app["status"] in ENDED_STATES:
                logger.warning("worker application %s is %s: deleting it", name, app["status"])
                self._delete(app)
            else:
                live.add(app["id"])
        with self._lock:
            self._live = live
        return live

    def _delete(self, app: dict[str, Any]) -> None:
        delete_application(self.client, self.project_id, app)
        unpublish_ip(self.folder, app["name"])
        with self._lock:
            self._live.discard(app["id"])

    def _app(self, node_id: str) -> dict[str, Any]:
        with self._lock:
            if node_id in self._known:
                return self._known[node_id]
        self._list()
        return self._known[node_id]

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        return [
            node_id
            for node_id in sorted(self._list())
            if all(self.node_tags(node_id).get(key) == value for key, value in tag_filters.items())
        ]

    def node_tags(self, node_id: str) -> dict[str, str]:
        app = self._app(node_id)
        worker = is_worker(app["name"])
        with self._lock:
            tags = dict(self._tags.get(node_id, {}))
        # The head runs this provider; a worker is ready once its application runs and its Ray node published
        # its IP: until then the autoscaler counts it as launching.
        ready = not worker or (app["status"] == RUNNING and self.internal_ip(node_id) is not None)
        tags.update(
            {
                TAG_RAY_NODE_KIND: NODE_KIND_WORKER if worker else NODE_KIND_HEAD,
                TAG_RAY_USER_NODE_TYPE: WORKER_TYPE if worker else HEAD_TYPE,
                TAG_RAY_NODE_NAME: app["name"],
                TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE if ready else STATUS_UNINITIALIZED,
            }
        )
        return tags

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        with self._lock:
            self._tags.setdefault(node_id, {}).update(tags)

    def is_running(self, node_id: str) -> bool:
        return not self.is_terminated(node_id) and self._app(node_id)["status"] == RUNNING

    def is_terminated(self, node_id: str) -> bool:
        with self._lock:
            return node_id not in self._live

    def internal_ip(self, node_id: str) -> str | None:
        name = self._app(node_id)["name"]
        if is_worker(name):
            return published_ip(self.folder, name)
        address = read_head_address(self.folder)
        return address.rpartition(":")[0] if address else None

    def external_ip(self, node_id: str) -> str | None:
        return self.internal_ip(node_id)

    def create_node(self, node_config: dict[str, Any], tags: dict[str, str], count: int) -> dict[str, Any]:
        with self._lock:
            self._list()
            live = [self._known[node_id] for node_id in self._live]
            workers = sum(1 for app in live if is_worker(app["name"]))
            allowed = max(0, min(count, self.max_workers - workers))
            if allowed < count:
                logger.warning(
                    "%d worker(s) asked for; %d stay within max_workers %d", count, allowed, self.max_workers
                )
            created = {}
            for name in free_worker_names(self.cluster, {app["name"] for app in live}, allowed):
                unpublish_ip(self.folder, name)  # left by an earlier worker of that name
                logger.info("creating worker application %s", name)
                app = create_node_application(
                    self.client, self.project_id, self.cluster, name, self.worker_size,
                    self.runtime_identifier, self.bypass_authentication,
                )  # fmt: skip
                self._known[app["id"]] = app
                self._live.add(app["id"])
                self._tags[app["id"]] = dict(tags)
                created[app["id"]] = app
            return created

    def terminate_node(self, node_id: str) -> None:
        app = self._app(node_id)
        logger.info("deleting worker application %s", app["name"])
        self._delete(app)
