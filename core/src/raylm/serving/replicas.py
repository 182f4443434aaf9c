"""The Ray Serve deployments raylm runs: one router, and a replica set per model.

Ray Serve keeps them alive (health checks, restarts, replica counts); the data
path does not go through Serve's own proxy. The router replica binds the public
port on the head node; each model replica starts its engine's OpenAI server and
registers its address with the router, repeating it as a heartbeat.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import urllib.request

from ray import serve

from raylm.engine import Engine, ModelDeployment
from raylm.model_settings import LOAD_METRIC, Limits, Routing
from raylm.serving.keys import KeyFile
from raylm.serving.policy import make_policy
from raylm.serving.router_thread import RouterThread
from raylm.waiting import count_down

logger = logging.getLogger("ray.serve")

HEARTBEAT_SECONDS = 5.0
# A replica that missed this many seconds of heartbeats is dropped from routing.
EXPIRY_SECONDS = 4 * HEARTBEAT_SECONDS
HEAD_NODE_RESOURCE = "node:__internal_head__"
# How long a replica that Serve removes lets its requests finish before its engine stops (Serve's
# graceful_shutdown_timeout_s for model replicas leaves room for this and the engine's own stop).
REPLICA_DRAIN_S = 30.0


class RouterReplica:
    """The router of a deployment, on the head node; model replicas register with it."""

    def __init__(
        self,
        host: str,
        port: int,
        models: dict[str, Limits],
        api_key_file: str | None,
        access_log: bool,
        read_timeout_s: float,
        routing: dict[str, tuple[Routing, str]],
        cold_starts: dict[str, tuple[str, float]],
    ):
        """`routing`: each model's routing settings and where its tokenizer is (the model's path); `cold_starts`:
        the models that scale to zero, each with its Serve app and how long a request waits for its first
        replica."""
        _log_where_serve_logs()
        keys = KeyFile(api_key_file) if api_key_file else None
        self.cold_starts = cold_starts
        self.router = RouterThread(
            models,
            expire_after_s=EXPIRY_SECONDS,
            keys=keys,
            limits=models,
            access_log=access_log,
            read_timeout_s=read_timeout_s,
            policies={model: make_policy(settings, path) for model, (settings, path) in routing.items()},
            cold_starts={model: timeout_s for model, (_, timeout_s) in cold_starts.items()},
            start_replica=self.start_replica,
        )
        try:
            self.router.start(host, port)
        except OSError as exc:
            raise RuntimeError(f"the router cannot listen on {host}:{port}: {exc}") from None
        logger.info("raylm router listening on http://%s:%d", host, port)

    def start_replica(self, model: str) -> None:
        """Have Serve start a replica of a model scaled to zero, and return once it runs: a call through the
        model's deployment handle waits at the handle, which Serve counts as demand (called off the loop)."""
        app, timeout_s = self.cold_starts[model]
        serve.get_deployment_handle("Model", app_name=app).wake.remote().result(timeout_s=timeout_s)

    def register(
        self, model: str, url: str, replica_id: str, card: dict | None, api_key: str | None,
        kv_events: tuple[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.router.register(model, url, replica_id, card, api_key, kv_events)

    def deregister(self, replica_id: str) -> None:
        self.router.deregister(replica_id)

    def retire(self, replica_id: str) -> int:
        return self.router.retire(replica_id)

    def load(self, model: str, replica_id: str) -> float:
        return self.router.load(model, replica_id)

    async def drain(self, timeout_s: float) -> int:
        """Take no new requests; return once those taken are answered, or after `timeout_s` with how many
        are not."""
        await asyncio.to_thread(self.router.start_draining)
        return await count_down(lambda: asyncio.to_thread(self.router.unfinished), timeout_s)

    def check_health(self) -> None:
        if not self.router.is_alive():
            raise RuntimeError("the router thread has stopped")

    def __del__(self) -> None:
        self.router.stop()


def _log_where_serve_logs() -> None:
    """raylm's own log lines (the router's, the access log) go where Serve writes this replica's, at INFO:
    its file under Ray's session logs (`serve/replica_*.log`)."""
    ours = logging.getLogger("raylm")
    ours.setLevel(logging.INFO)
    ours.handlers = list(logging.getLogger("ray.serve").handlers)
    ours.propagate = False


def _node_ip() -> str:
    """This node's IP as Ray registered it (`ray.util.get_node_ip_address()` guesses by routing instead)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return next(node["NodeManagerAddress"] for node in ray.nodes() if node["NodeID"] == node_id)


class ModelReplica:
    """One replica of one model: the engine's server plus its registration with the router."""

    async def __init__(self, deployment: ModelDeployment, engine_class: type[Engine], router_app: str):
        self.deployment = deployment
        self.engine = engine_class(deployment)
        if self.engine.takes_api_key:  # a key of this replica's own: only the router can reach its engine
            self.engine.api_key = secrets.token_urlsafe(32)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.router = serve.get_deployment_handle("RouterReplica", app_name=router_app)
        started = time.monotonic()
        self.url = await self.engine.start(_node_ip())
        logger.info("model %s: engine ready at %s after %.1fs", deployment.name, self.url, time.monotonic() - started)
        self.card = await asyncio.to_thread(_model_card, self.url, deployment.name, self.engine.api_key)
        await self._register()
        self.heartbeat = asyncio.get_running_loop().create_task(self._heartbeat())

    async def _register(self) -> None:
        events = self.engine.kv_events_url
        await self.router.register.remote(
            self.deployment.name, self.url, self.replica_id, self.card, self.engine.api_key,
            (events, self.engine.kv_events_follower) if events else None,
        )  # fmt: skip

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            if not self.engine.running():
                # Its engine exited: the router forgets it now (a heartbeat would bring it back), and Serve's
                # health check replaces the replica.
                logger.warning("model %s: the engine exited; leaving the router", self.deployment.name)
                await self.router.deregister.remote(self.replica_id)
                return
            try:
                await self._register()
            except Exception as exc:  # the router restarts: keep trying, it relearns us on the next beat
                logger.warning("model %s: heartbeat to the router failed: %s", self.deployment.name, exc)

    async def check_health(self) -> None:
        await self.engine.check_health()

    def wake(self) -> None:
        """What the router calls to start a replica when there is none: answering is all it takes."""

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve asks each replica for its load (with autoscaling): the router is where the requests are."""
        return {LOAD_METRIC: await self.router.load.remote(self.deployment.name, self.replica_id)}

    async def __del__(self) -> None:
        heartbeat = getattr(self, "heartbeat", None)
        if heartbeat is not None:
            heartbeat.cancel()
            try:
                await self._drain()
                await asyncio.wait_for(self.router.deregister.remote(self.replica_id), timeout=5)
            except Exception as exc:  # the router may already be gone
                logger.info("model %s: could not deregister: %s", self.deployment.name, exc)
        await self.engine.stop()

    async def _drain(self) -> None:
        """Serve removes this replica (a scale-down, a replacement, a stop): the router gives it no new
        requests, and the engine stops once those it has are answered (or after REPLICA_DRAIN_S)."""
        left = await count_down(
            lambda: asyncio.wait_for(self.router.retire.remote(self.replica_id), timeout=5), REPLICA_DRAIN_S
        )
        if left:
            logger.warning("model %s: stopping with %d request(s) unfinished", self.deployment.name, left)


def _model_card(url: str, name: str, api_key: str | None) -> dict | None:
    """The engine's own `/v1/models` entry for this model (carries e.g. max_model_len)."""
    request = urllib.request.Request(f"{url}/v1/models")
    if api_key is not None:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            cards = json.load(response).get("data", [])
    except (OSError, ValueError):
        return None
    return next((c for c in cards if c.get("id") == name), None)
