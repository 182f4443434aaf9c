"""`raylm cai deploy` from a laptop: a local git repository becomes a CML project whose job chain
(setup -> cluster up -> serve) ends with a served model, on FakeCML with real Ray and vLLM."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cai_setup import API_KEY, RUNTIME, Console, session_path

from raylm.testing.models import TINY_LLAMA_VLLM_ARGS

pytestmark = pytest.mark.engine


@pytest.fixture
def repository(tmp_path, tiny_llama):
    """An application repository: raylm's job script, requirements, a deployment file."""
    repo = tmp_path / "llm-app"
    repo.mkdir()
    done = subprocess.run([str(Path(sys.executable).parent / "raylm"), "cai", "init", str(repo)], capture_output=True)
    assert done.returncode == 0, done.stderr
    (repo / "requirements.txt").write_text("requests\n")  # already installed in the fake's runtime: no download
    plan = {
        "name": "tiny-app",
        "models": [
            {
                "model": str(tiny_llama),
                "name": "tiny",
                "engine_args": TINY_LLAMA_VLLM_ARGS,
            }
        ],
    }
    (repo / "deploy.yaml").write_text(yaml.safe_dump(plan))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "llm app"], check=True)
    return repo


def test_deploy_runs_the_job_chain_to_a_served_model_and_reruns_in_place(cml, repository, tmp_path):
    raylm = Console()
    laptop = {"PATH": session_path(), "HOME": str(tmp_path), "RAYLM_CML_URL": cml.url, "RAYLM_CML_API_KEY": API_KEY}
    deploy = ["cai", "deploy", "--git-url", f"file://{repository}", "-f", "deploy.yaml", "--cluster", "apps"]
    deploy += ["--runtime-identifier", RUNTIME, "--head-cpu", "2", "--head-memory", "4"]

    first = raylm(*deploy, env=laptop)
    assert first.returncode == 0, first.stderr + dump_job_logs(cml)
    for job in ("setup", "cluster up", "serve"):
        assert f"raylm apps: {job}: succeeded" in first.stderr
    project = one_project(cml, "llm-app")
    assert_serves(cml, project)

    again = raylm(*deploy, env=laptop)
    assert again.returncode == 0, again.stderr + dump_job_logs(cml)
    assert "using project 'llm-app'" in again.stderr and "updating job 'raylm apps: serve'" in again.stderr
    assert one_project(cml, "llm-app")["id"] == project["id"]
    jobs = [j["name"] for j in cml.handle("GET", f"projects/{project['id']}/jobs", {}, None, API_KEY)["jobs"]]
    assert sorted(jobs) == ["raylm apps: cluster up", "raylm apps: serve", "raylm apps: setup"]
    assert_serves(cml, project)

    failing = raylm(*deploy, "--setup", "-r no-such-requirements.txt", env=laptop)
    assert failing.returncode == 1
    assert "raylm: error: job 'raylm apps: setup' ended failed" in failing.stderr

    session = cml.session_environment(project["id"])
    assert raylm("stop", "tiny-app", env=session).returncode == 0
    assert raylm("cluster", "down", "--backend", "cai", "--cluster", "apps", env=session).returncode == 0
    assert cml.applications() == []
    assert not any(API_KEY in text for text in raylm.output)


def one_project(cml, name):
    projects = cml.handle("GET", "projects", {"search_filter": json.dumps({"name": name})}, None, API_KEY)["projects"]
    assert len(projects) == 1
    return projects[0]


def assert_serves(cml, project):
    from openai import OpenAI

    # The serve job recorded the deployment on the project filesystem, where sessions of the project find it.
    record = json.loads((cml.project_dir(project["id"]) / ".raylm/deployments/tiny-app.json").read_text())
    client = OpenAI(base_url=f"{record['url']}/v1", api_key="unused")
    completion = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens == 4


def dump_job_logs(cml):
    return "\n".join(path.read_text(errors="replace")[-3000:] for path in sorted((cml.root / "logs").glob("*.log")))
