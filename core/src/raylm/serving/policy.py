"""How the router picks one of a model's replicas for a request: a routing policy.

A policy sees the replicas that may take the request now (each with its requests in flight) and
returns one, with the reason (for `raylm_routing_decisions_total`). Policies, by name:

- `least-in-flight`: the replica with the fewest requests in flight.
- `approximate`: prefix-aware, from what the router itself sent where (the prompt's text in blocks):
  for engines that publish nothing of their cache.
- `precise`: prefix-aware, from the engines' own KV-cache events (the prompt's tokens, as the engine
  makes them, in the engine's blocks); the approximate prefix while no event has come.

A prefix-aware policy scores each replica as llm-d's scheduler does, the prefix it holds against
its load:

    score = prefix_weight x (blocks of the prompt it holds / blocks of the prompt)
            - load_weight x in_flight / (mean in_flight of the candidates + 1)

and takes the best (equal scores take turns); the reason is `prefix` (it holds the most of the
prompt), `spilled` (another held more, but was too busy) or `load` (no replica holds any of it).
The load term has no ceiling, so a replica holding a hot prefix takes that tenant's requests only
until it is busier than the others by about prefix_weight / load_weight x (mean + 1): a hot tenant
spreads instead of queueing on one replica, and where no prefix is shared the policy is
least-in-flight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from raylm.model_settings import Routing
from raylm.serving.prefix_index import PrefixIndex
from raylm.serving.prompts import Tokenizing, text_prefix, token_prefix
from raylm.serving.routes import Upstream

# How long the approximate index believes a replica holds what it was sent: about how long an engine's
# prefix cache keeps an unused prompt under load (a guess: the precise policy needs none).
APPROXIMATE_TTL_S = 300.0


class RoutingPolicy(Protocol):
    name: str
    follows_events: bool  # its index is fed by the replicas' KV-cache events (`index`)
    index: PrefixIndex | None

    def choose(self, replicas: list[Upstream], request: dict[str, Any]) -> tuple[Upstream, str]:
        """One of `replicas` (never empty) for `request`, the parsed JSON body, and why (a short word)."""

    def forget(self, replica: str) -> None:
        """The replica left: whatever the policy believed it held is gone."""


class LeastInFlight:
    """The replica with the fewest requests in flight; equally busy replicas take turns."""

    name = "least-in-flight"
    follows_events = False
    index = None

    def __init__(self) -> None:
        self.turn = 0

    def forget(self, replica: str) -> None:
        pass

    def choose(self, replicas: list[Upstream], request: dict[str, Any]) -> tuple[Upstream, str]:
        fewest = min(upstream.in_flight for upstream in replicas)
        idlest = [upstream for upstream in replicas if upstream.in_flight == fewest]
        self.turn += 1
        return idlest[self.turn % len(idlest)], "load"


class PrefixAware:
    """Scores replicas by the prefix they hold and their load (see the module's docstring)."""

    def __init__(
        self,
        name: str,
        index: PrefixIndex,
        prefix_of: Callable[[dict[str, Any]], list[int] | None],
        weights: Routing = Routing(),
        record: bool = False,
        fallback: RoutingPolicy | None = None,
    ):
        """`prefix_of(request)`: the request's chained block keys (None: not known yet: `fallback` chooses);
        `record`: the index learns from the choices themselves (the approximate policy)."""
        self.name, self.index, self.prefix_of, self.fallback = name, index, prefix_of, fallback
        self.weights, self.record = weights, record
        self.follows_events = not record
        self.turn = 0

    def forget(self, replica: str) -> None:
        self.index.forget(replica)
        if self.fallback is not None:
            self.fallback.forget(replica)

    def choose(self, replicas: list[Upstream], request: dict[str, Any]) -> tuple[Upstream, str]:
        keys = self.prefix_of(request)
        if keys is None:
            return (self.fallback or LeastInFlight()).choose(replicas, request)
        matched = self.index.matched(keys, [u.replica_id for u in replicas]) if keys else {}
        mean = sum(u.in_flight for u in replicas) / len(replicas)
        self.turn += 1

        def score(position: int) -> tuple[float, int]:
            upstream = replicas[position]
            held = matched.get(upstream.replica_id, 0) / len(keys) if keys else 0.0
            value = self.weights.prefix_weight * held - self.weights.load_weight * upstream.in_flight / (mean + 1)
            return value, (position - self.turn) % len(replicas)  # equal scores take turns

        best = replicas[max(range(len(replicas)), key=score)]
        if self.record and keys:
            self.index.record(best.replica_id, keys)
        most = max(matched.values(), default=0)
        if not most:
            return best, "load"  # no replica holds any of it
        return best, "prefix" if matched[best.replica_id] == most else "spilled"


def make_policy(routing: Routing, tokenizer_path: str | None = None) -> RoutingPolicy:
    """A model's policy, as its settings say (the precise one reads prompts with the tokenizer at
    `tokenizer_path`, the model's own)."""
    if routing.policy == "least-in-flight":
        return LeastInFlight()
    index = PrefixIndex(ttl_s=APPROXIMATE_TTL_S)
    approximate = PrefixAware("approximate", index, text_prefix, routing, record=True)
    if routing.policy == "approximate":
        return approximate
    events = PrefixIndex()
    tokens = token_prefix(Tokenizing(tokenizer_path), lambda: events.block_size)
    return PrefixAware("precise", events, tokens, routing, fallback=approximate)
