"""Starting and stopping leave nothing behind: Ctrl-C on a foreground serve, and an engine that fails to start."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from servetools import assert_port_free, free_port, leftovers, run_cli

import raylm
from raylm.engine import args_to_argv
from raylm.errors import DeploymentError
from raylm.state import Records
from raylm.testing.cli import RAYLM
from raylm.testing.models import TINY_LLAMA_VLLM_ARGS
from raylm_local.backend import ray_temp_dir

pytestmark = pytest.mark.engine

TINY_ARGV = args_to_argv(TINY_LLAMA_VLLM_ARGS)


class Foreground:
    """`raylm serve` in the foreground, as in a terminal; its output lines are read as they come."""

    def __init__(self, *args, home: Path, raylm: tuple[str, ...] = (RAYLM,)):
        self.lines: queue.Queue[str] = queue.Queue()
        env = {**os.environ, "RAYLM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            [*raylm, "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line.rstrip())

    def wait_for(self, fragment: str, timeout_s: float) -> list[str]:
        seen, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.process.poll() is None, "raylm serve exited early:\n" + "\n".join(seen)
                continue
            seen.append(line)
            if fragment in line:
                return seen
        raise AssertionError(f"{fragment!r} did not appear:\n" + "\n".join(seen))

    def ctrl_c(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=180)


def test_ctrl_c_while_serving_stops_everything(tmp_path, tiny_llama):
    port = free_port()
    serving = Foreground(str(tiny_llama), "--name", "fg-tiny", "--port", str(port), *TINY_ARGV, home=tmp_path)
    serving.wait_for("press Ctrl-C to stop", timeout_s=600)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(model="fg-tiny", prompt="Hello", max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens == 4

    assert serving.ctrl_c() == 0
    assert leftovers(ray_temp_dir(tmp_path, "fg-tiny"), "fg-tiny", "fg-tiny") == []
    assert_port_free(port)


# raylm, with a Ctrl-C at the instant it shows the progress message that starts with argv[1].
CTRL_C_AT_MESSAGE = """
import os, signal, sys
import raylm.cli

say, moment = raylm.cli.echo_progress, sys.argv.pop(1)

def echo_progress(message):
    say(message)
    if message.startswith(moment):
        os.kill(os.getpid(), signal.SIGINT)

raylm.cli.echo_progress = echo_progress
raylm.cli.main(sys.argv[1:])
"""


@pytest.mark.parametrize(
    ("moment", "exit_code"),
    [
        ("serving ", 130),  # `serve` says it is ready: it undoes its own start, as for any interrupted start
        ("press Ctrl-C to stop", 0),  # `serve` has returned, the command has not begun to wait: it stops it
    ],
)
def test_ctrl_c_the_instant_it_is_ready_stops_everything(tmp_path, tiny_llama, moment, exit_code):
    port = free_port()
    raylm_interrupted = (sys.executable, "-c", CTRL_C_AT_MESSAGE, moment)
    serving = Foreground(
        str(tiny_llama), "--name", "fg-ready", "--port", str(port), *TINY_ARGV, home=tmp_path, raylm=raylm_interrupted
    )
    assert serving.process.wait(timeout=600) == exit_code
    assert run_cli("status", env={**os.environ, "RAYLM_HOME": str(tmp_path)}).stdout.strip() == "no deployments running"
    assert leftovers(ray_temp_dir(tmp_path, "fg-ready"), "fg-ready", "fg-ready") == []
    assert_port_free(port)


def test_a_foreground_serve_ends_when_stopped_from_another_shell(tmp_path, tiny_llama):
    port = free_port()
    serving = Foreground(str(tiny_llama), "--name", "fg-other", "--port", str(port), *TINY_ARGV, home=tmp_path)
    serving.wait_for("press Ctrl-C to stop", timeout_s=600)
    stopped = run_cli("stop", "fg-other", env={**os.environ, "RAYLM_HOME": str(tmp_path)})
    assert stopped.returncode == 0, stopped.stderr
    serving.wait_for("fg-other was stopped from elsewhere", timeout_s=30)
    assert serving.process.wait(timeout=30) == 0
    assert leftovers(ray_temp_dir(tmp_path, "fg-other"), "fg-other", "fg-other") == []


def test_ctrl_c_while_starting_stops_everything(tmp_path, tiny_llama):
    port = free_port()
    starting = Foreground(str(tiny_llama), "--name", "fg-early", "--port", str(port), *TINY_ARGV, home=tmp_path)
    starting.wait_for("fg-early: deploying", timeout_s=300)
    assert starting.ctrl_c() == 130
    assert leftovers(ray_temp_dir(tmp_path, "fg-early"), "fg-early", "fg-early") == []
    assert_port_free(port)


def test_an_engine_that_fails_to_start_is_reported_and_cleaned_up(raylm_home, tiny_llama):
    # Valid for vLLM's parser, impossible at start: a KV cache of one byte.
    model = raylm.ModelDeployment(
        model=str(tiny_llama),
        name="doomed",
        engine="vllm",
        engine_args=args_to_argv({**TINY_LLAMA_VLLM_ARGS, "kv_cache_memory_bytes": 1}),
    )
    port = free_port()
    messages = []
    with pytest.raises(DeploymentError) as raised:
        raylm.serve(raylm.ServePlan(name="doomed", models=(model,), port=port), progress=messages.append)
    # One line with vLLM's root cause (not the traceback around it) and where the engine's output is.
    message = str(raised.value)
    assert message.startswith("doomed failed to start: vllm:doomed exited with code 1 while starting: "), message
    assert "ValueError: No available memory for the cache blocks" in message and "\n" not in message, message
    assert "(its output: /" in message
    assert "cleaning up" in " ".join(messages)
    assert not any("did not stop" in line for line in messages), messages
    assert leftovers(ray_temp_dir(raylm_home, "doomed"), "doomed", "doomed") == []
    assert Records("deployments").names() == []
    assert_port_free(port)
