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

and takes the best. Equal scores go to the prompt's "home", the first of the replicas ranked by a
hash of the prompt's first HOME_TOKENS tokens and their ids (rendezvous hashing): a new tenant's
concurrent first requests land together, and every router process ranks alike. The reason is
`prefix` (it holds the most of the prompt), `spilled` (another held more, but was too busy) or
`load` (no replica holds any of it).
The load term has no ceiling, so a replica holding a hot prefix takes that tenant's requests only
until it is busier than the others by about prefix_weight / load_weight x (mean + 1): a hot tenant
spreads instead of queueing on one replica, and where no prefix is shared the policy is
least-in-flight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from raylm.model_settings import Routing
from raylm.serving.prefix_index import PrefixIndex, digest
from raylm.serving.prompts import TEXT_BLOCK_TOKENS, Tokenizing, text_prefix, token_prefix
from raylm.serving.routes import Upstream

# How long the approximate index believes a replica holds what it was sent: about how long an engine's
# prefix cache keeps an unused prompt under load (a guess: the precise policy needs none).
APPROXIMATE_TTL_S = 300.0
# A prompt's home is ranked by its first 512 tokens (in the index's blocks; text blocks are about 32 tokens): a
# tenant's system prompt past the chat template's opening, not the question.
HOME_TOKENS = 512


class Choice(NamedTuple):
    upstream: Upstream
    reason: str  # prefix, spilled or load
    held: int = 0  # blocks of the prompt the replica held, as the policy believed
    blocks: int = 0  # blocks of the prompt


class RoutingPolicy(Protocol):
    name: str
    follows_events: bool  # its index is fed by the replicas' KV-cache events (`index`)
    index: PrefixIndex | None
    tokenizes: bool  # `prefix` tokenizes the prompt: the router calls it off its event loop

    def prefix(self, request: dict[str, Any]) -> list[int] | None:
        """What the policy reads of `request`, the parsed JSON body, to choose by: its prompt's chained block
        keys ([]: none; None: not readable yet)."""

    def choose(self, replicas: list[Upstream], request: dict[str, Any], prefix: list[int] | None) -> Choice:
        """One of `replicas` (never empty) for `request`, whose `prefix` was read, and why (a short word)."""

    def forget(self, replica: str) -> None:
        """The replica left: whatever the policy believed it held is gone."""


class LeastInFlight:
    """The replica with the fewest requests in flight; equally busy replicas take turns."""

    name = "least-in-flight"
    follows_events = False
    index = None
    tokenizes = False

    def __init__(self) -> None:
        self.turn = 0

    def forget(self, replica: str) -> None:
        pass

    def prefix(self, request: dict[str, Any]) -> list[int]:
        return []

    def choose(self, replicas: list[Upstream], request: dict[str, Any], prefix: list[int] | None = None) -> Choice:
        fewest = min(upstream.in_flight for upstream in replicas)
        idlest = [upstream for upstream in replicas if upstream.in_flight == fewest]
        self.turn += 1
        return Choice(idlest[self.turn % len(idlest)], "load")


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
        self.name, self.index, self.prefix, self.fallback = name, index, prefix_of, fallback
        self.weights, self.record = weights, record
        self.follows_events = self.tokenizes = not record
        self.least = LeastInFlight()  # for prompts too short to hold a block

    def forget(self, replica: str) -> None:
        self.index.forget(replica)
        if self.fallback is not None:
            self.fallback.forget(replica)

    def choose(self, replicas: list[Upstream], request: dict[str, Any], prefix: list[int] | None) -> Choice:
        if prefix is None:
            fallback = self.fallback or self.least
            return fallback.choose(replicas, request, fallback.prefix(request))
        if not prefix:
            return self.least.choose(replicas, request)
        matched = self.index.matched(prefix, [u.replica_id for u in replicas])
        mean = sum(u.in_flight for u in replicas) / len(replicas)
        home = prefix[min(len(prefix), HOME_TOKENS // (self.index.block_size or TEXT_BLOCK_TOKENS)) - 1]

        def score(upstream: Upstream) -> tuple[float, int]:
            held = matched[upstream.replica_id] / len(prefix)
            value = self.weights.prefix_weight * held - self.weights.load_weight * upstream.in_flight / (mean + 1)
            return value, hash((home, digest(upstream.replica_id)))

        best = max(replicas, key=score)
        if self.record:
            self.index.record(best.replica_id, prefix)
        most = max(matched.values())
        held = matched[best.replica_id]
        reason = "load" if not most else "prefix" if held == most else "spilled"  # load: no replica holds any
        return Choice(best, reason, held, len(prefix))


def make_policy(routing: Routing, tokenizer_path: str | None = None) -> RoutingPolicy:
    """A model's policy, as its settings say (the precise one reads prompts with the tokenizer at
    `tokenizer_path`, the model's own)."""
    if routing.policy == "least-in-flight":
        return LeastInFlight()
    if routing.policy is None:  # the engine's best, unknown here (a serve resolves it): the one any engine allows
        routing = routing.for_engine(publishes_events=False)
    index = PrefixIndex(ttl_s=APPROXIMATE_TTL_S)
    approximate = PrefixAware("approximate", index, text_prefix, routing, record=True)
    if routing.policy == "approximate":
        return approximate
    events = PrefixIndex()
    tokens = token_prefix(Tokenizing(tokenizer_path), lambda: events.block_size)
    return PrefixAware("precise", events, tokens, routing, fallback=approximate)
