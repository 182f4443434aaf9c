"""The `cai` backend: a Ray cluster made of Cloudera ML applications, one per Ray node.

A cluster named NAME in a project is the applications `raylm-NAME-head` and
`raylm-NAME-worker-1..N`, each running `.raylm/cai/ray_node.py` (see
`raylm_cai.node`), and the folder `.raylm/cai/NAME/` on the project filesystem
holding Ray's token and the head's address. `up` writes those files, so it runs
where the project's files are: a CML session or job of the project. `status`,
`scale` and `down` need only the API and work from anywhere.

With `--max-workers`, the head runs Ray's autoscaler over the cluster's applications
(`raylm_cai.autoscaling`): workers come and go with the demand, between `--min-workers`
and `--max-workers`, instead of `--workers` fixed ones.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from raylm import Backend, ClusterStatus, ServePlan
from raylm.toolkit import ClusterError, ConfigError, Progress, StateChanges, connect_ray, wait_until, write_atomically
from raylm_cai import plans
from raylm_cai.applications import (
    ENDED_STATES,
    NodeSize,
    cluster_applications,
    create_node_application,
    delete_application,
    head_name,
    is_worker,
    worker_name,
)
from raylm_cai.autoscaling import BOUNDS_VARIABLE, CONFIG_FILE, autoscaler_config
from raylm_cai.client import CMLClient, CMLSettings, inside_cml
from raylm_cai.node import DASHBOARD_PORT, cluster_folder, ray_auth_environment, read_head_address

NODE_SCRIPT_SOURCE = """\
# Written by `raylm cluster up --backend cai`: the script of raylm's Ray node applications.
from raylm_cai.node import main

main()
"""
POLL_S = 2.0
DEFAULT_IDLE_TIMEOUT_S = 300.0


class CAIBackend(Backend):
    def __init__(self, options: dict[str, Any]):
        super().__init__(options)
        self._client: CMLClient | None = None
        self._project: dict[str, Any] | None = None
        self._check_worker_options()

    def _check_worker_options(self) -> None:
        workers, low, high = (self.options.get(key) for key in ("workers", "min_workers", "max_workers"))
        if high is None:
            if low is not None:
                raise ClusterError("--min-workers needs --max-workers: the most workers the cluster may grow to")
            return
        if workers is not None:
            raise ClusterError("give --workers for a fixed cluster, or --min-workers/--max-workers to autoscale")
        if (low or 0) < 0 or high < max(1, low or 0):
            raise ClusterError(f"--max-workers must be >= 1 and >= --min-workers ({low or 0}), got {high}")
        if (self.options.get("idle_timeout") or 0) < 0:
            raise ClusterError(f"--idle-timeout must be >= 0 seconds, got {self.options['idle_timeout']}")

    def check_plan(self, plan: ServePlan) -> None:
        """An endpoint open to anyone (the applications made with --bypass-authentication, now or when the
        cluster was made) needs the endpoint's keys."""
        if plan.api_key_file is not None:
            return
        head = (
            None
            if self.options.get("bypass_authentication")
            else self._applications().get(head_name(self.cluster_name))
        )
        if self.options.get("bypass_authentication") or (head or {}).get("bypass_authentication"):
            raise ConfigError(
                "--bypass-authentication opens the endpoint to anyone who reaches its URL: give it keys "
                "(--api-key-file, or RAYLM_API_KEY)"
            )

    def _head_bypasses_authentication(self) -> bool:
        head = self._applications().get(head_name(self.cluster_name))
        return bool(head and head.get("bypass_authentication"))

    @property
    def may_add_nodes(self) -> bool:  # type: ignore[override]
        """An autoscaled cluster (asked for, or running) adds workers for what it cannot place."""
        return self.options.get("max_workers") is not None or self._worker_bounds(self._applications()) is not None

    def _worker_bounds(self, apps: dict[str, dict[str, Any]]) -> tuple[int, int] | None:
        """(min, max) workers of a running autoscaled cluster, as its head application says; None: fixed."""
        head = apps.get(head_name(self.cluster_name))
        bounds = json.loads(head.get("environment") or "{}").get(BOUNDS_VARIABLE) if head else None
        return tuple(int(n) for n in bounds.split(":")) if bounds else None

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
        return cluster_applications(self.client, self.project_id, self.cluster_name)

    def _size(self, role: str) -> NodeSize:
        return NodeSize(*(self.options[f"{role}_{resource}"] for resource in ("cpu", "memory", "gpu")))

    def _create_application(self, name: str, role: str, environment: dict[str, str]) -> dict[str, Any]:
        return create_node_application(
            self.client, self.project_id, self.cluster_name, name, self._size(role),
            self.options.get("runtime_identifier"), bool(self.options.get("bypass_authentication")), environment,
        )  # fmt: skip

    def _delete(self, apps: list[dict[str, Any]], progress: Progress) -> None:
        for app in apps:
            progress(f"deleting application {app['name']}")
            delete_application(self.client, self.project_id, app)

    # -- lifecycle -------------------------------------------------------------------

    def up(self, progress: Progress) -> ClusterStatus:
        # Without --workers, a running cluster keeps its workers (e.g. when `raylm serve` connects to it).
        return self._converge(self.options.get("workers"), progress, starting=True)

    def scale(self, workers: int, progress: Progress) -> ClusterStatus:
        if workers < 0:
            raise ClusterError("--workers must be 0 or more")
        apps = self._applications()
        head = apps.get(head_name(self.cluster_name))
        if head is None:
            raise ClusterError(f"no cai cluster {self.cluster_name!r} runs: start it with `raylm cluster up`")
        bounds = self._worker_bounds(apps)
        if bounds is not None:
            raise ClusterError(
                f"cluster {self.cluster_name!r} autoscales between {bounds[0]} and {bounds[1]} workers; "
                "to fix its workers, `raylm cluster down` and `up` it with --workers"
            )
        # New workers look like the cluster's first worker (or its head): same sizes, same runtime.
        model = next((app for name, app in sorted(apps.items()) if is_worker(name)), None)
        if model is not None:
            self.options.update(worker_cpu=model["cpu"], worker_memory=model["memory"], worker_gpu=model["nvidia_gpu"])
        self.options["runtime_identifier"] = self.options.get("runtime_identifier") or head.get("runtime_identifier")
        return self._converge(workers, progress, starting=False)

    def _converge(self, workers: int | None, progress: Progress, starting: bool) -> ClusterStatus:
        """Make the cluster a running head and exactly `workers` running workers (None: as many as it has now),
        then wait for Ray. On an autoscaled cluster the workers are the autoscaler's: only the head is made,
        and Ray waited for with the minimum of workers.

        Applications that run are kept, failed or stopped ones restarted, missing ones created; on any
        failure the applications created here are deleted again (unless keep_on_failure).
        """
        current = self._applications()
        head = head_name(self.cluster_name)
        asked = self._asked_bounds()
        running = self._worker_bounds(current)
        if head in current and asked is not None and asked != running:
            raise ClusterError(
                f"cluster {self.cluster_name!r} runs already, "
                + (f"autoscaling {running[0]}-{running[1]} workers" if running else "with fixed workers")
                + "; its workers are set when it starts: `raylm cluster down` it first"
            )
        bounds = asked or running
        if workers is None:
            workers = sum(1 for name in current if is_worker(name))
        folder = self._folder(required=starting or head not in current)
        created: list[dict[str, Any]] = []
        try:
            if folder is not None:
                _write_node_files(folder)
                if head not in current:
                    self._write_autoscaler_config(folder, asked)
            wanted = [(head, "head")]
            if bounds is None:
                wanted += [(worker_name(self.cluster_name, i), "worker") for i in range(1, workers + 1)]
            for name, role in wanted:
                app = current.get(name)
                if app is None:
                    progress(f"creating application {name} in project {self._project['name']!r}")
                    environment = {BOUNDS_VARIABLE: f"{asked[0]}:{asked[1]}"} if asked and role == "head" else {}
                    created.append(self._create_application(name, role, environment))
                elif app["status"] in ENDED_STATES:
                    progress(f"restarting application {name} ({app['status']})")
                    self.client.call("POST", f"projects/{self.project_id}/applications/{app['id']}:restart")
                else:
                    progress(f"using application {name} ({app['status']})")
            if bounds is None:
                surplus = sorted(
                    (app for name, app in current.items() if name not in dict(wanted)),
                    key=lambda app: app["name"],
                    reverse=True,
                )
                self._delete(surplus, progress)
            self._wait_running([name for name, _ in wanted], progress)
            address = self._head_address(folder)
            if address is not None:
                self._wait_ray_nodes(address, len(wanted) + (bounds[0] if bounds else 0), progress)
        except BaseException:
            if created and not self.options.get("keep_on_failure"):
                progress(f"cluster {self.cluster_name!r} did not start; deleting the applications created")
                self._delete(created, progress)
            raise
        return self._status(self._applications(), address)

    def _asked_bounds(self) -> tuple[int, int] | None:
        high = self.options.get("max_workers")
        return None if high is None else (self.options.get("min_workers") or 0, high)

    def _write_autoscaler_config(self, folder: Path, bounds: tuple[int, int] | None) -> None:
        """Ray's cluster config for the head to start its autoscaler with; none for a fixed cluster."""
        import yaml

        path = folder / CONFIG_FILE
        if bounds is None:
            path.unlink(missing_ok=True)
            return
        config = autoscaler_config(
            self.cluster_name, self._size("head"), self._size("worker"), *bounds,
            idle_timeout_s=self.options.get("idle_timeout") or DEFAULT_IDLE_TIMEOUT_S,
            runtime_identifier=self.options.get("runtime_identifier"),
            bypass_authentication=bool(self.options.get("bypass_authentication")),
        )  # fmt: skip
        write_atomically(path, yaml.safe_dump(config, sort_keys=False))

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

        # An autoscaled cluster's minimum workers are still being created: as long as applications take.
        timeout_s = self.options.get("start_timeout") or 900
        try:
            wait_until(
                lambda: alive() >= expected,
                timeout_s=timeout_s,
                poll_s=1.0,
                on_timeout=lambda: ClusterError(f"Ray reports {alive()} of {expected} nodes alive after {timeout_s}s"),
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
        head = apps.get(head_name(self.cluster_name))
        bounds = self._worker_bounds(apps)
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
                "pending": sorted(name for name, app in apps.items() if app["status"] == "APPLICATION_STARTING"),
                "autoscaling": {"min_workers": bounds[0], "max_workers": bounds[1]} if bounds else None,
            },
        )

    def remember_plan(self, plan: ServePlan) -> None:
        folder = self._folder(required=False)
        if folder is not None:
            plans.keep(folder, plan)

    def forget_plan(self, name: str) -> None:
        folder = self._folder(required=False)
        if folder is not None:
            plans.forget(folder, name)

    def down(self, progress: Progress) -> None:
        apps = self._applications()
        if not apps:
            progress(f"no cai cluster {self.cluster_name!r} in project {self._project['name']!r}")
        # A fixed cluster's workers go first, so none outlives its head; an autoscaled one's head goes first,
        # so its autoscaler creates no more workers. A worker created meanwhile is deleted on a later pass.
        head_first = self._worker_bounds(apps) is not None
        self._delete(sorted(apps.values(), key=lambda app: is_worker(app["name"]) == head_first), progress)
        deleted = {app["id"] for app in apps.values()}

        def gone() -> bool:
            left = self._applications()
            late = [app for app in left.values() if app["id"] not in deleted]
            self._delete(late, progress)
            deleted.update(app["id"] for app in late)
            return not left

        wait_until(
            gone,
            timeout_s=300,
            poll_s=POLL_S,
            on_timeout=lambda: ClusterError(
                f"CML still lists applications of cluster {self.cluster_name!r} after 300s"
            ),
        )
        folder = self._folder(required=False)
        if folder is not None:
            for name in ("head.json", "token", CONFIG_FILE):
                (folder / name).unlink(missing_ok=True)
            plans.forget_all(folder)  # a later cluster of this name starts empty


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
