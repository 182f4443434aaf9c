"""FakeCML follows CML's contract and does real work behind it."""

import json
import subprocess
import time

import psutil
import pytest
from cai_setup import RUNTIME

from raylm_cai.client import CMLClient, CMLError

# An application: answers HTTP on CDSW_APP_PORT and records the environment CML gave it.
APP_SCRIPT = """
import http.server, json, os
json.dump(dict(os.environ), open(f"env-{os.environ['CDSW_ENGINE_ID']}.json", "w"))
server = http.server.HTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), http.server.SimpleHTTPRequestHandler)
server.serve_forever()
"""


def wait_status(client, path, wanted, key="status", timeout=30):
    deadline = time.monotonic() + timeout
    while (record := client.call("GET", path))[key] not in wanted:
        assert time.monotonic() < deadline, f"{path} stayed {record[key]}"
        time.sleep(0.2)
    return record


def create_app(client, project, name, **fields):
    body = {"name": name, "subdomain": name, "script": "app.py", "runtime_identifier": RUNTIME, **fields}
    return client.call("POST", f"projects/{project['id']}/applications", body)


@pytest.fixture(scope="module", autouse=True)
def app_script(cml, project):
    (cml.project_dir(project["id"]) / "app.py").write_text(APP_SCRIPT)
    (cml.project_dir(project["id"]) / "fail.py").write_text("import sys; sys.exit(3)\n")


def test_an_application_runs_its_script_as_a_pod_of_its_own(cml, project, client):
    client.call("PATCH", f"projects/{project['id']}", {"environment": json.dumps({"FROM_PROJECT": "1"})})
    app = create_app(client, project, "web", environment={"FROM_APP": "2"}, cpu=1, memory=2)
    assert app["status"] == "APPLICATION_STARTING"
    assert json.loads(app["environment"]) == {"FROM_PROJECT": "1", "FROM_APP": "2"}  # a JSON string in answers
    assert app["bypass_authentication"] is False
    path = f"projects/{project['id']}/applications/{app['id']}"
    running = wait_status(client, path, {"APPLICATION_RUNNING"})
    assert running["running_at"].endswith("Z")
    env_file = next(cml.project_dir(project["id"]).glob("env-*.json"))
    env = json.loads(env_file.read_text())
    env_file.unlink()
    assert env["CDSW_PROJECT_ID"] == project["id"] and env["HOME"] == str(cml.project_dir(project["id"]))
    assert env["CDSW_IP_ADDRESS"].startswith("127.0.") and env["CDSW_IP_ADDRESS"] != "127.0.0.1"
    assert env["CDSW_API_URL"] == f"{cml.url}/api/v1" and env["FROM_APP"] == "2" and env["FROM_PROJECT"] == "1"
    pods = cml.pod_processes()
    assert pods

    restarted = client.call("POST", f"{path}:restart")
    assert restarted["status"] == "APPLICATION_STARTING"
    wait_status(client, path, {"APPLICATION_RUNNING"})
    new_env = json.loads(next(cml.project_dir(project["id"]).glob("env-*.json")).read_text())
    assert new_env["CDSW_IP_ADDRESS"] != env["CDSW_IP_ADDRESS"]  # a new pod, a new IP
    assert not any(psutil.pid_exists(pid) for pid in pods)

    stopped = client.call("POST", f"{path}:stop")
    assert stopped["status"] == "APPLICATION_STOPPED" and cml.pod_processes() == []
    assert client.call("DELETE", path) == {}
    with pytest.raises(CMLError) as missing:
        client.call("GET", path)
    assert missing.value.status == 404


def test_an_application_whose_process_dies_fails(cml, project, client):
    app = create_app(client, project, "dies", script="fail.py")
    path = f"projects/{project['id']}/applications/{app['id']}"
    assert wait_status(client, path, {"APPLICATION_FAILED", "APPLICATION_RUNNING"})["status"] == "APPLICATION_FAILED"
    client.call("DELETE", path)


def test_injected_scheduling_failure(cml, project, client):
    cml.faults.fail_applications("^unschedulable$")
    app = create_app(client, project, "unschedulable")
    path = f"projects/{project['id']}/applications/{app['id']}"
    assert wait_status(client, path, {"APPLICATION_FAILED", "APPLICATION_RUNNING"})["status"] == "APPLICATION_FAILED"
    client.call("DELETE", path)
    cml.faults.clear()


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"runtime_identifier": ""}, "runtime_identifier must be specified"),
        ({"runtime_identifier": "no-such-runtime"}, "not available"),
        ({"subdomain": "Not_A_Label"}, "invalid subdomain"),
        ({"environment": "A=1"}, "environment must be an object"),
        ({"cpu": -1}, "must be positive"),
    ],
)
def test_applications_cml_would_reject(project, client, fields, says):
    with pytest.raises(CMLError, match=says) as error:
        create_app(client, project, "rejected", **fields)
    assert error.value.status == 400


def test_subdomains_are_unique(cml, project, client):
    app = create_app(client, project, "taken")
    with pytest.raises(CMLError, match="already in use"):
        create_app(client, project, "taken")
    client.call("DELETE", f"projects/{project['id']}/applications/{app['id']}")


def test_lists_reject_a_filter_that_is_not_a_json_object(project, client):
    with pytest.raises(CMLError, match="search_filter must be a JSON object"):
        client.call("GET", f"projects/{project['id']}/applications", search_filter="name=x")


def test_dependent_jobs_run_after_a_success_only(cml, project, client):
    (cml.project_dir(project["id"]) / "job.py").write_text(
        "import sys, pathlib; pathlib.Path(sys.argv[1]).touch(); sys.exit(int(sys.argv[2]))\n"
    )
    jobs = f"projects/{project['id']}/jobs"

    def job(name, arguments, parent=None):
        body = {"name": name, "script": "job.py", "arguments": arguments, "runtime_identifier": RUNTIME}
        return client.call("POST", jobs, {**body, **({"parent_job_id": parent} if parent else {})})

    first = job("first", "first.done 0")
    second = job("second", "second.done 1", parent=first["id"])
    third = job("third", "third.done 0", parent=second["id"])
    assert (second["type"], second["parent_id"], second["timeout"]) == ("dependent", first["id"], "0")
    with pytest.raises(CMLError, match="alongside schedule"):
        client.call("POST", jobs, {"name": "x", "script": "job.py", "runtime_identifier": RUNTIME,
                                   "parent_job_id": first["id"], "schedule": "0 13 * * 1"})  # fmt: skip

    run = client.call("POST", f"{jobs}/{first['id']}/runs", {})
    assert run["status"] == "ENGINE_SCHEDULING"
    with pytest.raises(CMLError, match="already has an active run"):
        client.call("POST", f"{jobs}/{first['id']}/runs", {})
    assert wait_status(client, f"{jobs}/{first['id']}/runs/{run['id']}", {"ENGINE_SUCCEEDED"})
    deadline = time.monotonic() + 30
    while not (runs := client.call("GET", f"{jobs}/{second['id']}/runs")["job_runs"]):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert wait_status(client, f"{jobs}/{second['id']}/runs/{runs[0]['id']}", {"ENGINE_FAILED"})
    time.sleep(1.0)
    assert client.call("GET", f"{jobs}/{third['id']}/runs")["job_runs"] == []  # a failed parent starts nothing
    assert (cml.project_dir(project["id"]) / "second.done").exists()
    assert not (cml.project_dir(project["id"]) / "third.done").exists()
    with pytest.raises(CMLError, match="already finished"):
        client.call("POST", f"{jobs}/{first['id']}/runs/{run['id']}:stop")


def test_a_git_project_is_cloned(cml, client, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "hello.txt").write_text("hi\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    project = client.call("POST", "projects", {"name": "from-git", "template": "git", "git_url": f"file://{repo}"})
    assert project["creation_status"] == "creating"
    wait_status(client, f"projects/{project['id']}", {"success"}, key="creation_status")
    assert (cml.project_dir(project["id"]) / "hello.txt").read_text() == "hi\n"


def test_closing_the_fake_ends_its_pods_and_removes_their_tmp(tmp_path):
    from raylm_cai.testing import FakeCML

    with FakeCML(tmp_path) as fake:
        project = fake.create_project("short-lived")
        (fake.project_dir(project["id"]) / "app.py").write_text(APP_SCRIPT)
        client = CMLClient(fake.url, fake.api_keys[0])
        create_app(client, project, "lingering")
        assert fake.pod_processes()
    assert fake.pod_processes() == []
    assert not fake.pod_tmp_root.exists()
