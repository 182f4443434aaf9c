"""How the node script stops its Ray node when CML stops the application."""

import subprocess
import sys
import time

import psutil

from raylm_cai import node

# Stands in for `ray start --block` on a node whose stop outlasts a pod's grace time: it and its child ignore
# SIGTERM, and each says when it has set that up.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if sys.argv[1] == "parent":
    subprocess.Popen([sys.executable, sys.argv[0], "child"])
print(sys.argv[1], flush=True)
time.sleep(600)
"""


def test_a_node_whose_ray_does_not_stop_is_ended_within_its_stop_time(tmp_path):
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    ray = subprocess.Popen([sys.executable, str(script), "parent"], stdout=subprocess.PIPE, text=True)
    assert sorted(ray.stdout.readline().strip() for _ in range(2)) == ["child", "parent"]
    tree = [psutil.Process(ray.pid), *psutil.Process(ray.pid).children(recursive=True)]
    assert len(tree) == 2

    started = time.monotonic()
    node._stop_node(ray)
    took = time.monotonic() - started

    assert node.NODE_STOP_S <= took < node.NODE_STOP_S + 5, "a node stops at its stop time, not at the pod's kill"
    assert ray.poll() is not None
    assert not [process for process in tree if process.is_running() and process.status() != psutil.STATUS_ZOMBIE]
