"""An engine server as a child process: what it leaves behind when it stops or dies, what it says when it fails."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from raylm.errors import DeploymentError
from raylm.net import ENGINE_SERVER_PORTS, free_port, free_ports_in, other_listeners
from raylm.processes import marked_processes
from raylm.server_process import ServerProcess, torch_compile_cache

# A stand-in engine server: writes a temporary file as vLLM does (its distributed-init file), then serves.
SERVER = """
import http.server, pathlib, sys, tempfile
pathlib.Path(tempfile.gettempdir(), "vllm_dist_left_behind").write_text("x")
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def test_the_servers_temporary_files_go_with_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    port = free_port("127.0.0.1")
    server = ServerProcess("stand-in", [sys.executable, "-c", SERVER, str(port)])
    server.start()
    asyncio.run(server.wait_healthy(f"http://127.0.0.1:{port}/", 30))
    assert (server.temp_dir / "vllm_dist_left_behind").exists(), "the server's TMPDIR is its own folder"
    asyncio.run(server.stop())
    assert server.exit_code() is not None
    assert not server.temp_dir.exists()


# A stand-in engine that compiles with torch: reports whether torch's precompiled headers are
# there from an earlier start, then adds its own.
COMPILING_SERVER = """
from pathlib import Path
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
headers = Path(default_cache_dir(), "precompiled_headers")
print("found" if (headers / "header.h.gch").exists() else "compiled")
headers.mkdir(parents=True, exist_ok=True)
(headers / "header.h.gch").write_text("x")
"""


@pytest.fixture
def temp_folder(tmp_path, monkeypatch):
    """The replica's temporary folder, where engines' own temporary folders go: tmp_path."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile reads TMPDIR again
    return tmp_path


def test_torchs_compile_cache_outlives_the_servers_temporary_folder(temp_folder):
    outputs = []
    for _ in range(2):
        server = ServerProcess("stand-in", [sys.executable, "-c", COMPILING_SERVER])
        server.start()
        assert server.process.wait(60) == 0, server.last_lines()
        outputs += server.last_lines(1)
        asyncio.run(server.stop())
        assert not server.temp_dir.exists()
    assert outputs == ["compiled", "found"]
    assert [p.name for p in temp_folder.iterdir()] == [torch_compile_cache().name]


def test_a_server_starts_where_the_shared_compile_cache_cannot_be_made(temp_folder):
    torch_compile_cache().write_text("a file where the cache folder would go")
    server = ServerProcess("stand-in", [sys.executable, "-c", "print('serving')"])
    server.start()
    assert server.process.wait(30) == 0
    assert server.last_lines(1) == ["serving"]
    asyncio.run(server.stop())


# Stand-in engines that fail to start as vLLM does. When its engine core fails: a warning that quotes
# an error, the engine core's traceback with the root cause, then the server's own traceback ending
# in a generic error.
FAILING_ENGINE_CORE = """
print("WARNING this can cause fd limit errors like `OSError: [Errno 24] Too many open files`", flush=True)
try:
    raise ValueError("No available memory for the cache blocks")
except ValueError:
    import traceback
    traceback.print_exc()
raise RuntimeError("Engine core initialization failed. See root cause above.")
"""
# When a worker process fails, vLLM logs its traceback (as vLLM 0.32 on CPU printed it), then the same.
FAILING_WORKER = """
log = "(VllmWorker-0 pid=26772) ERROR 11-23 07:45:05 [multiproc_executor.py:953] "
print("(APIServer pid=26713) WARNING 11-23 07:44:40 [system_utils.py:255] This can cause fd limit errors like "
      "`OSError: [Errno 24] Too many open files`. Consider increasing with ulimit -n")
print(log + "WorkerProc failed to start.")
print(log + "Traceback (most recent call last):")
print(log + "    raise ValueError(")
print(log + "ValueError: Available memory on node 0 (13.9/16.21 GiB) on startup is less than desired")
raise RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
"""


@pytest.mark.parametrize(
    "script, root_cause",
    [
        (FAILING_ENGINE_CORE, "ValueError: No available memory for the cache blocks"),
        (FAILING_WORKER, "ValueError: Available memory on node 0 (13.9/16.21 GiB) on startup is less than desired"),
    ],
    ids=["engine core", "worker"],
)
def test_a_server_that_fails_to_start_is_reported_with_its_root_cause(script, root_cause):
    server = ServerProcess("stand-in", [sys.executable, "-c", script])
    server.start()
    with pytest.raises(DeploymentError) as raised:
        asyncio.run(server.wait_healthy(f"http://127.0.0.1:{free_port('127.0.0.1')}/", 30))
    assert str(raised.value) == (
        f"stand-in exited with code 1 while starting: {root_cause} (its output: {server.log_path})"
    )


def test_without_a_traceback_the_last_output_lines_are_reported():
    server = ServerProcess("stand-in", [sys.executable, "-c", "print('cannot bind the port'); raise SystemExit(3)"])
    server.start()
    with pytest.raises(DeploymentError) as raised:
        asyncio.run(server.wait_healthy(f"http://127.0.0.1:{free_port('127.0.0.1')}/", 30))
    assert str(raised.value).splitlines()[-2:] == [
        f"stand-in exited with code 3 while starting; its last output ({server.log_path}):",
        "cannot bind the port",
    ]


def test_ports_picked_together_differ_and_are_free():
    ports = free_ports_in(range(20000, 30000), 40)
    assert len(set(ports)) == 40
    assert all(20000 <= port < 30000 for port in ports)
    for port in ports:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


# A stand-in engine server that starts a worker process, as vLLM starts its engine core, and prints
# the worker's pid. The worker ignores SIGTERM when told to (a stuck engine).
SPAWNING_SERVER = """
import http.server, subprocess, sys
worker = "import signal, sys, time\\n" \\
    "if sys.argv[1] == 'stubborn': signal.signal(signal.SIGTERM, signal.SIG_IGN)\\ntime.sleep(600)"
child = subprocess.Popen([sys.executable, "-c", worker, sys.argv[2]])
print("worker", child.pid, flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def start_spawning_server(mark: str, worker: str = "polite") -> tuple[ServerProcess, int]:
    port = free_port("127.0.0.1")
    server = ServerProcess(
        "stand-in", [sys.executable, "-c", SPAWNING_SERVER, str(port), worker], env={"RAYLM_TEST_MARK": mark}, grace_s=2
    )
    server.start()
    asyncio.run(server.wait_healthy(f"http://127.0.0.1:{port}/", 30))
    wait_until(lambda: "worker" in " ".join(server.last_lines()))
    return server, int(next(line for line in server.last_lines() if line.startswith("worker")).split()[1])


def wait_until(condition, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_killed_server_takes_the_processes_it_started_with_it():
    server, worker = start_spawning_server("killed-server")
    (engine,) = psutil.Process(server.process.pid).children()  # the server, under its supervisor
    engine.kill()  # what the OOM killer does
    wait_until(lambda: not psutil.pid_exists(worker))
    assert server.process.wait(10) == 128 + signal.SIGKILL  # the server's fate, as an exit code
    assert marked_processes("RAYLM_TEST_MARK", "killed-server") == []
    asyncio.run(server.stop())


def test_stop_ends_a_worker_that_ignores_sigterm_after_the_grace_time():
    server, worker = start_spawning_server("stubborn", worker="stubborn")
    started = time.monotonic()
    asyncio.run(server.stop())
    assert not psutil.pid_exists(worker)
    assert 1.5 < time.monotonic() - started < 10, "SIGKILL after the 2 s grace"
    assert marked_processes("RAYLM_TEST_MARK", "stubborn") == []


# A stand-in engine server that stops its worker itself on SIGTERM, after draining, as SGLang does; a worker
# that dies before it is told to stop is a crash, which the server waits 5 s to diagnose (SGLang does too).
ORDERLY_SERVER = """
import http.server, signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
def stop(*_):
    time.sleep(0.5)  # drains its requests
    if worker.poll() is not None:
        print("worker crashed: waiting 5 s for crash diagnostics", flush=True)
        time.sleep(5)
    else:
        worker.terminate()
        worker.wait()
        print("stopped in order", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def test_stop_lets_the_server_stop_its_own_processes_first():
    port = free_port("127.0.0.1")
    server = ServerProcess("orderly", [sys.executable, "-c", ORDERLY_SERVER, str(port)], grace_s=20)
    server.start()
    asyncio.run(server.wait_healthy(f"http://127.0.0.1:{port}/", 30))
    started = time.monotonic()
    asyncio.run(server.stop())
    assert "stopped in order" in server.last_lines()
    assert time.monotonic() - started < 4, "no crash diagnostics, no grace time spent"


# A stand-in replica: starts the server, then waits to be killed.
REPLICA = """
import sys, time
sys.path[:0] = sys.argv[2:]
from test_server_process import start_spawning_server
server, worker = start_spawning_server(sys.argv[1])
print(worker, flush=True)
time.sleep(600)
"""


def test_a_killed_replica_takes_its_server_and_the_servers_processes_with_it():
    replica = subprocess.Popen(
        [sys.executable, "-c", REPLICA, "killed-replica", *sys.path], stdout=subprocess.PIPE, text=True
    )
    worker = int(replica.stdout.readline())
    assert len(marked_processes("RAYLM_TEST_MARK", "killed-replica")) == 3  # supervisor, server, worker
    replica.kill()
    replica.wait()
    wait_until(lambda: marked_processes("RAYLM_TEST_MARK", "killed-replica") == [])
    assert not psutil.pid_exists(worker)


def test_a_port_shared_through_so_reuseport_is_seen(tmp_path):
    """Engines listen with SO_REUSEPORT: a second server on the same port binds without an error, so
    raylm looks for other listeners once its engine answers."""
    (port,) = free_ports_in(ENGINE_SERVER_PORTS)
    listen = (
        "import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); time.sleep(60)"
    )
    with socket.socket() as mine:
        mine.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        mine.bind(("127.0.0.1", port))
        mine.listen()
        assert other_listeners("127.0.0.1", port, {os.getpid()}) == set()
        other = subprocess.Popen([sys.executable, "-c", listen], stdout=subprocess.PIPE, text=True)
        try:
            assert other.stdout.readline() == "up\n"
            assert other_listeners("127.0.0.1", port, {os.getpid()}) == {other.pid}
            assert other_listeners("127.0.0.2", port, {os.getpid()}) == set(), "another address is another socket"
        finally:
            other.kill()
            other.wait()
