"""The README's install lines, each run as written in a fresh virtualenv, then used as a user would.

raylm is not on PyPI: its wheels, built from this checkout, are offered to pip as extra
find-links. Everything else comes from PyPI (and this machine's wheel folders) exactly as the
line asks. PyPI holds vLLM's GPU build, so the GPU line installs here; this machine has no GPU,
so that environment is checked as far as parsing, validation, plugin status and the resources a
replica asks Ray for go, and `raylm serve` must refuse a replica no node can hold.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from servetools import free_port

from raylm.testing.cli import run_raylm

pytestmark = pytest.mark.install

REPO = Path(__file__).resolve().parent.parent
DISTRIBUTIONS = ("core", "plugins/backend_local", "plugins/backend_cai", "plugins/engine_vllm")


def install_line(label: str) -> str:
    """The command under the `# LABEL...` comment of the README's Install block."""
    block = re.search(r"## Install\n.*?```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    lines = block.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("#") and label in line)
    return lines[index + 1]


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder)]
        + [str(REPO / d) for d in DISTRIBUTIONS],
        check=True,
    )
    return folder


def pip_environment(wheelhouse: Path) -> dict[str, str]:
    """This machine's pip settings plus raylm's wheels."""
    configured = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
    ).stdout.split()
    # PyTorch's index (the CPU line's --extra-index-url) is unreachable here: fail each lookup at
    # once instead of retrying it for every package. No byte-compiling of ~10 GB of packages at
    # install time: Python compiles what it imports.
    return {"PIP_FIND_LINKS": " ".join([*configured, str(wheelhouse)]), "PIP_RETRIES": "0", "PIP_NO_COMPILE": "1"}


class FreshVenv:
    """A new virtualenv in which one README line ran, "activated" by putting its bin first on PATH."""

    def __init__(self, folder: Path, line: str, wheelhouse: Path):
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        self.bin = folder / "bin"
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "VIRTUAL_ENV": str(folder),
            "RAYLM_HOME": str(folder / "raylm-home"),
            "HF_HUB_OFFLINE": "1",
        }
        self.env.pop("PYTHONPATH", None)
        installed = subprocess.run(
            ["bash", "-c", line],
            env={**self.env, **pip_environment(wheelhouse)},
            capture_output=True,
            text=True,
            timeout=1500,
        )
        assert installed.returncode == 0, f"{line}\n{installed.stdout[-3000:]}\n{installed.stderr[-3000:]}"

    def run(self, *command, timeout=600):
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)

    def raylm(self, *args, timeout=600):
        return run_raylm(*args, env=self.env, timeout=timeout, command=(str(self.bin / "raylm"),))

    def plugins(self) -> dict:
        listed = self.raylm("plugins", "--json")
        assert listed.returncode == 0, listed.stderr
        return {record["name"]: record for record in json.loads(listed.stdout)}

    def checked(self, model, *engine_args) -> dict:
        """What vLLM's own check in this environment says of the arguments (the JSON line)."""
        result = self.run(str(self.bin / "python"), "-m", "raylm_vllm.validate", str(model), *engine_args)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1])


LABELS = ("a GPU node", "a Cloudera ML project", "a CPU-only machine")


@pytest.fixture(scope="module")
def fresh_venvs(tmp_path_factory, wheelhouse):
    """One fresh virtualenv per README line, installed side by side (pip mostly waits on the disk)."""
    folders = {label: tmp_path_factory.mktemp("venv") for label in LABELS}
    try:
        with ThreadPoolExecutor(len(LABELS)) as pool:
            made = {label: pool.submit(FreshVenv, folders[label], install_line(label), wheelhouse) for label in LABELS}
            yield {label: future.result() for label, future in made.items()}
    finally:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)  # GPU builds take ~10 GB each


@pytest.fixture(scope="module")
def gpu_node(fresh_venvs):
    return fresh_venvs["a GPU node"]


@pytest.fixture(scope="module")
def cml_project(fresh_venvs):
    return fresh_venvs["a Cloudera ML project"]


@pytest.fixture(scope="module")
def cpu_machine(fresh_venvs):
    return fresh_venvs["a CPU-only machine"]


def newest_vllm() -> str:
    """The newest vLLM release inside the range raylm-vllm declares, as pip sees it."""
    from packaging.specifiers import SpecifierSet

    from raylm.engine_check import declared_ranges

    index = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "vllm"], capture_output=True, text=True, check=True
    ).stdout
    versions = re.search(r"Available versions: (.*)", index).group(1).split(", ")
    return next(SpecifierSet(declared_ranges("raylm-vllm", ("vllm",))["vllm"]).filter(versions))


def test_the_gpu_line_installs_the_newest_vllm_in_range_and_its_plugins_are_usable(gpu_node):
    version = gpu_node.run(str(gpu_node.bin / "python"), "-c", "import vllm; print(vllm.__version__)")
    assert version.stdout.strip() == newest_vllm()
    plugins = gpu_node.plugins()
    assert sorted(plugins) == ["raylm-local", "raylm-vllm"]
    assert {name: p["status"] for name, p in plugins.items()} == {"raylm-local": "ok", "raylm-vllm": "ok"}


def test_the_gpu_build_refuses_a_bad_flag_with_vllms_own_message(gpu_node, tiny_llama):
    refused = gpu_node.raylm("serve", str(tiny_llama), "--name", "gpu-bad", "--bogus-flag")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "raylm: error: model 'gpu-bad': vLLM rejected the arguments: unrecognized arguments: --bogus-flag"
    )


def test_the_gpu_build_sizes_replicas_in_gpus(gpu_node, tiny_llama):
    assert gpu_node.checked(tiny_llama, "--tensor-parallel-size", "4") == {
        "vllm": newest_vllm(),
        "device": "cuda",
        "gpus": 4,
    }
    assert gpu_node.checked(tiny_llama, "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2")["gpus"] == 4


def test_a_replica_no_node_can_hold_is_refused_at_once_and_nothing_is_left(gpu_node, tiny_llama):
    from raylm.testing.processes import processes_matching

    served = gpu_node.raylm(
        "serve", str(tiny_llama), "--name", "gpu-two", "--port", str(free_port()), "--tensor-parallel-size", "2"
    )
    lines = served.stderr.strip().splitlines()
    assert served.returncode == 1, served.stderr
    assert "raylm: gpu-two: 1 replica(s), each needs 1 CPU and 2 GPUs" in lines
    assert lines[-1] == (
        "raylm: error: model 'gpu-two' needs 1 CPU and 2 GPUs on one node per replica, but the cluster's "
        "1 node(s) have 8 CPUs and 0 GPUs: add such a node, or ask for less"
    )
    assert any("stopping the local Ray head 'gpu-two'" in line for line in lines)
    assert processes_matching(gpu_node.env["RAYLM_HOME"]) == []
    assert gpu_node.raylm("status").stdout.strip() == "no deployments running"


def test_the_cml_line_gives_the_cai_backend_and_vllms_gpu_build(cml_project, tiny_llama):
    plugins = cml_project.plugins()
    assert sorted(plugins) == ["raylm-cai", "raylm-vllm"]
    assert all(p["status"] == "ok" for p in plugins.values()), plugins
    assert cml_project.raylm("cai", "--help").returncode == 0
    assert cml_project.checked(tiny_llama, "--tensor-parallel-size", "2")["gpus"] == 2


@pytest.mark.engine
def test_the_cpu_line_serves_the_tiny_model(cpu_machine, tiny_llama):
    import openai

    from raylm.engine import args_to_argv
    from raylm.testing.models import TINY_LLAMA_VLLM_ARGS

    port = free_port()
    served = cpu_machine.raylm(
        "serve",
        str(tiny_llama),
        "--name",
        "cpu-line",
        "--port",
        str(port),
        "--detach",
        *args_to_argv(TINY_LLAMA_VLLM_ARGS),
    )
    assert served.returncode == 0, served.stderr
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        completion = client.completions.create(model="cpu-line", prompt="Hello", max_tokens=4, temperature=0)
        assert completion.usage.completion_tokens == 4
    finally:
        stopped = cpu_machine.raylm("stop", "cpu-line")
    assert stopped.returncode == 0, stopped.stderr
