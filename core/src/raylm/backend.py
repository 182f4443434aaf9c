"""The backend contract: where the Ray cluster comes from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raylm.errors import ClusterError
from raylm.net import address_answers

if TYPE_CHECKING:
    from raylm.config import ServePlan

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ClusterStatus:
    """How a cluster is: its Ray address, dashboard, and nodes alive out of those expected."""

    backend: str
    name: str
    address: str
    dashboard_url: str | None = None
    nodes_alive: int = 0
    nodes_expected: int = 0
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "name": self.name,
            "address": self.address,
            "dashboard_url": self.dashboard_url,
            "nodes_alive": self.nodes_alive,
            "nodes_expected": self.nodes_expected,
            **dict(self.details),
        }


class Backend(ABC):
    """Base class of every cluster backend.

    `options` holds the values of the `BackendOption`s the backend's spec declares
    (missing ones at their defaults), plus `cluster`, the cluster's name.
    """

    # True when the cluster's head, where the router listens, is this machine.
    head_is_local: bool = False
    # True when the cluster may add nodes for demand it cannot place (e.g. Ray's autoscaler): a replica
    # that fits no node now is then waited for instead of refused.
    may_add_nodes: bool = False

    def __init__(self, options: Mapping[str, Any]):
        self.options = dict(options)
        self.cluster_name: str = self.options.get("cluster") or "default"

    @abstractmethod
    def up(self, progress: Progress) -> ClusterStatus:
        """Start the cluster, or connect to the one already running; return once it is usable.

        Idempotent: a second `up` with the same name reuses what runs.
        """

    @abstractmethod
    def status(self) -> ClusterStatus | None:
        """The cluster as it is now, or None when no such cluster runs."""

    @abstractmethod
    def down(self, progress: Progress) -> None:
        """Stop everything `up` started. A cluster raylm only connected to is left running."""

    def client_environment(self) -> dict[str, str]:
        """Environment a Ray driver needs to connect to this cluster (e.g. token authentication)."""
        return {}

    def scale(self, workers: int, progress: Progress) -> ClusterStatus:
        """Change the number of worker nodes."""
        raise ClusterError(f"the {type(self).__name__} backend cannot scale; it has a fixed set of nodes")

    def check_plan(self, plan: ServePlan) -> None:  # noqa: B027 - optional: by default any plan is fine
        """Refuse (raise `raylm.errors.ConfigError`) a plan this cluster cannot serve safely, before anything
        starts: e.g. an endpoint the platform opens to anyone, without the endpoint's keys."""

    def remember_plan(self, plan: ServePlan) -> None:  # noqa: B027 - optional: by default nothing is kept
        """`plan` now serves on this cluster. A backend whose cluster can lose its head and come back by
        itself keeps the plan, to serve it again there (cai); the default keeps nothing."""

    def forget_plan(self, name: str) -> None:  # noqa: B027 - optional, as remember_plan
        """The deployment `name` is being stopped: serve it no more, whatever happens to the cluster."""


def connect_ray(address: str, environment: Mapping[str, str]) -> None:
    """Connect this process to the cluster at `address` as a Ray driver (once; later calls keep the connection).

    Call it before importing `ray` elsewhere: Ray reads settings such as its authentication mode at import.
    """
    import os

    # Ray reads its authentication settings from the environment when it starts its client.
    os.environ.update(environment)
    import logging

    import ray

    if not ray.is_initialized():
        # ray.init would retry a dead address for minutes; say so at once instead.
        if not address_answers(address, timeout_s=5):
            raise ClusterError(f"no Ray cluster answers at {address}; see `raylm cluster status`")
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, namespace="raylm")
