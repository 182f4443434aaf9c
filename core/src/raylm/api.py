"""raylm's Python API: what the CLI does, for scripts and platform automation.

import raylm
plan = raylm.ServePlan(models=(raylm.ModelDeployment(model="/models/tiny", name="tiny", engine="vllm"),))
deployment = raylm.serve(plan)          # returns once every model answers
print(deployment.url)                   # http://127.0.0.1:8000, OpenAI API under /v1
raylm.stop(deployment.name)             # or: with raylm.serve(plan): ...

The orchestration lives here; how a plan becomes Ray Serve applications is `raylm.serving.apps`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from raylm.backend import Backend, ClusterStatus, Progress
from raylm.config import ServePlan, check_model_path, check_port_free
from raylm.deployments import DEPLOYMENTS, DeploymentRecord
from raylm.engine import Engine
from raylm.errors import ConfigError, DeploymentError, RaylmError
from raylm.net import http_ok, port_is_free
from raylm.placement import describe, node_need, unplaceable
from raylm.plugins import Registry, get_registry
from raylm.processes import DEPLOYMENT_MARKER, end_processes, marked_processes
from raylm.serving.apps import RayServeApps, app_name
from raylm.serving.keys import endpoint_key_file, key_file_from_environment
from raylm.state import Busy, exclusive
from raylm.waiting import wait_until

READY_TIMEOUT_S = 1800
DRAIN_TIMEOUT_S = 30.0  # how long `stop` lets requests already taken finish
PORT_RELEASE_TIMEOUT_S = 15
# How the orchestration reaches a cluster's Serve applications: (address, environment) -> apps.
AppsFactory = Callable[[str, Mapping[str, str]], RayServeApps]


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


def serve(
    plan: ServePlan,
    *,
    progress: Progress = _stderr,
    registry: Registry | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    replace: bool = False,
    apps: AppsFactory = RayServeApps,
) -> Deployment:
    """Start the cluster if needed, deploy every model and the router, return once all answer.

    Anything this call started is stopped again if it fails or is interrupted. With `replace`, a
    deployment of the same name is stopped first instead of being an error. `apps` reaches the
    cluster's Serve applications (tests pass a stand-in).
    """
    try:
        with exclusive("serve", plan.name):
            return _serve(plan, progress, registry or get_registry(), ready_timeout_s, replace, apps)
    except Busy as busy:
        by = f" (pid {busy.pid})" if busy.pid else ""
        raise ConfigError(
            f"a `raylm serve` of {plan.name!r} is already under way{by}: wait for it, or choose another --name"
        ) from None


def _serve(
    plan: ServePlan, progress: Progress, registry: Registry, ready_timeout_s: float, replace: bool, apps: AppsFactory
) -> Deployment:
    """`serve`, with the deployment's name held: no other start of the same name runs meanwhile, and so
    none can clean up after itself what this one started."""
    if replace and DEPLOYMENTS.load(plan.name) is not None:
        progress(f"replacing the deployment {plan.name!r}")
        stop(plan.name, progress=progress, registry=registry, apps=apps)
    _refuse_running_duplicate(plan.name)
    plan = dataclasses.replace(plan, api_key_file=endpoint_key_file(plan.name, plan.api_key_file, os.environ))
    backend_name = plan.backend or registry.default_backend()
    # Unless told otherwise, each deployment gets a cluster of its own name (for `local`: its own Ray head).
    backend = make_backend(backend_name, {"cluster": plan.name, **plan.backend_options}, registry)
    backend.check_plan(plan)
    if backend.head_is_local:
        check_port_free(plan.host, plan.port)
    owns_cluster = backend.status() is None  # also checks the backend's settings, before the slower engine checks
    engines = _resolve_engines(plan, registry)
    plan = dataclasses.replace(plan, models=tuple(engine.deployment for engine in engines))  # as resolved
    # The engines' checks run while the cluster starts and the router deploys: they need neither.
    checks = _check_engines(engines, progress)
    try:
        cluster = backend.up(progress)
    except BaseException:  # e.g. Ctrl-C while the head starts: stop what was started
        if owns_cluster:
            backend.down(progress)
        raise
    host, url = _endpoint(plan, backend, cluster)
    record = DeploymentRecord(
        name=plan.name,
        url=url,
        models=tuple(m.name for m in plan.models),
        router_app=app_name(plan.name, "router"),
        model_apps=tuple(app_name(plan.name, m.name) for m in plan.models),
        backend=backend_name,
        backend_options=backend.options,
        address=cluster.address,
        owns_cluster=owns_cluster,
        head_is_local=backend.head_is_local,
        host=host,
        port=plan.port,
        api_key_file=plan.api_key_file,
        replica_bounds={m.name: m.replica_bounds for m in plan.models},
        routing={m.name: m.routing.policy for m in plan.models},
    )
    DEPLOYMENTS.save(record)
    try:
        running = apps(cluster.address, backend.client_environment())
        try:
            running.deploy_router(plan, host, progress)
            _checked(engines, checks, progress)
            _check_capacity(engines, running.nodes(), backend, progress)
            running.deploy_models(plan, engines, progress)
            labels = dict(zip(record.apps, ["router", *record.models]))
            running.wait_running(labels, progress, ready_timeout_s)
        finally:
            running.close()
        backend.remember_plan(dataclasses.replace(plan, backend=backend_name))
        progress(f"serving {', '.join(record.models)} at {url}/v1")
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        progress("interrupted; stopping what was started" if interrupted else "start failed; cleaning up")
        stop(plan.name, progress=progress, registry=registry, apps=apps, drain_timeout_s=0)  # nothing served yet
        raise
    return Deployment(name=plan.name, url=url, models=record.models)


def _resolve_engines(plan: ServePlan, registry: Registry) -> list[Engine]:
    """Every model's engine, its model path checked (and made absolute: the router and the replicas run in
    other folders) and its routing policy resolved; its arguments are checked by `_check_engines`."""
    engines = []
    for model in plan.models:
        # An engine in its own environment (`python`) is checked there, by its validate().
        spec = registry.engine(model.engine, runtime_here=model.python is None)
        check_model_path(model.model)
        if os.path.exists(model.model):  # replicas do not run in this folder
            model = dataclasses.replace(model, model=os.path.abspath(model.model))
        publishes_events = spec.engine_class.kv_events_follower is not None
        model = dataclasses.replace(model, routing=model.routing.for_engine(publishes_events))
        if model.routing.needs_engine_events and not publishes_events:
            raise ConfigError(
                f"model {model.name!r}: routing {model.routing.policy!r} needs an engine that publishes its KV-cache "
                f"events, and {spec.name} does not: use 'approximate'"
            )
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
        progress(f"{model.name}: {model.describe_replicas()}, each needs {describe(node_need(engine.resources()))}")


def _check_capacity(engines: list[Engine], nodes: list[dict[str, float]], backend: Backend, progress: Progress) -> None:
    """Refuse at once a model whose replica fits no node of a cluster that cannot grow (Serve would wait
    forever); on one that may grow, say what it waits for."""
    problem = unplaceable({e.deployment.name: e.resources() for e in engines}, nodes)
    if problem is None:
        return
    if not backend.may_add_nodes:
        raise DeploymentError(problem)
    progress(f"{problem}; waiting for the cluster to add one")


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
    if http_ok(f"{record.url}/health", 2.0):
        raise ConfigError(
            f"a deployment named {name!r} already runs at {record.url}: "
            f"stop it with `raylm stop {name}`, or choose another --name"
        )
    raise ConfigError(
        f"a deployment named {name!r} was started earlier and no longer answers: clean it up with `raylm stop {name}`"
    )


def _record(name: str) -> DeploymentRecord:
    record = DEPLOYMENTS.load(name)
    if record is None:
        raise ConfigError(f"no deployment named {name!r}; running: {', '.join(DEPLOYMENTS.names()) or 'none'}")
    return record


def status(
    name: str | None = None, *, registry: Registry | None = None, apps: AppsFactory = RayServeApps
) -> list[dict[str, Any]]:
    """The deployments raylm started, each with whether its endpoint answers and is ready, whether its
    cluster runs, and each model's replicas by state (`running`, `starting`, ...)."""
    result = []
    registry = registry or get_registry()
    for each in [name] if name else DEPLOYMENTS.names():
        record = _record(each)
        healthy, ready = http_ok(f"{record.url}/health", 2.0), http_ok(f"{record.url}/ready", 2.0)
        backend = make_backend(record.backend, record.backend_options, registry)
        cluster_running = backend.status() is not None
        replicas = _replica_states(record, backend, apps) if cluster_running else {}
        result.append({
            **dataclasses.asdict(record), "healthy": healthy, "ready": ready, "cluster_running": cluster_running,
            "replicas": replicas,
        })  # fmt: skip
    return result


def _replica_states(record: DeploymentRecord, backend: Backend, apps: AppsFactory) -> dict[str, dict[str, int]]:
    running = apps(record.address, backend.client_environment())
    try:
        states = running.replica_states(record.model_apps)
    finally:
        running.close()
    return {model: states.get(app, {}) for model, app in zip(record.models, record.model_apps)}


def stop(
    name: str | None = None,
    *,
    progress: Progress = _stderr,
    registry: Registry | None = None,
    apps: AppsFactory = RayServeApps,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
) -> list[str]:
    """Stop a deployment (all of them when `name` is None): its router takes no new requests and finishes
    those it took (for up to `drain_timeout_s`), then its models, its router, and a cluster it started."""
    registry = registry or get_registry()
    if name is None:
        return _stop_all(progress, registry, apps, drain_timeout_s)
    record = _record(name)
    backend = make_backend(record.backend, record.backend_options, registry)
    backend.forget_plan(name)
    if backend.status() is not None:
        running = apps(record.address, backend.client_environment())
        try:
            running.drain(record.router_app, drain_timeout_s, progress)
            # Models first and together (each replica stops its engine), so they can deregister from the router.
            running.delete(record.model_apps, progress)
            running.delete([record.router_app], progress)
        finally:
            running.close()
    if record.owns_cluster and not _hand_over_cluster(record):
        backend.down(progress)
    if record.head_is_local:
        _end_leftovers(name, progress)
        wait_until(
            lambda: port_is_free(record.host, record.port),
            timeout_s=PORT_RELEASE_TIMEOUT_S,
            poll_s=0.2,
            on_timeout=lambda: DeploymentError(f"port {record.port} on {record.host} is still in use after stopping"),
        )
    DEPLOYMENTS.delete(name)
    key_file_from_environment(name).unlink(missing_ok=True)
    progress(f"stopped {name}")
    return [name]


def _stop_all(progress: Progress, registry: Registry, apps: AppsFactory, drain_timeout_s: float) -> list[str]:
    """Stop every deployment; one that cannot be stopped does not keep the others running."""
    stopped, failed = [], []
    for name in DEPLOYMENTS.names():
        try:
            stopped += stop(name, progress=progress, registry=registry, apps=apps, drain_timeout_s=drain_timeout_s)
        except RaylmError as exc:
            progress(f"could not stop {name}: {exc}")
            failed.append(name)
    if failed:
        raise DeploymentError(
            f"could not stop {', '.join(failed)} (see above); stopped: {', '.join(stopped) or 'none'}"
        )
    return stopped


def _end_leftovers(name: str, progress: Progress) -> None:
    """End processes of the deployment's engines still running on this machine, and say so."""
    leftovers = marked_processes(DEPLOYMENT_MARKER, name)
    if leftovers:
        end_processes(leftovers, grace_s=5)
        pids = ", ".join(str(process.pid) for process in leftovers)
        progress(f"ended {len(leftovers)} process(es) the engines of {name} had left running (pids {pids})")


def _hand_over_cluster(record: DeploymentRecord) -> bool:
    """Make another deployment on the same cluster its owner, so stopping this one leaves the cluster up."""
    for other_name in DEPLOYMENTS.names():
        other = DEPLOYMENTS.load(other_name)
        if other and other_name != record.name and other.address == record.address:
            DEPLOYMENTS.save(dataclasses.replace(other, owns_cluster=True))
            return True
    return False


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
