"""raylm's applications on Ray Serve: how a deployment's router and models become Serve apps.

`RayServeApps` is what `raylm.api` uses to run a plan on a cluster; its tests use a stand-in with
the same methods, so that the orchestration is tested without Ray.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from raylm.backend import Progress, connect_ray
from raylm.config import ServePlan
from raylm.engine import Engine
from raylm.errors import DeploymentError
from raylm.processes import DEPLOYMENT_MARKER
from raylm.waiting import StateChanges, wait_until

RAYLM_ERROR_PREFIX = f"{DeploymentError.__module__}.{DeploymentError.__qualname__}: "
DELETE_TIMEOUT_S = 120


def app_name(deployment: str, part: str) -> str:
    """The Serve application of a deployment's router (`part` "router") or of one of its models."""
    return f"raylm-{deployment}-" + re.sub(r"[^A-Za-z0-9_.-]", "_", part)


def _serve() -> Any:
    """Ray Serve's API, its logger quieted: our progress lines say what happens."""
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # set after import: importing Serve resets it
    return serve


class RayServeApps:
    """A driver's connection to one Ray cluster, and the raylm applications on its Serve instance."""

    def __init__(self, address: str, environment: Mapping[str, str]):
        connect_ray(address, environment)

    def close(self) -> None:
        """Disconnect, so the next cluster (another deployment's) can be reached from this process."""
        import ray
        from ray.serve import context

        ray.shutdown()
        # Serve keeps a client of the cluster it last reached; it would outlive the disconnect.
        context._set_global_client(None)

    def nodes(self) -> list[dict[str, float]]:
        """The resources of every node alive."""
        import ray

        return [node["Resources"] for node in ray.nodes() if node["Alive"]]

    def present(self, apps: Sequence[str]) -> list[str]:
        statuses = _serve().status().applications
        return [app for app in apps if app in statuses]

    def replica_states(self, apps: Sequence[str]) -> dict[str, dict[str, int]]:
        """How many replicas each app has in each state (`running`, `starting`, `stopping`, ...)."""
        statuses = _serve().status().applications
        return {app: _replica_counts(statuses[app]) for app in apps if app in statuses}

    def deploy_router(self, plan: ServePlan, host: str, progress: Progress) -> None:
        """Start Serve and the deployment's router app, without waiting for it."""
        from raylm.serving.replicas import HEAD_NODE_RESOURCE, RouterReplica

        serve = _serve()
        serve.start(proxy_location="Disabled")
        router = serve.deployment(
            RouterReplica,
            ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}},
            health_check_period_s=5,
            max_constructor_retry_count=1,
        ).bind(
            host,
            plan.port,
            {m.name: m.limits for m in plan.models},
            plan.api_key_file,
            plan.access_log,
            plan.read_timeout_s,
            {m.name: (m.routing, m.model) for m in plan.models},
            {
                m.name: (app_name(plan.name, m.name), m.autoscaling.scale_from_zero_timeout_s)
                for m in plan.models
                if m.autoscaling is not None and m.autoscaling.scales_to_zero
            },
        )
        progress(f"deploying the router on {host}:{plan.port}")
        serve.run_many([serve.RunTarget(target=router, name=app_name(plan.name, "router"), route_prefix=None)],
                       wait_for_applications_running=False)  # fmt: skip

    def deploy_models(self, plan: ServePlan, engines: Sequence[Engine], progress: Progress) -> None:
        """Start one app per model, without waiting for them; their replicas register with the router."""
        from raylm.serving.replicas import REPLICA_DRAIN_S, ModelReplica

        serve = _serve()
        targets = []
        for engine in engines:
            model, resources = engine.deployment, engine.resources()
            # The marker reaches every process an engine starts: `stop` looks for what is left by it.
            runtime_env: dict[str, Any] = {"env_vars": {**model.env, DEPLOYMENT_MARKER: plan.name}}
            if model.python:
                runtime_env["py_executable"] = model.python
            if model.autoscaling is None:
                scaling: dict[str, Any] = {"num_replicas": model.replicas}
            else:
                scaling = {"autoscaling_config": model.autoscaling.serve_config()}
            replica = serve.deployment(
                ModelReplica,
                name="Model",
                **scaling,
                ray_actor_options={
                    "num_cpus": resources.num_cpus,
                    "num_gpus": resources.num_gpus,
                    "runtime_env": runtime_env,
                },
                placement_group_bundles=[dict(b) for b in resources.bundles] or None,
                placement_group_strategy=resources.strategy if resources.bundles else None,
                health_check_period_s=10,
                health_check_timeout_s=30,
                graceful_shutdown_timeout_s=REPLICA_DRAIN_S + 30,  # its requests finish, then its engine stops
                # A replica that fails to start fails the deployment at once, with its error; no slow retries.
                max_constructor_retry_count=model.max_replicas,
            ).bind(model, type(engine), app_name(plan.name, "router"))
            targets.append(serve.RunTarget(target=replica, name=app_name(plan.name, model.name), route_prefix=None))
        progress(f"deploying {len(engines)} model(s)")
        serve.run_many(targets, wait_for_applications_running=False)

    def wait_running(self, labels: Mapping[str, str], progress: Progress, timeout_s: float) -> None:
        """Report each app's progress until all run; raise with Serve's message when one fails."""
        serve = _serve()
        changes = StateChanges(progress)
        waiting = list(labels.values())

        def all_running() -> bool:
            statuses = serve.status().applications
            waiting.clear()
            for app, label in labels.items():
                status = statuses.get(app)
                state = status.status if status else "NOT_STARTED"
                if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                    raise DeploymentError(f"{label} failed to start: {_failure_message(status)}")
                if state != "RUNNING":
                    waiting.append(label)
                replicas = [f"{n} {s}" for s, n in (_replica_counts(status) if status else {}).items()]
                changes.show(label, state.lower() + (f" ({', '.join(replicas)})" if replicas else ""))
            return not waiting

        wait_until(
            all_running,
            timeout_s=timeout_s,
            poll_s=1.0,
            on_timeout=lambda: DeploymentError(f"not ready after {timeout_s:.0f}s: {', '.join(waiting)}"),
        )

    def drain(self, router_app: str, timeout_s: float, progress: Progress) -> None:
        """Let the router finish the requests it took, taking no new ones, for up to `timeout_s`."""
        serve = _serve()
        if timeout_s <= 0 or not self.present([router_app]):
            return
        progress("draining: new requests get 503, those taken finish")
        router = serve.get_deployment_handle("RouterReplica", app_name=router_app)
        try:
            unfinished = router.drain.remote(timeout_s).result(timeout_s=timeout_s + 30)
        except Exception as exc:  # a router that is gone or broken has nothing to drain
            progress(f"the router could not drain ({type(exc).__name__}); stopping anyway")
            return
        if unfinished:
            progress(f"{unfinished} request(s) still unfinished after {timeout_s:g}s; stopping them")

    def delete(self, apps: Sequence[str], progress: Progress) -> None:
        """Delete these apps together and wait until Serve has."""
        serve = _serve()
        present = self.present(apps)
        if not present:
            return
        progress(f"deleting {', '.join(present)}")
        for app in present:
            serve.delete(app, _blocking=False)
        wait_until(
            lambda: not self.present(present),
            timeout_s=DELETE_TIMEOUT_S,
            poll_s=0.5,
            on_timeout=lambda: DeploymentError(
                f"Ray Serve did not delete {', '.join(present)} within {DELETE_TIMEOUT_S}s"
            ),
        )


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


def _replica_counts(status: Any) -> dict[str, int]:
    """An app's replicas by state (`running`, `starting`, ...), from Serve's `ApplicationStatusOverview`."""
    return {
        state.lower(): count
        for deployment in status.deployments.values()
        for state, count in deployment.replica_states.items()
        if count
    }
