"""raylm's Python API: what the CLI does, for scripts and platform automation.

import raylm
plan = raylm.ServePlan(models=(raylm.ModelDeployment(model="/models/tiny", name="tiny", engine="vllm"),))
deployment = raylm.serve(plan)          # returns once every model answers
print(deployment.url)                   # http://127.0.0.1:8000, OpenAI API under /v1
raylm.stop(deployment.name)             # or: with raylm.serve(plan): ...
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from raylm.backend import Backend, ClusterStatus, Progress, connect_ray
from raylm.config import ServePlan, check_model_path, check_port_free
from raylm.engine import Engine
from raylm.errors import ConfigError, DeploymentError
from raylm.placement import describe, node_need, unplaceable
from raylm.plugins import Registry, get_registry
from raylm.processes import DEPLOYMENT_MARKER, end_processes, marked_processes
from raylm.server_process import http_ok
from raylm.state import Records

DEPLOYMENTS = Records("deployments")
READY_TIMEOUT_S = 1800
PORT_RELEASE_TIMEOUT_S = 15
RAYLM_ERROR_PREFIX = f"{DeploymentError.__module__}.{DeploymentError.__qualname__}: "


def _stderr(message: str) -> None:
    print(f"raylm: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Deployment:
    """A running deployment; a context manager that stops it on exit."""

    name: str
    url: str
    models: tuple[str, ...]

    def stop(self, progress: Progress = _stderr) -> None:
        stop(self.name, progress=progress)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def make_backend(name: str | None, options: Mapping[str, Any], registry: Registry) -> Backend:
    """Instantiate a backend with its declared options; an undeclared option is an error."""
    spec = registry.backend(name or registry.default_backend())
    declared = {option.name: option for option in spec.options}
    values: dict[str, Any] = {option.name: option.default for option in spec.options}
    for key, value in options.items():
        if key == "cluster":
            values[key] = value
        elif key not in declared:
            allowed = ", ".join(sorted(declared)) or "none"
            raise ConfigError(f"backend {spec.name!r} has no option {key!r}; its options: {allowed}")
        elif value is not None:
            try:
                values[key] = declared[key].type(value)
            except (TypeError, ValueError):
                kind = declared[key].type.__name__
                raise ConfigError(f"backend {spec.name!r}: option {key!r} expects {kind}, got {value!r}") from None
    return spec.backend_class(values)


def _app_name(deployment: str, part: str) -> str:
    return f"raylm-{deployment}-" + re.sub(r"[^A-Za-z0-9_.-]", "_", part)


def _resolve_engines(plan: ServePlan, registry: Registry) -> list[Engine]:
    """Every model's engine, its model path checked; its arguments are checked by `_check_engines`."""
    engines = []
    for model in plan.models:
        # An engine in its own environment (`python`) is checked there, by its validate().
        spec = registry.engine(model.engine, runtime_here=model.python is None)
        check_model_path(model.model)
        if os.path.exists(model.model):  # replicas do not run in this folder
            model = replace(model, model=os.path.abspath(model.model))
        engines.append(spec.engine_class(model))
    return engines


def _check_engines(engines: list[Engine], progress: Progress) -> list[Future]:
    """Start every engine's argument check (the engine's own parser, in a child process), side by side."""
    progress(f"checking the engine arguments of {', '.join(e.deployment.name for e in engines)}")
    pool = ThreadPoolExecutor(max_workers=len(engines))
    checks = [pool.submit(engine.validate) for engine in engines]
    pool.shutdown(wait=False)
    return checks


def _checked(engines: list[Engine], checks: list[Future], progress: Progress) -> None:
    """Wait for the checks; raise the first engine's complaint, else say what each replica needs."""
    for check in checks:
        check.result()
    for engine in engines:
        model = engine.deployment
        progress(f"{model.name}: {model.replicas} replica(s), each needs {describe(node_need(engine.resources()))}")


def _check_capacity(engines: list[Engine], backend: Backend, progress: Progress) -> None:
    """Refuse at once a model whose replica fits no node of a cluster that cannot grow (Serve would wait
    forever); on one that may grow, say what it waits for."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    problem = unplaceable({e.deployment.name: e.resources() for e in engines}, nodes)
    if problem is None:
        return
    if not backend.may_add_nodes:
        raise DeploymentError(problem)
    progress(f"{problem}; waiting for the cluster to add one")


def serve(
    plan: ServePlan,
    *,
    progress: Progress = _stderr,
    registry: Registry | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    replace: bool = False,
) -> Deployment:
    """Start the cluster if needed, deploy every model and the router, return once all answer.

    Anything this call started is stopped again if it fails or is interrupted. With `replace`, a
    deployment of the same name is stopped first instead of being an error.
    """
    registry = registry or get_registry()
    if replace and DEPLOYMENTS.load(plan.name) is not None:
        progress(f"replacing the deployment {plan.name!r}")
        stop(plan.name, progress=progress, registry=registry)
    _refuse_running_duplicate(plan.name)
    backend_name = plan.backend or registry.default_backend()
    # Unless told otherwise, each deployment gets a cluster of its own name (for `local`: its own Ray head).
    backend = make_backend(backend_name, {"cluster": plan.name, **plan.backend_options}, registry)
    if backend.head_is_local:
        check_port_free(plan.host, plan.port)
    owns_cluster = backend.status() is None  # also checks the backend's settings, before the slower engine checks
    engines = _resolve_engines(plan, registry)
    # The engines' checks run while the cluster starts: neither needs the other.
    checks = _check_engines(engines, progress)
    try:
        cluster = backend.up(progress)
        _checked(engines, checks, progress)
    except BaseException:  # a bad engine argument, or Ctrl-C while the head starts: stop what was started
        if owns_cluster:
            backend.down(progress)
        raise
    apps = [_app_name(plan.name, "router")] + [_app_name(plan.name, m.name) for m in plan.models]
    host, url = _endpoint(plan, backend, cluster)
    record = {
        "name": plan.name,
        "url": url,
        "models": [m.name for m in plan.models],
        "apps": apps,
        "backend": backend_name,
        "backend_options": backend.options,
        "address": cluster.address,
        "owns_cluster": owns_cluster,
        "head_is_local": backend.head_is_local,
        "host": host,
        "port": plan.port,
        "started": time.time(),
    }
    DEPLOYMENTS.save(plan.name, record)
    try:
        connect_ray(cluster.address, backend.client_environment())
        _check_capacity(engines, backend, progress)
        _deploy(plan, engines, host, apps, progress, ready_timeout_s)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        progress("interrupted; stopping what was started" if interrupted else "start failed; cleaning up")
        stop(plan.name, progress=progress)
        raise
    progress(f"serving {', '.join(record['models'])} at {url}/v1")
    return Deployment(name=plan.name, url=url, models=tuple(record["models"]))


def _endpoint(plan: ServePlan, backend: Backend, cluster: ClusterStatus) -> tuple[str, str]:
    """Where the router listens, and the URL clients use. A remote head is reached at its cluster address."""
    if backend.head_is_local:
        return plan.host, plan.url
    head = cluster.address.rpartition(":")[0]
    return (head if plan.host in ("127.0.0.1", "localhost") else plan.host), f"http://{head}:{plan.port}"


def _refuse_running_duplicate(name: str) -> None:
    record = DEPLOYMENTS.load(name)
    if record is None:
        return
    if http_ok(f"{record['url']}/health", 2.0):
        raise ConfigError(
            f"a deployment named {name!r} already runs at {record['url']}: "
            f"stop it with `raylm stop {name}`, or choose another --name"
        )
    raise ConfigError(
        f"a deployment named {name!r} was started earlier and no longer answers: clean it up with `raylm stop {name}`"
    )


def _serve_api() -> Any:
    """Ray Serve's API, its logger quieted: our progress lines say what happens."""
    import logging

    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # set after import: importing Serve resets it
    return serve


def _deploy(
    plan: ServePlan,
    engines: list[Engine],
    host: str,
    apps: list[str],
    progress: Progress,
    ready_timeout_s: float,
) -> None:
    serve = _serve_api()

    from raylm.serving.replicas import HEAD_NODE_RESOURCE, ModelReplica, RouterReplica

    serve.start(proxy_location="Disabled")
    router_app, model_apps = apps[0], apps[1:]
    router = serve.deployment(
        RouterReplica,
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}},
        health_check_period_s=5,
        max_constructor_retry_count=1,
    ).bind(host, plan.port, [m.name for m in plan.models])
    targets = [serve.RunTarget(target=router, name=router_app, route_prefix=None)]
    for engine, app in zip(engines, model_apps):
        model, resources = engine.deployment, engine.resources()
        # The marker reaches every process an engine starts: `stop` looks for what is left by it.
        runtime_env: dict[str, Any] = {"env_vars": {**model.env, DEPLOYMENT_MARKER: plan.name}}
        if model.python:
            runtime_env["py_executable"] = model.python
        options: dict[str, Any] = {
            "num_cpus": resources.num_cpus,
            "num_gpus": resources.num_gpus,
            "runtime_env": runtime_env,
        }
        replica = serve.deployment(
            ModelReplica,
            name="Model",
            num_replicas=model.replicas,
            ray_actor_options=options,
            placement_group_bundles=[dict(b) for b in resources.bundles] or None,
            placement_group_strategy=resources.strategy if resources.bundles else None,
            health_check_period_s=10,
            health_check_timeout_s=30,
            graceful_shutdown_timeout_s=30,
            # A replica that fails to start fails the deployment at once, with its error; no slow retries.
            max_constructor_retry_count=model.replicas,
        ).bind(model, type(engine), router_app)
        targets.append(serve.RunTarget(target=replica, name=app, route_prefix=None))
    progress(f"deploying the router on {host}:{plan.port} and {len(model_apps)} model(s)")
    serve.run_many(targets, wait_for_applications_running=False)
    _wait_running(dict(zip(apps, ["router", *(m.name for m in plan.models)])), progress, ready_timeout_s)


def _wait_running(apps: dict[str, str], progress: Progress, timeout_s: float) -> None:
    """Report each app's progress until all run; raise with Serve's message when one fails."""
    from ray import serve

    shown: dict[str, str] = {}
    started = time.monotonic()
    while True:
        statuses = serve.status().applications
        waiting = []
        for app, label in apps.items():
            status = statuses.get(app)
            state = status.status if status else "NOT_STARTED"
            if state == "DEPLOY_FAILED" or state == "UNHEALTHY":
                raise DeploymentError(f"{label} failed to start: {_failure_message(status)}")
            if state != "RUNNING":
                waiting.append(label)
            replicas = [
                f"{n} {s.lower()}"
                for d in (status.deployments.values() if status else ())
                for s, n in d.replica_states.items()
                if n
            ]
            line = f"{label}: {state.lower()}" + (f" ({', '.join(replicas)})" if replicas else "")
            if shown.get(app) != line:
                shown[app] = line
                progress(f"{line} [{time.monotonic() - started:.0f}s]")
        if not waiting:
            return
        if time.monotonic() - started > timeout_s:
            raise DeploymentError(f"not ready after {timeout_s:.0f}s: {', '.join(waiting)}")
        time.sleep(1.0)


def _failure_message(status: Any) -> str:
    messages = [status.message] + [d.message for d in status.deployments.values()]
    text = "\n".join(m for m in messages if m).strip()
    # Serve wraps the replica's exception in a long traceback: raylm's own error is the message;
    # for another exception, the traceback's last lines say what happened.
    ours = text.rfind(RAYLM_ERROR_PREFIX)
    if ours >= 0:
        return text[ours + len(RAYLM_ERROR_PREFIX) :]
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-14:]) if lines else "no message from Ray Serve"


def status(name: str | None = None) -> list[dict[str, Any]]:
    """The deployments raylm started, each with whether its endpoint answers and is ready."""
    names = [name] if name else DEPLOYMENTS.names()
    result = []
    for each in names:
        record = DEPLOYMENTS.load(each)
        if record is None:
            raise ConfigError(f"no deployment named {each!r}; running: {', '.join(DEPLOYMENTS.names()) or 'none'}")
        record["healthy"] = http_ok(f"{record['url']}/health", 2.0)
        record["ready"] = http_ok(f"{record['url']}/ready", 2.0)
        result.append(record)
    return result


def stop(name: str | None = None, *, progress: Progress = _stderr, registry: Registry | None = None) -> list[str]:
    """Stop a deployment (all of them when `name` is None): its models, its router, and a cluster it started."""
    registry = registry or get_registry()
    names = [name] if name else DEPLOYMENTS.names()
    for each in names:
        record = DEPLOYMENTS.load(each)
        if record is None:
            raise ConfigError(f"no deployment named {each!r}; running: {', '.join(DEPLOYMENTS.names()) or 'none'}")
        backend = make_backend(record["backend"], record["backend_options"], registry)
        if backend.status() is not None:
            _delete_apps(record, backend, progress)
        if record["owns_cluster"] and not _hand_over_cluster(record):
            backend.down(progress)
        if record["head_is_local"]:
            _end_leftovers(each, progress)
            _wait_port_released(record["host"], record["port"])
        DEPLOYMENTS.delete(each)
        progress(f"stopped {each}")
    return names


def _end_leftovers(name: str, progress: Progress) -> None:
    """End processes of the deployment's engines still running on this machine, and say so."""
    leftovers = marked_processes(DEPLOYMENT_MARKER, name)
    if leftovers:
        end_processes(leftovers, grace_s=5)
        pids = ", ".join(str(process.pid) for process in leftovers)
        progress(f"ended {len(leftovers)} process(es) the engines of {name} had left running (pids {pids})")


def _hand_over_cluster(record: dict[str, Any]) -> bool:
    """Make another deployment on the same cluster its owner, so stopping this one leaves the cluster up."""
    for other_name in DEPLOYMENTS.names():
        other = DEPLOYMENTS.load(other_name)
        if other and other_name != record["name"] and other["address"] == record["address"]:
            DEPLOYMENTS.save(other_name, {**other, "owns_cluster": True})
            return True
    return False


def _delete_apps(record: dict[str, Any], backend: Backend, progress: Progress) -> None:
    connect_ray(record["address"], backend.client_environment())  # first: it sets Ray's environment
    import ray

    serve = _serve_api()
    router_app, model_apps = record["apps"][0], record["apps"][1:]
    try:
        # Models first and together (each replica stops its engine), so they can deregister from the router.
        for apps in (model_apps, [router_app]):
            present = [app for app in apps if app in serve.status().applications]
            if present:
                progress(f"deleting {', '.join(present)}")
            for app in present:
                serve.delete(app, _blocking=False)
            deadline = time.monotonic() + 120
            while any(app in serve.status().applications for app in present):
                if time.monotonic() > deadline:
                    raise DeploymentError(f"Ray Serve did not delete {', '.join(present)} within 120s")
                time.sleep(0.5)
    finally:
        ray.shutdown()


def _wait_port_released(host: str, port: int) -> None:
    deadline = time.monotonic() + PORT_RELEASE_TIMEOUT_S
    while True:
        try:
            check_port_free(host, port)
            return
        except ConfigError:
            if time.monotonic() > deadline:
                raise DeploymentError(f"port {port} on {host} is still in use after stopping") from None
            time.sleep(0.2)


def cluster_up(backend: str | None, options: Mapping[str, Any], progress: Progress = _stderr) -> ClusterStatus:
    return make_backend(backend, options, get_registry()).up(progress)


def cluster_status(backend: str | None, options: Mapping[str, Any]) -> ClusterStatus | None:
    return make_backend(backend, options, get_registry()).status()


def cluster_scale(
    backend: str | None, options: Mapping[str, Any], workers: int, progress: Progress = _stderr
) -> ClusterStatus:
    return make_backend(backend, options, get_registry()).scale(workers, progress)


def cluster_down(backend: str | None, options: Mapping[str, Any], progress: Progress = _stderr) -> None:
    make_backend(backend, options, get_registry()).down(progress)
