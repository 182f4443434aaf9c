"""The `cai` backend: a Ray cluster made of Cloudera ML applications, one per Ray node.

A cluster named NAME in a project is the applications `raylm-NAME-head` and
`raylm-NAME-worker-1..N`, each running `.raylm/cai/ray_node.py` (see
`raylm_cai.node`), and the folder `.raylm/cai/NAME/` on the project filesystem
holding Ray's token and the head's address. `up` writes those files, so it runs
where the project's files are: a CML session or job of the project. `status`,
`scale` and `down` need only the API and work from anywhere.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any

from raylm.backend import Backend, ClusterStatus, Progress, connect_ray
from raylm.errors import ClusterError
from raylm.waiting import StateChanges, wait_until
from raylm_cai.client import CMLClient, CMLError, CMLSettings, inside_cml
from raylm_cai.node import DASHBOARD_PORT, cluster_folder, ray_auth_environment, read_head_address

NODE_SCRIPT = ".raylm/cai/ray_node.py"
NODE_SCRIPT_SOURCE = """\
# Written by `raylm cluster up --backend cai`: the script of raylm's Ray node applications.
from raylm_cai.node import main

main()
"""
POLL_S = 2.0
FAILED_STATES = ("APPLICATION_FAILED", "APPLICATION_STOPPED", "APPLICATION_STOPPING")


class CAIBackend(Backend):
    def __init__(self, options: dict[str, Any]):
        super().__init__(options)
        self.prefix = f"raylm-{self.cluster_name}-"
        self._client: CMLClient | None = None
        self._project: dict[str, Any] | None = None

    # -- connections -------------------------------------------------------------

    @property
    def client(self) -> CMLClient:
        if self._client is None:
            settings = CMLSettings.resolve(self.options)
            self._client = CMLClient(settings.url, settings.api_key)
            self._project = self._client.find_project(settings.project)  # a bad key fails here, first
        return self._client

    @property
    def project_id(self) -> str:
        self.client  # noqa: B018 - resolves the project
        return self._project["id"]

    def _folder(self, required: bool) -> Path | None:
        """The cluster's folder on the project filesystem: this machine's home inside a CML workload."""
        if inside_cml() and self.project_id == os.environ["CDSW_PROJECT_ID"]:
            return cluster_folder(self.cluster_name)
        if required:
            raise ClusterError(
                f"starting a cai cluster needs the files of project {self._project['name']!r}: run this in a CML "
                "session or job of that project, or use `raylm cai deploy` from here"
            )
        return None

    def client_environment(self) -> dict[str, str]:
        folder = self._folder(required=False)
        if folder is None or not (folder / "token").is_file():
            raise ClusterError(
                f"the Ray token of cluster {self.cluster_name!r} is on the project filesystem: "
                "connect from a CML session or job of the project"
            )
        return ray_auth_environment(folder)

    # -- applications --------------------------------------------------------------

    def _applications(self) -> dict[str, dict[str, Any]]:
        """This cluster's applications by name (the API's name filter matches substrings: keep exact names)."""
        pattern = re.compile(re.escape(self.prefix) + r"(head|worker-\d+)")
        found = self.client.applications(self.project_id, self.prefix)
        return {app["name"]: app for app in found if pattern.fullmatch(app["name"])}

    def _head_name(self) -> str:
        return self.prefix + "head"

    def _worker_name(self, index: int) -> str:
        return f"{self.prefix}worker-{index}"

    def _create_application(self, name: str, role: str) -> dict[str, Any]:
        cpu, memory, gpus = (self.options[f"{role}_{resource}"] for resource in ("cpu", "memory", "gpu"))
        subdomain = re.sub(r"[^a-z0-9-]+", "-", name.lower())[:56].strip("-") + "-" + secrets.token_hex(3)
        body = {
            "project_id": self.project_id,
            "name": name,
            "subdomain": subdomain,
            "description": f"raylm: Ray {role} of cluster {self.cluster_name}",
            "script": NODE_SCRIPT,
            "cpu": cpu,
            "memory": memory,
            "nvidia_gpu": gpus,
            "bypass_authentication": bool(self.options.get("bypass_authentication")),
            "environment": {
                "RAYLM_CAI_CLUSTER": self.cluster_name,
                "RAYLM_CAI_ROLE": role,
                "RAYLM_CAI_CPU": str(cpu),
                "RAYLM_CAI_MEMORY_GB": str(memory),
                "RAYLM_CAI_GPU": str(gpus),
            },
        }
        if self.options.get("runtime_identifier"):
            body["runtime_identifier"] = self.options["runtime_identifier"]
        return self.client.call("POST", f"projects/{self.project_id}/applications", body)

    def _delete(self, apps: list[dict[str, Any]], progress: Progress) -> None:
        for app in apps:
            progress(f"deleting application {app['name']}")
            try:
                self.client.call("DELETE", f"projects/{self.project_id}/applications/{app['id']}")
            except CMLError as exc:
                if exc.status != 404:
                    raise

    # -- lifecycle -------------------------------------------------------------------

    def up(self, progress: Progress) -> ClusterStatus:
        # Without --workers, a running cluster keeps its workers (e.g. when `raylm serve` connects to it).
        return self._converge(self.options.get("workers"), progress, starting=True)

    def scale(self, workers: int, progress: Progress) -> ClusterStatus:
        if workers < 0:
            raise ClusterError("--workers must be 0 or more")
        apps = self._applications()
        head = apps.get(self._head_name())
        if head is None:
            raise ClusterError(f"no cai cluster {self.cluster_name!r} runs: start it with `raylm cluster up`")
        # New workers look like the cluster's first worker (or its head): same sizes, same runtime.
        model = next((app for name, app in sorted(apps.items()) if "-worker-" in name), None)
        if model is not None:
            self.options.update(worker_cpu=model["cpu"], worker_memory=model["memory"], worker_gpu=model["nvidia_gpu"])
        self.options["runtime_identifier"] = self.options.get("runtime_identifier") or head.get("runtime_identifier")
        return self._converge(workers, progress, starting=False)

    def _converge(self, workers: int | None, progress: Progress, starting: bool) -> ClusterStatus:
        """Make the cluster a running head and exactly `workers` running workers (None: as many as it has now),
        then wait for Ray.

        Applications that run are kept, failed or stopped ones restarted, missing ones created; on any
        failure the applications created here are deleted again (unless keep_on_failure).
        """
        current = self._applications()
        if workers is None:
            workers = sum(1 for name in current if "-worker-" in name)
        folder = self._folder(required=starting or self._head_name() not in current)
        created: list[dict[str, Any]] = []
        try:
            if folder is not None:
                _write_node_files(folder)
            wanted = [(self._head_name(), "head")] + [(self._worker_name(i), "worker") for i in range(1, workers + 1)]
            for name, role in wanted:
                app = current.get(name)
                if app is None:
                    progress(f"creating application {name} in project {self._project['name']!r}")
                    created.append(self._create_application(name, role))
                elif app["status"] in FAILED_STATES:
                    progress(f"restarting application {name} ({app['status']})")
                    self.client.call("POST", f"projects/{self.project_id}/applications/{app['id']}:restart")
                else:
                    progress(f"using application {name} ({app['status']})")
            surplus = sorted(
                (app for name, app in current.items() if name not in dict(wanted)),
                key=lambda app: app["name"],
                reverse=True,
            )
            self._delete(surplus, progress)
            self._wait_running([name for name, _ in wanted], progress)
            address = self._head_address(folder)
            if address is not None:
                self._wait_ray_nodes(address, len(wanted), progress)
        except BaseException:
            if created and not self.options.get("keep_on_failure"):
                progress(f"cluster {self.cluster_name!r} did not start; deleting the applications created")
                self._delete(created, progress)
            raise
        return self._status(self._applications(), address)

    def _wait_running(self, names: list[str], progress: Progress) -> None:
        timeout_s = self.options.get("start_timeout") or 900
        changes = StateChanges(progress)
        states: dict[str, str] = {}

        def all_running() -> bool:
            apps = self._applications()
            for name in names:
                states[name] = state = apps[name]["status"] if name in apps else "gone"
                label = state.removeprefix("APPLICATION_").lower()
                changes.show(name, label)
                if state == "gone" or state in ("APPLICATION_FAILED", "APPLICATION_STOPPED"):
                    raise ClusterError(
                        f"application {name} is {label}: see its logs in CML "
                        f"(project {self._project['name']!r}, Applications)"
                    )
            return all(state == "APPLICATION_RUNNING" for state in states.values())

        def not_running() -> ClusterError:
            waiting = ", ".join(n for n in names if states[n] != "APPLICATION_RUNNING")
            return ClusterError(
                f"{waiting} not running after {timeout_s}s: the workspace may lack capacity or quota for the "
                "requested cpu/memory/GPUs, or need longer to scale (--start-timeout)"
            )

        wait_until(all_running, timeout_s=timeout_s, poll_s=POLL_S, on_timeout=not_running)

    def _head_address(self, folder: Path | None) -> str | None:
        """The head's Ray address as it published it, once it answers; None where the project files are not."""
        if folder is None:
            return None
        return wait_until(
            lambda: read_head_address(folder),
            timeout_s=60,
            poll_s=0.5,
            on_timeout=lambda: ClusterError(f"the Ray head runs but published no address in {folder / 'head.json'}"),
        )

    def _wait_ray_nodes(self, address: str, expected: int, progress: Progress) -> None:
        connect_ray(address, self.client_environment())
        import ray

        def alive() -> int:
            return sum(1 for node in ray.nodes() if node["Alive"])

        try:
            wait_until(
                lambda: alive() >= expected,
                timeout_s=120,
                poll_s=1.0,
                on_timeout=lambda: ClusterError(f"Ray reports {alive()} of {expected} nodes alive after 120s"),
            )
            progress(f"Ray reports {alive()} nodes alive at {address}")
        finally:
            ray.shutdown()

    def status(self) -> ClusterStatus | None:
        apps = self._applications()
        if not apps:
            return None
        folder = self._folder(required=False)
        return self._status(apps, read_head_address(folder) if folder else None)

    def _status(self, apps: dict[str, dict[str, Any]], address: str | None) -> ClusterStatus:
        head = apps.get(self._head_name())
        domain = os.environ.get("CDSW_DOMAIN") or self.client.url.split("://", 1)[-1]
        scheme = self.client.url.split("://", 1)[0]
        return ClusterStatus(
            backend="cai",
            name=self.cluster_name,
            address=address or "(known inside the project's CML sessions and jobs)",
            # Ray's dashboard listens on the head's pod IP (the application's URL is the OpenAI endpoint).
            dashboard_url=f"http://{address.rpartition(':')[0]}:{DASHBOARD_PORT}" if address else None,
            # An application runs only while its Ray node does (node.py answers CML's polling).
            nodes_alive=sum(1 for app in apps.values() if app["status"] == "APPLICATION_RUNNING"),
            nodes_expected=len(apps),
            details={
                "project": self._project["name"],
                # CML's ingress takes the head application's URL to its port: the deployment's router.
                "api_url": f"{scheme}://{head['subdomain']}.{domain}/v1" if head else None,
                "applications": {name: app["status"] for name, app in sorted(apps.items())},
            },
        )

    def down(self, progress: Progress) -> None:
        apps = self._applications()
        if not apps:
            progress(f"no cai cluster {self.cluster_name!r} in project {self._project['name']!r}")
        # Workers first, so none of them outlives its head.
        self._delete(sorted(apps.values(), key=lambda app: app["name"].endswith("-head")), progress)
        wait_until(
            lambda: not self._applications(),
            timeout_s=300,
            poll_s=POLL_S,
            on_timeout=lambda: ClusterError(
                f"CML still lists applications of cluster {self.cluster_name!r} after 300s"
            ),
        )
        folder = self._folder(required=False)
        if folder is not None:
            for name in ("head.json", "token"):
                (folder / name).unlink(missing_ok=True)


def _write_node_files(folder: Path) -> None:
    """The node script and, on first use, the cluster's Ray token (readable by the project's user only)."""
    script = folder.parent / "ray_node.py"
    folder.mkdir(parents=True, exist_ok=True)
    if not script.is_file() or script.read_text() != NODE_SCRIPT_SOURCE:
        script.write_text(NODE_SCRIPT_SOURCE)
    token = folder / "token"
    if not token.is_file():
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
