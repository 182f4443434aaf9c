"""An engine server as a child process: what it leaves behind when it stops."""

import asyncio
import sys

from raylm.server_process import ServerProcess, free_port

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
