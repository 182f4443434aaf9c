"""What raylm remembers of a deployment it started, so `raylm status` and `raylm stop` find it from any shell."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from raylm.errors import ConfigError
from raylm.state import Records


@dataclass(frozen=True)
class DeploymentRecord:
    """One deployment: where it answers, its Serve applications, and the cluster it runs on."""

    name: str
    url: str  # the endpoint clients use, without /v1
    models: tuple[str, ...]
    router_app: str
    model_apps: tuple[str, ...]
    backend: str
    backend_options: dict[str, Any]  # the backend's options, `cluster` included
    address: str  # the Ray cluster's
    owns_cluster: bool  # the deployment started the cluster, so stopping it stops the cluster
    head_is_local: bool  # the router listens on this machine
    host: str
    port: int
    api_key_file: str | None = None  # where the router reads the endpoint's keys (the path, never a key)
    # Each model's replica bounds: [min, max] (the same number twice without autoscaling).
    replica_bounds: dict[str, list[int]] = field(default_factory=dict)
    routing: dict[str, str] = field(default_factory=dict)  # each model's routing policy
    started: float = field(default_factory=time.time)

    @property
    def apps(self) -> tuple[str, ...]:
        return (self.router_app, *self.model_apps)


class DeploymentRecords:
    """The records under `$RAYLM_HOME/deployments`, one JSON file each."""

    def __init__(self) -> None:
        self.store = Records("deployments")

    def save(self, record: DeploymentRecord) -> None:
        self.store.save(record.name, dataclasses.asdict(record))

    def load(self, name: str) -> DeploymentRecord | None:
        data = self.store.load(name)
        if data is None:
            return None
        try:
            data.update(models=tuple(data["models"]), model_apps=tuple(data["model_apps"]))
            return DeploymentRecord(**data)
        except (KeyError, TypeError):
            raise ConfigError(
                f"the record of deployment {name!r} was written by another raylm version: stop that deployment "
                f"with it, or remove {self.store.path(name)}"
            ) from None

    def names(self) -> list[str]:
        return self.store.names()

    def delete(self, name: str) -> None:
        self.store.delete(name)


DEPLOYMENTS = DeploymentRecords()
