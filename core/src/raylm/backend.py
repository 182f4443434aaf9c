"""The backend contract: where the Ray cluster comes from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from raylm.errors import ClusterError

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

    def scale(self, workers: int, progress: Progress) -> ClusterStatus:
        """Change the number of worker nodes."""
        raise ClusterError(f"the {type(self).__name__} backend cannot scale; it has a fixed set of nodes")
