"""The engine contract: what an inference engine plugin implements.

An engine turns a `ModelDeployment` into an OpenAI-compatible HTTP server that
runs inside a Ray Serve replica. raylm's router forwards each request's bytes to
that server unchanged, so the engine's own server sits directly behind one hop.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from raylm.errors import ConfigError
from raylm.model_settings import (
    DEFAULT_MAX_ONGOING_REQUESTS,
    DEFAULT_MAX_QUEUED_REQUESTS,
    Autoscaling,
    Limits,
    Routing,
)
from raylm.names import check_name


def args_to_argv(engine_args: Mapping[str, Any]) -> tuple[str, ...]:
    """Turn `{"max_model_len": 256, "enforce_eager": True}` into engine CLI tokens.

    True becomes a bare flag, False `--no-FLAG`, a list repeats its values after one flag.
    """
    argv: list[str] = []
    for key, value in engine_args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif value is not None:
            argv += [flag, str(value)]
    return tuple(argv)


@dataclass(frozen=True)
class ModelDeployment:
    """One model to serve: what the user asked for, engine-agnostic.

    `engine_args` are in the engine's own command-line vocabulary
    (`("--max-model-len", "256")`) and reach the engine unchanged.
    """

    model: str
    name: str
    engine: str
    engine_args: tuple[str, ...] = ()
    replicas: int = 1
    # Python interpreter the replicas run in (a venv holding this engine), or None for the driver's.
    python: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    # Backpressure, enforced by the router: requests at once per replica, and waiting for the model.
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    # Replicas between bounds, following the load (then `replicas` is not used).
    autoscaling: Autoscaling | None = None
    # How the router picks one of its replicas for a request.
    routing: Routing = Routing()

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("a model needs a path or an id")
        if not self.name or any(c.isspace() for c in self.name):
            raise ConfigError(f"model name {self.name!r} is invalid: use a non-empty name without spaces")
        check_name("engine", self.engine)
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ConfigError(f"model {self.name!r}: replicas must be a whole number >= 1, got {self.replicas!r}")
        try:
            Limits(self.max_ongoing_requests, self.max_queued_requests)  # checks them
        except ConfigError as exc:
            raise ConfigError(f"model {self.name!r}: {exc}") from None
        object.__setattr__(self, "engine_args", tuple(str(a) for a in self.engine_args))
        object.__setattr__(self, "env", dict(self.env))

    @property
    def limits(self) -> Limits:
        return Limits(self.max_ongoing_requests, self.max_queued_requests)

    @property
    def replica_bounds(self) -> list[int]:
        """[min, max] replicas."""
        if self.autoscaling is None:
            return [self.replicas, self.replicas]
        return [self.autoscaling.min_replicas, self.autoscaling.max_replicas]

    @property
    def max_replicas(self) -> int:
        return self.replica_bounds[1]

    def describe_replicas(self) -> str:
        if self.autoscaling is None:
            return f"{self.replicas} replica(s)"
        scaling = self.autoscaling
        bounds = f"{scaling.min_replicas}-{scaling.max_replicas}"
        return f"{bounds} replicas, autoscaled ({scaling.target_ongoing_requests:g} requests each)"


@dataclass(frozen=True)
class ReplicaResources:
    """What one replica needs from Ray, so Ray schedules it honestly.

    With `bundles`, the replica gets a placement group of those bundles
    (the first bundle hosts the replica actor itself).
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    bundles: tuple[Mapping[str, float], ...] = ()
    strategy: str = "STRICT_PACK"

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("replica resources cannot be negative")
        object.__setattr__(self, "bundles", tuple(dict(b) for b in self.bundles))


class Engine(ABC):
    """Base class of every engine. One instance per model deployment.

    `validate` and `resources` run where `raylm serve` runs, before anything starts;
    `start`, `check_health` and `stop` run inside each Ray Serve replica.
    """

    # True when the engine's server can be told to require a key: the replica then sets `api_key` before
    # `start`, the router sends that key with every request, and nothing else reaches the engine's routes.
    takes_api_key: bool = False
    # How the router follows the KV-cache events the engine publishes, if it can (the `precise` routing
    # policy needs them): "module:function", `follow(url, deliver, stopping)`, run by the router on a
    # thread of its own for each replica (see `raylm.serving.kv_events`).
    kv_events_follower: str | None = None
    # Set by `start` when the engine publishes its events: where the router follows them.
    kv_events_url: str | None = None

    def __init__(self, deployment: ModelDeployment):
        self.deployment = deployment
        self.api_key: str | None = None

    @abstractmethod
    def validate(self) -> None:
        """Check the engine arguments with the engine's own parser.

        Raise `raylm.errors.ConfigError` with the engine's message on a bad argument.
        """

    @abstractmethod
    def resources(self) -> ReplicaResources:
        """The resources one replica needs, derived from the engine arguments."""

    @abstractmethod
    async def start(self, host: str) -> str:
        """Start serving inside the replica; return the base URL of an OpenAI-compatible server.

        The server must answer `/v1/models`, `/v1/completions`, `/v1/chat/completions`
        (and `/v1/embeddings` for embedding models) and return only when it can answer.
        """

    @abstractmethod
    async def check_health(self) -> None:
        """Raise if the engine can no longer answer; Ray Serve then replaces the replica."""

    def running(self) -> bool:
        """False once the engine has stopped for good (its process exited): the replica then leaves the
        router at once, before Serve's health check notices. Cheap: called with every heartbeat."""
        return True

    @abstractmethod
    async def stop(self) -> None:
        """Stop everything `start` started. Must be safe to call more than once."""
