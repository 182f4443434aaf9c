"""The local backend against real Ray: the contract, connecting to an existing cluster, and errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from raylm.testing.contracts import BackendContract
from raylm.testing.processes import processes_matching
from raylm.toolkit import HEAD_ENVIRONMENT, SERVING_NODE_ENVIRONMENT, ClusterError
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


HEAD_SETTINGS = {**SERVING_NODE_ENVIRONMENT, **HEAD_ENVIRONMENT}
WORKER_SETTINGS = """
import json, os, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
keys = json.loads(sys.argv[2])
@ray.remote
def settings():
    return {"niceness": os.nice(0), "policy": os.sched_getscheduler(0), "session": os.getsid(0),
            "environment": {key: os.environ.get(key) for key in keys}}
print(json.dumps(ray.get(settings.remote())))
"""


def test_the_embedded_head_runs_workers_with_its_settings_and_the_environment_wins(raylm_home, monkeypatch):
    monkeypatch.setenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.3")
    head = LocalBackend({"cluster": "settings", "num_cpus": 2})
    address = head.up(print).address
    try:
        driver = subprocess.run(
            [sys.executable, "-c", WORKER_SETTINGS, address, json.dumps(list(HEAD_SETTINGS))],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        head.down(print)
    assert driver.returncode == 0, driver.stderr
    seen = json.loads(driver.stdout.strip().splitlines()[-1])
    assert seen["niceness"] == 0, "Ray's default worker niceness (15) starves the engines"
    assert seen["policy"] == os.SCHED_BATCH, "Ray's wake-ups must not preempt the engines (raylm.ray_nodes)"
    assert seen["environment"] == {**HEAD_SETTINGS, "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.3"}
    # The engines' busy loops yield the CPU only within their session's scheduling group (autogroup).
    assert seen["session"] == os.getsid(0), "Ray's workers must stay in the session that started the head"


def test_a_ray_token_left_in_home_does_not_lock_the_driver_out(raylm_home, monkeypatch, tmp_path):
    # A local `ray.init()` writes ~/.ray/auth_token; a `ray start` after it turns token auth on by itself
    # (RAY_AUTH_MODE unset), which a driver of the same user, also unset, is then refused by.
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a-token-of-an-earlier-ray-init")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # as a user's shell has it: unset
    head = LocalBackend({"cluster": "token-in-home", "num_cpus": 2})
    address = head.up(print).address
    try:
        driver = subprocess.run(
            [sys.executable, "-c", WORKER_SETTINGS, address, "[]"], capture_output=True, text=True, timeout=120
        )
    finally:
        head.down(print)
    assert driver.returncode == 0, driver.stderr


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


def test_a_dead_head_is_forgotten_and_down_ends_what_it_left(raylm_home):
    head = LocalBackend({"cluster": "dies", "num_cpus": 2})
    head.up(print)
    head_pid = CLUSTERS.load("dies")["pid"]
    os.kill(head_pid, signal.SIGKILL)
    psutil.Process(head_pid).wait(timeout=10)
    try:
        assert head.status() is None
        assert CLUSTERS.load("dies") is None
        messages = []
        head.down(messages.append)  # SIGKILL skipped Ray's own cleanup: its other processes may still run
        assert processes_matching(str(head.ray_temp_dir)) == []
        assert not messages or messages[0].startswith("stopping what is left of the local cluster 'dies' (")
    finally:
        for line in processes_matching(str(head.ray_temp_dir)):
            psutil.Process(int(line.split(":")[0])).kill()


def test_cluster_commands_start_show_and_stop_a_head(raylm_home):
    raylm = str(Path(sys.executable).parent / "raylm")
    env = {**os.environ, "RAYLM_HOME": str(raylm_home)}

    def cli(*args):
        return subprocess.run([raylm, "cluster", *args, "--cluster", "lab"], capture_output=True, text=True, env=env)

    up = cli("up", "--num-cpus", "2", "--json")
    assert up.returncode == 0, up.stderr
    address = json.loads(up.stdout)["address"]
    try:
        assert json.loads(cli("up", "--json").stdout)["address"] == address, "a second up reuses the head"
        status = cli("status")
        assert status.stdout.strip() == f"local cluster 'lab' at {address}: 1/1 nodes alive"
        assert cli("scale", "--workers", "2").stderr.strip().endswith("cannot scale; it has a fixed set of nodes")
    finally:
        assert cli("down").returncode == 0
    assert cli("status").stdout.strip() == "no such cluster running"
    assert processes_matching(str(LocalBackend({"cluster": "lab"}).ray_temp_dir)) == []
