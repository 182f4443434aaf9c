"""How the router picks one of a model's replicas for a request: a routing policy.

A policy sees the replicas that serve the model now (each with its requests in flight) and
returns one. Least-in-flight is the first; policies that know what each replica holds (its
prefix cache, its LoRA adapters) implement the same method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from raylm.serving.routes import Upstream


class RoutingPolicy(Protocol):
    def choose(self, replicas: list[Upstream], request: dict) -> Upstream:
        """One of `replicas` (never empty) for `request`, the parsed JSON body."""


class LeastInFlight:
    """The replica with the fewest requests in flight; equally busy replicas take turns."""

    def __init__(self) -> None:
        self.turn = 0

    def choose(self, replicas: list[Upstream], request: dict) -> Upstream:
        fewest = min(upstream.in_flight for upstream in replicas)
        idlest = [upstream for upstream in replicas if upstream.in_flight == fewest]
        self.turn += 1
        return idlest[self.turn % len(idlest)]
