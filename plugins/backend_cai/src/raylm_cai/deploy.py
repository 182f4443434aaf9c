"""`raylm cai deploy`: from a git repository to a served model, as a chain of CML jobs.

The project is found by name or created from the repository. Three jobs, each
depending on the one before (`parent_job_id`), run the repository's
`raylm_cml_job.py` (written by `raylm cai init`):

    raylm CLUSTER: setup       pip install SETUP             (e.g. -r requirements.txt)
    raylm CLUSTER: cluster up  raylm cluster up --backend cai --cluster CLUSTER ...
    raylm CLUSTER: serve       raylm serve -f FILE --backend cai --cluster CLUSTER --detach --replace

Running the first job makes CML run the others after each success; we follow every
run to its end. A second deploy reuses the project and the jobs (updated to the
new options), the running cluster, and replaces the served deployment.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from raylm.toolkit import DeploymentError, Progress, StateChanges, wait_until
from raylm_cai.client import CMLClient, CMLError

JOB_SCRIPT = "raylm_cml_job.py"
JOB_SCRIPT_SOURCE = '''\
"""raylm's CML job script, written by `raylm cai init`: commit it to the repository CML clones.

`setup ARGS...` runs `pip install ARGS`; anything else runs `raylm ARGS...`.
"""

import subprocess
import sys

arguments = sys.argv[1:]
if arguments[:1] == ["setup"]:
    sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", *arguments[1:]]))

from raylm.cli import main  # noqa: E402 - installed by the setup job

main(arguments)
'''
POLL_S = 2.0
CREATE_PROJECT_TIMEOUT_S = 600
CHILD_RUN_TIMEOUT_S = 120
TERMINAL = {"ENGINE_SUCCEEDED", "ENGINE_FAILED", "ENGINE_TIMEDOUT", "ENGINE_STOPPED", "ENGINE_SKIPPED"}


@dataclass(frozen=True)
class JobPlan:
    name: str
    arguments: list[str]
    timeout_s: int
    memory_gb: float = 2.0


def job_chain(cluster: str, plan_file: str, setup: str, cluster_options: Mapping[str, Any]) -> list[JobPlan]:
    up = ["cluster", "up", "--backend", "cai", "--cluster", cluster]
    for name, value in cluster_options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            up.append(flag)
        elif value not in (None, False):
            up += [flag, str(value)]
    serve = ["serve", "-f", plan_file, "--backend", "cai", "--cluster", cluster, "--detach", "--replace"]
    return [
        JobPlan(f"raylm {cluster}: setup", ["setup", *shlex.split(setup)], timeout_s=3600, memory_gb=4.0),
        JobPlan(f"raylm {cluster}: cluster up", up, timeout_s=int(cluster_options.get("start_timeout") or 900) + 600),
        JobPlan(f"raylm {cluster}: serve", serve, timeout_s=3600),
    ]


def deploy(
    client: CMLClient,
    *,
    project_name: str,
    git_url: str,
    git_ref: str | None,
    runtime_identifier: str | None,
    chain: list[JobPlan],
    progress: Progress,
) -> dict[str, Any]:
    """Create or reuse the project and the job chain, run it, follow every run; raise if one does not succeed."""
    if not runtime_identifier:
        raise DeploymentError("--runtime-identifier is required for the jobs; runtimes here: " + _some_runtimes(client))
    project = _project(client, project_name, git_url, git_ref, progress)
    jobs = _jobs(client, project["id"], runtime_identifier, chain, progress)
    earlier = {job["id"]: _run_ids(client, project["id"], job["id"]) for job in jobs}
    progress(f"running job {jobs[0]['name']!r}")
    run = client.call("POST", f"projects/{project['id']}/jobs/{jobs[0]['id']}/runs", {})
    for index, job in enumerate(jobs):
        if index:
            run = _child_run(client, project["id"], job, earlier[job["id"]])
        status = _follow(client, project["id"], job, run, progress)
        if status != "ENGINE_SUCCEEDED":
            raise DeploymentError(
                f"job {job['name']!r} ended {status.removeprefix('ENGINE_').lower()}: see its run history in "
                f"project {project['name']!r} (Jobs); the jobs after it did not run"
            )
    progress(f"deployed: `raylm status` in a session of project {project['name']!r} shows the endpoint")
    return project


def _some_runtimes(client: CMLClient) -> str:
    runtimes = client.call("GET", "runtimes", search_filter={"status": "ENABLED"}, page_size=5).get("runtimes") or []
    return ", ".join(r["image_identifier"] for r in runtimes) or "none listed"


def _project(client: CMLClient, name: str, git_url: str, git_ref: str | None, progress: Progress) -> dict[str, Any]:
    project = client.project_named(name)
    if project is not None:
        progress(f"using project {name!r} ({project['id']})")
        return project
    progress(f"creating project {name!r} from {git_url}")
    body = {"name": name, "template": "git", "git_url": git_url, "visibility": "private"}
    if git_ref:
        body["git_ref"] = git_ref
    project = client.call("POST", "projects", body)
    current = {"project": project}

    def created() -> dict[str, Any] | None:
        state = current["project"].get("creation_status", "success").lower()
        if state in ("success", "ready"):
            return current["project"]
        if "fail" in state or "error" in state:
            raise DeploymentError(f"CML could not create project {name!r} from {git_url} ({state}): check the URL")
        current["project"] = client.call("GET", f"projects/{project['id']}")
        return None

    return wait_until(
        created,
        timeout_s=CREATE_PROJECT_TIMEOUT_S,
        poll_s=POLL_S,
        on_timeout=lambda: DeploymentError(
            f"project {name!r} still {current['project'].get('creation_status')!r} after {CREATE_PROJECT_TIMEOUT_S}s"
        ),
    )


def _jobs(
    client: CMLClient, project_id: str, runtime: str, chain: list[JobPlan], progress: Progress
) -> list[dict[str, Any]]:
    existing = {j["name"]: j for j in client.items(f"projects/{project_id}/jobs", "jobs", {"name": "raylm "})}
    jobs: list[dict[str, Any]] = []
    for plan in chain:
        fields = {
            "script": JOB_SCRIPT,
            "arguments": shlex.join(plan.arguments),
            "cpu": 1.0,
            "memory": plan.memory_gb,
            "timeout": plan.timeout_s,
            "kill_on_timeout": True,
            "runtime_identifier": runtime,
        }
        parent = jobs[-1]["id"] if jobs else None
        job = existing.get(plan.name)
        if job is None:
            progress(f"creating job {plan.name!r}")
            body = {"project_id": project_id, "name": plan.name, **fields}
            if parent:
                body["parent_job_id"] = parent
            job = client.call("POST", f"projects/{project_id}/jobs", body)
        else:
            progress(f"updating job {plan.name!r}")
            job = client.call("PATCH", f"projects/{project_id}/jobs/{job['id']}", {**fields, "parent_id": parent or ""})
        jobs.append(job)
    return jobs


def _run_ids(client: CMLClient, project_id: str, job_id: str) -> set[str]:
    return {run["id"] for run in client.items(f"projects/{project_id}/jobs/{job_id}/runs", "job_runs")}


def _child_run(client: CMLClient, project_id: str, job: dict[str, Any], earlier: set[str]) -> dict[str, Any]:
    """The run CML started for a dependent job after its parent succeeded."""

    def started() -> dict[str, Any] | None:
        runs = list(client.items(f"projects/{project_id}/jobs/{job['id']}/runs", "job_runs"))
        new = [run for run in runs if run["id"] not in earlier]
        return max(new, key=lambda run: run.get("created_at") or "") if new else None

    return wait_until(
        started,
        timeout_s=CHILD_RUN_TIMEOUT_S,
        poll_s=POLL_S,
        on_timeout=lambda: DeploymentError(f"CML started no run of job {job['name']!r} after its parent succeeded"),
    )


def _follow(client: CMLClient, project_id: str, job: dict[str, Any], run: dict[str, Any], progress: Progress) -> str:
    """Report a run's status changes until it ends; Ctrl-C stops the run rather than leaving it behind."""
    path = f"projects/{project_id}/jobs/{job['id']}/runs/{run['id']}"
    changes = StateChanges(progress)
    try:
        while True:
            status = run["status"]
            changes.show(job["name"], status.removeprefix("ENGINE_").lower())
            if status in TERMINAL:
                return status
            time.sleep(POLL_S)
            run = client.call("GET", path)
    except KeyboardInterrupt:
        progress(f"interrupted: stopping the run of {job['name']!r}")
        try:
            client.call("POST", f"{path}:stop")
        except CMLError as exc:
            progress(f"could not stop it: {exc}")
        raise
