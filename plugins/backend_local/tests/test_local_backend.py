"""The local backend against real Ray: the contract, connecting to an existing cluster, and errors."""

import os
import signal

import psutil
import pytest
from raylm.errors import ClusterError
from raylm.testing.contracts import BackendContract
from raylm.testing.processes import processes_matching
from raylm_local.backend import CLUSTERS, LocalBackend


class TestLocalBackend(BackendContract):
    backend_name = "local"
    plugin_module = "raylm_local.plugin"

    @pytest.fixture
    def backend_options(self, raylm_home):
        return {"cluster": "contract", "num_cpus": 2}

    def test_down_leaves_no_ray_process(self, backend):
        backend.up(print)
        assert processes_matching(str(backend.ray_temp_dir)), "the head's processes carry its temp dir"
        backend.down(print)
        assert processes_matching(str(backend.ray_temp_dir)) == []


@pytest.fixture
def running_head(raylm_home):
    head = LocalBackend({"cluster": "existing", "num_cpus": 2})
    yield head.up(print)
    head.down(print)


def test_connecting_by_address_never_stops_that_cluster(running_head):
    guest = LocalBackend({"cluster": "guest", "address": running_head.address})
    assert not guest.head_is_local
    assert guest.up(print).address == running_head.address
    messages = []
    guest.down(messages.append)
    assert "leaving the Ray cluster" in messages[0]
    assert guest.status() is not None, "the cluster must still run"


def test_an_address_where_nothing_listens_is_a_clear_error(raylm_home):
    with pytest.raises(ClusterError, match="no Ray cluster answers at 127.0.0.1:1: give the GCS address"):
        LocalBackend({"address": "127.0.0.1:1"}).up(print)


def test_a_dead_head_is_forgotten(raylm_home):
    head = LocalBackend({"cluster": "dies", "num_cpus": 2})
    head.up(print)
    os.kill(CLUSTERS.load("dies")["pid"], signal.SIGKILL)
    try:
        assert head.status() is None
        assert CLUSTERS.load("dies") is None
    finally:
        for line in processes_matching(str(head.ray_temp_dir)):  # SIGKILL skipped Ray's own cleanup
            psutil.Process(int(line.split(":")[0])).kill()
