"""A fresh environment composes only what is installed: core plus chosen plugins, nothing else.

The venv gets raylm's wheels without their heavy dependencies (no Ray, no vLLM),
which also proves `raylm plugins` needs none of them.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raylm.testing.cli import run_raylm

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(folder),
            str(REPO / "core"),
            str(REPO / "plugins/backend_local"),
            str(REPO / "examples/backend_example"),
        ],
        check=True,
    )
    return {path.name.split("-")[0]: path for path in folder.glob("*.whl")}


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheels):
    folder = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    pip(python, "--no-deps", wheels["raylm"], wheels["raylm_local"])
    pip(python, "pluggy", "click", "pyyaml")  # the only imports `raylm plugins` needs
    return python


def pip(python, *args):
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *map(str, args)], check=True
    )


def raylm(python, *args, env=None):
    return run_raylm(*args, env={"PATH": "/usr/bin:/bin", **(env or {})}, command=(str(Path(python).parent / "raylm"),))


def names(result):
    assert result.returncode == 0, result.stderr
    return {record["name"]: record for record in json.loads(result.stdout)}


def site_packages(python):
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return Path(out.strip())


def test_only_installed_plugins_are_listed(venv):
    records = names(raylm(venv, "plugins", "--json"))
    assert list(records) == ["raylm-local"]
    assert records["raylm-local"]["status"] == "ok" and records["raylm-local"]["backends"] == ["local"]


def test_installing_the_example_backend_adds_it(venv, wheels):
    pip(venv, "--no-deps", wheels["raylm_env"])
    records = names(raylm(venv, "plugins", "--json"))
    assert sorted(records) == ["raylm-env", "raylm-local"]
    assert records["raylm-env"]["backends"] == ["env"] and records["raylm-env"]["status"] == "ok"
    table = raylm(venv, "plugins").stdout
    assert "raylm-env" in table and "backend env" in table


def test_a_broken_plugin_is_listed_as_failed_and_the_rest_work(venv):
    site = site_packages(venv)
    (site / "raylm_broken.py").write_text("raise RuntimeError('this plugin is broken')\n")
    dist_info = site / "raylm_broken-0.0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: raylm-broken\nVersion: 0.0.1\n")
    (dist_info / "entry_points.txt").write_text("[raylm]\nbroken = raylm_broken\n")
    (dist_info / "RECORD").write_text("")

    records = names(raylm(venv, "plugins", "--json"))
    assert records["raylm-broken"]["status"] == "failed"
    assert records["raylm-broken"]["error"] == "import failed: RuntimeError: this plugin is broken"
    assert records["raylm-local"]["status"] == "ok" and records["raylm-env"]["status"] == "ok"
    assert raylm(venv, "--help").returncode == 0

    strict = raylm(venv, "plugins", env={"RAYLM_STRICT_PLUGINS": "1"})
    assert strict.returncode != 0
    assert "Traceback" in strict.stderr and "this plugin is broken" in strict.stderr

    disabled = names(raylm(venv, "plugins", "--json", env={"RAYLM_DISABLE_PLUGINS": "broken"}))
    assert "raylm-broken" not in disabled
