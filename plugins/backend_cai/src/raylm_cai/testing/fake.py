"""FakeCML itself: the workspace's state (projects, applications, jobs, runs) and the API's routes."""

from __future__ import annotations

import json
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from raylm.toolkit import wait_until
from raylm_cai.testing import pods
from raylm_cai.testing.faults import Faults
from raylm_cai.testing.http import handler_for
from raylm_cai.testing.wire import (
    APPLICATION_CREATE_FIELDS,
    APPLICATION_UPDATE_FIELDS,
    JOB_CREATE_FIELDS,
    JOB_UPDATE_FIELDS,
    PROJECT_CREATE_FIELDS,
    PROJECT_UPDATE_FIELDS,
    RUN_CREATE_FIELDS,
    APIError,
    cml_id,
    json_string_field,
    now,
    object_field,
    page,
    public,
    resources,
)

DEFAULT_RUNTIME = (
    "docker.repository.cloudera.com/cloudera/cdsw/ml-runtime-pbj-workbench-python3.11-standard:2025.09.1-b5"
)
USER = {"username": "fake-user", "name": "Fake User", "email": "fake-user@example.com"}
TERMINAL_RUN_STATES = {"ENGINE_SUCCEEDED", "ENGINE_FAILED", "ENGINE_TIMEDOUT", "ENGINE_STOPPED"}


class FakeCML:
    """A CML API v2 server on 127.0.0.1 whose applications and jobs run as local processes."""

    def __init__(
        self,
        root: str | Path,
        *,
        api_keys: tuple[str, ...] = ("fake-cml-api-key",),
        python: str = sys.executable,
        runtimes: tuple[str, ...] = (DEFAULT_RUNTIME,),
        starting_delay_s: float = 0.0,
        port: int = 0,
    ):
        self.root = Path(root).resolve()
        self.api_keys = tuple(api_keys)
        self.python = python
        self.runtimes = tuple(runtimes)
        self.starting_delay_s = starting_delay_s
        self.faults = Faults()
        self.requests: list[dict[str, Any]] = []
        # Request fields CML's gateway would silently drop: a client sending one has a bug.
        self.unknown_fields: list[tuple[str, str]] = []
        self._lock = threading.RLock()
        self._projects: dict[str, dict[str, Any]] = {}
        self._apps: dict[str, dict[str, Any]] = {}
        self._jobs: dict[str, dict[str, Any]] = {}
        self._runs: dict[str, dict[str, Any]] = {}
        self._workloads: dict[str, pods.Workload] = {}  # by application or run id
        self.killed_after_grace: list[str] = []  # ids of workloads whose processes outlived SIGTERM's grace time
        # Pods get a short private /tmp (Unix socket paths must stay under 108 bytes).
        self.pod_tmp_root = Path("/tmp") / f"fakecml-{secrets.token_hex(3)}"
        self._closing = threading.Event()
        self._request_key = threading.local()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler_for(self.handle))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads = [
            threading.Thread(target=self._server.serve_forever, name="fakecml-http", daemon=True),
            threading.Thread(target=self._watch, name="fakecml-watch", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- for tests and users -------------------------------------------------------

    def __enter__(self) -> FakeCML:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop every workload, then the server; remove the pods' private /tmp folders."""
        self._closing.set()
        with self._lock:
            ids = list(self._workloads)
        for workload_id in ids:
            self._end_workload(workload_id)
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self.pod_tmp_root, ignore_errors=True)

    @property
    def domain(self) -> str:
        return f"127.0.0.1:{self.port}"

    def create_project(self, name: str, **fields: Any) -> dict[str, Any]:
        """Create a project as `POST /api/v2/projects` would (and wait while it clones)."""
        project = self._create_project({"name": name, **fields})
        wait_until(
            lambda: self._projects[project["id"]]["creation_status"] != "creating",
            timeout_s=120,
            poll_s=0.1,
            on_timeout=lambda: APIError(500, f"project {name!r} still creating after 120s"),
        )
        return public(self._projects[project["id"]])

    def project_dir(self, project_id: str) -> Path:
        return self.root / "projects" / project_id

    def session_environment(self, project_id: str, api_key: str | None = None) -> dict[str, str]:
        """The environment of a CML session in the project: run raylm with it to act "inside CML"."""
        workload = pods.Workload(engine_id=secrets.token_hex(8), ip=pods.next_pod_ip())
        return self._environment(self._projects[project_id], workload, api_key or self.api_keys[0])

    def applications(self) -> list[dict[str, Any]]:
        with self._lock:
            return [public(app) for app in self._apps.values()]

    def application_url(self, name: str) -> str:
        """Where CML's ingress takes a client of the application `name` (`https://SUBDOMAIN.DOMAIN`):
        here, straight to the port it listens on, `CDSW_APP_PORT` (the fake has no ingress of its own)."""
        with self._lock:
            (app_id,) = [app["id"] for app in self._apps.values() if app["name"] == name]
            return f"http://127.0.0.1:{self._workloads[app_id].app_port}"

    def kill_pod(self, name: str) -> None:
        """The pod of application `name` dies at once, as when its node is lost: every process of it is
        SIGKILLed; the application then turns APPLICATION_FAILED."""
        with self._lock:
            (app_id,) = [app["id"] for app in self._apps.values() if app["name"] == name]
            workload = self._workloads[app_id]
        pods.kill(workload.folder(self.pod_tmp_root))

    def pod_processes(self) -> list[int]:
        """Pids of every live process started for a workload of this fake (its "pods")."""
        return [process.pid for process in pods.members(self.pod_tmp_root)]

    def log_of(self, workload_id: str) -> str:
        """Output of an application's or job run's process."""
        workload = self._workloads.get(workload_id)
        return workload.log.read_text(errors="replace") if workload and workload.log else ""

    # -- the API -----------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], body: Any, api_key: str | None) -> Any:
        self.requests.append({"method": method, "path": path, "query": query})
        self._request_key.value = api_key
        if api_key not in self.api_keys:
            raise APIError(401, "invalid or expired API key")
        injected = self.faults.injected_status(method, path)
        if injected:
            raise APIError(injected, f"injected fault: {HTTPStatus(injected).phrase}")
        for (verb, pattern), handler in _ROUTES.items():
            match = pattern.fullmatch(path)
            if match and verb == method:
                if body is not None and not isinstance(body, dict):
                    raise APIError(400, "request body must be a JSON object")
                return handler(self, *match.groups(), query=query, body=body or {})
        if any(pattern.fullmatch(path) for _, pattern in _ROUTES):
            raise APIError(501, f"method {method} not allowed on {path}")
        raise APIError(404, f"no such endpoint: {path}")

    def _check_fields(self, path: str, body: Mapping[str, Any], known: set[str]) -> None:
        for name in sorted(set(body) - known):
            self.unknown_fields.append((path, name))

    # projects

    def _create_project(self, body: Mapping[str, Any]) -> dict[str, Any]:
        self._check_fields("projects", body, PROJECT_CREATE_FIELDS)
        name = body.get("name")
        if not name:
            raise APIError(400, "project name is required")
        environment = object_field(body, "environment")
        visibility = body.get("visibility") or "private"
        if visibility not in ("private", "organization", "public"):
            raise APIError(400, f"invalid visibility {visibility!r}")
        project_id = cml_id()
        folder = self.project_dir(project_id)
        folder.parent.mkdir(parents=True, exist_ok=True)
        template = body.get("template") or "blank"
        stamp = now()
        project = {
            "id": project_id,
            "name": name,
            "description": body.get("description") or "",
            "visibility": visibility,
            "default_engine_type": body.get("default_project_engine_type") or "ml_runtime",
            "creation_status": "creating",
            "environment": json.dumps(environment),
            "owner": USER,
            "creator": USER,
            "created_at": stamp,
            "updated_at": stamp,
            "shared_memory_limit": int(body.get("shared_memory_limit") or 64),
            "permissions": {"read": True, "write": True, "admin": True},
        }
        with self._lock:
            self._projects[project_id] = project
        if template == "git":
            if not body.get("git_url"):
                raise APIError(400, "git_url is required with template git")
            threading.Thread(target=self._clone, args=(project, body), daemon=True).start()
        else:
            folder.mkdir()
            project["creation_status"] = "success"
        return public(project)

    def _clone(self, project: dict[str, Any], body: Mapping[str, Any]) -> None:
        folder = self.project_dir(project["id"])
        command = ["git", "clone", "--quiet", body["git_url"], str(folder)]
        if body.get("git_ref"):
            command[3:3] = ["--branch", body["git_ref"]]
        done = subprocess.run(command, capture_output=True, text=True)
        project["creation_status"] = "success" if done.returncode == 0 else "failure"

    def _project(self, project_id: str) -> dict[str, Any]:
        project = self._projects.get(project_id)
        if project is None:
            raise APIError(404, f"project {project_id} not found")
        return project

    def list_projects(self, query, body):
        return page(self._projects.values(), "projects", query)

    def create_project_route(self, query, body):
        return self._create_project(body)

    def get_project(self, project_id, query, body):
        return public(self._project(project_id))

    def update_project(self, project_id, query, body):
        project = self._project(project_id)
        self._check_fields(f"projects/{project_id}", body, PROJECT_UPDATE_FIELDS)
        for key in PROJECT_UPDATE_FIELDS & set(body):
            project[key] = json_string_field(body, key) if key == "environment" else body[key]
        project["updated_at"] = now()
        return public(project)

    def delete_project(self, project_id, query, body):
        self._project(project_id)
        with self._lock:
            owned = [i for i, a in self._apps.items() if a["_project"] == project_id]
            owned += [i for i, r in self._runs.items() if r["project_id"] == project_id]
        for workload_id in owned:
            self._end_workload(workload_id)
        with self._lock:
            for table in (self._apps, self._jobs):
                for key in [k for k, v in table.items() if v["_project"] == project_id]:
                    del table[key]
            del self._projects[project_id]
        return {}

    def list_runtimes(self, query, body):
        rows = [
            {
                "image_identifier": image,
                "editor": "PBJ Workbench",
                "kernel": "Python 3.11",
                "edition": "Standard",
                "description": "Standard edition",
                "full_version": image.rsplit(":", 1)[-1],
                "status": "ENABLED",
            }
            for image in self.runtimes
        ]
        return page(rows, "runtimes", query)

    # applications

    def list_applications(self, project_id, query, body):
        self._project(project_id)
        return page([a for a in self._apps.values() if a["_project"] == project_id], "applications", query)

    def create_application(self, project_id, query, body):
        project = self._project(project_id)
        path = f"projects/{project_id}/applications"
        self._check_fields(path, body, APPLICATION_CREATE_FIELDS)
        self._check_runtime(project, body)
        subdomain = body.get("subdomain") or ""
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", subdomain):
            raise APIError(400, f"invalid subdomain {subdomain!r}: use lowercase letters, digits and '-'")
        with self._lock:
            if any(a["subdomain"] == subdomain for a in self._apps.values()):
                raise APIError(400, f"subdomain {subdomain!r} is already in use")
        if not body.get("name") or not body.get("script"):
            raise APIError(400, "an application needs a name and a script")
        cpu, memory, gpus = resources(body)
        environment = {**json.loads(project["environment"]), **object_field(body, "environment")}
        stamp = now()
        app = {
            "id": cml_id(),
            "name": body["name"],
            "description": body.get("description") or "",
            "script": body["script"],
            "subdomain": subdomain,
            "kernel": body.get("kernel") or "",
            "status": "APPLICATION_STARTING",
            "cpu": cpu,
            "memory": memory,
            "nvidia_gpu": gpus,
            "bypass_authentication": bool(body.get("bypass_authentication", False)),
            "environment": json.dumps(environment),
            "runtime_identifier": body.get("runtime_identifier") or "",
            "runtime_addon_identifiers": list(body.get("runtime_addon_identifiers") or []),
            "creator": USER,
            "created_at": stamp,
            "updated_at": stamp,
            "starting_at": stamp,
            "running_at": None,
            "stopped_at": None,
            "_project": project_id,
            "_api_key": self._current_key(),
        }
        with self._lock:
            self._apps[app["id"]] = app
        self._start_application(app)
        return public(app)

    def _application(self, project_id, app_id) -> dict[str, Any]:
        self._project(project_id)
        app = self._apps.get(app_id)
        if app is None or app["_project"] != project_id:
            raise APIError(404, f"application {app_id} not found")
        return app

    def get_application(self, project_id, app_id, query, body):
        return public(self._application(project_id, app_id))

    def update_application(self, project_id, app_id, query, body):
        app = self._application(project_id, app_id)
        self._check_fields(f"projects/{project_id}/applications/{app_id}", body, APPLICATION_UPDATE_FIELDS)
        for key in APPLICATION_UPDATE_FIELDS & set(body):
            app[key] = json_string_field(body, key) if key == "environment" else body[key]
        app["updated_at"] = now()
        return public(app)

    def application_action(self, project_id, app_id, action, query, body):
        app = self._application(project_id, app_id)
        if action == "stop":
            app["status"] = "APPLICATION_STOPPING"
            self._end_workload(app_id)
            app.update(status="APPLICATION_STOPPED", stopped_at=now())
        elif action == "restart":
            self._end_workload(app_id)
            app.update(status="APPLICATION_STARTING", starting_at=now(), running_at=None, stopped_at=None)
            self._start_application(app)  # a new pod: a new IP
        else:
            raise APIError(404, f"no action :{action} on applications")
        return public(app)

    def delete_application(self, project_id, app_id, query, body):
        self._application(project_id, app_id)
        self._end_workload(app_id)
        with self._lock:
            del self._apps[app_id]
        return {}

    def _start_application(self, app: dict[str, Any]) -> None:
        workload = pods.Workload(engine_id=secrets.token_hex(8), ip=pods.next_pod_ip(), app_port=pods.free_pod_port())
        with self._lock:
            self._workloads[app["id"]] = workload
        if self.faults.app_fails(app["name"]):
            return  # never scheduled: the watcher marks it failed
        self._spawn(workload, self._projects[app["_project"]], app, app["script"], "", app["_api_key"])

    # jobs and runs

    def list_jobs(self, project_id, query, body):
        self._project(project_id)
        return page([j for j in self._jobs.values() if j["_project"] == project_id], "jobs", query)

    def create_job(self, project_id, query, body):
        project = self._project(project_id)
        self._check_fields(f"projects/{project_id}/jobs", body, JOB_CREATE_FIELDS)
        self._check_runtime(project, body)
        if not body.get("name") or not body.get("script"):
            raise APIError(400, "a job needs a name and a script")
        parent = body.get("parent_job_id") or body.get("parent_id") or ""
        if parent and body.get("schedule"):
            raise APIError(400, "parent_job_id cannot be used alongside schedule")
        if parent and self._jobs.get(parent, {}).get("_project") != project_id:
            raise APIError(400, f"parent job {parent} not found in this project")
        cpu, memory, gpus = resources(body)
        stamp = now()
        job = {
            "id": cml_id(),
            "name": body["name"],
            "script": body["script"],
            "arguments": body.get("arguments") or "",
            "kernel": body.get("kernel") or "",
            "schedule": body.get("schedule") or "",
            "type": "dependent" if parent else ("cron" if body.get("schedule") else "manual"),
            "parent_id": parent,
            "paused": bool(body.get("paused", False)),
            "cpu": cpu,
            "memory": memory,
            "nvidia_gpu": gpus,
            "timeout": str(int(body.get("timeout") or 0)),
            "kill_on_timeout": bool(body.get("kill_on_timeout", False)),
            "environment": json.dumps(object_field(body, "environment")),
            "runtime_identifier": body.get("runtime_identifier") or "",
            "engine_image_id": "0",
            "created_at": stamp,
            "updated_at": stamp,
            "creator": USER,
            "owner": USER,
            "_project": project_id,
        }
        with self._lock:
            self._jobs[job["id"]] = job
        return public(job)

    def _job(self, project_id, job_id) -> dict[str, Any]:
        self._project(project_id)
        job = self._jobs.get(job_id)
        if job is None or job["_project"] != project_id:
            raise APIError(404, f"job {job_id} not found")
        return job

    def get_job(self, project_id, job_id, query, body):
        return public(self._job(project_id, job_id))

    def update_job(self, project_id, job_id, query, body):
        job = self._job(project_id, job_id)
        self._check_fields(f"projects/{project_id}/jobs/{job_id}", body, JOB_UPDATE_FIELDS)
        for key in JOB_UPDATE_FIELDS & set(body):
            if key == "environment":
                job[key] = json_string_field(body, key)
            elif key == "timeout":
                job[key] = str(int(body[key]))
            else:
                job[key] = body[key]
        job["updated_at"] = now()
        return public(job)

    def delete_job(self, project_id, job_id, query, body):
        self._job(project_id, job_id)
        with self._lock:
            del self._jobs[job_id]  # its dependent jobs stay, as in CML
        return {}

    def list_runs(self, project_id, job_id, query, body):
        self._job(project_id, job_id)
        return page([r for r in self._runs.values() if r["job_id"] == job_id], "job_runs", query)

    def create_run(self, project_id, job_id, query, body):
        job = self._job(project_id, job_id)
        self._check_fields(f"projects/{project_id}/jobs/{job_id}/runs", body, RUN_CREATE_FIELDS)
        run = self._start_run(job, object_field(body, "environment"), body.get("arguments"), self._current_key())
        return public(run)

    def _start_run(self, job: dict, environment: dict[str, str], arguments: str | None, api_key: str) -> dict:
        with self._lock:
            if any(r["job_id"] == job["id"] and r["status"] not in TERMINAL_RUN_STATES for r in self._runs.values()):
                raise APIError(400, f"job {job['id']} already has an active run")
            stamp = now()
            run = {
                "id": secrets.token_hex(8),
                "project_id": job["_project"],
                "job_id": job["id"],
                "status": "ENGINE_SCHEDULING",
                "created_at": stamp,
                "scheduling_at": stamp,
                "starting_at": None,
                "running_at": None,
                "finished_at": None,
                "kernel": job["kernel"],
                "cpu": job["cpu"],
                "memory": job["memory"],
                "nvidia_gpu": job["nvidia_gpu"],
                "arguments": job["arguments"] if arguments is None else arguments,
                "environment": json.dumps({**json.loads(job["environment"]), **environment}),
                "runtime_identifier": job["runtime_identifier"],
                "creator": USER,
                "_api_key": api_key,
            }
            self._runs[run["id"]] = run
        return run

    def _run(self, project_id, job_id, run_id) -> dict[str, Any]:
        self._job(project_id, job_id)
        run = self._runs.get(run_id)
        if run is None or run["job_id"] != job_id:
            raise APIError(404, f"job run {run_id} not found")
        return run

    def get_run(self, project_id, job_id, run_id, query, body):
        return public(self._run(project_id, job_id, run_id))

    def run_action(self, project_id, job_id, run_id, action, query, body):
        run = self._run(project_id, job_id, run_id)
        if action != "stop":
            raise APIError(404, f"no action :{action} on job runs")
        if run["status"] in TERMINAL_RUN_STATES:
            raise APIError(400, f"job run {run_id} has already finished ({run['status']})")
        run["status"] = "ENGINE_STOPPING"
        self._end_workload(run_id)
        run.update(status="ENGINE_STOPPED", finished_at=now())
        return public(run)

    # -- behind the API ----------------------------------------------------------

    def _current_key(self) -> str:
        """The API key of the request being handled: workloads get their creator's key as CDSW_APIV2_KEY."""
        return getattr(self._request_key, "value", None) or self.api_keys[0]

    def _check_runtime(self, project: Mapping[str, Any], body: Mapping[str, Any]) -> None:
        runtime = body.get("runtime_identifier")
        if project["default_engine_type"] == "ml_runtime" and not runtime:
            raise APIError(400, "runtime_identifier must be specified for projects using ML Runtimes")
        if runtime and runtime not in self.runtimes:
            raise APIError(400, f"runtime {runtime!r} is not available in this workspace")

    def _environment(self, project: Mapping[str, Any], workload: pods.Workload, api_key: str) -> dict[str, str]:
        folder = self.project_dir(project["id"])
        tmp = workload.folder(self.pod_tmp_root)
        tmp.mkdir(parents=True, exist_ok=True)
        return {
            "PATH": f"{Path(self.python).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(folder),
            "LANG": "C.UTF-8",
            "TMPDIR": str(tmp),
            "CDSW_PROJECT_ID": project["id"],
            "CDSW_PROJECT": project["name"],
            "CDSW_DOMAIN": self.domain,
            "CDSW_API_URL": f"{self.url}/api/v1",
            "CDSW_PROJECT_URL": f"{self.url}/api/v1/projects/{USER['username']}/{project['name']}",
            "CDSW_APIV2_KEY": api_key,
            "CDSW_ENGINE_ID": workload.engine_id,
            "CDSW_IP_ADDRESS": workload.ip,
            "CDSW_APP_PORT": str(workload.app_port or pods.free_pod_port()),
            "CDSW_READONLY_PORT": str(pods.free_pod_port()),
            **json.loads(project["environment"]),
        }

    def _spawn(self, workload, project, source, script: str, arguments: str, api_key: str) -> None:
        env = {**self._environment(project, workload, api_key), **json.loads(source["environment"])}
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        command = [self.python, script, *shlex.split(arguments)]
        pods.start(
            workload, command, self.project_dir(project["id"]), env, logs / f"{source['id']}-{workload.engine_id}.log"
        )

    def _end_workload(self, workload_id: str) -> None:
        with self._lock:
            workload = self._workloads.pop(workload_id, None)
        if workload is not None and workload.process is not None and pods.end(workload, self.pod_tmp_root):
            self.killed_after_grace.append(workload_id)

    def _watch(self) -> None:
        """Move applications and job runs along their lifecycles."""
        while not self._closing.wait(0.2):
            with self._lock:
                apps = list(self._apps.values())
                runs = list(self._runs.values())
            for app in apps:
                self._watch_application(app)
            for run in runs:
                self._watch_run(run)

    def _watch_application(self, app: dict[str, Any]) -> None:
        workload = self._workloads.get(app["id"])
        if workload is None or app["status"] not in ("APPLICATION_STARTING", "APPLICATION_RUNNING"):
            return
        if workload.process is None:  # could not be scheduled
            if time.monotonic() - workload.started > max(1.0, self.starting_delay_s):
                app.update(status="APPLICATION_FAILED", stopped_at=now())
            return
        code = workload.process.poll()
        if code is not None:
            app.update(status="APPLICATION_STOPPED" if code == 0 else "APPLICATION_FAILED", stopped_at=now())
            return
        if app["status"] == "APPLICATION_STARTING" and time.monotonic() - workload.started >= self.starting_delay_s:
            environment = json.loads(app["environment"])
            endpoint = environment.get("CDSW_APP_POLLING_ENDPOINT", "/")
            if pods.answers(f"http://127.0.0.1:{workload.app_port}{endpoint}"):
                app.update(status="APPLICATION_RUNNING", running_at=now())

    def _watch_run(self, run: dict[str, Any]) -> None:
        job = self._jobs.get(run["job_id"])
        if run["status"] == "ENGINE_SCHEDULING" and job is not None:
            workload = pods.Workload(engine_id=secrets.token_hex(8), ip=pods.next_pod_ip())
            with self._lock:
                self._workloads[run["id"]] = workload
            run.update(status="ENGINE_STARTING", starting_at=now())
            project = self._projects[run["project_id"]]
            self._spawn(workload, project, run, job["script"], run["arguments"], run["_api_key"])
            run.update(status="ENGINE_RUNNING", running_at=now())
            return
        workload = self._workloads.get(run["id"])
        if run["status"] != "ENGINE_RUNNING" or workload is None:
            return
        timeout = int(job["timeout"]) if job else 0
        if timeout and time.monotonic() - workload.started > timeout:
            self._end_workload(run["id"])
            run.update(status="ENGINE_TIMEDOUT", finished_at=now())
            return
        code = workload.process.poll()
        if code is None:
            return
        run.update(status="ENGINE_SUCCEEDED" if code == 0 else "ENGINE_FAILED", finished_at=now())
        if code == 0:  # dependent jobs run after a success only
            with self._lock:
                children = [j for j in self._jobs.values() if j["parent_id"] == run["job_id"]]
            for child in children:
                self._start_run(child, {}, None, run["_api_key"])


_ID = r"([^/:]+)"
_ROUTES = {
    ("GET", re.compile(r"projects")): FakeCML.list_projects,
    ("POST", re.compile(r"projects")): FakeCML.create_project_route,
    ("GET", re.compile(rf"projects/{_ID}")): FakeCML.get_project,
    ("PATCH", re.compile(rf"projects/{_ID}")): FakeCML.update_project,
    ("DELETE", re.compile(rf"projects/{_ID}")): FakeCML.delete_project,
    ("GET", re.compile(r"runtimes")): FakeCML.list_runtimes,
    ("GET", re.compile(rf"projects/{_ID}/applications")): FakeCML.list_applications,
    ("POST", re.compile(rf"projects/{_ID}/applications")): FakeCML.create_application,
    ("GET", re.compile(rf"projects/{_ID}/applications/{_ID}")): FakeCML.get_application,
    ("PATCH", re.compile(rf"projects/{_ID}/applications/{_ID}")): FakeCML.update_application,
    ("DELETE", re.compile(rf"projects/{_ID}/applications/{_ID}")): FakeCML.delete_application,
    ("POST", re.compile(rf"projects/{_ID}/applications/{_ID}:(\w+)")): FakeCML.application_action,
    ("GET", re.compile(rf"projects/{_ID}/jobs")): FakeCML.list_jobs,
    ("POST", re.compile(rf"projects/{_ID}/jobs")): FakeCML.create_job,
    ("GET", re.compile(rf"projects/{_ID}/jobs/{_ID}")): FakeCML.get_job,
    ("PATCH", re.compile(rf"projects/{_ID}/jobs/{_ID}")): FakeCML.update_job,
    ("DELETE", re.compile(rf"projects/{_ID}/jobs/{_ID}")): FakeCML.delete_job,
    ("GET", re.compile(rf"projects/{_ID}/jobs/{_ID}/runs")): FakeCML.list_runs,
    ("POST", re.compile(rf"projects/{_ID}/jobs/{_ID}/runs")): FakeCML.create_run,
    ("GET", re.compile(rf"projects/{_ID}/jobs/{_ID}/runs/{_ID}")): FakeCML.get_run,
    ("POST", re.compile(rf"projects/{_ID}/jobs/{_ID}/runs/{_ID}:(\w+)")): FakeCML.run_action,
}
