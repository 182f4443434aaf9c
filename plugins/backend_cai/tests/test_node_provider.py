"""The node provider Ray's autoscaler runs on an autoscaled cai head, against FakeCML (real HTTP, real
pods; no Ray): what it creates, how it tags and matches nodes, what it deletes."""

from pathlib import Path

import pytest
from cai_setup import API_KEY, RUNTIME, delete_what_is_left
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

from raylm.toolkit import wait_until
from raylm_cai.applications import NodeSize, create_node_application, head_name
from raylm_cai.autoscaling import autoscaler_config, publish_ip
from raylm_cai.client import CMLClient
from raylm_cai.node import cluster_folder
from raylm_cai.node_provider import CMLNodeProvider

# Stands in for the node script: answers CML's polling, starts no Ray.
POLLING_ONLY = """
import http.server, os
server = http.server.HTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), http.server.SimpleHTTPRequestHandler)
server.serve_forever()
"""
WORKER_TAGS = {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: "worker"}


@pytest.fixture
def provider_project(cml, monkeypatch):
    project = cml.create_project("autoscaled")
    environment = cml.session_environment(project["id"])
    for key, value in environment.items():
        monkeypatch.setenv(key, value)  # the provider reads what CML gives the head's workload
    script = Path(environment["HOME"]) / ".raylm/cai/ray_node.py"
    script.parent.mkdir(parents=True)
    script.write_text(POLLING_ONLY)
    yield project
    delete_what_is_left(cml, CMLClient(cml.url, API_KEY), project["id"])


def names(provider, node_ids):
    return sorted(provider.node_tags(node_id)[TAG_RAY_NODE_NAME] for node_id in node_ids)


def test_workers_are_created_within_max_workers_matched_by_ip_and_ended_ones_deleted(cml, provider_project):
    client = CMLClient(cml.url, API_KEY)
    head = create_node_application(client, provider_project["id"], "p", head_name("p"), NodeSize(1, 1), RUNTIME)
    config = autoscaler_config("p", NodeSize(1, 1), NodeSize(2, 1), 0, 2, 60, RUNTIME, False)
    provider = CMLNodeProvider(config["provider"], config["cluster_name"])
    assert provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD}) == [head["id"]]

    cml.faults.fail_requests("POST", r"/applications$", 503, times=2)  # retried with backoff
    created = provider.create_node({}, WORKER_TAGS, count=3)
    assert len(created) == 2, "never more workers than max_workers"
    workers = provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_WORKER})
    assert names(provider, workers) == ["raylm-p-worker-1", "raylm-p-worker-2"]
    assert provider.create_node({}, WORKER_TAGS, count=1) == {}
    assert all(provider.node_tags(node)[TAG_RAY_NODE_STATUS] == STATUS_UNINITIALIZED for node in workers)

    # A worker is up to date once its application runs and its node published its IP.
    first = next(node for node in workers if provider.node_tags(node)[TAG_RAY_NODE_NAME] == "raylm-p-worker-1")
    publish_ip(cluster_folder("p"), "raylm-p-worker-1", "127.0.9.9")
    wait_until(  # the autoscaler lists the nodes on each update, then reads their tags
        lambda: (
            provider.non_terminated_nodes({TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE}) == [head["id"], first]
            or provider.non_terminated_nodes({TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE}) == [first, head["id"]]
        ),
        timeout_s=30,
        poll_s=0.5,
        on_timeout=lambda: AssertionError("the running worker with a published IP never became up to date"),
    )
    assert provider.internal_ip(first) == "127.0.9.9" and provider.is_running(first)

    # An application that ended is deleted (the autoscaler then replaces it as needed); a terminated node too.
    second = next(node for node in workers if node != first)
    client.call("POST", f"projects/{provider_project['id']}/applications/{second}:stop")
    assert names(provider, provider.non_terminated_nodes({})) == ["raylm-p-head", "raylm-p-worker-1"]
    assert provider.is_terminated(second)
    provider.terminate_node(first)
    assert [app["name"] for app in client.applications(provider_project["id"], "raylm-p-")] == ["raylm-p-head"]
    assert not (cluster_folder("p") / "nodes" / "raylm-p-worker-1.json").exists()
    # The next worker takes the lowest free name.
    (again,) = provider.create_node({}, WORKER_TAGS, count=1)
    assert provider.node_tags(again)[TAG_RAY_NODE_NAME] == "raylm-p-worker-1"
